"""Randomized smoothing: CERTIFY against independent formulas, its failure rate, its integrity check (and a broken
twin of each), the noise objective, the record, the CLI and the bench cell."""

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from statistics import NormalDist

import pytest
import torch
from scipy.stats import binom
from torch import nn

import clipguard.smoothing.core as smoothing
from clipguard.errors import ClipguardError
from clipguard.smoothing.core import ABSTAIN, Smoothed, certificate_check, certify
from clipguard.tasks.certify import certify_config, run_certify

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

SIGMA, ALPHA = 0.25, 0.001
TINY = dict(model="toy", dataset="toy", device="cpu", precision="fp32", limit=4, n0=20, n=300, radii="0,0.25,0.5",
            check_images=2, check_steps=5, check_samples=4, check_n=200)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """The p where P(Binomial(n, p) >= k) = alpha (the Clopper-Pearson definition), by bisection: no scipy."""
    def tail(p: float) -> float:
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                            + (n - i) * math.log1p(-p)) for i in range(k, n + 1))
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < alpha else (lo, mid)
    return lo


def test_certified_radius_is_the_closed_form(toy_prepared):
    """On the toy model: the same noise drawn by hand gives CERTIFY's class and count; its radius is
    sigma * Phi^-1(pA_lower) with pA_lower from the binomial tail (not scipy), abstaining below 1/2."""
    clf, n0, n = toy_prepared.classifier, 100, 1000
    smoothed = Smoothed(clf, SIGMA, 10, batch=n)
    seen = set()
    for i in range(6):
        x = toy_prepared.data.images[i].float() / 255
        cert = certify(smoothed, x, n0=n0, n=n, alpha=ALPHA, generator=torch.Generator().manual_seed(i))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            top = int(clf(x + SIGMA * torch.randn((n0, *x.shape), generator=g)).argmax(1).bincount().argmax())
            count = int((clf(x + SIGMA * torch.randn((n, *x.shape), generator=g)).argmax(1) == top).sum())
        lower = clopper_pearson_lower(count, n, ALPHA)
        assert cert.count == count and cert.pa_lower == pytest.approx(lower, abs=1e-9)
        if lower < 0.5:
            assert (cert.prediction, cert.radius) == (ABSTAIN, 0.0)
        else:
            assert cert.prediction == top
            assert cert.radius == pytest.approx(SIGMA * NormalDist().inv_cdf(lower), rel=1e-7)
        seen.add(cert.prediction == ABSTAIN)
    assert seen == {True, False}  # both branches were exercised


