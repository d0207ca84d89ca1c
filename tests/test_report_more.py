"""Reports and gates, issue 26: integrity checks as gate metrics and --strict (4), the report's default --out and
--force (6), pictures found wherever the report runs (7), UAP numbers in HTML and CSV (8), readable scatter labels
and a UAP grid that fits the page (18). Hand-written records: no model runs here."""

import base64
import json

import pytest
import typer

EPS = {"4/255": 4 / 255, "8/255": 8 / 255}


def _checks(failed: tuple[str, ...] = ()) -> list[dict]:
    """Two eps of cheap checks; the ``name@eps`` entries in ``failed`` fail."""
    return [{"name": n, "value": 0, "passed": f"{n}@{e}" not in failed, "detail": "", "eps": e}
            for e in EPS for n in ("no_nan", "in_unit_range")] + [{"name": "eps0_equals_clean", "value": 0,
                                                                    "passed": "eps0_equals_clean" not in failed}]


def _robust(cell: str, failed: tuple[str, ...] = ()) -> dict:
    checks = _checks(failed)
    return {"schema": "clipguard.result/1", "task": "robustness", "dataset": "toy", "model_spec": "toy",
            "metrics": {"acc1": 0.9, "robust": [{"attack": "pgd", "eps": e, "eps_value": v, "robust_acc": 0.5,
                                                 "attack_success_rate": 0.4} for e, v in EPS.items()]},
            "checks": checks, "checks_passed": all(c["passed"] for c in checks),
            "bench": {"label": cell, "cell": cell}}


def _uap(pngs: list[str]) -> dict:
    return {"schema": "clipguard.result/1", "task": "uap_evaluation", "dataset": "toy", "model_spec": "toy",
            "attack": {"eps": {"text": "16/255", "value": 16 / 255}},
            "metrics": {"fooling_rate": 0.8125, "acc1": 0.9375, "perturbed_acc": 0.1875, "attack_success_rate": 0.8},
            "checks": [{"name": "norm_within_eps", "value": 0.06, "passed": True}], "checks_passed": True,
            "pngs": pngs, "bench": {"label": "toy CLIP", "cell": "base-uap"}}


def _write(folder, **records):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rec in records.items():
        (folder / f"{name}.json").write_text(json.dumps(rec))
    return folder


def _rules(path, *rules):
    path.write_text("rules = [" + ", ".join(json.dumps(r) for r in rules) + "]\n")
    return path


# ------------------------------------------------------------------ 4: checks as gate metrics, --strict


def test_checks_passed_and_each_check_by_name_are_gate_metrics(tmp_path):
    from clipguard.records.rows import load_records, rows
    from clipguard.report.gate import evaluate_rule, parse_rule

    rs = rows(load_records(_write(tmp_path / "r", good=_robust("good"), bad=_robust("bad", ("no_nan@8/255",)))))

    def holds(rule: str):
        o = evaluate_rule(parse_rule(rule), rs)
        return o.passed, o.message

    assert holds("checks_passed(cell=good) == 1")[0]
    passed, msg = holds("checks_passed == 1")
    assert not passed and "bad" in msg and "good" not in msg.split(":", 1)[1]
    assert holds("checks_passed(check=in_unit_range) == 1")[0]
    passed, msg = holds("checks_passed(check=no_nan) == 1")
    assert not passed and "no_nan@8/255" in msg and "(bad)" in msg
    assert holds("checks_passed(check=no_nan, eps=4/255) == 1")[0]  # the eps filter narrows to the passing ones
    assert holds("checks_passed(check=no_nan, cell=good) == 1")[0]
    passed, msg = holds("checks_passed(check=no_nam) == 1")  # a misspelt check matches nothing: fails, lists names
    assert not passed and "no record matches" in msg and "no_nan" in msg


def test_gate_strict_fails_on_a_failed_check_even_when_the_rules_hold(tmp_path, cli):
    good = _write(tmp_path / "good", a=_robust("a"))
    bad = _write(tmp_path / "bad", a=_robust("a"), b=_robust("b", ("eps0_equals_clean",)))
    rules = _rules(tmp_path / "g.toml", "clean_acc1 >= 0.5")
    assert cli("gate", bad, "--rules", rules)[0] == 0
    code, _, err = cli("gate", bad, "--rules", rules, "--strict")
    assert code == 1 and "checks_passed == 1" in err and "eps0_equals_clean" in err
    assert cli("gate", good, "--rules", rules, "--strict")[0] == 0


