"""The leaderboard (issue 23 item 6): the report's ranked tables with averages and costs, on constructed records
where every number is known, the suites' shape, and a reduced toy leaderboard run for real."""

from pathlib import Path

import pytest

from clipguard.records.rows import rows
from clipguard.report.leaderboard import eval_ms, leaderboard_tables, training_cost

REPO = Path(__file__).resolve().parents[1]
METHODS = ["CLIP", "TeCoA", "FARE", "PMG-AFT", "TGA-ZSR", "APT on TeCoA", "TTC"]


def _eval(label, dataset, clean, robust, *, adapter=None, base=None, ips=1000.0, defense_ms=None, n=200,
          device="cpu"):
    """A robustness record of ``label`` on ``dataset`` at Linf 4/255 (PGD-10), with counts for the intervals."""
    k = round(robust * n)
    rec = {"task": "robustness", "dataset": dataset, "model_spec": "toy", "adapter": adapter,
           "config": {"base_adapter": base} if base else {}, "bench": {"label": label},
           "environment": {"device": device, "device_name": "GPU-X" if device.startswith("cuda") else "CPU-Y"},
           "timings": {"images_per_s": ips}, "attack": {"norm": "linf", "steps": 10},
           "metrics": {"acc1": clean, "counts": {"acc1": {"k": round(clean * n), "n": n}},
                       "robust": [{"attack": "pgd", "eps": "4/255", "eps_value": 4 / 255, "robust_acc": k / n,
                                   "counts": {"robust_acc": {"k": k, "n": n}}}]}}
    if defense_ms is not None:
        rec["defense"] = {"name": "ttc", "evaluation": "adaptive", "cost": {"ms_per_image": defense_ms}}
    return rec


def _train(folder, wall_s, *, base=None, world=1, device="cpu"):
    return {"task": "finetune", "dataset": "toy", "model_spec": "toy", "bench": {"label": "ft"},
            "environment": {"device": device, "device_name": "GPU-X" if device.startswith("cuda") else "CPU-Y"},
            "metrics": {}, "finetune": {"adapter": folder, "config": {"base_adapter": base} if base else {},
                                        "train": {"wall_s": wall_s, "world_size": world}}}


@pytest.fixture
def board():
    recs = [_train("out/adapters/tecoa", 3600.0), _train("/abs/out/adapters/apt", 1800.0, base="out/adapters/tecoa")]
    for ds, shift in (("toy", 0.0), ("toy-shift", 0.1)):
        recs += [_eval("CLIP", ds, 0.99, 0.30 - shift),
                 _eval("TeCoA", ds, 0.90, 0.65 - shift, adapter="out/adapters/tecoa"),
                 _eval("APT on TeCoA", ds, 0.91, 0.65 - shift, adapter="out/adapters/apt", base="out/adapters/tecoa"),
                 _eval("TTC", ds, 0.95, 0.40 - shift, ips=1000.0, defense_ms=4.0)]
    recs.append(_eval("half", "toy", 0.5, 0.9))  # one dataset only: no average, no rank
    return leaderboard_tables(recs, rows(recs))


def test_rows_are_ranked_by_the_average_with_ties_sharing_a_rank(board):
    (t,) = board
    assert t["title"] == "Linf 4/255 (pgd-10)"
    assert t["header"] == ["rank", "model", "toy", "toy-shift", "average", "clean average", "training", "eval ms/img"]
    got = [(row[0], row[1]) for row in t["body"]]
    assert got == [(1, "TeCoA"), (1, "APT on TeCoA"), (3, "TTC"), (4, "CLIP"), (None, "half")]
    by = {row[1]: row for row in t["body"]}
    assert by["CLIP"][4] == pytest.approx((0.30 + 0.20) / 2) and by["CLIP"][5] == pytest.approx(0.99)
    lo, hi = by["CLIP"][4].ci  # the bootstrap interval of the average brackets it and is not a point
    assert lo < by["CLIP"][4] < hi and hi - lo > 0.01
    assert by["half"][3] is None and by["half"][4] is None  # the missing dataset shows, and no average is made