class Threshold(nn.Module):
    """Class 0 iff the first coordinate is below ``t``: at x = 0 under N(0, sigma^2) noise, P(class 0) =
    Phi(t / sigma) exactly."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        return torch.stack([self.t - v, v - self.t], dim=1)


def certificate_failures(p: float, reps: int, alpha: float, n: int = 100) -> int:
    """Seeded CERTIFY runs on a case with known pA = p: how many certify a probability above the truth (a
    certificate wider than the true radius, or one for the wrong class)."""
    smoothed = Smoothed(Threshold(SIGMA * NormalDist().inv_cdf(p)), SIGMA, 2, batch=n)
    truth = {0: p, 1: 1 - p}
    fails = 0
    for seed in range(reps):
        c = certify(smoothed, torch.zeros(1), n0=10, n=n, alpha=alpha, generator=torch.Generator().manual_seed(seed))
        fails += c.prediction != ABSTAIN and c.pa_lower > truth[c.prediction]
    return fails


REPS, STAT_ALPHA = 2000, 0.05
# The most failures a bound valid at level alpha shows in REPS runs but once in a million (binomial quantile).
MAX_FAILS = int(binom.ppf(1 - 1e-6, REPS, STAT_ALPHA))


def test_certificate_failure_rate_stays_below_alpha():
    fails = certificate_failures(0.9, REPS, STAT_ALPHA)
    assert fails <= MAX_FAILS, (fails, MAX_FAILS)
    assert fails / REPS <= STAT_ALPHA  # Clopper-Pearson is conservative: below alpha itself here


def test_a_wrong_bound_fails_the_failure_rate_test(monkeypatch):
    """The twin: the point estimate k/n as the 'bound' certifies too much about half the time."""
    monkeypatch.setattr(smoothing, "lower_confidence_bound", lambda k, n, alpha: k / n)
    assert certificate_failures(0.9, REPS, STAT_ALPHA) > MAX_FAILS


@pytest.fixture(scope="module")
def toy_certs(toy_prepared):
    """The first four certified (radius > 0) of the first 12 toy test images (n = 1000) and their certificates."""
    smoothed = Smoothed(toy_prepared.classifier, SIGMA, 10)
    x = toy_prepared.data.images[:12].float() / 255
    g = torch.Generator().manual_seed(0)
    certs = [certify(smoothed, img, n0=100, n=1000, alpha=ALPHA, generator=g) for img in x]
    chosen = [i for i, c in enumerate(certs) if c.radius > 0][:4]
    return smoothed, x[chosen], [certs[i] for i in chosen]


def _check(smoothed, x, certs):
    return certificate_check(smoothed, x, certs, steps=10, samples=8, num=500, alpha=ALPHA,
                             generator=torch.Generator().manual_seed(1))


def test_integrity_check_passes_honest_certificates(toy_certs):
    checks = _check(*toy_certs)
    assert len(toy_certs[2]) == 4 and all(c["passed"] for c in checks), checks


def test_integrity_check_fails_an_inflated_radius(toy_certs):
    smoothed, x, certs = toy_certs
    checks = _check(smoothed, x, [replace(c, radius=c.radius + 1.0) for c in certs])
    by_name = {c["name"]: c for c in checks}
    assert not by_name["smoothadv_within_certificate"]["passed"], checks
    assert by_name["smoothadv_l2_within_radius"]["passed"]  # the attack stayed inside the (inflated) ball


def test_record_is_reproducible_and_complete():
    a, b = run_certify(certify_config(**TINY), progress=False), run_certify(certify_config(**TINY), progress=False)
    assert a["per_image"] == b["per_image"] and a["metrics"] == b["metrics"] and a["empirical_l2"] == b["empirical_l2"]
    c = run_certify(certify_config(**{**TINY, "seed": 1}), progress=False)
    assert [e["count"] for e in c["per_image"]] != [e["count"] for e in a["per_image"]]
    m = a["metrics"]
    assert a["task"] == "certified_robustness" and a["checks_passed"] and len(a["per_image"]) == 4
    assert [e["radius"] for e in m["certified"]] == [0.0, 0.25, 0.5]
    assert m["smoothed_acc1"] == m["certified"][0]["certified_acc"]
    assert a["smoothing"]["n"] == 300 and a["smoothing"]["resolution"] == [32, 32]
    assert {"wall_s", "samples_per_s", "images_per_s"} <= set(a["timings"])
    assert [e["radius"] for e in a["empirical_l2"]["curve"]] == [0.0, 0.25, 0.5]


def test_the_record_says_when_the_check_failed(monkeypatch):
    """The twin at the task level: a certificate whose radius is inflated fails the record's check."""
    honest = smoothing.certified_radius
    monkeypatch.setattr(smoothing, "certified_radius", lambda sigma, p: honest(sigma, p) + 1.5)
    rec = run_certify(certify_config(**{**TINY, "limit": 6, "n": 1000}), progress=False)
    assert not rec["checks_passed"]
    assert [c["passed"] for c in rec["checks"] if c["name"] == "smoothadv_within_certificate"] == [False]


def recording_bars(monkeypatch) -> list[dict]:
    """certify's progress bars, recorded: each bar's total, description, unit and the samples it was advanced by."""
    import clipguard.tasks.certify as task

    bars = []

    @contextmanager
    def bar(total, description, *, enabled=True, unit="img", **_):
        bars.append({"total": total, "description": description, "unit": unit, "advanced": 0})
        yield lambda n=1, **fields: bars[-1].__setitem__("advanced", bars[-1]["advanced"] + n)

    monkeypatch.setattr(task, "progress_bar", bar)
    return bars


