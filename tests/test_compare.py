"""`clipguard compare` on the toy world (issue 24): a TeCoA-LoRA adapter against its base at PGD 4/255 is a
significant difference, two attack seeds on the same model are not, runs of other images are refused."""

import json
import shutil

import pytest

from clipguard.records.stats import holm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

N = 300  # images of the base-vs-adapter comparison: ~0.29 -> ~0.47 robust, far beyond the noise at this size
ATTACK = ["--attack", "pgd", "--eps", "4/255", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Records + predictions: the base toy CLIP and a TeCoA-LoRA adapter (4/255, 2 epochs on 1,024 training images,
    ~7 s) on the same 300 images; the base on all 1,000 test images under two attack seeds (3-step PGD: --seed
    changes the --limit selection too, so the whole split keeps the images the same)."""
    from clipguard.cli.app import run

    d = tmp_path_factory.mktemp("compare")
    assert run(["finetune", "--model", "toy", "--dataset", "toy", "--eps", "4/255", "--epochs", "2", "--limit", "1024",
                "--batch-size", "64", "--lr", "1e-2", "--eval-limit", "20", "--eval-steps", "1", "--device", "cpu",
                "--run-dir", str(d / "lora"), "--json"]) == 0

    def ev(name, *args):
        assert run(["eval", *ATTACK, *args, "--predictions", str(d / f"{name}.csv"), "--out", str(d / f"{name}.json"),
                    "--json"]) == 0
        return d / f"{name}.json"

    return {"dir": d, "base": ev("base", "--limit", str(N)), "lora": ev("lora", "--limit", str(N), "--adapter",
                                                                          str(d / "lora")),
            "seed0": ev("seed0", "--steps", "3", "--seed", "0"), "seed1": ev("seed1", "--steps", "3", "--seed", "1")}


def _compare(cli, *args):
    code, out, err = cli("compare", *map(str, args), "--json", "--n-resamples", "2000")
    return code, (json.loads(out) if code == 0 else None), err


def _row(res, metric_prefix):
    return next(r for r in res["comparisons"] if r["metric"].startswith(metric_prefix))


def test_tecoa_adapter_is_significantly_more_robust_than_its_base(cli, runs):
    code, res, err = _compare(cli, runs["base"], runs["lora"])
    assert code == 0, err
    r = _row(res, "robust_acc@4/255")
    assert r["significant"] and r["p_holm"] < 1e-4 and r["difference"] > 0.10, r
    lo, hi = r["difference_ci"]
    assert 0 < lo < r["difference"] < hi
    # matches the records themselves: A and B are the records' own robust accuracies over the same 300 images
    base, lora = (json.loads(runs[k].read_text())["metrics"] for k in ("base", "lora"))
    assert (r["a"], r["b"], r["n"]) == (base["robust_acc"], lora["robust_acc"], N)
    assert r["b"] - r["a"] == pytest.approx(r["difference"]) and r["only_b"] - r["only_a"] == round(r["difference"] * N)
    assert _row(res, "acc1")["a"] == base["acc1"] and _row(res, "acc1")["b"] == lora["acc1"]
    assert [x["p_holm"] for x in res["comparisons"]] == pytest.approx(holm([x["p"] for x in res["comparisons"]]))
    assert res["schema"] == "clipguard.compare/1" and "McNemar" in res["test"] and "BCa" in res["difference"]["method"]


def test_two_attack_seeds_of_one_model_are_not_significantly_different(cli, runs):
    code, res, err = _compare(cli, runs["seed0"], runs["seed1"])
    assert code == 0, err
    r = _row(res, "robust_acc@4/255")
    assert r["only_a"] + r["only_b"] > 0  # the seeds did change some images: the test had something to weigh
    assert not r["significant"] and r["p_holm"] > 0.05, r
    clean = _row(res, "acc1")
    assert (clean["only_a"], clean["only_b"], clean["p"], clean["significant"]) == (0, 0, 1.0, False)


def test_twin_the_same_runs_with_a_real_drop_are_significant(cli, runs, tmp_path):
    """Twin of the seeds test: seed 1's predictions with 40 more images broken by the attack must be flagged."""
    import csv

    rows = list(csv.DictReader((runs["dir"] / "seed1.csv").open()))
    broken = 0
    for r in rows:
        if broken < 40 and r["clean_pred"] == r["label"] == r["adv_pred@4/255"]:
            r["adv_pred@4/255"], broken = str((int(r["label"]) + 1) % 10), broken + 1
            r["robust@4/255"] = "0"  # the runner's verdict, which pairing reads first
    with (tmp_path / "worse.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    code, res, err = _compare(cli, runs["dir"] / "seed0.csv", tmp_path / "worse.csv")
    assert code == 0, err
    assert _row(res, "robust_acc@4/255")["significant"] and not _row(res, "acc1")["significant"]
    code, _, err = cli("compare", runs["seed0"], runs["seed1"], "--level", "1.5")
    assert code == 2 and "--level 1.5 must be in (0, 1)" in err


def test_runs_of_different_images_are_refused(cli, runs):
    code, _, err = _compare(cli, runs["base"], runs["seed1"])
    assert code == 2 and "hold different images" in err and len(err.strip().splitlines()) == 1, err


def test_predictions_files_and_out(cli, runs, tmp_path):
    out = tmp_path / "cmp" / "c.json"
    code, stdout, err = cli("compare", runs["dir"] / "base.csv", runs["dir"] / "lora.csv", "--out", out,
                            "--n-resamples", "500")
    assert code == 0, err
    saved = json.loads(out.read_text())
    r = _row(saved, "robust_acc@4/255")
    assert r["significant"] and r["a_label"] == "base" and r["dataset"] is None
    assert "A = base, B = lora" in stdout and "McNemar" in stdout and "yes" in stdout


def test_a_suite_folder_against_a_baseline(cli, runs, tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("base", "lora"):
        rec = json.loads(runs[name].read_text())
        shutil.copy(runs["dir"] / f"{name}.csv", suite / f"{name}.csv")
        rec["predictions"]["path"] = f"somewhere/else/{name}.csv"  # a moved folder: found beside the record
        rec["bench"] = {"label": name, "cell": name}
        (suite / f"{name}.json").write_text(json.dumps(rec))
    code, res, err = _compare(cli, suite, "--baseline", "base")
    assert code == 0, err
    assert {(r["a_label"], r["b_label"]) for r in res["comparisons"]} == {("base", "lora")}
    code, _, err = _compare(cli, suite, "--baseline", "nobody")
    assert code == 2 and "names no run" in err


def test_a_record_without_predictions_is_refused(cli, runs, tmp_path):
    rec = json.loads(runs["base"].read_text())
    rec.pop("predictions")
    (tmp_path / "r.json").write_text(json.dumps(rec))
    code, _, err = _compare(cli, tmp_path / "r.json", runs["lora"])
    assert code == 2 and "--predictions" in err
    code, _, err = cli("compare", "--json")
    assert code == 2 and "compare needs RUNS" in err


def test_strict_fails_when_a_compared_run_failed_an_integrity_check(cli, runs, tmp_path):
    rec = json.loads(runs["lora"].read_text())
    rec["checks"] = [{"name": "no_nan", "eps": "4/255", "passed": False}]
    rec["checks_passed"] = False
    rec["predictions"]["path"] = str(runs["dir"] / "lora.csv")
    (tmp_path / "bad.json").write_text(json.dumps(rec))
    assert _compare(cli, runs["base"], tmp_path / "bad.json")[0] == 0  # the comparison itself stands
    code, _, err = cli("compare", runs["base"], tmp_path / "bad.json", "--json", "--strict", "--n-resamples", "200")
    assert code == 1 and "no_nan@4/255" in err
    assert cli("compare", runs["base"], runs["lora"], "--json", "--strict", "--n-resamples", "200")[0] == 0


def test_a_randomized_defense_pairs_by_the_runners_own_verdicts(cli, runs, tmp_path):
    """Under --defense ttc the runner judges robustness against a second, randomly drawn clean pass, so a clean and
    an adversarial prediction cannot give the record's robust_acc: the file's robust@EPS column does, and compare
    reads it. Twin: the same file without that column is refused (its numbers are not the record's)."""
    import csv

    from clipguard.records.paired import correctness, read_predictions

    code, _, err = cli("eval", *ATTACK, "--steps", "2", "--limit", "100", "--defense", "ttc", "--defense-eot", "1",
                       "--predictions", tmp_path / "ttc.csv", "--out", tmp_path / "ttc.json", "--json")
    assert code == 0, err
    rec = json.loads((tmp_path / "ttc.json").read_text())
    flags = correctness(read_predictions(tmp_path / "ttc.csv"))["robust_acc@4/255"]
    counts = rec["metrics"]["counts"]["robust_acc"]
    assert flags.dtype == bool and (int(flags.sum()), len(flags)) == (counts["k"], counts["n"])
    base = tmp_path / "base.json"
    assert cli("eval", *ATTACK, "--steps", "2", "--limit", "100", "--predictions", tmp_path / "base.csv", "--out", base,
               "--json")[0] == 0
    assert _compare(cli, base, tmp_path / "ttc.json")[0] == 0
    rows = list(csv.DictReader((tmp_path / "ttc.csv").open()))
    derived = sum(r["clean_pred"] == r["label"] == r["adv_pred@4/255"] for r in rows)
    with (tmp_path / "old.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if not k.startswith("robust@")], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    rec["predictions"]["path"] = str(tmp_path / "old.csv")
    (tmp_path / "old.json").write_text(json.dumps(rec))
    code, _, err = _compare(cli, base, tmp_path / "old.json")
    assert derived != rec["metrics"]["counts"]["robust_acc"]["k"]  # seeded: the old derivation is off on these images
    assert code == 2 and "robust_acc@4/255" in err and len(err.strip().splitlines()) == 1, err