def test_a_ranking_follows_the_numbers(board):
    """Twin: make CLIP the most robust and it moves to rank 1 alone."""
    recs = [_eval("CLIP", ds, 0.99, 0.9) for ds in ("toy", "toy-shift")]
    recs += [_eval("TeCoA", ds, 0.90, 0.65) for ds in ("toy", "toy-shift")]
    (t,) = leaderboard_tables(recs, rows(recs))
    assert [(row[0], row[1]) for row in t["body"]] == [(1, "CLIP"), (2, "TeCoA")]


def test_training_cost_sums_the_fine_tunes_behind_a_model(board):
    by = {row[1]: row for row in board[0]["body"]}
    assert by["TeCoA"][6].value == pytest.approx(1.0) and str(by["TeCoA"][6]) == "1 CPU-h (CPU-Y)"
    assert by["APT on TeCoA"][6].value == pytest.approx(1.5)  # the prompt's 0.5 h on top of the tower's 1 h
    assert by["CLIP"][6] is None and by["TTC"][6] is None  # nothing trained


def test_training_cost_units_and_processes():
    gpu = {("adapters", "a"): _train("adapters/a", 900.0, world=4, device="cuda:0")}
    assert training_cost(["x/adapters/a"], gpu) == {"hours": 1.0, "unit": "GPU-h", "devices": ["GPU-X"], "runs": 1}
    assert training_cost(["x/adapters/b"], gpu) is None  # twin: an adapter no fine-tune wrote costs nothing known


def test_eval_cost_is_the_defended_forward_when_there_is_one(board):
    by = {row[1]: row for row in board[0]["body"]}
    assert by["TTC"][7].value == pytest.approx(4.0) and by["CLIP"][7].value == pytest.approx(1.0)
    assert eval_ms([_eval("a", "toy", 1, 0, ips=500.0), _eval("a", "toy", 1, 0, ips=250.0),
                    _eval("a", "toy", 1, 0, ips=100.0)])["ms"] == pytest.approx(2.0)  # the fastest


def test_one_model_is_no_leaderboard():
    recs = [_eval("CLIP", ds, 0.99, 0.3) for ds in ("toy", "toy-shift")]
    assert leaderboard_tables(recs, rows(recs)) == []


def _cells(name):
    from clipguard.tasks.bench import load_suite

    return load_suite(REPO / "benchmarks" / name)[1]


@pytest.mark.parametrize("suite, datasets", [("leaderboard-toy.toml", 2), ("zs-leaderboard.toml", 14)])
def test_the_suites_hold_every_method_on_every_set_under_both_attacks(suite, datasets):
    from clipguard.specs import parse_eps_list

    evals = [c for c in _cells(suite) if c["kind"] == "eval"]
    assert list(dict.fromkeys(c["label"] for c in evals)) == METHODS
    for method in METHODS:
        mine = [c for c in evals if c["label"] == method]
        assert {c["attack"] for c in mine} == {"pgd", "autoattack"}
        assert len({c["dataset"] for c in mine}) == datasets and len(mine) == 2 * datasets
        for c in mine:
            assert {e.text for e in parse_eps_list(str(c["eps"]))} == {"1/255", "4/255"}
            if c["attack"] == "pgd":
                assert c["steps"] == 100
    ttc = [c for c in evals if c["label"] == "TTC"]
    assert all(c["defense"] == "ttc" and c.get("defense_attack", "adaptive") == "adaptive" for c in ttc)
    # AutoAttack against the randomized defense runs its version rand (EOT): no version given, so the default applies
    assert all("aa_version" not in c and "aa_attacks" not in c for c in ttc if c["attack"] == "autoattack")
    assert all(c.get("aa_version") == "custom" for c in evals if c["attack"] == "autoattack" and c["label"] != "TTC")
    apt = [c for c in evals if c["label"] == "APT on TeCoA"]
    assert all(c["adapter"] == "@apt" and c["base_adapter"] == "@tecoa" for c in apt)


