"""Integrity checks attached to every robust number: each is {name, value, passed, detail}.

Cheap checks run always; ``sanity`` checks (eps sweep monotone, PGD vs FGSM, steps doubled, restarts)
cost extra attack runs and run with ``--sanity``. An attack not run in fp32 (``--attack-precision bf16``) is
always checked against fp32 on the same images (:func:`precision_check`).

Every check fails on a NaN or an infinity, in its inputs or in its value (:func:`check` enforces the value part
for every producer): comparisons with NaN are False, so ``not (x > limit)`` passes a NaN, and a number that is
not finite measured nothing.
"""

from __future__ import annotations

import math
import numbers

import torch

LINF_SLACK = 1e-6  # float32 rounding of x + delta
ZERO_GRAD_MAX = 0.05  # above this share of zero input gradients, robust numbers may be masked gradients
CONVERGENCE_POINTS = 0.01  # doubling the steps may move robust accuracy by at most 1 point
PRECISION_POINTS = 0.005  # a bf16 (fp16) attack's robust accuracy may differ from fp32's by at most 0.5 points


def finite(*values) -> bool:
    """Every number in ``values`` (numbers, tensors, nested lists / tuples / dict values) is finite."""
    for v in values:
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list | tuple):
            if not finite(*v):
                return False
        elif isinstance(v, torch.Tensor):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return False
        elif isinstance(v, numbers.Real) and not math.isfinite(v):
            return False
    return True


def check(name: str, value, passed: bool, detail: str = "") -> dict:
    """One check; it fails whatever ``passed`` says when ``value`` holds a NaN or an infinity."""
    ok = bool(passed) and finite(value)
    if bool(passed) and not ok:
        detail = f"{detail} [not finite: fails]"
    return {"name": name, "value": value, "passed": ok, "detail": detail}


def cheap_checks(run, eps: float, norm: str = "linf") -> list[dict]:
    """Checks on one AttackRun: within eps in its norm, in [0, 1], finite, gradients not masked (share of the
    attacked images)."""
    s = run.stats
    share = s["zero_grad"] / max(s["attacked"], 1)
    size = s["max_l2"] if norm == "l2" else s["max_linf"]
    what = "max ||x_adv - x||_2 per image" if norm == "l2" else "max |x_adv - x|"
    return [
        check(f"{norm}_within_eps", size, finite(eps) and size <= eps + LINF_SLACK,
              f"{what} vs eps {eps:.6g} (+{LINF_SLACK:g})"),
        check("in_unit_range", [s["min"], s["max"]], 0 <= s["min"] <= s["max"] <= 1, "adversarial pixels in [0, 1]"),
        check("no_nan", s["nan"], s["nan"] == 0, "NaN values in adversarial images"),
        check("zero_grad_share", round(share, 4), share <= ZERO_GRAD_MAX,
              f"share of images whose input gradient is exactly zero (<= {ZERO_GRAD_MAX})"),
        *aa_flag_checks(s.get("aa_flags")),
    ]


def saved_set_checks(adv: torch.Tensor, clean, eps: float, norm: str, *, batch_size: int = 512) -> list[dict]:
    """Checks on a saved adversarial set against the clean images it was made from (both (N, 3, H, W), as uint8 (a
    quantized set) or [0, 1] floats; ``clean(a, b)`` may also be a function giving those rows): every image within
    eps in its norm, pixels in [0, 1], all finite. What ``clipguard attack`` wrote and ``eval --adv-set`` scores."""
    size, lo, hi, nan = 0.0, 1.0, 0.0, 0
    for a in range(0, adv.shape[0], batch_size):
        x, c = adv[a:a + batch_size], clean(a, a + batch_size) if callable(clean) else clean[a:a + batch_size]
        x, c = (t.float().div(255) if t.dtype == torch.uint8 else t.float() for t in (x, c))  # uint8: quantized
        d = (x - c.to(x.device)).flatten(1)
        per = d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)
        size = max(size, float(per.max())) if per.numel() else size
        nan += int(torch.isnan(x).sum())
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    what = "max ||x_adv - x||_2 per image" if norm == "l2" else "max |x_adv - x|"
    return [
        check(f"adv_set_{norm}_within_eps", size, finite(eps) and size <= eps + LINF_SLACK,
              f"saved set: {what} vs eps {eps:.6g} (+{LINF_SLACK:g})"),
        check("adv_set_in_unit_range", [lo, hi], 0 <= lo <= hi <= 1, "saved set: pixels in [0, 1]"),
        check("adv_set_no_nan", nan, nan == 0, "saved set: NaN values"),
    ]