def test_the_smoothadv_check_has_its_own_bar_and_timings(monkeypatch):
    """Issue 26 item 13: the check (minutes on real settings) shows progress, ends at its total, and is timed."""
    bars = recording_bars(monkeypatch)
    rec = run_certify(certify_config(**TINY))
    assert [b["description"] for b in bars] == ["certify", "check (SmoothAdv)"]
    check = bars[1]
    assert check["unit"] == "sample" and check["advanced"] == check["total"] > 0, bars
    assert rec["timings"]["check_wall_s"] > 0 and rec["timings"]["check_samples_per_s"] > 0
    assert rec["checks_passed"] is True and all(c["passed"] is True for c in rec["checks"])


def test_check_images_0_skips_the_check_and_the_record_says_so(monkeypatch, cli, tmp_path):
    """No SmoothAdv attack runs; the checks are listed as skipped (passed null), checks_passed is null (neither
    passed nor failed), and neither the table nor a report shows them as passed."""
    from clipguard.report.certify import certified_table

    def no_attack(*args, **kw):
        raise AssertionError("the SmoothAdv attack ran")

    monkeypatch.setattr(smoothing, "smoothadv_pgd", no_attack)
    bars = recording_bars(monkeypatch)
    rec = run_certify(certify_config(**{**TINY, "check_images": 0}))
    assert [b["description"] for b in bars] == ["certify"]
    assert [(c["name"], c["passed"], c["skipped"]) for c in rec["checks"]] == [
        ("smoothadv_within_certificate", None, True), ("smoothadv_l2_within_radius", None, True)]
    assert all("--check-images 0" in c["detail"] for c in rec["checks"])
    assert rec["checks_passed"] is None and rec["empirical_l2"]["skipped"] == "--check-images 0"
    assert rec["empirical_l2"]["curve"] == [] and "check_wall_s" not in rec["timings"]
    assert certified_table([rec])[1][0][-1] == "skipped"
    code, out, err = cli("certify", *[a for k, v in TINY.items() if k != "check_images"
                                      for a in (f"--{k.replace('_', '-')}", v)], "--check-images", "0")
    assert code == 0, err
    assert "integrity checks skipped: smoothadv_within_certificate" in out and "passed" not in out, out


@pytest.mark.parametrize("passed, expected", [
    ([True, True], True), ([True, None], None), ([None, None], None), ([None, False], False), ([True, False], False),
])
def test_checks_passed_is_false_on_a_failure_then_null_on_a_skip(passed, expected):
    from clipguard.tasks.certify import all_passed

    assert all_passed([{"name": str(i), "passed": p} for i, p in enumerate(passed)]) is expected


@pytest.mark.parametrize("opts, needle", [
    ({"sigma": 0.0}, "--sigma"), ({"failure_prob": 0.5}, "--failure-prob"), ({"n": 0}, "--n "),
    ({"radii": "0,-1"}, "--radii"),
    ({"radii": "a"}, "--radii"), ({"check_images": -1}, "--check-images"),
])
def test_bad_options_are_one_line_errors(opts, needle):
    with pytest.raises(ClipguardError, match=needle):
        run_certify(certify_config(**{**TINY, **opts}), progress=False)


def test_noise_trained_adapter_certifies_more_at_half_radius(tmp_path):
    """Cohen et al.'s recipe (Gaussian noise augmentation, no adversary) on a toy LoRA: more images certified at
    L2 radius 0.5 than the base toy CLIP, same images, same seed."""
    from clipguard.finetune.config import finetune_config
    from clipguard.tasks.finetune import run_finetune

    ft = run_finetune(finetune_config(model="toy", dataset="toy", device="cpu", method="lora", objective="noise",
                                      sigma=SIGMA, eps="0", lora_targets=["attn", "c_fc", "c_proj"], epochs=8,
                                      batch_size=64, lr=1e-2, save_every=0, eval_limit=20, eval_batch_size=20,
                                      eval_steps=1, run_dir=str(tmp_path / "noise")), progress=False)
    assert ft["finetune"]["objective"] == "noise" and ft["finetune"]["sigma"] == SIGMA
    opts = {**TINY, "limit": 30, "n0": 50, "n": 1000, "check_images": 1}
    base = run_certify(certify_config(**opts), progress=False)["metrics"]["certified"]
    noise = run_certify(certify_config(**opts, adapter=str(tmp_path / "noise")), progress=False)["metrics"]["certified"]
    at = {e["radius"]: e["certified_acc"] for e in base}, {e["radius"]: e["certified_acc"] for e in noise}
    assert at[1][0.5] >= at[0][0.5] + 0.1, (base, noise)