def _record_commands():
    """(path, click command) of every command: cache / datasets write no record and take no --strict."""
    from typer.main import get_command

    from clipguard.cli.app import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group (Typer ships its own click: no isinstance check)
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    return [(p, c) for p, c in walk(get_command(app), []) if p.split()[0] not in ("cache", "datasets")]


def test_every_command_offers_strict_and_no_config_holds_it():
    from clipguard.cli.options import config_of
    from clipguard.config import option_fields

    commands = _record_commands()
    assert {p for p, _ in commands} >= {"eval", "attack", "certify", "finetune", "prepare", "uap fit", "uap eval",
                                        "bench run", "report", "gate"}
    for path, cmd in commands:
        assert any("--strict" in p.opts for p in cmd.params), path
        cfg = config_of(cmd.callback)  # --strict decides an exit code: never a config field, record or hash
        assert cfg is None or "strict" not in {f.name for f in option_fields(cfg)}, path


def test_emit_strict_exits_1_after_the_record_is_written(tmp_path, capsys):
    from clipguard.cli.output import emit

    bad, good = _robust("b", ("no_nan@8/255",)), _robust("g")
    emit(bad, out=tmp_path / "lenient.json", as_json=True, table=None)  # without --strict: exit 0
    with pytest.raises(typer.Exit) as e:
        emit(bad, out=tmp_path / "bad.json", as_json=True, table=None, strict=True)
    assert e.value.exit_code == 1
    assert json.loads((tmp_path / "bad.json").read_text())["checks_passed"] is False
    assert "no_nan@8/255" in capsys.readouterr().err
    emit(good, out=tmp_path / "good.json", as_json=True, table=None, strict=True)  # all passed: no exit
    with pytest.raises(typer.Exit):  # a record that says it failed without naming a check fails too
        emit({"checks": [], "checks_passed": False}, out=None, as_json=True, table=None, strict=True)


def test_eval_strict_through_the_cli(tmp_path, cli, fake_task):
    import clipguard.tasks.eval as task

    fake_task(task, "run_eval", _robust("b", ("no_nan@8/255",)))
    args = ("eval", "--model", "toy", "--dataset", "toy", "--device", "cpu", "--json", "--out")
    code, out, err = cli(*args, tmp_path / "b.json", "--strict")
    assert code == 1 and (tmp_path / "b.json").exists() and json.loads(out)["checks_passed"] is False
    assert err.strip().splitlines() == [err.strip()] and "--strict" in err
    fake_task(task, "run_eval", _robust("g"))
    assert cli(*args, tmp_path / "c.json", "--strict")[0] == 0


def test_bench_and_report_strict(tmp_path, cli):
    recs = _write(tmp_path / "runs", a=_robust("a"), b=_robust("b", ("no_nan@4/255",)))
    code, _, err = cli("report", recs, "--strict")
    assert code == 1 and (recs / "report.md").exists() and "b" in err
    assert cli("report", recs)[0] == 0
    (recs / "b.json").unlink()
    assert cli("report", recs, "--strict")[0] == 0


# ------------------------------------------------------------------ 6: --out inside RECORDS, --force


def test_report_default_out_is_inside_records_not_the_current_folder(tmp_path, cli, monkeypatch):
    recs = _write(tmp_path / "runs", a=_robust("a"))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, _ = cli("report", recs, "--json")
    assert code == 0 and json.loads(out)["out"] == str(recs / "report.md")
    assert (recs / "report.md").read_text().startswith("# clipguard report") and (recs / "report_files").is_dir()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("flag, name", [("--out", "notes.md"), ("--html", "page.html"), ("--csv", "table.csv")])
def test_report_keeps_a_file_it_did_not_write_unless_forced(tmp_path, cli, flag, name):
    recs = _write(tmp_path / "runs", a=_robust("a"))
    theirs = tmp_path / name
    theirs.write_text("someone's own file\n")
    code, _, err = cli("report", recs, flag, theirs)
    assert code == 2 and "--force" in err and flag in err and len(err.strip().splitlines()) == 1
    assert theirs.read_text() == "someone's own file\n" and not (recs / "report.md").exists()  # nothing written
    assert cli("report", recs, flag, theirs)[0] == 2
    from clipguard.report.files import written_by_report

    assert cli("report", recs, flag, theirs, "--force")[0] == 0 and written_by_report(theirs)
    assert cli("report", recs, flag, theirs)[0] == 0  # its own file: replaced on a rerun without --force


# ------------------------------------------------------------------ 7, 8: pictures from elsewhere, UAP numbers