# AutoAttack's own flags (attacks.registry.AA_FLAGS, raised by pyautoattack.checks) as checks: name -> what it means
AA_FLAG_CHECKS = {
    "randomized": "AutoAttack found the forward randomized and the version is not rand (no EOT): rerun with "
                  "--aa-version rand",
    "zero_gradients": "AutoAttack found images with an exactly zero input gradient (masked gradients?)",
    "square_beats_white_box": "Square (black-box) lowered robust accuracy below the white-box attacks': gradients "
                              "are unreliable, attack adaptively",
    "dynamic": "AutoAttack found gradient calls inside the forward (a test-time defense): its attacks alone may be "
               "insufficient",
}


def aa_flag_checks(flags) -> list[dict]:
    """One check per AutoAttack flag (passed: AutoAttack did not raise it); none when AutoAttack did not run."""
    if flags is None:
        return []
    return [check(f"aa_{name}", name in flags, name not in flags, detail) for name, detail in AA_FLAG_CHECKS.items()]


def eps0_check(eps0_pred: torch.Tensor, clean_pred: torch.Tensor) -> dict:
    mismatches = int((eps0_pred != clean_pred).sum())
    return check("eps0_equals_clean", mismatches, mismatches == 0 and finite(eps0_pred, clean_pred),
                 "predictions changed by the attack at eps=0 (must be 0)")


def deterministic_check(classifier, x: torch.Tensor) -> dict:
    with torch.no_grad():
        a, b = classifier(x), classifier(x)
    diff = float((a - b).abs().max())
    return check("deterministic_forward", diff, diff == 0.0, "max |logits1 - logits2| over two identical passes")


def monotone_check(curve: list[tuple[str, float]]) -> dict:
    """Robust accuracy must not rise as eps grows (curve sorted by eps)."""
    rises = [(a[0], b[0]) for a, b in zip(curve, curve[1:], strict=False) if b[1] > a[1] + 1e-12]
    accs = [a for _, a in curve]
    if not finite(accs):  # NaN never "rises", so the rule alone would pass it
        return check("eps_sweep_monotone", accs, False, "a robust accuracy along the eps sweep is not finite")
    return check("eps_sweep_monotone", len(rises), not rises,
                 "robust accuracy rose along the eps sweep at " + ", ".join(f"{a}->{b}" for a, b in rises)
                 if rises else "robust accuracy never rises with eps")


def stronger_check(name: str, strong: float, weak: float, what: str) -> dict:
    return check(name, {"strong": strong, "weak": weak}, strong <= weak + 1e-12, what)


def precision_check(low: float, fp32: float, precision: str, images: int) -> dict:
    """Robust accuracy of the attack run in ``precision`` vs the same attack in fp32 on the same ``images``
    images: within :data:`PRECISION_POINTS` (two-sided; bf16 rounding weakens small-eps gradients, which
    overestimates robustness). On 256 images that is one image at most."""
    delta = abs(low - fp32)
    value = {precision: low, "fp32": fp32, "images": images, "delta": round(delta, 6)}
    return check(f"{precision}_matches_fp32", value, delta <= PRECISION_POINTS + 1e-12,
                 f"{precision} vs fp32 robust accuracy on the same first {images} images (within "
                 f"{PRECISION_POINTS * 100:g} points)")


def converged_check(acc: float, acc_double: float) -> dict:
    delta = abs(acc - acc_double)
    return check("steps_converged", round(delta, 4), finite(acc, acc_double) and delta <= CONVERGENCE_POINTS,
                 "robust accuracy change when steps are doubled (> 1 point: not converged)")


def restarts_check(acc1: float, acc5: float) -> dict:
    """5 restarts must not be weaker than 1, and should lower robust accuracy by at most 1 point."""
    return check("restarts_5_vs_1", {"restarts_1": acc1, "restarts_5": acc5},
                 acc5 <= acc1 + 1e-12 and acc1 - acc5 <= CONVERGENCE_POINTS,
                 "5 restarts must not be weaker, and should lower robust acc by <= 1 point")
