"""Run one attack over a dataset in batches: adversarial predictions plus integrity statistics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.attacks.registry import AttackConfig, build_attack
from clipguard.distributed import gather_objects, gather_rows
from clipguard.models.inference import Autocast, attack_inputs, rate_fields, run_batches
from clipguard.progress import progress_bar


@dataclass
class AttackRun:
    clean_pred: torch.Tensor  # (N,) predictions on the unperturbed inputs (fp32 target)
    adv_pred: torch.Tensor  # (N,) predictions on the adversarial inputs (= clean for images not attacked)
    attacked: torch.Tensor  # (N,) bool: the clean-correct images, the only ones attacked (RobustBench)
    stats: dict = field(default_factory=dict)  # max_linf, max_l2, min, max, nan, zero_grad, attacked
    timings: dict = field(default_factory=dict)
    adv_images: torch.Tensor | None = None  # float [0,1] on CPU when keep_adv (clean for images not attacked)
    source_clean_pred: torch.Tensor | None = None  # surrogate's own predictions (transfer attacks)
    source_adv_pred: torch.Tensor | None = None

    @property
    def robust(self) -> torch.Tensor:
        """(N,) bool: attacked (so clean-correct) and still correct: robust accuracy is its mean, <= clean."""
        return self.attacked & (self.adv_pred == self.clean_pred)


def zero_grad_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Images whose cross-entropy input gradient is exactly zero (a sign of masked gradients)."""
    if x.shape[0] == 0:
        return 0
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return int((g.flatten(1).abs().amax(1) == 0).sum())


def run_attack(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig, *,
               batch_size: int = 128, resolution: str = "model", precision: str = "fp32", keep_adv: bool = False,
               progress: bool = True, description: str | None = None, craft_on: nn.Module | None = None,
               correct: torch.Tensor | None = None) -> AttackRun:
    """Attack uint8 ``images`` (a tensor or an ``ImageStream``) in batches, RobustBench's way: a clean pass first,
    then the attack runs only on the clean-correct images (the others cannot be robust and keep their clean input).

    Args:
        classifier: the target, a [0, 1] -> logits ZeroShotClassifier (fp32 by default).
        cfg: the attack; eps/alpha in [0, 1] pixel units.
        resolution: "model" (perturb at the model's input size) or "native" (at the dataset's size).
        precision: "fp32" (default) or "bf16"/"fp16" (weaker small-eps gradients; recorded as a warning).
        craft_on: a surrogate to craft on instead of the target (transfer attack); the target then
            classifies the result.
        correct: (N,) bool, which images count as clean-correct (the record's own clean pass); default: the
            target's clean predictions here.
    """
    device = classifier.text_embeddings.device
    target = classifier if precision == "fp32" else Autocast(classifier, precision)
    source = craft_on if craft_on is not None else target
    attack = build_attack(source, cfg)
    clean, adv, hit, kept, s_clean, s_adv = [], [], [], [], [], []
    stats = {"max_linf": 0.0, "max_l2": 0.0, "min": 1.0, "max": 0.0, "nan": 0, "zero_grad": 0, "attacked": 0,
             "correct": 0}

    def compute(a: int, b: int, batch: torch.Tensor) -> tuple:
        torch.manual_seed(batch_seed(cfg.seed, a))  # random starts depend on (seed, batch) only: any rank, any order
        x = attack_inputs(classifier, batch, resolution)
        y = labels[a:b].to(device)
        with torch.no_grad():
            clean_pred = target(x).argmax(1)
        mask = (clean_pred == y) if correct is None else correct[a:b].to(device) & (clean_pred == y)
        x_adv = x.clone()
        if mask.any():
            x_adv[mask] = attack(x[mask], y[mask]).detach()
        zero_grad = zero_grad_count(source, x[mask], y[mask])
        with torch.no_grad():
            preds = [clean_pred.cpu(), target(x_adv).argmax(1).cpu(), mask.cpu()]
            if craft_on is not None:
                preds += [craft_on(x).argmax(1).cpu(), craft_on(x_adv).argmax(1).cpu()]
        return x, x_adv, zero_grad, preds

    def consume(a: int, b: int, out: tuple) -> None:
        x, x_adv, zero_grad, preds = out
        for store, p in zip((clean, adv, hit, s_clean, s_adv), preds, strict=False):
            store.append(p)
        delta = (x_adv - x).flatten(1)
        stats["zero_grad"] += zero_grad
        stats["attacked"] += int(preds[2].sum())
        stats["max_linf"] = nan_max(stats["max_linf"], float(delta.abs().max()))
        stats["max_l2"] = nan_max(stats["max_l2"], float(delta.norm(dim=1).max()))
        stats["min"] = nan_min(stats["min"], float(x_adv.min()))
        stats["max"] = nan_max(stats["max"], float(x_adv.max()))
        stats["nan"] += int(torch.isnan(x_adv).sum())
        if keep_adv:
            kept.append(x_adv.cpu())
        stats["correct"] += int((preds[2] & (preds[1] == labels[a:b])).sum())
        advance(b - a, robust=stats["correct"] / b, **rate_fields(images, time.perf_counter() - t0))

    t0, n = time.perf_counter(), images.shape[0]
    with progress_bar(n, description or f"{cfg.name} eps={cfg.eps.text}", enabled=progress,
                      sharded=True) as advance:
        batch_size = run_batches(images, batch_size, compute, consume, device=device)
    stats.pop("correct")
    if hasattr(attack, "flags"):  # AutoAttack: the names of its own warnings (attacks.integrity.aa_flag_checks)
        stats["aa_flags"] = sorted(attack.flags)
    # Under torchrun: every rank's images, in dataset order, on every rank (a no-op in one process).
    stats = merge_stats(gather_objects(stats))
    preds = [gather_rows(_cat(p, torch.long)) for p in (clean, adv, s_clean, s_adv)]
    attacked = gather_rows(_cat(hit, torch.bool))
    size = classifier.input_size if resolution == "model" else tuple(images.shape[-2:])
    adv_images = gather_rows(torch.cat(kept) if kept else torch.empty(0, 3, *size)) if keep_adv else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return AttackRun(preds[0], preds[1], attacked, stats,
                     {"wall_s": round(wall, 4), "images_per_s": round(n / wall, 2), "batch_size": batch_size},
                     adv_images, preds[2] if craft_on is not None else None,
                     preds[3] if craft_on is not None else None)


def batch_seed(seed: int, position: int) -> int:
    """The seed of the batch starting at ``position``: a pure function of both, so a batch draws the same random
    start whichever process attacks it, and in whatever order."""
    return (seed * 1_000_003 + position) % 2**63


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def merge_stats(per_rank: list[dict]) -> dict:
    """One rank's statistics, or every rank's combined (max of the maxima, min of the minima, sums of counts)."""
    out = dict(per_rank[0])
    for st in per_rank[1:]:
        for k in ("max_linf", "max_l2", "max"):
            out[k] = nan_max(out[k], st[k])
        out["min"] = nan_min(out["min"], st["min"])
        for k in ("nan", "zero_grad", "attacked"):
            out[k] += st[k]
    if "aa_flags" in out:  # a flag raised on any rank
        out["aa_flags"] = sorted(set().union(*(st.get("aa_flags", ()) for st in per_rank)))
    return out


# NaN-keeping min / max: Python's max(0.0, nan) is 0.0, so a NaN batch vanished from the statistics and passed
# every check (in_unit_range read [1.0, 0.0] on an all-NaN run). torch's own reductions keep NaN already.
def nan_max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def nan_min(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)
