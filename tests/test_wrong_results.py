"""Issue 26 items 1-3: numbers that were wrong. Every attack returns x itself at eps 0 (L2 PGD / FGSM returned NaN);
every integrity check fails on NaN or inf (in_unit_range passed [1.0, 0.0] on an all-NaN run); every count-based
metric is k / n of integers with its counts in the record (float32 stored 2/200 as 0.009999999776)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import clipguard.attacks.integrity as ic
import clipguard.attacks.runner as runner
from clipguard.attacks.registry import AttackConfig, build_attack
from clipguard.attacks.runner import AttackRun, merge_stats, run_attack
from clipguard.records.metrics import classification_metrics
from clipguard.specs import parse_eps

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

ZERO = parse_eps("0")
BAD = [math.nan, math.inf, -math.inf]
# Count-based metric names: wherever one of them holds a number, its dict holds counts[name] = {k, n}.
COUNTED = {"acc1", "acc5", "robust_acc", "clean_acc", "attack_success_rate", "surrogate_clean_acc",
           "surrogate_robust_acc", "fooling_rate", "perturbed_acc", "targeted_success_rate", "random_fooling_rate",
           "smoothed_acc1", "abstain_rate", "certified_acc"}


def assert_counts_exact(obj) -> int:
    """Walk a record: every count-based metric equals k / n of its integer counts exactly; returns how many."""
    seen = 0
    if isinstance(obj, dict):
        for name in COUNTED & obj.keys():
            if isinstance(obj[name], int | float):  # not a protocol section's description of the metric
                c = obj["counts"][name]
                assert type(c["k"]) is int and type(c["n"]) is int and 0 <= c["k"] <= c["n"], (name, c)
                assert obj[name] == (c["k"] / c["n"] if c["n"] else 0.0), (name, obj[name], c)
                seen += 1
        obj = [v for k, v in obj.items() if k != "counts"]
    if isinstance(obj, list):
        seen += sum(assert_counts_exact(v) for v in obj)
    return seen


# -- item 1: eps 0 returns the input, whatever the attack and norm ------------------------------------------------

EPS0_CASES = [AttackConfig(name, ZERO, norm=norm, **extra)
              for norm in ("linf", "l2")
              for name, extra in [("fgsm", {}), ("pgd", {}), ("pgd", {"restarts": 3}), ("apgd", {}),
                                  ("apgd", {"restarts": 2}), ("autoattack", {}),
                                  ("autoattack", {"aa_version": "plus"}), ("autoattack", {"aa_version": "rand"}),
                                  ("autoattack", {"aa_version": "custom", "aa_attacks": ("apgd-ce", "square")})]]


@pytest.mark.parametrize("cfg", EPS0_CASES, ids=lambda c: f"{c.name}-{c.norm}-r{c.restarts}-{c.aa_version}")
def test_every_attack_returns_x_exactly_at_eps0(toy_prepared, cfg):
    x, y = toy_prepared.data.images[:4].float() / 255, toy_prepared.data.labels[:4]
    out = build_attack(toy_prepared.classifier, cfg)(x, y)
    assert torch.isfinite(out).all() and torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()  # a copy, as every attack returns: the runner writes into it


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_l2_eval_at_eps0_equals_clean_and_passes_its_checks(cli, attack):
    """The issue's command: robust accuracy at eps 0 was 0.10 (clean 1.00) with 153,600 NaN values."""
    code, out, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "50", "--attack", attack,
                         "--norm", "l2", "--eps", "0,0.5", "--device", "cpu", "--json")
    assert code == 0, err
    rec = json.loads(out)
    at0, at05 = rec["metrics"]["robust"]
    assert at0["robust_acc"] == rec["metrics"]["acc1"] and at0["attack_success_rate"] == 0.0
    assert at05["robust_acc"] < rec["metrics"]["acc1"]  # the attack at 0.5 still works
    assert rec["checks_passed"], [c for c in rec["checks"] if not c["passed"]]
    assert next(c for c in rec["checks"] if c["name"] == "no_nan" and c["eps"] == "0")["value"] == 0
    assert assert_counts_exact(rec) == 8  # acc1, acc5, 2 eps x (robust, clean, success)


