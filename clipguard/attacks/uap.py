"""Universal adversarial perturbations (UAP): one image-agnostic delta ``v`` with ``||v|| <= eps`` that
changes the prediction on most images of a distribution.

Fooling rate = share of images whose predicted class changes when ``v`` is added (against the clean
*prediction*, not the label, as in Moosavi-Dezfooli et al. 2017). Targeted UAPs count success as
"the prediction becomes the target class" instead.

Methods (a registry: ``list_uap_methods()``; each runs one epoch over the fitting set):
- ``sgd``: projected sign-gradient ascent on ``v`` over mini-batches with per-image clipped cross-entropy
  (the SGD-UAP family, Shafahi et al. 2020), see :mod:`clipguard.attacks.uap_sgd`. Fast on a GPU.
- ``deepfool``: the original loop (Moosavi-Dezfooli et al. 2017, "Universal adversarial perturbations"),
  see :mod:`clipguard.attacks.deepfool`.

Where ``v`` lives: "model" resolution (default) is the model's input size and images are resized to it
first, as attacks do; "native" is the dataset's own size and the classifier upsamples ``x + v``. Applied
to inputs of another size (another model or dataset), ``v`` is resized with the classifier's bicubic
(no clamp: ``v`` is signed) and projected back onto the eps-ball; for L2 the radius scales with
sqrt(area ratio), so ``v`` keeps its per-pixel energy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.specs import Eps, parse_eps, suggest

NORM_SLACK = 1e-6  # float32 rounding allowed above eps in checks
RESOLUTIONS = ("model", "native")


class Norm(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11; we support 3.10)
    """The ball ``v`` lives in; ``Norm("linf")`` and ``Norm.LINF`` are the same."""

    LINF = "linf"
    L2 = "l2"


def parse_norm(text: str | Norm) -> Norm:
    if isinstance(text, Norm):
        return text
    try:
        return Norm(str(text).lower())
    except ValueError:
        raise ClipguardError(f"--norm {text!r} is unknown: use linf or l2") from None


@dataclass(frozen=True)
class UAPConfig:
    """How to fit one universal perturbation. eps and step are in [0, 1] pixel units."""

    eps: Eps = parse_eps("10/255")  # radius of v: max |v| (linf) or ||v||_2 over the whole of v (l2)
    norm: Norm = Norm.LINF  # linf or l2
    method: str = "sgd"  # a key of list_uap_methods()
    target_fooling: float = 0.8  # stop once the fitting-set fooling (or targeted success) rate reaches this
    epochs: int = 10  # at most this many passes over the fitting set
    batch_size: int = 128  # images per gradient step (sgd) or per prediction pass (deepfool)
    step: Eps | None = None  # sgd step per batch (linf: per pixel; l2: norm of the step); None = eps / 10
    ce_clip: float = 5.0  # sgd: per-image cross-entropy clipped here (nats) so fooled images stop pulling v
    overshoot: float = 0.02  # deepfool: relative overshoot past the linearised decision boundary
    deepfool_steps: int = 10  # deepfool: at most this many linearisation steps per image
    candidates: int = 10  # deepfool: the top-k classes (by clean logit) whose boundaries are considered
    target_class: int | None = None  # index into the class list for a targeted UAP; None = untargeted
    resolution: str = "model"  # where v lives: "model" (input size) or "native" (dataset size)
    seed: int = 0  # seeds the shuffling of the fitting set

    def __post_init__(self):
        object.__setattr__(self, "norm", parse_norm(self.norm))  # "linf" and Norm.LINF both work

    @property
    def step_value(self) -> float:
        return self.step.value if self.step is not None else self.eps.value / 10

    def validate(self) -> UAPConfig:
        """Raise a one-line ClipguardError for any bad field; returns self."""
        if self.eps.value <= 0:
            raise ClipguardError(f"--eps {self.eps.text} must be > 0 (e.g. 10/255, [0, 1] pixel units)")
        if self.method not in _METHODS:
            close = suggest(self.method, list(_METHODS))
            hint = f" (did you mean {close}?)" if close else ""
            raise ClipguardError(f"--method {self.method!r} is unknown{hint}: use {' or '.join(_METHODS)}")
        if self.resolution not in RESOLUTIONS:
            raise ClipguardError(f"--resolution {self.resolution!r}: use model or native")
        if not 0 < self.target_fooling <= 1:
            raise ClipguardError(f"--target-fooling {self.target_fooling} must be a share in (0, 1], e.g. 0.8")
        for name, v in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if v < 1:
                raise ClipguardError(f"{name} {v} must be at least 1")
        if self.step is not None and self.step.value <= 0:
            raise ClipguardError(f"--step {self.step.text} must be > 0 ([0, 1] pixel units, e.g. 1/255)")
        return self

    def to_record(self) -> dict:
        step = self.step.to_record() if self.step else {"text": "eps/10", "value": self.step_value}
        return {"name": "uap", "method": self.method, "norm": self.norm.value, "eps": self.eps.to_record(),
                "step": step, "target_fooling": self.target_fooling, "epochs": self.epochs,
                "batch_size": self.batch_size, "ce_clip": self.ce_clip, "overshoot": self.overshoot,
                "deepfool_steps": self.deepfool_steps, "candidates": self.candidates,
                "target_class": self.target_class, "resolution": self.resolution, "seed": self.seed}


# ------------------------------------------------------------------------------------------ geometry


def norm_of(v: torch.Tensor, norm: Norm) -> float:
    return float(v.abs().max()) if Norm(norm) is Norm.LINF else float(v.flatten().norm(p=2))


def project(v: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    """Nearest point of the eps-ball: clamp (linf) or rescale when longer than eps (l2)."""
    if Norm(norm) is Norm.LINF:
        return v.clamp(-eps, eps)
    length = v.flatten().norm(p=2)
    return v * (eps / length) if length > eps else v


def scaled_eps(eps: float, norm: Norm, src: tuple[int, int], dst: tuple[int, int]) -> float:
    """The radius of a resized ``v``: eps for linf; for l2 scaled by sqrt(area ratio) (same per-pixel energy)."""
    return eps if Norm(norm) is Norm.LINF else eps * math.sqrt(dst[0] * dst[1] / (src[0] * src[1]))


def fit_to(v: torch.Tensor, size: tuple[int, int], norm: Norm, eps: float) -> torch.Tensor:
    """``v`` resized (bicubic, like the classifier) to ``size`` and projected back onto the eps-ball.

    Raises:
        ClipguardError: the aspect ratios differ by more than 1% (the UAP does not fit these images).
    """
    h, w = v.shape[-2:]
    if tuple(size) == (h, w):
        return v
    if abs((h / w) / (size[0] / size[1]) - 1) > 0.01:
        raise ClipguardError(f"the UAP is {h}x{w} but the images it is applied to are {size[0]}x{size[1]}: "
                             "aspect ratios differ, so the perturbation does not fit")
    out = F.interpolate(v, size=tuple(size), mode="bicubic", align_corners=False, antialias=h > size[0])
    return project(out, norm, scaled_eps(eps, norm, (h, w), size))


def perturb(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x + v`` kept in [0, 1] (clamping only shrinks the perturbation, so it stays in the ball)."""
    return (x + v).clamp(0, 1)


