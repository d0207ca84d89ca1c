"""Every count-based accuracy in a record carries its exact (Clopper-Pearson) 95 % interval, as scipy computes it
(issue 24, item 1: the record part)."""

import json

import pytest
from scipy.stats import binomtest

from clipguard.records.metrics import interval, put


def _scipy(k, n, level=0.95):
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return [ci.low, ci.high]


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (2, 200), (143, 1000)])
def test_the_interval_is_scipys_exact_one(k, n):
    assert interval(k, n) == pytest.approx(_scipy(k, n), abs=0)
    assert interval(k, n) != pytest.approx(_scipy(k, n, 0.9), abs=1e-6)  # twin: another level would show
    assert put({}, "robust_acc", k, n)["robust_acc_ci"] == interval(k, n)


def test_no_images_give_the_whole_unit_interval():
    assert interval(0, 0) == [0.0, 1.0]


def test_every_counted_metric_of_an_eval_record_has_its_interval(cli, tmp_path):
    out = tmp_path / "r.json"
    code, _, err = cli("eval", "--limit", "50", "--attack", "pgd", "--eps", "0,8/255", "--steps", "2",
                       "--device", "cpu", "--out", out, "--json")
    assert code == 0, err
    m = json.loads(out.read_text())["metrics"]
    for entry in (m, *m["robust"]):
        assert entry["counts"], entry
        for name, c in entry["counts"].items():
            assert entry[f"{name}_ci"] == pytest.approx(_scipy(c["k"], c["n"]), abs=0), name
            lo, hi = entry[f"{name}_ci"]
            assert lo <= entry[name] <= hi
