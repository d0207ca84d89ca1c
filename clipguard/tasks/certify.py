"""``clipguard certify`` as a library function: config in, record out.

Certified L2 robustness of the zero-shot classifier smoothed with Gaussian noise (Cohen et al. 2019's CERTIFY,
:mod:`clipguard.smoothing.core`), at the model's input resolution, noise in [0, 1] pixel units. The record
holds every image's certificate, certified accuracy over a grid of radii, the smoothed classifier's clean accuracy
and abstain rate, timings, and an integrity check: SmoothAdv's L2 PGD at each checked image's certified radius
must not beat the certificate. The same attack at the grid radii gives the empirical robust accuracy of the
smoothed classifier on that sample (an upper bound the certified curve stays under). The check has its own progress
bar and its own timings (``check_wall_s``, ``check_samples_per_s``); ``--check-images 0`` skips it, and then the
record lists its checks as skipped (``passed`` null) and ``checks_passed`` is null: not false (nothing failed), not
true (nothing was checked).

Every image's noise comes from its own generator seeded by (``--seed``, image position), so the same options
(including ``--noise-batch``) give the same record.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from clipguard.config import flat
from clipguard.defenses.adaptive import defense_cost, defense_record
from clipguard.models.inference import autocast_for, to_pixels
from clipguard.progress import progress_bar
from clipguard.records.metrics import at_run_confidence, put
from clipguard.records.schema import make_record
from clipguard.smoothing.core import (
    ABSTAIN,
    Smoothed,
    certificate_check,
    certified_counts,
    certify,
    check_samples,
    majority,
    skipped_checks,
    smoothadv_pgd,
)
from clipguard.tasks.configs import CertifyConfig, certify_config
from clipguard.tasks.setup import prepare

CERTIFY_STREAM, CHECK_STREAM = 0, 1  # independent noise streams of one seed: certificates, integrity check


__all__ = ["CertifyConfig", "certify_config", "run_certify"]


@at_run_confidence  # every _ci at --confidence (not --failure-prob: that is each certificate's)
def run_certify(cfg: CertifyConfig, *, progress: bool = True) -> dict:
    """Certify every image of the run; returns a ``clipguard.result/1`` record (task ``certified_robustness``).

    Example:
        >>> rec = run_certify(certify_config(model="toy", dataset="toy", limit=20, sigma=0.25, n=10_000))
        >>> rec["metrics"]["certified"]  # [{"radius": 0.0, "certified_acc": ...}, ...]
    """
    started = time.perf_counter()
    p = prepare(cfg.run, resolution="model", defense=cfg.defended)  # the noise lives at the model's input size
    smoothed = Smoothed(p.classifier, cfg.sigma, len(p.prompts.classnames), cfg.noise_batch, p.clip.precision)
    certs, base_pred, timings = _certify_all(p, cfg, smoothed, progress)
    labels, radii = p.data.labels.tolist(), list(cfg.radii)
    # Every rate is k / n of integers, its counts beside it (records.metrics.put).
    metrics = put({}, "acc1", sum(b == y for b, y in zip(base_pred, labels, strict=True)), len(labels))
    put(metrics, "smoothed_acc1", *certified_counts(certs, labels, 0.0))
    put(metrics, "abstain_rate", sum(c.prediction == ABSTAIN for c in certs), len(certs))
    metrics["certified"] = [put({"radius": r}, "certified_acc", *certified_counts(certs, labels, r)) for r in radii]
    metrics["counts"] = metrics.pop("counts")  # after the numbers
    checks, empirical, check_timings = _checks(p, cfg, smoothed, certs, radii, progress)
    return make_record("certified_robustness", clip=p.clip, started=started,
                       dataset=p.data, prompts=p.prompts, metrics=metrics,
                       timings=p.timings({**timings, **check_timings}), text_embeddings=p.text.to_record(),
                       adapter=cfg.run.adapter, adapters=p.adapters, config=flat(cfg),
                       smoothing=_protocol(cfg, p), empirical_l2=empirical, checks=checks,
                       checks_passed=all_passed(checks), per_image=_per_image(p, certs, base_pred),
                       **_defense(p, cfg))


def _defense(p, cfg: CertifyConfig) -> dict:
    """--defense: the record's ``defense`` section (the smoothed classifier is the defended one; the SmoothAdv check
    attacks it through the defense, averaging --check-samples noise draws per step)."""
    if p.undefended is None:
        return {}
    cost = defense_cost(p, precision=p.clip.precision, batch_size=cfg.noise_batch)
    return {"defense": defense_record(p, plan=None, cost=cost, evaluation="adaptive: certified, and the SmoothAdv "
                                      "check attacks the smoothed defended classifier through the defense")}


def all_passed(checks: list[dict]) -> bool | None:
    """A record's ``checks_passed``: False when a check failed, else None when one was skipped (``passed`` None:
    an unchecked certificate is not a passed one), else True."""
    passed = [c["passed"] for c in checks]
    return False if False in passed else None if None in passed else True


def _protocol(cfg: CertifyConfig, p) -> dict:
    """The record's ``smoothing`` section: the settings, units and definitions behind its numbers."""
    return {"method": "randomized smoothing, CERTIFY (Cohen et al. 2019)", "sigma": cfg.sigma, "n0": cfg.n0,
            "n": cfg.n, "alpha": cfg.failure_prob, "resolution": list(p.data.images.shape[-2:]),
            "noise": "N(0, sigma^2 I) added to [0, 1] pixels at the model's input size, not clamped",
            "radius_units": "L2 norm, [0, 1] pixel units at the model's input size",
            "acc1": "the base classifier on the clean images",
            "smoothed_acc1": "certified accuracy at radius 0: CERTIFY's prediction correct, not abstained",
            "precision": p.clip.precision}