def hits(pred: torch.Tensor, reference: torch.Tensor, target: int | None) -> torch.Tensor:
    """Per image: fooled (prediction != reference) or, for a targeted UAP, prediction == target."""
    return pred != reference if target is None else pred == target


# ------------------------------------------------------------------------------------------- fitting


@dataclass
class FitContext:
    """What one epoch of a method needs. ``inputs`` turns uint8 images into [0, 1] pixels at v's size."""

    model: nn.Module  # [0, 1] pixels -> (N, C) logits, fp32
    images: torch.Tensor  # uint8 (N, 3, H, W) fitting set, on the CPU
    reference: torch.Tensor  # (N,) clean predictions on the device: what fooling is measured against
    inputs: Callable[[torch.Tensor], torch.Tensor]
    cfg: UAPConfig
    counted: torch.Tensor  # (N,) bool on the device: images that count (targeted: clean pred != target)
    advance: Callable  # progress: advance(n_images, **fields)
    generator: torch.Generator  # shuffles the fitting set, seeded by cfg.seed


Method = Callable[[FitContext, torch.Tensor, int], tuple[torch.Tensor, float]]  # (ctx, v, epoch) -> (v, rate)


def _sgd_epoch(ctx: FitContext, v: torch.Tensor, epoch: int) -> tuple[torch.Tensor, float]:
    from clipguard.attacks.uap_sgd import sgd_epoch

    return sgd_epoch(ctx, v, epoch)


