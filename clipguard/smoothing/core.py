"""Randomized smoothing: Cohen et al.'s CERTIFY, and the SmoothAdv attack that checks its certificates.

The smoothed classifier ``g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)`` over a base classifier ``f`` (the
ZeroShotClassifier, [0, 1] pixels -> logits). Noise is in [0, 1] pixel units at the model's input size, drawn on
the device from a seeded ``torch.Generator`` and never clamped (as Cohen et al. do). Certified radii are L2
distances in the same pixel units.

- CERTIFY (Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019):
  select ``cA`` from ``n0`` noisy samples, count ``cA`` in ``n`` fresh ones, take the one-sided Clopper-Pearson
  lower bound ``pA_lower`` at level ``alpha``; abstain below 1/2, else certify radius ``sigma * Phi^-1(pA_lower)``.
- SmoothAdv's L2 PGD (Salman et al., "Provably Robust Deep Learning via Adversarially Trained Smoothed
  Classifiers", NeurIPS 2019) on the Monte-Carlo soft smoothed classifier: the empirical attack that must not
  beat a certificate (:func:`certificate_check`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.stats import beta, norm
from torch import nn

from clipguard.attacks.integrity import check
from clipguard.models.inference import autocast_for, is_oom
from clipguard.records.metrics import ratio

Advance = Callable[[int], None]  # told how many noisy samples were just classified (a progress bar's advance)
ABSTAIN = -1  # the prediction of an abstained certificate (Cohen et al.'s reference code uses -1 too)
L2_SLACK = 1e-5  # float32 rounding of ||x_adv - x||_2


def _quiet(samples: int) -> None:
    """The default ``advance``: no progress bar."""


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one image."""

    prediction: int  # the certified class cA, or ABSTAIN
    count: int  # noisy samples (of n) that f classified as cA
    n: int  # estimation samples
    pa_lower: float  # one-sided Clopper-Pearson lower bound on P(f(x + noise) = cA) at level alpha
    radius: float  # certified L2 radius in [0, 1] pixel units (0.0 on abstain)