def test_the_real_leaderboard_suite_passes_the_option_checks(tmp_path):
    """Every cell's options parse and check (the weights and data are not needed for that)."""
    from clipguard.tasks.bench import CellTask, check_cells, config_hash

    hashes, tasks = {}, []
    for c in _cells("zs-leaderboard.toml"):
        hashes[c["id"]] = h = config_hash(c, hashes)
        tasks.append(CellTask("zs-leaderboard", c, h, str(tmp_path), "local"))
    check_cells(tasks)


@pytest.mark.usefixtures("one_thread")
def test_a_reduced_toy_leaderboard_runs_and_reports_every_method(tmp_path, fresh_cache):
    """The toy suite with its sizes cut (PGD cells only, 40 images, PGD-5, one epoch): every method's row in the
    report with an average, a rank and its costs; the fine-tuned ones with a training cost, APT's over two runs."""
    from clipguard.report.build import build_report
    from clipguard.tasks.bench import run_suite

    text = (REPO / "benchmarks" / "leaderboard-toy.toml").read_text()
    for old, new in (("limit = 200", "limit = 40"), ("steps = 100", "steps = 5"), ("epochs = 3", "epochs = 1"),
                     ('device = "auto"', 'device = "cpu"')):  # "limit = 200" covers eval_limit too
        assert old in text
        text = text.replace(old, new)
    suite = tmp_path / "leaderboard-toy.toml"
    suite.write_text(text)
    only = ["tecoa", "fare", "pmg", "tga", "apt"] + [f"{m}-pgd-{d}" for m in (
        "clip", "tecoa", "fare", "pmg", "tga", "apt", "ttc") for d in ("toy", "toy-shift")]
    summary = run_suite(suite, tmp_path / "out", only=only, progress=False)
    assert sum(s["status"] == "ran" for s in summary) == len(only)
    out = build_report(tmp_path / "out", tmp_path / "report.md")
    tables = {t["title"]: t for t in out["leaderboard"]}
    assert set(tables) == {"Linf 1/255 (pgd-5)", "Linf 4/255 (pgd-5)"}
    for t in tables.values():
        assert sorted(row[1] for row in t["body"]) == sorted(METHODS)
        assert t["header"][2:4] == ["toy", "toy-shift"]
        for row in t["body"]:
            assert row[0] in range(1, 8) and row[4] is not None and row[4].ci is not None, row
            assert row[7] is not None and row[7].value > 0  # eval ms/img
        by = {row[1]: row for row in t["body"]}
        assert by["CLIP"][6] is None and by["TTC"][6] is None
        assert all(by[m][6].value > 0 for m in ("TeCoA", "FARE", "PMG-AFT", "TGA-ZSR"))
        assert by["APT on TeCoA"][6].value > by["TeCoA"][6].value  # the prompt's training on top of the tower's
        assert by["TTC"][7].value > by["CLIP"][7].value  # the counterattack costs forward passes
    md = (tmp_path / "report.md").read_text()
    assert "## Leaderboard" in md and "| rank | model | toy | toy-shift | average |" in md


# ---- toy-shift: the toy world's second set, so a toy leaderboard has datasets to average over

# sha256 of the toy splits' images + labels as the code made them before toy-shift existed (issue 23): the
# committed toy records and weights were made on exactly these images.
SPLIT_DIGESTS = {"test": "ff09834bf658b3aa7f07f39a058acf45372a00e28dcb7b092776f5cda4e28f40",
                 "train": "d77e51c8a01591d7fb0a852bc448cf9bd66bcc67e99fcb63db663b99cb67f9ba"}


def _digest(images, labels):
    import hashlib

    return hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()


