"""Significance-aware gates, --confidence and the report's intervals and marks (issue 24).

The gate tests build records and their per-image predictions by hand (1,000 images, robust accuracy 0.600), so the
discordant pairs are known exactly: a 0.5-point drop made of 10 images lost and 5 gained is not significant (exact
McNemar p = 0.30), one of 100 lost is."""

import csv
import json

import pytest
from scipy.stats import binomtest

from clipguard.records.metrics import interval, put
from clipguard.records.stats import mcnemar_p

N, EPS = 1000, "4/255"


def _write(folder, name, robust, *, label="model", predictions=True, clean=None, dataset="toy", n=N):
    """A robustness record (+ predictions CSV) whose image i is robust-correct iff i in ``robust``; every image is
    clean-correct unless ``clean`` names the clean-correct ones."""
    folder.mkdir(parents=True, exist_ok=True)
    clean = set(range(n)) if clean is None else clean
    rows = []
    for i in range(n):
        y = i % 10
        c = y if i in clean else (y + 1) % 10
        a = y if i in robust and i in clean else (y + 2) % 10
        rows.append({"index": i, "digest": f"{i:016x}", "label": y, "clean_pred": c, f"adv_pred@{EPS}": a})
    if predictions:
        with (folder / f"{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    metrics = put({}, "acc1", len(clean), n)
    entry = put({"attack": "pgd", "eps": EPS, "eps_value": 4 / 255}, "robust_acc", len(robust & clean), n)
    metrics["robust"] = [entry]
    rec = {"schema": "clipguard.result/1", "task": "robustness", "dataset": dataset, "model_spec": "toy",
           "bench": {"label": label, "cell": name}, "attack": {"name": "pgd", "norm": "linf"}, "metrics": metrics}
    if predictions:
        rec["predictions"] = {"path": f"{name}.csv", "rows": n}  # relative: found beside the record
    (folder / f"{name}.json").write_text(json.dumps(rec))
    return folder / f"{name}.json"


BASE = set(range(600))
SMALL_DROP = (BASE - set(range(10))) | set(range(600, 605))  # 10 lost, 5 gained: 0.595
REAL_DROP = BASE - set(range(100))  # 100 lost: 0.500


@pytest.fixture
def gate(cli, tmp_path):
    _write(tmp_path / "base", "base", BASE, label="base")

    def run(robust, rules_toml, **kw):
        cand = tmp_path / "cand"
        _write(cand, "cand", robust, label="cand", **kw)
        (tmp_path / "rules.toml").write_text(rules_toml)
        return cli("gate", cand, "--rules", tmp_path / "rules.toml", "--baseline", tmp_path / "base")

    return run


SIGNIFICANT = f'[[rule]]\nexpr = "robust_acc(attack=pgd, eps={EPS}) >= baseline"\nsignificant = true\n'


def test_the_constructed_drops_have_the_p_values_they_claim():
    assert mcnemar_p(10, 5) == pytest.approx(binomtest(5, 15).pvalue) and mcnemar_p(10, 5) > 0.05
    assert mcnemar_p(100, 0) < 1e-20


def test_a_significance_rule_passes_a_half_point_drop_that_is_not_significant(gate):
    code, out, err = gate(SMALL_DROP, SIGNIFICANT)
    assert code == 0, out + err
    assert "not significant" in out and "0.5950 vs baseline base=0.6000" in out


def test_twin_without_significant_the_same_drop_fails(gate):
    code, _, err = gate(SMALL_DROP, f'rules = ["robust_acc(attack=pgd, eps={EPS}) >= baseline"]')
    assert code == 1 and "0.5950 vs baseline base=0.6000" in err


def test_a_significance_rule_fails_a_real_drop(gate):
    code, _, err = gate(REAL_DROP, SIGNIFICANT)
    assert code == 1 and "significant (exact McNemar p=" in err, err


def test_a_margin_allows_a_drop(gate):
    assert gate(SMALL_DROP, f'rules = ["robust_acc(eps={EPS}) >= baseline - 0.01"]')[0] == 0
    assert gate(REAL_DROP, f'rules = ["robust_acc(eps={EPS}) >= baseline - 0.01"]')[0] == 1


def test_no_predictions_is_not_tested_and_fails(gate):
    code, _, err = gate(SMALL_DROP, SIGNIFICANT, predictions=False)
    assert code == 1 and "no predictions: not tested" in err


def test_predictions_of_another_run_are_refused(gate, cli, tmp_path):
    assert gate(SMALL_DROP, SIGNIFICANT)[0] == 0
    _write(tmp_path / "other", "cand", REAL_DROP)  # predictions that give 0.500, not the record's 0.595
    (tmp_path / "cand" / "cand.csv").write_text((tmp_path / "other" / "cand.csv").read_text())
    code, _, err = cli("gate", tmp_path / "cand", "--rules", tmp_path / "rules.toml", "--baseline", tmp_path / "base")
    assert code == 2 and "belongs to another run" in err, err


def test_baseline_rules_need_a_baseline_and_significance_needs_a_baseline_rule(cli, tmp_path):
    cand = tmp_path / "cand"
    _write(cand, "cand", BASE)
    (tmp_path / "r.toml").write_text(SIGNIFICANT)
    code, _, err = cli("gate", cand, "--rules", tmp_path / "r.toml")
    assert code == 2 and "give --baseline RECORDS" in err
    (tmp_path / "r.toml").write_text('[[rule]]\nexpr = "robust_acc >= 0.5"\nsignificant = true\n')
    code, _, err = cli("gate", cand, "--rules", tmp_path / "r.toml")
    assert code == 2 and ">= baseline" in err
    (tmp_path / "r.toml").write_text('[[rule]]\nexpr = "robust_acc >= baseline"\nsignificant = "yes"\n')
    assert cli("gate", cand, "--rules", tmp_path / "r.toml", "--baseline", cand)[0] == 2


def test_min_lower_reads_the_interval(cli, tmp_path):
    cand = tmp_path / "cand"
    _write(cand, "cand", BASE)  # 0.600 of 1,000: [0.569, 0.631]
    lo = interval(600, N)[0]
    for bar, code in ((0.55, 0), (0.58, 1)):
        (tmp_path / "r.toml").write_text(f'[[rule]]\nexpr = "robust_acc(eps={EPS})"\nmin_lower = {bar}\n')
        got, out, err = cli("gate", cand, "--rules", tmp_path / "r.toml")
        assert got == code, out + err
    assert f"lower end {lo:.4f} < 0.58" in err
    # twin: the value itself (0.600) clears 0.58, so a rule on the value alone passes where min_lower fails
    (tmp_path / "r.toml").write_text(f'rules = ["robust_acc(eps={EPS}) >= 0.58"]')
    assert cli("gate", cand, "--rules", tmp_path / "r.toml")[0] == 0


# ------------------------------------------------------------------------------------------ --confidence


def test_confidence_sets_every_interval_and_the_record_names_it(cli, tmp_path):
    out = tmp_path / "r.json"
    code, _, err = cli("eval", "--limit", "40", "--attack", "pgd", "--eps", "4/255", "--steps", "1", "--device",
                       "cpu", "--confidence", "0.8", "--out", out, "--json")
    assert code == 0, err
    rec = json.loads(out.read_text())
    assert rec["intervals"]["confidence"] == 0.8 and rec["config"]["confidence"] == 0.8
    m = rec["metrics"]
    for entry in (m, *m["robust"]):
        for name, c in entry["counts"].items():
            ci = binomtest(c["k"], c["n"]).proportion_ci(confidence_level=0.8, method="exact")
            assert entry[f"{name}_ci"] == pytest.approx([ci.low, ci.high], abs=0), name
            wrong = binomtest(c["k"], c["n"]).proportion_ci(confidence_level=0.95, method="exact")
            if 0 < c["k"] < c["n"] or c["k"] == 0:  # twin: the default level gives other ends
                assert entry[f"{name}_ci"] != pytest.approx([wrong.low, wrong.high], abs=1e-9), name
    assert interval(3, 10) == interval(3, 10, 0.95)  # outside the run: the default level again


def test_confidence_is_checked_and_offered_where_records_are_written(cli):
    code, _, err = cli("eval", "--confidence", "1", "--json")
    assert code == 2 and "--confidence 1.0 must be in (0, 1)" in err
    from clipguard.config import option_fields
    from clipguard.tasks.configs import (
        AttackSetConfig,
        CertifyConfig,
        EvalConfig,
        PrepareConfig,
        UAPEvalConfig,
        UAPFitConfig,
    )

    for cls in (EvalConfig, AttackSetConfig, CertifyConfig, UAPFitConfig, UAPEvalConfig):
        assert "confidence" in {f.name for f in option_fields(cls, cli_only=True)}, cls
    assert "confidence" not in {f.name for f in option_fields(PrepareConfig, cli_only=True)}  # writes no metric


# ------------------------------------------------------------------------------------------ report


def test_report_marks_significant_differences_against_the_baseline(cli, tmp_path):
    recs = tmp_path / "recs"
    _write(recs, "base", BASE, label="base")
    _write(recs, "small", SMALL_DROP, label="small")
    _write(recs, "real", REAL_DROP, label="real")
    _write(recs, "blind", REAL_DROP, label="blind", predictions=False)
    code, out, err = cli("report", recs, "--baseline", "base", "--json")
    assert code == 0, err
    info = json.loads(out)
    md = (recs / "report.md").read_text()
    hw = (interval(600, N)[1] - interval(600, N)[0]) / 2
    assert f"| base | toy | 1.0000 ±0.002 | 0.6000 ±{hw:.3f} |" in md
    assert "| small | toy | 1.0000 ±0.002 | 0.5950 ±0.031 |" in md  # neither column significant: no mark
    assert "| real | toy | 1.0000 ±0.002 | 0.5000 ±0.031* |" in md
    assert "| blind | toy | 1.0000 ±0.002? | 0.5000 ±0.031? |" in md
    assert "no predictions: not tested" in md and "Holm-adjusted over 4 tests" in md
    tested = {(m["label"], m["column"]): m for m in info["significance"] if "p" in m}
    assert tested[("real", 3)]["significant"] and not tested[("small", 3)]["significant"]
    assert tested[("small", 3)]["p"] == pytest.approx(mcnemar_p(10, 5))
    assert cli("report", recs, "--baseline", "nobody")[0] == 2


def test_report_average_over_datasets_carries_the_bootstrap_interval(cli, tmp_path):
    from clipguard.records.stats import bootstrap_average, from_counts
    from clipguard.report.significance import AVERAGE_RESAMPLES

    recs = tmp_path / "recs"
    _write(recs, "a", BASE, dataset="cifar10", predictions=False)  # 600 of 1,000
    _write(recs, "b", set(range(50)), dataset="cifar100", predictions=False, n=100)  # 50 of 100
    code, out, err = cli("report", recs, "--json")
    assert code == 0, err
    table = next(t for t in json.loads(out)["zero_shot"] if t["title"] != "clean")
    assert table["body"][0][-1] == pytest.approx((0.6 + 0.5) / 2)
    boot = bootstrap_average([from_counts(600, N), from_counts(50, 100)], n_resamples=AVERAGE_RESAMPLES)
    half = (boot["ci"][1] - boot["ci"][0]) / 2
    md = (recs / "report.md").read_text()
    assert f"| 0.5500 ±{half:.3f} |" in md
    # twin: the pooled images' exact interval (the small set would weigh a tenth, not half) is another half-width
    pooled = interval(650, 1100)
    assert abs((pooled[1] - pooled[0]) / 2 - half) > 0.01


def test_confidence_is_a_suite_option_and_leaves_older_hashes_alone():
    from clipguard.config import flat
    from clipguard.tasks.configs import eval_config

    assert eval_config(confidence=0.9).run.confidence == 0.9 and flat(eval_config(confidence=0.9))["confidence"] == 0.9
    assert "confidence" not in flat(eval_config())  # omitted at its default: records and hashes from before stay