@dataclass
class Smoothed:
    """A base classifier under Gaussian noise: counts its predictions on noisy copies of an image."""

    classifier: nn.Module  # [0, 1] pixels -> (N, C) logits, eval mode
    sigma: float  # noise standard deviation, [0, 1] pixel units
    num_classes: int
    batch: int = 1000  # noisy samples per forward pass (halved on CUDA out-of-memory)
    precision: str = "fp32"  # autocast of the counting passes

    @torch.no_grad()
    def counts(self, x: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """Class counts (C,) int64 on CPU of ``f(x + sigma * z)`` over ``num`` draws of z ~ N(0, I).

        ``x``: one image (3, H, W) in [0, 1] on the classifier's device; the noise is drawn there from
        ``generator`` in batches of ``self.batch`` and is not clamped.
        """
        total, done = torch.zeros(self.num_classes, dtype=torch.long, device=x.device), 0
        while done < num:
            b = min(self.batch, num - done)
            try:
                noisy = torch.randn((b, *x.shape), generator=generator, device=x.device).mul_(self.sigma).add_(x)
                with autocast_for(x.device, self.precision):
                    pred = self.classifier(noisy).argmax(1)
            except RuntimeError as e:
                if not is_oom(e) or self.batch == 1:
                    raise
                # CUDA out of memory: halve the batch, keep the counts (the noise stream, so the record, then differs)
                self.batch //= 2
                torch.cuda.empty_cache()
                continue
            total += torch.bincount(pred, minlength=self.num_classes)
            done += b
        return total.cpu()


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from ``k`` successes of ``n``."""
    return float(beta.ppf(alpha, k, n - k + 1)) if k > 0 else 0.0


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion from ``k`` successes of ``n``."""
    return float(beta.ppf(1 - alpha, k + 1, n - k)) if k < n else 1.0


def certified_radius(sigma: float, pa_lower: float) -> float:
    """Cohen et al.'s L2 radius ``sigma * Phi^-1(pA_lower)`` in [0, 1] pixel units (for pA_lower >= 1/2)."""
    return float(sigma * norm.ppf(pa_lower))


def certify(smoothed: Smoothed, x: torch.Tensor, *, n0: int, n: int, alpha: float,
            generator: torch.Generator) -> Certificate:
    """Cohen et al.'s CERTIFY for one image ``x`` (3, H, W) in [0, 1]: wrong with probability at most ``alpha``.

    Selection (``n0`` samples) and estimation (``n`` samples) use successive draws of ``generator``.
    """
    top = int(smoothed.counts(x, n0, generator).argmax())
    count = int(smoothed.counts(x, n, generator)[top])
    pa_lower = lower_confidence_bound(count, n, alpha)
    if pa_lower < 0.5:
        return Certificate(ABSTAIN, count, n, pa_lower, 0.0)
    return Certificate(top, count, n, pa_lower, certified_radius(smoothed.sigma, pa_lower))


def certified_accuracy(certs: list[Certificate], labels: list[int], radius: float) -> float:
    """Share of images certified correct at ``radius``: not abstained, cA = label and certified radius >= radius."""
    return ratio(*certified_counts(certs, labels, radius))


def certified_counts(certs: list[Certificate], labels: list[int], radius: float) -> tuple[int, int]:
    """(images certified correct at ``radius``, images): the integers behind :func:`certified_accuracy`."""
    return sum(c.prediction == y and c.radius >= radius for c, y in zip(certs, labels, strict=True)), len(certs)


def smoothadv_pgd(smoothed: Smoothed, x: torch.Tensor, classes: torch.Tensor, radii: torch.Tensor, *, steps: int,
                  samples: int, generator: torch.Generator, advance: Advance = _quiet) -> torch.Tensor:
    """SmoothAdv's L2 PGD: images pushed away from ``classes`` under the soft smoothed classifier.

    Maximises ``-log(mean_i softmax(f(x + delta + sigma z_i))[class])`` over ``||delta||_2 <= radius`` and
    ``x + delta`` in [0, 1]: ``samples`` fresh noise draws per step (the Monte-Carlo expectation), normalised
    gradient steps of ``2.5 * radius / steps``, projection onto the ball, then onto [0, 1]. fp32. ``advance(m)``
    is told the ``m = K * samples`` noisy samples of each step.

    Shape:
        x: (K, 3, H, W) in [0, 1]; classes: (K,) int64; radii: (K,) L2, [0, 1] pixel units -> (K, 3, H, W).
    """
    clf, (k, *shape) = smoothed.classifier, x.shape
    r = radii.to(x.device, torch.float32).view(k, 1, 1, 1)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        noise = torch.randn((samples, k, *shape), generator=generator, device=x.device) * smoothed.sigma
        probs = F.softmax(clf((x + delta + noise).flatten(0, 1)).float(), dim=1).view(samples, k, -1).mean(0)
        loss = -probs.gather(1, classes.to(x.device).view(k, 1)).clamp_min(1e-12).log().sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = delta.detach() + 2.5 * r / steps * grad / _l2(grad).clamp_min(1e-12)
        delta = delta * (r / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)  # onto the L2 ball
        delta = (x + delta).clamp(0, 1) - x  # onto [0, 1]: only shrinks |delta| per pixel
        advance(k * samples)
    return (x + delta).detach()


def _l2(t: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norms (K, 1, 1, 1) of a (K, 3, H, W) tensor."""
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


CHECK_NAMES = ("smoothadv_within_certificate", "smoothadv_l2_within_radius")  # what certificate_check returns


def check_samples(images: int, *, steps: int, samples: int, num: int) -> int:
    """Noisy samples :func:`certificate_check` classifies for ``images`` certified images (a progress bar's total):
    ``steps x samples`` per image for the attack, ``num`` per image for the re-estimate."""
    return images * (steps * samples + num)


def skipped_checks(reason: str) -> list[dict]:
    """:func:`certificate_check`'s checks, not run: ``passed`` is None (neither passed nor failed) and ``skipped``
    says so, so a record never shows a check it did not run as passed."""
    return [{"name": name, "value": None, "passed": None, "skipped": True, "detail": f"skipped: {reason}"}
            for name in CHECK_NAMES]


def certificate_check(smoothed: Smoothed, x: torch.Tensor, certs: list[Certificate], *, steps: int, samples: int,
                      num: int, alpha: float, generator: torch.Generator, advance: Advance = _quiet) -> list[dict]:
    """Attack each certified image (``x`` (K, 3, H, W), ``certs`` not abstained) at its certified radius with
    SmoothAdv's PGD, then re-estimate the smoothed classifier there from ``num`` samples.

    A certificate promises ``P(f(x_adv + noise) = cA) >= 1/2`` inside its radius; it is violated when the
    Clopper-Pearson upper bound of that probability (level ``alpha / K``, Bonferroni over the K images) is below
    1/2. Returns two checks: no violation, and every attacked image within its radius (both pass, vacuously, when
    no image is certified). ``advance(m)`` is told the noisy samples as they are classified
    (:func:`check_samples` in all).
    """
    if not certs:
        return [check("smoothadv_within_certificate", 0, True, "no certified image (radius > 0) to attack"),
                check("smoothadv_l2_within_radius", 0.0, True, "no certified image (radius > 0) to attack")]
    classes = torch.tensor([c.prediction for c in certs], dtype=torch.long)
    radii = torch.tensor([c.radius for c in certs], dtype=torch.float32)
    x_adv = smoothadv_pgd(smoothed, x, classes, radii, steps=steps, samples=samples, generator=generator,
                          advance=advance)
    excess = (_l2(x_adv - x).view(-1).cpu() - radii).max().item()
    level = alpha / len(certs)
    broken = []
    for i, c in enumerate(certs):
        if upper_confidence_bound(int(smoothed.counts(x_adv[i], num, generator)[c.prediction]), num, level) < 0.5:
            broken.append(i)
        advance(num)
    # A NaN attack tested nothing: its images are counted as the argmax of NaN logits, so it cannot pass.
    attacked = bool(torch.isfinite(x_adv).all())
    return [
        check("smoothadv_within_certificate", len(broken), attacked and not broken,
              f"of {len(certs)} certified images attacked at their certified radius (SmoothAdv L2 PGD, {steps} steps "
              f"x {samples} noise samples), those where P(g = cA) < 1/2 at level {level:.3g} "
              f"(Clopper-Pearson, {num} samples)" + (f": images {broken}" if broken else "")
              + ("" if attacked else "; the attacked images are not finite")),
        check("smoothadv_l2_within_radius", round(excess, 8), excess <= L2_SLACK,
              f"max ||x_adv - x||_2 - certified radius (<= {L2_SLACK:g})"),
    ]


def majority(smoothed: Smoothed, x: torch.Tensor, num: int, generator: torch.Generator,
             advance: Advance = _quiet) -> torch.Tensor:
    """The smoothed classifier's top class (K,) int64 on CPU for each image of ``x`` (K, 3, H, W), each from
    ``num`` noisy samples (no abstention: the empirical attack's view of g); ``advance(num)`` after each image."""
    tops = []
    for img in x:
        tops.append(smoothed.counts(img, num, generator).argmax())
        advance(num)
    return torch.stack(tops)