def test_noise_objective_needs_sigma_and_only_it():
    with pytest.raises(ClipguardError, match="--sigma"):
        finetune_config_for(objective="noise")  # checked on construction
    with pytest.raises(ClipguardError, match="--sigma is used only"):
        finetune_config_for(objective="tecoa", sigma=0.25)


def finetune_config_for(**opts):
    from clipguard.finetune.config import finetune_config

    # a run folder outside the checkout: configs probe (create) it on construction
    return finetune_config(model="toy", dataset="toy", run_dir=tempfile.mkdtemp(prefix="clipguard-unused-"), **opts)


def test_cli_builds_the_config(fake_task, cli, tmp_path):
    import clipguard.tasks.certify as task

    got = fake_task(task, "run_certify")
    code, _, err = cli("certify", "--model", "toy", "--dataset", "toy", "--limit", "7", "--sigma", "0.5", "--n0",
                       "50", "--n", "2000", "--failure-prob", "0.01", "--noise-batch", "500", "--radii", "0,1",
                       "--seed", "3", "--out", tmp_path / "r.json", "--json")
    assert code == 0, err
    cfg = got["cfg"]
    assert (cfg.sigma, cfg.n0, cfg.n, cfg.failure_prob, cfg.noise_batch, cfg.radii) == \
        (0.5, 50, 2000, 0.01, 500, (0.0, 1.0))
    assert (cfg.run.limit, cfg.run.seed, cfg.run.model) == (7, 3, "toy")
    code, _, err = cli("certify", "--sigma", "-1")
    assert code == 2 and "--sigma" in err and len(err.strip().splitlines()) == 1


def test_bench_cell_and_report(tmp_path):
    from clipguard.report.certify import section
    from clipguard.tasks.bench import load_suite, run_suite

    suite = tmp_path / "s.toml"
    suite.write_text('[[cell]]\nid = "c"\nkind = "certify"\nlabel = "toy"\n'
                     + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY.items()))
    run_suite(suite, tmp_path / "out", progress=False)
    rec = json.loads((tmp_path / "out" / "records" / "c.json").read_text())
    assert rec["task"] == "certified_robustness" and rec["bench"]["cell"] == "c"
    lines = section([rec], tmp_path)
    assert lines[0].startswith("## Certified") and (tmp_path / "certified_vs_radius.png").is_file()
    assert any(line.startswith("| toy | toy | 0.25 | 300 |") for line in lines), lines
    # the HTML report carries the same section (table and embedded curve); a report without certify records has none
    from clipguard.report.build import build_report

    info = build_report(tmp_path / "out", tmp_path / "rep" / "report.md", html_out=tmp_path / "rep" / "report.html")
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<h2>Certified robustness (randomized smoothing)</h2>" in page and 'alt="certified_vs_radius"' in page
    assert "<td>toy</td><td>toy</td><td>0.25</td><td>300</td>" in page and info["certify"]["body"][0][:4] == \
        ["toy", "toy", "0.25", "300"]
    assert (tmp_path / "rep" / "report.md").read_text().count("## Certified robustness") == 1
    eval_only = tmp_path / "eval-only"
    eval_only.mkdir()
    rec2 = {**rec, "task": "zero_shot_classification"}
    (eval_only / "e.json").write_text(json.dumps(rec2))
    other = build_report(eval_only, tmp_path / "rep2" / "report.md", html_out=tmp_path / "rep2" / "report.html")
    assert other["certify"] is None and "Certified robustness" not in (tmp_path / "rep2" / "report.html").read_text()
    _, cells = load_suite("benchmarks/certify-toy.toml")  # the committed suite parses
    assert {c["kind"] for c in cells} == {"finetune", "certify"}
