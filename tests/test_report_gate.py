"""Suites, reports and the CI gate on real toy-world records (a tiny suite, run once per module)."""

import json
import xml.etree.ElementTree as ET

import pytest

SUITE = """
[suite]
name = "mini"
[defaults]
model = "toy"
dataset = "toy"
limit = 60
device = "cpu"
steps = 3
[[cell]]
id = "base"
label = "toy CLIP"
attack = "pgd"
eps = "0,4/255,8/255"
[[cell]]
id = "transfer"
label = "toy CLIP"
attack = "pgd"
eps = "8/255"
surrogate = "clip:toy@seed1"
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from clipguard.tasks.bench import run_suite

    root = tmp_path_factory.mktemp("bench")
    suite = root / "mini.toml"
    suite.write_text(SUITE)
    first = run_suite(suite, root / "out", progress=False)
    return root, suite, first


def test_suite_runs_then_skips_then_reruns_only_changed_cells(bench):
    from clipguard.tasks.bench import run_suite

    root, suite, first = bench
    assert [s["status"] for s in first] == ["ran", "ran"]
    assert [s["status"] for s in run_suite(suite, root / "out", progress=False)] == ["skipped", "skipped"]
    changed = root / "changed.toml"
    changed.write_text(SUITE.replace('surrogate = "clip:toy@seed1"', 'surrogate = "toy-cnn"'))
    out = root / "out2"
    (out / "records").mkdir(parents=True)
    for f in (root / "out" / "records").iterdir():
        (out / "records" / f.name).write_text(f.read_text())
    assert [s["status"] for s in run_suite(changed, out, progress=False)] == ["skipped", "ran"]


def test_report_numbers_equal_the_records(bench, tmp_path):
    from clipguard.report.build import build_report

    root, _, _ = bench
    info = build_report(root / "out", tmp_path / "r.md", html_out=tmp_path / "r.html", csv_out=tmp_path / "r.csv")
    base = json.loads((root / "out" / "records" / "base.json").read_text())
    transfer = json.loads((root / "out" / "records" / "transfer.json").read_text())
    header, (row,) = info["header"], info["body"]
    assert header[:3] == ["model", "dataset", "clean acc1"]
    assert row[0] == "toy CLIP" and row[1] == base["dataset"] and row[2] == base["metrics"]["acc1"]
    steps, t_steps = base["attack"]["steps"], transfer["attack"]["steps"]
    expected = {f"pgd-{steps} {e['eps']}": e["robust_acc"] for e in base["metrics"]["robust"] if e["eps_value"] > 0}
    expected[f"pgd-{t_steps} 8/255 from clip:toy@seed1"] = transfer["metrics"]["robust"][0]["robust_acc"]
    assert dict(zip(header[3:], row[3:], strict=True)) == expected
    md = (tmp_path / "r.md").read_text()
    for v in expected.values():
        assert f"{v:.4f}" in md
    assert len(info["plots"]) >= 2 and all(p.endswith(".png") for p in info["plots"])
    assert "checks passed" in md and "data:image/png;base64," in (tmp_path / "r.html").read_text()
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("dataset,model,pretrained,task,acc1")


def _record(dataset: str, acc1: float, robust: dict[str, float]) -> dict:
    """A hand-written clipguard.result/1 record of the shape rows() reads (no model run)."""
    eps_value = {"1/255": 1 / 255, "4/255": 4 / 255}
    return {"schema": "clipguard.result/1", "task": "robustness", "dataset": dataset, "model_spec": "clip:toy",
            "metrics": {"acc1": acc1, "robust": [{"attack": "pgd", "eps": e, "eps_value": eps_value[e],
                                                  "robust_acc": v, "attack_success_rate": 1 - v / acc1}
                                                 for e, v in robust.items()]},
            "bench": {"label": "toy CLIP", "cell": f"base-{dataset}"}}


def test_report_keeps_datasets_of_one_model_apart(tmp_path):
    from clipguard.records.rows import load_records, rows
    from clipguard.report.build import _scatter_points, build_report
    from clipguard.report.plots import eps_series

    recs = tmp_path / "records"
    recs.mkdir()
    numbers = {"cifar10": (0.91, {"1/255": 0.62, "4/255": 0.23}),
               "cifar100": (0.57, {"1/255": 0.31, "4/255": 0.08})}
    for ds, (acc1, robust) in numbers.items():
        (recs / f"{ds}.json").write_text(json.dumps(_record(ds, acc1, robust)))
    info = build_report(recs, tmp_path / "r.md", html_out=tmp_path / "r.html")
    assert info["header"] == ["model", "dataset", "clean acc1", "pgd 1/255", "pgd 4/255"]  # no steps recorded
    assert info["body"] == [["toy CLIP", ds, acc1, robust["1/255"], robust["4/255"]]
                            for ds, (acc1, robust) in numbers.items()]
    md = (tmp_path / "r.md").read_text()
    for ds, (acc1, robust) in numbers.items():
        assert f"| toy CLIP | {ds} | {acc1:.4f} | {robust['1/255']:.4f} | {robust['4/255']:.4f} |" in md
    rs = rows(load_records(recs))
    assert eps_series(rs) == {("toy CLIP", ds, "pgd", None): {1 / 255: robust["1/255"], 4 / 255: robust["4/255"]}
                              for ds, (_, robust) in numbers.items()}
    col, pts = _scatter_points(rs)
    assert sorted(pts) == sorted((f"toy CLIP ({ds})", acc1, robust[col.split()[1]])
                                 for ds, (acc1, robust) in numbers.items())
    assert len(info["plots"]) == 2


def _rules(tmp_path, *rules):
    p = tmp_path / "gate.toml"
    p.write_text("rules = [" + ", ".join(json.dumps(r) for r in rules) + "]\n")
    return p


def test_gate_passes_fails_and_rejects_malformed(bench, tmp_path, cli):
    root, _, _ = bench
    recs = root / "out"
    ok = _rules(tmp_path, "clean_acc1 >= 0.9", "robust_acc(attack=pgd, eps=8/255, cell=base) <= 0.5")
    code, out, _ = cli("gate", recs, "--rules", ok, "--junit", tmp_path / "j.xml")
    assert code == 0 and "2 of 2 rules hold" in out
    bad = _rules(tmp_path, "clean_acc1 >= 0.9", "robust_acc(attack=pgd, eps=4/255) >= 0.99")
    code, out, err = cli("gate", recs, "--rules", bad, "--junit", tmp_path / "j.xml")
    assert code == 1
    fails = [line for line in err.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "robust_acc(attack=pgd, eps=4/255) >= 0.99" in fails[0]
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    code, _, err = cli("gate", recs, "--rules", _rules(tmp_path, "robust_acc(attack=pgd >= x"))
    assert code == 2 and "malformed" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("gate", recs, "--rules", _rules(tmp_path, "robust_acc(norm=l2) >= 0.1"))
    assert code == 2 and "norm=l2" in err


def test_gate_rule_matching_nothing_fails(bench, tmp_path, cli):
    root, _, _ = bench
    code, _, err = cli("gate", root / "out", "--rules", _rules(tmp_path, "fooling_rate <= 0.5"))
    assert code == 1 and "no record matches" in err


def test_suite_option_of_the_wrong_type_is_one_clear_error(tmp_path):
    from clipguard.errors import ClipguardError
    from clipguard.tasks.bench import run_suite

    suite = tmp_path / "bad.toml"
    suite.write_text('[[cell]]\nid = "c1"\nmodel = "toy"\nlimit = "abc"\n')
    with pytest.raises(ClipguardError, match="'c1'.*limit = 'abc'"):
        run_suite(suite, tmp_path / "out", progress=False)
    suite.write_text('[[cell]]\nid = "c2"\nkind = "finetune"\nepochs = 1.5\n')
    with pytest.raises(ClipguardError, match="'c2'.*epochs = 1.5"):
        run_suite(suite, tmp_path / "out", progress=False)


def _eval(n: int, acc1: float, robust: float, *, steps: int = 10, limit: int | None = None) -> dict:
    rec = _record("toy", acc1, {"4/255": robust})
    rec["data"] = {"split": "test", "n": n, "limit": limit, "seed": 0}
    rec["attack"] = {"steps": steps}
    rec["metrics"]["robust"][0]["attack"] = "pgd"
    del rec["bench"]
    return rec


def test_a_report_row_never_mixes_image_sets_or_runs(tmp_path):
    """A full-set run and a --limit 50 run of one model: two rows, each with its own clean and robust numbers (the
    old table took clean from the first record and robust from the last, in one row). Two runs of the same cell:
    the first by file name is shown and a differing number is named under the table. PGD-5 and PGD-10 are two
    columns."""
    from clipguard.report.build import build_report

    recs = tmp_path / "mix"
    recs.mkdir()
    (recs / "a_base.json").write_text(json.dumps(_eval(1000, 0.999, 0.293)))
    (recs / "b_small.json").write_text(json.dumps(_eval(50, 0.98, 0.22, limit=50)))
    info = build_report(recs, tmp_path / "r.md")
    assert info["header"] == ["model", "dataset", "clean acc1", "pgd-10 4/255"] and info["dropped"] == []
    assert info["body"] == [["clip:toy [test n=1000]", "toy", 0.999, 0.293],
                            ["clip:toy [test n=50 (limit, seed 0)]", "toy", 0.98, 0.22]]

    (recs / "c_again.json").write_text(json.dumps(_eval(1000, 0.5, 0.1)))  # the same cell, other numbers
    (recs / "d_pgd5.json").write_text(json.dumps(_eval(1000, 0.999, 0.4, steps=5)))
    info = build_report(recs, tmp_path / "r.md")
    assert info["header"] == ["model", "dataset", "clean acc1", "pgd-10 4/255", "pgd-5 4/255"]
    assert info["body"][0] == ["clip:toy [test n=1000]", "toy", 0.999, 0.293, 0.4]
    # c_again's clean and pgd-10 differ from the shown ones; d_pgd5's clean is the same 0.999: nothing lost, no note
    assert len(info["dropped"]) == 2 and all("c_again.json" in d for d in info["dropped"])
    md = (tmp_path / "r.md").read_text()
    assert "2 number(s) repeat a cell with another value" in md and "c_again.json" in md


def test_skipped_checks_are_neither_passed_nor_failed_in_the_report(tmp_path):
    """A certify record with its empirical check skipped (passed: null) read "0/2 passed" in the report, as if both
    had failed: skipped checks are counted apart. Twin: a failed check still shows as failed."""
    from clipguard.records.rows import checks_summary
    from clipguard.report.build import build_report

    skipped = {**_eval(100, 0.9, 0.5), "checks": [{"name": "a", "passed": None}, {"name": "b", "passed": None}],
               "checks_passed": None}
    failed = {**_eval(100, 0.9, 0.5), "checks": [{"name": "a", "passed": True}, {"name": "b", "passed": False}],
              "checks_passed": False}
    s, f = checks_summary([skipped, failed])
    assert (s["passed"], s["total"], s["skipped"], s["failed"]) == (0, 0, 2, [])
    assert (f["passed"], f["total"], f["skipped"], f["failed"]) == (1, 2, 0, ["b"])
    recs = tmp_path / "recs"
    recs.mkdir()
    (recs / "s.json").write_text(json.dumps(skipped))
    (recs / "f.json").write_text(json.dumps(failed))
    build_report(recs, tmp_path / "r.md", html_out=tmp_path / "r.html")
    md = (tmp_path / "r.md").read_text()
    assert "1 of 2 checks passed; 1 failed; 2 skipped." in md and "| 0/0 (2 skipped) |" in md and "| 1/2 | b |" in md
    assert "0/0 passed, 2 skipped" in (tmp_path / "r.html").read_text()
