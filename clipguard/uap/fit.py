"""Fitting a universal perturbation: the method registry (``UAP_METHODS``), the fitting loop and its metrics.

A method is one epoch over the fitting set, ``(ctx, v, epoch) -> (v, rate)``: it optimises the one delta
``v`` shared by every image (per-image attacks are :mod:`clipguard.attacks.registry`). Once fitted, ``v``
is applied through the same attack contract as every other attack: :func:`~clipguard.uap.core.universal_attack`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clipguard.progress import progress_bar
from clipguard.records.metrics import accuracy_counts, attack_success_counts, count, put
from clipguard.registry import Registry
from clipguard.uap.core import FitContext, UAPConfig, predict, universal_attack
from clipguard.uap.deepfool import deepfool_uap_epoch
from clipguard.uap.sgd import sgd_epoch

Method = Callable[[FitContext, torch.Tensor, int], tuple[torch.Tensor, float]]  # (ctx, v, epoch) -> (v, rate)

UAP_METHODS: Registry[Method] = Registry("--method")
UAP_METHODS.register("sgd", sgd_epoch)
UAP_METHODS.register("deepfool", deepfool_uap_epoch)


def check_uap_config(cfg: UAPConfig) -> UAPConfig:
    """Every field checked (the method against the registry), one ClipguardError naming the option."""
    UAP_METHODS.check(cfg.method)
    return cfg.validate()


@dataclass
class UAPFit:
    delta: torch.Tensor  # float32 (1, 3, H, W) on the CPU, ||delta|| <= eps
    clean_pred: torch.Tensor  # (N,) fitting-set predictions without v (CPU)
    adv_pred: torch.Tensor  # (N,) fitting-set predictions with the final v (CPU)
    history: list[float]  # per epoch: the rate the method reported (what the stopping rule saw)
    timings: dict


def fit_uap(model: nn.Module, images: torch.Tensor, cfg: UAPConfig, inputs: Callable, *,
            progress: bool = True) -> UAPFit:
    """Fit one universal perturbation on uint8 ``images`` (the fitting set).

    Args:
        model: the target, a [0, 1] -> logits ZeroShotClassifier (fp32).
        cfg: a validated :class:`UAPConfig` (``target_class`` already an index).
        inputs: uint8 batch -> [0, 1] pixels on the device at the resolution v lives at.

    Shape:
        images: uint8 (N, 3, H, W); returned delta: float32 (1, 3, h, w) with (h, w) = inputs' size.

    Stops after ``cfg.epochs`` passes or once an epoch's rate reaches ``cfg.target_fooling``.
    """
    n, t0 = images.shape[0], time.perf_counter()
    (reference,) = predict(model, images, inputs, None, batch_size=cfg.batch_size)
    counted = torch.ones_like(reference, dtype=torch.bool)
    if cfg.target_class is not None:
        counted = reference != cfg.target_class
    size = inputs(images[:1]).shape[-2:]
    v = torch.zeros(1, 3, *size, device=reference.device)
    history, seen = [], 0
    desc = f"uap {cfg.method} {cfg.norm.value} eps={cfg.eps.text}"
    with progress_bar(n * cfg.epochs, desc, enabled=progress, sharded=True) as advance:
        ctx = FitContext(model, images, reference, inputs, cfg, counted, advance,
                         torch.Generator().manual_seed(cfg.seed))
        for epoch in range(cfg.epochs):
            v, rate = UAP_METHODS.get(cfg.method)(ctx, v, epoch)
            history.append(round(rate, 4))
            seen += n
            if rate >= cfg.target_fooling:
                break
    if reference.device.type == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    (adv,) = predict(model, images, inputs, universal_attack(v), batch_size=cfg.batch_size)
    timings = {"wall_s": round(time.perf_counter() - t0, 4), "fit_s": round(fit_s, 4), "epochs_run": len(history),
               "images_seen": seen, "images_per_s": round(seen / fit_s, 2)}
    return UAPFit(v.detach().float().cpu().contiguous(), reference.cpu(), adv.cpu(), history, timings)


def uap_metrics(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor,
                target: int | None = None) -> dict:
    """fooling_rate, acc1 (clean), perturbed_acc, attack_success_rate (share of clean-correct images the
    UAP makes wrong) and, for a targeted UAP, targeted_success_rate over images whose label is not the target;
    each k / n of integers, with its ``counts`` (records.metrics.put)."""
    labels, clean_pred, adv_pred = labels.cpu(), clean_pred.cpu(), adv_pred.cpu()
    n = labels.shape[0]
    m = put({}, "fooling_rate", count(adv_pred != clean_pred), n)
    put(m, "acc1", *accuracy_counts(clean_pred, labels))
    put(m, "perturbed_acc", *accuracy_counts(adv_pred, labels))
    put(m, "attack_success_rate", *attack_success_counts(labels, clean_pred, adv_pred))
    if target is not None:
        other = labels != target
        put(m, "targeted_success_rate", count(adv_pred[other] == target), count(other))
    m["counts"] = m.pop("counts")  # after the numbers
    return m