def _deepfool_epoch(ctx: FitContext, v: torch.Tensor, epoch: int) -> tuple[torch.Tensor, float]:
    from clipguard.attacks.deepfool import deepfool_uap_epoch

    return deepfool_uap_epoch(ctx, v, epoch)


_METHODS: dict[str, Method] = {"sgd": _sgd_epoch, "deepfool": _deepfool_epoch}


def list_uap_methods() -> list[str]:
    return list(_METHODS)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, inputs: Callable, *deltas: torch.Tensor | None,
            batch_size: int = 256, advance: Callable | None = None) -> list[torch.Tensor]:
    """Predicted classes (N,) on the device for uint8 ``images``, once per delta (``None`` = clean).

    ``advance(n, fooling=...)`` reports the running share of images whose prediction under the second
    delta differs from the first (the fooling rate when called as ``predict(m, x, f, None, v)``).
    """
    out: list[list[torch.Tensor]] = [[] for _ in deltas]
    changed = done = 0
    for i in range(0, images.shape[0], batch_size):
        x = inputs(images[i:i + batch_size])
        for preds, v in zip(out, deltas, strict=True):
            preds.append(model(perturb(x, v) if v is not None else x).argmax(1))
        if advance is not None:
            changed += int((out[1][-1] != out[0][-1]).sum()) if len(out) > 1 else 0
            done += x.shape[0]
            advance(x.shape[0], fooling=changed / done)
    return [torch.cat(p) for p in out]


def random_control(v: torch.Tensor, norm: Norm, seed: int = 0) -> torch.Tensor:
    """A random +-1 sign pattern scaled to the same norm as ``v``: what chance alone fools."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.randint(0, 2, v.shape, generator=g) * 2 - 1).float().to(v.device)
    return r * (norm_of(v, norm) / norm_of(r, norm))


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
    from clipguard.progress import progress_bar

    n, t0 = images.shape[0], time.perf_counter()
    (reference,) = predict(model, images, inputs, None, batch_size=cfg.batch_size)
    counted = torch.ones_like(reference, dtype=torch.bool)
    if cfg.target_class is not None:
        counted = reference != cfg.target_class
    size = inputs(images[:1]).shape[-2:]
    v = torch.zeros(1, 3, *size, device=reference.device)
    history, seen = [], 0
    desc = f"uap {cfg.method} {cfg.norm.value} eps={cfg.eps.text}"
    with progress_bar(n * cfg.epochs, desc, enabled=progress) as advance:
        ctx = FitContext(model, images, reference, inputs, cfg, counted, advance,
                         torch.Generator().manual_seed(cfg.seed))
        for epoch in range(cfg.epochs):
            v, rate = _METHODS[cfg.method](ctx, v, epoch)
            history.append(round(rate, 4))
            seen += n
            if rate >= cfg.target_fooling:
                break
    if reference.device.type == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    (adv,) = predict(model, images, inputs, v, batch_size=cfg.batch_size)
    timings = {"wall_s": round(time.perf_counter() - t0, 4), "fit_s": round(fit_s, 4), "epochs_run": len(history),
               "images_seen": seen, "images_per_s": round(seen / fit_s, 2)}
    return UAPFit(v.detach().float().cpu().contiguous(), reference.cpu(), adv.cpu(), history, timings)


def uap_metrics(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor,
                target: int | None = None) -> dict:
    """fooling_rate, acc1 (clean), perturbed_acc, attack_success_rate (share of clean-correct images the
    UAP makes wrong) and, for a targeted UAP, targeted_success_rate over images whose label is not the target."""
    labels = labels.cpu()
    correct = clean_pred == labels
    m = {"fooling_rate": (adv_pred != clean_pred).float().mean().item(),
         "acc1": correct.float().mean().item(),
         "perturbed_acc": (adv_pred == labels).float().mean().item(),
         "attack_success_rate": (correct & (adv_pred != labels)).sum().item() / max(int(correct.sum()), 1)}
    if target is not None:
        other = labels != target
        m["targeted_success_rate"] = (adv_pred[other] == target).float().mean().item() if other.any() else 0.0
    return m