def _per_image(p, certs: list, base_pred: list[int]) -> list[dict]:
    """One entry per image: dataset index, label, the base classifier's clean prediction and the certificate
    (prediction -1 = abstain, count of n, pA lower bound, radius)."""
    rows = zip(certs, p.data.labels.tolist(), base_pred, strict=True)
    return [{"index": p.data.indices[i] if p.data.indices else i, "label": y, "base_prediction": b,
             "prediction": c.prediction, "count": c.count, "pa_lower": c.pa_lower, "radius": c.radius,
             "correct": c.prediction == y} for i, (c, y, b) in enumerate(rows)]


def _pixels(data, positions: list[int], device: torch.device) -> torch.Tensor:
    """[0, 1] float (K, 3, H, W) on ``device``: the images at ``positions`` (the one place certify reads images)."""
    return to_pixels(data.images[positions], device)  # a tensor or an ImageStream: both index by position lists


def _generator(seed: int, stream: int, position: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` whose draws depend only on (seed, stream, image position)."""
    state = np.random.SeedSequence([seed % 2**63, stream, position]).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def _certify_all(p, cfg: CertifyConfig, smoothed: Smoothed, progress: bool) -> tuple[list, list[int], dict]:
    """(certificates, base classifier's clean predictions, timings) for every image, one image at a time."""
    dev, n = p.clip.device, len(p.data)
    certs, base_pred, abstained = [], [], 0
    t0 = time.perf_counter()
    with progress_bar(n * (cfg.n0 + cfg.n), "certify", enabled=progress, unit="sample") as advance:
        for i in range(n):
            x = _pixels(p.data, [i], dev)
            with torch.no_grad(), autocast_for(dev, smoothed.precision):
                base_pred.append(int(p.classifier(x).argmax()))
            certs.append(certify(smoothed, x[0], n0=cfg.n0, n=cfg.n, alpha=cfg.failure_prob,
                                 generator=_generator(cfg.run.seed, CERTIFY_STREAM, i, dev)))
            abstained += certs[-1].prediction == ABSTAIN
            advance(cfg.n0 + cfg.n, abstained=abstained)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return certs, base_pred, {"wall_s": round(wall, 3), "images_per_s": round(n / wall, 4),
                              "samples_per_s": round(n * (cfg.n0 + cfg.n) / wall, 1), "noise_batch": smoothed.batch}


def _checks(p, cfg: CertifyConfig, smoothed: Smoothed, certs: list, radii: list[float],
            progress: bool) -> tuple[list, dict, dict]:
    """(checks, empirical curve, timings): the integrity check on the first ``check_images`` certified images
    (radius > 0), and the empirical L2 robust accuracy of the smoothed classifier on the first ``check_images``
    images, beside their certified accuracy: SmoothAdv PGD at each grid radius; an image counts at radius r if the
    smoothed classifier's majority stays correct unattacked and at every grid radius up to r (RobustBench's
    accounting, worst case over the radii). ``--check-images 0``: both skipped, and the record says so."""
    empirical = {"attack": "SmoothAdv L2 PGD on the Monte-Carlo smoothed classifier (Salman et al. 2019)",
                 "steps": cfg.check_steps, "samples": cfg.check_samples, "n": cfg.check_n}
    if cfg.check_images == 0:
        why = "--check-images 0"
        return skipped_checks(why), {**empirical, "images": 0, "curve": [], "skipped": why}, {}  # no check timings
    dev, gen = p.clip.device, _generator(cfg.run.seed, CHECK_STREAM, 0, p.clip.device)
    chosen = [i for i, c in enumerate(certs) if c.radius > 0][:cfg.check_images]
    sample = list(range(min(cfg.check_images, len(certs))))
    per_image = {"steps": cfg.check_steps, "samples": cfg.check_samples, "num": cfg.check_n}
    attacked = sum(r > 0 for r in radii) * len(sample)  # the curve attacks the sample once per radius > 0
    recounted = (1 + sum(r == 0 for r in radii)) * len(sample)  # unattacked majorities: before the loop, at r = 0
    total = check_samples(len(chosen) + attacked, **per_image) + recounted * cfg.check_n  # noisy samples classified
    t0 = time.perf_counter()
    with progress_bar(total, "check (SmoothAdv)", enabled=progress, unit="sample") as advance:
        attack = {"steps": cfg.check_steps, "samples": cfg.check_samples, "generator": gen, "advance": advance}
        x = _pixels(p.data, chosen, dev) if chosen else None
        checks = certificate_check(smoothed, x, [certs[i] for i in chosen], num=cfg.check_n, alpha=cfg.failure_prob,
                                   **attack)
        checks[0]["positions"] = chosen  # the checked images' positions in the run (the detail's indices point here)
        x, labels = _pixels(p.data, sample, dev), p.data.labels[sample]
        robust = majority(smoothed, x, cfg.check_n, gen, advance) == labels
        curve = []
        for r in radii:  # an image broken at a radius stays broken at every larger one (the same x_adv is inside)
            adv = smoothadv_pgd(smoothed, x, labels, torch.full((len(sample),), r), **attack) if r > 0 else x
            robust = robust & (majority(smoothed, adv, cfg.check_n, gen, advance) == labels)
            point = put({"radius": r}, "robust_acc", int(robust.sum()), len(sample))
            curve.append(put(point, "certified_acc", *certified_counts(certs[:len(sample)], labels.tolist(), r)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return checks, {**empirical, "images": len(sample), "curve": curve}, {
        "check_wall_s": round(wall, 3), "check_samples_per_s": round(total / wall, 1)}