# -- item 2: NaN or inf fails every integrity check ---------------------------------------------------------------

def _stats(**bad) -> AttackRun:
    stats = {"max_linf": 0.01, "max_l2": 0.1, "min": 0.0, "max": 1.0, "nan": 0, "zero_grad": 0, "attacked": 10}
    return AttackRun(torch.zeros(1), torch.zeros(1), torch.ones(1, dtype=torch.bool), {**stats, **bad})


def _cheap(name: str, norm: str = "linf", **bad) -> dict:
    return next(c for c in ic.cheap_checks(_stats(**bad), 0.03 if norm == "linf" else 0.5, norm) if c["name"] == name)


class _Logits(nn.Module):
    """A classifier whose logits are all ``value`` (gradients flow, so an attack on it runs)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x.flatten(1)[:, :3] * 0 + self.value


def _certificate_checks(bad: float) -> list[dict]:
    from clipguard.smoothing.core import Certificate, Smoothed, certificate_check

    smoothed = Smoothed(_Logits(bad), 0.25, 3, batch=8)
    certs = [Certificate(0, 90, 100, 0.9, 0.3)]
    return certificate_check(smoothed, torch.full((1, 3, 4, 4), 0.5), certs, steps=2, samples=2, num=20, alpha=0.001,
                             generator=torch.Generator().manual_seed(0))


def _uap_norm_check(bad: float) -> dict:
    from clipguard.specs import Norm
    from clipguard.tasks.uap import _norm_check

    v = torch.zeros(1, 3, 4, 4)
    v[0, 0, 0, 0] = bad
    return _norm_check(v, Norm.LINF, 0.1)


CHECKS = {  # name -> bad value -> the check(s) fed it
    "linf_within_eps": lambda b: _cheap("linf_within_eps", max_linf=b),
    "l2_within_eps": lambda b: _cheap("l2_within_eps", "l2", max_l2=b),
    "in_unit_range(min)": lambda b: _cheap("in_unit_range", min=b),
    "in_unit_range(max)": lambda b: _cheap("in_unit_range", max=b),
    "no_nan": lambda b: _cheap("no_nan", nan=b),
    "zero_grad_share": lambda b: _cheap("zero_grad_share", zero_grad=b),
    "eps0_equals_clean": lambda b: ic.eps0_check(torch.tensor([1.0, b]), torch.tensor([1.0, b])),
    "deterministic_forward": lambda b: ic.deterministic_check(_Logits(b), torch.zeros(2, 3, 2, 2)),
    "eps_sweep_monotone(last)": lambda b: ic.monotone_check([("0", 0.9), ("4/255", b)]),
    "eps_sweep_monotone(first)": lambda b: ic.monotone_check([("0", b), ("4/255", 0.5)]),
    "stronger(strong)": lambda b: ic.stronger_check("stronger_than_fgsm", b, 0.5, ""),
    "stronger(weak)": lambda b: ic.stronger_check("stronger_than_fgsm", 0.2, b, ""),
    "precision(low)": lambda b: ic.precision_check(b, 0.5, "bf16", 256),
    "precision(fp32)": lambda b: ic.precision_check(0.5, b, "bf16", 256),
    "steps_converged(acc)": lambda b: ic.converged_check(b, 0.5),
    "steps_converged(doubled)": lambda b: ic.converged_check(0.5, b),
    "restarts_5_vs_1(one)": lambda b: ic.restarts_check(b, 0.5),
    "restarts_5_vs_1(five)": lambda b: ic.restarts_check(0.5, b),
    "check(value)": lambda b: ic.check("any", {"nested": [0.1, b]}, True),
    "smoothadv_within_certificate": lambda b: _certificate_checks(b)[0],
    "smoothadv_l2_within_radius": lambda b: _certificate_checks(b)[1],
    "uap norm_within_eps": _uap_norm_check,
}


@pytest.mark.parametrize("bad", BAD, ids=str)
@pytest.mark.parametrize("name", list(CHECKS))
def test_every_check_fails_on_nan_and_inf(name, bad):
    assert not CHECKS[name](bad)["passed"]


@pytest.mark.parametrize("name", ["linf_within_eps", "in_unit_range", "no_nan", "zero_grad_share"])
def test_the_cheap_checks_pass_finite_stats(name):  # the twins above fail only because of the bad value
    assert _cheap(name)["passed"]


def test_the_other_checks_pass_finite_inputs():
    ok = [ic.eps0_check(torch.tensor([1, 2]), torch.tensor([1, 2])), ic.monotone_check([("0", 0.9), ("a", 0.5)]),
          ic.stronger_check("s", 0.2, 0.5, ""), ic.precision_check(0.5, 0.5, "bf16", 256),
          ic.converged_check(0.5, 0.5), ic.restarts_check(0.5, 0.5), ic.check("any", {"nested": [0.1, 2]}, True),
          ic.deterministic_check(_Logits(1.0), torch.zeros(2, 3, 2, 2))]
    assert all(c["passed"] for c in ok), ok
    assert not ic.eps0_check(torch.tensor([1, 2]), torch.tensor([1, 3]))["passed"]


def test_nan_adversarial_images_fail_the_runs_checks(toy_prepared, monkeypatch):
    """The statistics keep NaN (Python's max(0.0, nan) is 0.0): an attack that returns NaN fails within-eps,
    in-range and no-NaN, where in_unit_range used to pass with [1.0, 0.0]."""
    p = toy_prepared
    monkeypatch.setattr(runner, "build_attack", lambda m, c: lambda x, y: torch.full_like(x, math.nan))
    run = run_attack(p.classifier, p.data.images[:8], p.data.labels[:8], AttackConfig("pgd"), progress=False)
    checks = {c["name"]: c for c in ic.cheap_checks(run, 8 / 255)}
    assert run.stats["nan"] > 0 and math.isnan(run.stats["max"]) and math.isnan(run.stats["min"])
    for name in ("linf_within_eps", "in_unit_range", "no_nan"):
        assert not checks[name]["passed"], checks[name]
    merged = merge_stats([{**_stats().stats}, run.stats])  # across torchrun ranks too
    assert math.isnan(merged["max"]) and math.isnan(merged["max_linf"]) and math.isnan(merged["min"])


# -- item 3: count-based metrics are k / n of integers, the counts in the record ----------------------------------

def test_two_of_two_hundred_is_exactly_one_percent_and_passes_the_gate(tmp_path):
    from clipguard.attacks.sweep import robust_entry
    from clipguard.records.rows import load_records, rows
    from clipguard.records.schema import SCHEMA, write_record
    from clipguard.report.gate import evaluate_rule, parse_rule

    labels = torch.arange(200) % 10
    adv = labels.clone()
    adv[2:] = (adv[2:] + 1) % 10  # 2 of 200 stay correct
    run = AttackRun(labels.clone(), adv, torch.ones(200, dtype=torch.bool), {}, {"images_per_s": 1.0})
    entry = robust_entry(run, labels, AttackConfig("pgd", parse_eps("8/255")))
    assert torch.tensor([1.0] * 2 + [0.0] * 198).mean().item() < 0.01  # the float32 mean the record used to hold
    assert entry["robust_acc"] == 0.01 and entry["counts"]["robust_acc"] == {"k": 2, "n": 200}
    assert entry["attack_success_rate"] == 0.99 and entry["counts"]["attack_success_rate"] == {"k": 198, "n": 200}
    rec = {"schema": SCHEMA, "task": "robustness", "dataset": "toy", "model_spec": "toy", "attack": {"norm": "linf"},
           "metrics": {**classification_metrics(torch.eye(10)[labels], labels), "robust": [entry]}}
    write_record(tmp_path / "r.json", rec)
    found = rows(load_records(tmp_path))
    assert evaluate_rule(parse_rule("robust_acc(attack=pgd, eps=8/255) >= 0.01"), found).passed
    assert not evaluate_rule(parse_rule("robust_acc(attack=pgd, eps=8/255) > 0.01"), found).passed


def test_classification_metrics_are_exact_ratios_with_counts():
    labels = torch.arange(200) % 10
    pred = (labels + 1) % 10
    pred[:2] = labels[:2]  # 2 of 200 right, each in its own class (1 of 20 there)
    # Class pred + j scores -j (mod 10): top-5 is pred .. pred + 4, and a wrong image's label (pred - 1) is last.
    logits = -((torch.arange(10) - pred[:, None]) % 10).float()
    m = classification_metrics(logits, labels)
    assert m["acc1"] == 0.01 and m["counts"]["acc1"] == {"k": 2, "n": 200}
    assert m["acc5"] == 0.01 and m["counts"]["acc5"] == {"k": 2, "n": 200}
    assert m["mean_per_class_recall"] == 0.01  # (1/20 + 1/20) / 10 summed exactly; float32 gave 0.0100000001
    three = classification_metrics(torch.eye(3)[torch.tensor([0, 1, 1, 1, 2, 0, 2, 0, 1])],  # 1 of 3 in each
                                   torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert three["mean_per_class_recall"] == 1 / 3 and three["acc5"] is None and "acc5" not in three["counts"]


def test_uap_metrics_are_exact_ratios_with_counts():
    from clipguard.uap.fit import uap_metrics

    labels = torch.tensor([0, 1, 2] * 100)
    clean, adv = labels.clone(), labels.clone()
    adv[:3] = 0  # images 1 and 2 now say 0 (the target); image 0 was 0 already
    m = uap_metrics(labels, clean, adv, target=0)
    assert m["fooling_rate"] == 2 / 300 and m["counts"]["fooling_rate"] == {"k": 2, "n": 300}
    assert m["targeted_success_rate"] == 0.01 and m["counts"]["targeted_success_rate"] == {"k": 2, "n": 200}
    assert assert_counts_exact(m) == 5


def test_uap_records_hold_exact_ratios(cli, tmp_path):
    uap, fit, ev = tmp_path / "u.safetensors", tmp_path / "fit.json", tmp_path / "eval.json"
    common = ["--model", "toy", "--dataset", "toy", "--device", "cpu"]
    code, _, err = cli("uap", "fit", *common, "--split", "train", "--limit", "64", "--epochs", "1", "--uap", uap,
                       "--target-class", "red circle", "--out", fit)
    assert code == 0, err
    code, _, err = cli("uap", "eval", *common, "--split", "test", "--limit", "60", "--uap", uap, "--out", ev)
    assert code == 0, err
    assert assert_counts_exact(json.loads(fit.read_text())) == 5
    # its own 5 + random_fooling_rate, and the fit's 5 that the UAP file carries (uap.fitting)
    assert assert_counts_exact(json.loads(ev.read_text())) == 11


def test_attack_and_adv_set_records_hold_exact_ratios(cli, tmp_path):
    adv, crafted = tmp_path / "a.safetensors", tmp_path / "c.json"
    args = ["--model", "toy", "--dataset", "toy", "--limit", "30", "--device", "cpu"]
    code, _, err = cli("attack", *args, "--steps", "2", "--adv-set", adv, "--out", crafted)
    assert code == 0, err
    code, out, err = cli("eval", *args, "--adv-set", adv, "--json")
    assert code == 0, err
    assert assert_counts_exact(json.loads(crafted.read_text())) == 3
    rec = json.loads(out)
    assert assert_counts_exact(rec) == 4 and rec["metrics"]["counts"]["acc1"]["n"] == 30  # clean counts kept


def test_certify_record_holds_exact_ratios():
    from clipguard.tasks.certify import certify_config, run_certify

    rec = run_certify(certify_config(model="toy", dataset="toy", device="cpu", precision="fp32", limit=3, n0=10, n=100,
                                     radii="0,0.25", check_images=1, check_steps=2, check_samples=2, check_n=20),
                      progress=False)
    # acc1, smoothed_acc1, abstain_rate, 2 certified radii, 2 empirical points x (robust, certified)
    assert assert_counts_exact(rec) == 9