def _pictures(folder):
    import torch

    from clipguard.report.uap_pictures import uap_pictures

    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=g)
    v = (torch.rand(1, 3, 16, 16, generator=g) - 0.5) / 8
    pred = torch.arange(8) % 3
    return uap_pictures(v, x, (x + v).clamp(0, 1), pred, (pred + 1) % 3, pred, ["a", "b", "c"], folder)


def test_report_pictures_and_uap_numbers_do_not_depend_on_the_current_folder(tmp_path, monkeypatch):
    from clipguard.report.build import build_report

    bench = tmp_path / "bench"
    bench.mkdir()
    monkeypatch.chdir(bench)  # the suite ran here: its records name pictures relative to this folder
    pngs = _pictures("runs/uap_png/base-uap")
    _write(bench / "runs" / "records", pgd=_robust("base-pgd"), uap=_uap(pngs))
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    build_report("../bench/runs", "r2.md", html_out="r2.html", csv_out="r2.csv")
    md = (elsewhere / "r2.md").read_text()
    links = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![uap")]
    assert [(elsewhere / link).resolve() for link in links] == [(bench / p).resolve() for p in pngs]
    page = (elsewhere / "r2.html").read_text()
    for p in pngs:
        assert base64.b64encode((bench / p).read_bytes()).decode() in page
    assert "<h2>Universal perturbations</h2>" in page and "0.8125" in page and "0.1875" in page  # item 8
    rows = [line.split(",") for line in (elsewhere / "r2.csv").read_text().splitlines()]
    uap_row = dict(zip(rows[0], next(r for r in rows[1:] if r[3] == "uap_evaluation"), strict=True))
    assert uap_row["fooling_rate"] == "0.8125" and uap_row["perturbed_acc"] == "0.1875" and uap_row["eps"] == "16/255"
    # the twin: a picture that is gone is left out, not linked to a path that does not exist
    (bench / pngs[0]).unlink()
    info = build_report("../bench/runs", "r3.md")
    assert info["uap_pictures"] == [str((bench / pngs[1]).resolve())]


def test_report_without_uap_records_has_no_uap_section(tmp_path):
    from clipguard.report.build import build_report

    recs = _write(tmp_path / "runs", a=_robust("a"))
    build_report(recs, tmp_path / "r.md", html_out=tmp_path / "r.html")
    assert "Universal perturbations" not in (tmp_path / "r.html").read_text()
    assert "Universal perturbations" not in (tmp_path / "r.md").read_text()


# ------------------------------------------------------------------ 18: scatter labels, UAP grid width

CROWD = [("toy CLIP (toy)", 0.999, 0.059), ("toy CLIP + LoRA (CE) (toy)", 0.858, 0.229),
         ("toy CLIP + LoRA (TeCoA) (toy)", 0.918, 0.139), ("toy CLIP + VPT (toy)", 0.93, 0.12),
         ("toy CLIP + VPT-2 (toy)", 0.93, 0.12), ("another model (toy)", 0.91, 0.14)]


def _axes():
    from clipguard.report.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    for _, x, y in CROWD:
        ax.scatter([x], [y], s=40)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return plt, fig, ax


def _overlaps(texts, renderer) -> int:
    from matplotlib.text import Text

    for t in texts:
        t.update_positions(renderer)
    boxes = [Text.get_window_extent(t, renderer) for t in texts]
    return sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_scatter_labels_do_not_overlap_each_other_or_markers():
    from matplotlib.text import Text

    from clipguard.report.plots import MARKER_PX, place_labels

    plt, fig, ax = _axes()
    renderer = fig.canvas.get_renderer()
    naive = [ax.annotate(n, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points") for n, x, y in CROWD]
    assert _overlaps(naive, renderer) > 0  # the twin: one fixed offset (the old placement) stacks these names
    for t in naive:
        t.remove()
    texts = place_labels(ax, CROWD)
    assert len(texts) == len(CROWD) and _overlaps(texts, renderer) == 0
    frame = ax.get_window_extent(renderer)
    for t in texts:
        t.update_positions(renderer)
    for box in (Text.get_window_extent(t, renderer) for t in texts):  # the text alone, not its leader line
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        for px, py in ax.transData.transform([(x, y) for _, x, y in CROWD]):
            assert not (box.x0 < px + MARKER_PX and px - MARKER_PX < box.x1
                        and box.y0 < py + MARKER_PX and py - MARKER_PX < box.y1)
    plt.close(fig)


def test_uap_grid_fits_a_report_page(tmp_path):
    from PIL import Image

    _, grid = _pictures(tmp_path)
    width, height = Image.open(grid).size
    assert width <= 960  # the HTML report's column is 60em = 960 px: eight pairs in one row were 1,400 px
    assert height > width / 2  # wrapped onto two row pairs, not squeezed