def test_the_toy_splits_are_unchanged_and_the_shift_set_is_new():
    from clipguard.data import toy

    for split, want in SPLIT_DIGESTS.items():
        assert _digest(*toy.toy_split(split)) == want, split
    images, labels = toy.toy_split("shift")
    assert images.shape == (1000, 3, 32, 32) and labels.bincount().tolist() == [100] * 10
    assert _digest(images, labels) not in SPLIT_DIGESTS.values()
    test = toy.toy_split("test")[0].float()
    assert images.float().mean() < test.mean() - 10  # darker backgrounds


@pytest.mark.usefixtures("one_thread")
def test_toy_shift_is_a_harder_set_of_the_same_classes(toy_prepared):
    from clipguard.models.inference import predict_logits
    from clipguard.run_options import RunOptions
    from clipguard.tasks.setup import prepare

    p = prepare(RunOptions(model="toy", dataset="toy-shift", split="test", limit=300, device="cpu", precision="fp32"))
    assert p.data.name == "toy-shift" and p.data.classnames == toy_prepared.data.classnames
    acc = {}
    for name, q in (("test", toy_prepared), ("shift", p)):
        logits, _ = predict_logits(q.classifier, q.data.images, batch_size=256, precision="fp32", progress=False)
        acc[name] = (logits.argmax(1) == q.data.labels).float().mean().item()
    assert 0.6 < acc["shift"] < acc["test"] - 0.03, acc  # recognisable, and shifted


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "toy-shift", "--split", "train"], "--dataset toy-shift has only a test split"),
    (["--dataset", "toy", "--split", "shift"], "the shift set is --dataset toy-shift"),
])
def test_a_wrong_toy_split_is_one_line(cli, args, needle):
    code, out, err = cli("eval", "--model", "toy", *args, "--device", "cpu")
    assert code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_clean_average_comes_from_the_same_records_as_the_threat():
    """TTC's AutoAttack cells attack 50 images, its PGD cells 200: each table's clean average is over its own."""
    recs = []
    for ds in ("toy", "toy-shift"):
        pgd = _eval("TTC", ds, 0.90, 0.3)
        aa = _eval("TTC", ds, 0.80, 0.4, n=50)
        aa["attack"] = {"norm": "linf"}
        aa["metrics"]["robust"][0]["attack"] = "autoattack"
        pgd["_path"], aa["_path"] = f"{ds}-pgd.json", f"{ds}-aa.json"
        recs += [aa, pgd, _eval("CLIP", ds, 0.99, 0.2), {**_eval("CLIP", ds, 0.99, 0.1), "attack": {"norm": "linf"}}]
        recs[-1]["metrics"]["robust"][0]["attack"] = "autoattack"
    tables = {t["title"]: {row[1]: row for row in t["body"]} for t in leaderboard_tables(recs, rows(recs))}
    assert tables["Linf 4/255 (pgd-10)"]["TTC"][5] == pytest.approx(0.90)
    assert tables["Linf 4/255 (autoattack)"]["TTC"][5] == pytest.approx(0.80)


def test_the_committed_toy_leaderboard_reports_every_method(tmp_path):
    """The records `make bench-leaderboard-toy` wrote (benchmarks/results/leaderboard-toy-cpu): four threats, every
    method ranked with an average, a clean average and an eval cost; a training cost for the fine-tuned ones."""
    from clipguard.report.build import build_report

    out = build_report(REPO / "benchmarks" / "results" / "leaderboard-toy-cpu", tmp_path / "report.md")
    tables = {t["title"]: t for t in out["leaderboard"]}
    assert set(tables) == {f"Linf {e} ({a})" for e in ("1/255", "4/255") for a in ("autoattack", "pgd-100")}
    for t in tables.values():
        by = {row[1]: row for row in t["body"]}
        assert sorted(by) == sorted(METHODS)
        assert all(row[0] is not None and row[4] is not None and row[5] is not None and row[7] for row in t["body"])
        assert [row[0] for row in t["body"]] == sorted(row[0] for row in t["body"])
        assert all(by[m][6] is not None for m in ("TeCoA", "FARE", "PMG-AFT", "TGA-ZSR", "APT on TeCoA"))
    assert "## Leaderboard" in (tmp_path / "report.md").read_text()
