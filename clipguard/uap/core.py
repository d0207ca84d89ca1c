"""Universal adversarial perturbations (UAP): one image-agnostic delta ``v`` with ``||v|| <= eps`` that
changes the prediction on most images of a distribution.

Fooling rate = share of images whose predicted class changes when ``v`` is added (against the clean
*prediction*, not the label, as in Moosavi-Dezfooli et al. 2017). Targeted UAPs count success as
"the prediction becomes the target class" instead.

Methods (the registry ``UAP_METHODS`` in :mod:`clipguard.uap.fit`; each runs one epoch over the fitting set):
- ``sgd``: projected sign-gradient ascent on ``v`` over mini-batches with per-image clipped cross-entropy
  (the SGD-UAP family, Shafahi et al. 2020), see :mod:`clipguard.uap.sgd`. Fast on a GPU.
- ``deepfool``: the original loop (Moosavi-Dezfooli et al. 2017, "Universal adversarial perturbations"),
  see :mod:`clipguard.uap.deepfool`.

Where ``v`` lives: "model" resolution (default) is the model's input size and images are resized to it
first, as attacks do; "native" is the dataset's own size and the classifier upsamples ``x + v``. Applied
to inputs of another size (another model or dataset), ``v`` is resized with the classifier's bicubic
(no clamp: ``v`` is signed) and projected back onto the eps-ball; for L2 the radius scales with
sqrt(area ratio), so ``v`` keeps its per-pixel energy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.distributed import gather_rows
from clipguard.errors import ClipguardError
from clipguard.models.inference import check_resolution, run_batches
from clipguard.specs import Eps, Norm, parse_eps, parse_norm

NORM_SLACK = 1e-6  # float32 rounding allowed above eps in checks


@dataclass(frozen=True)
class UAPConfig:
    """How to fit one universal perturbation. eps and step are in [0, 1] pixel units."""

    eps: Eps = parse_eps("10/255")  # radius of v: max |v| (linf) or ||v||_2 over the whole of v (l2)
    norm: Norm = Norm.LINF  # linf or l2
    method: str = "sgd"  # a name in clipguard.uap.fit.UAP_METHODS
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
        """Raise a one-line ClipguardError for any bad field but ``method`` (checked by
        :func:`clipguard.uap.fit.check_uap_config`, where the methods are registered); returns self."""
        if self.eps.value <= 0:
            raise ClipguardError(f"--eps {self.eps.text} must be > 0 (e.g. 10/255, [0, 1] pixel units)")
        check_resolution(self.resolution)
        if not 0 < self.target_fooling <= 1:
            raise ClipguardError(f"--target-fooling {self.target_fooling} must be a share in (0, 1], e.g. 0.8")
        for name, v in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if v < 1:
                raise ClipguardError(f"{name} {v} must be at least 1")
        if self.step is not None and self.step.value <= 0:
            raise ClipguardError(f"--step-size {self.step.text} must be > 0 ([0, 1] pixel units, e.g. 1/255)")
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


def universal_attack(v: torch.Tensor):
    """``v`` as an attack of the common contract (:data:`clipguard.attacks.registry.Attack`):
    ``(x, y) -> clamp(x + v, 0, 1)``, the same ``v`` for every image."""
    return lambda x, y=None: perturb(x, v)


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


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, inputs: Callable, *attacks: Callable | None,
            batch_size: int = 256, advance: Callable | None = None) -> list[torch.Tensor]:
    """Predicted classes (N,) on the device for uint8 ``images`` (a tensor or an ImageStream), once per attack
    (``None`` = clean); an attack is ``(x, y) -> x_adv``, here :func:`universal_attack` of a delta.

    ``advance(n, fooling=...)`` reports the running share of images whose prediction under the second
    attack differs from the first (the fooling rate when called as ``predict(m, x, f, None, universal_attack(v))``).
    """
    out: list[list[torch.Tensor]] = [[] for _ in attacks]
    changed = done = 0

    def compute(a: int, b: int, batch: torch.Tensor) -> list[torch.Tensor]:
        x = inputs(batch)
        return [model(attack(x, None) if attack is not None else x).argmax(1) for attack in attacks]

    def consume(a: int, b: int, preds: list[torch.Tensor]) -> None:
        nonlocal changed, done
        for store, p in zip(out, preds, strict=True):
            store.append(p)
        if advance is not None:
            changed += int((preds[1] != preds[0]).sum()) if len(preds) > 1 else 0
            done += b - a
            advance(b - a, fooling=changed / done)

    # the shared batch walker: a stream decoded by its workers, under torchrun this rank's batches (gathered below)
    device = model.text_embeddings.device if hasattr(model, "text_embeddings") else None
    run_batches(images, batch_size, compute, consume, device=device)
    return [gather_rows(torch.cat(p) if p else torch.empty(0, dtype=torch.long, device=device)) for p in out]


def random_control(v: torch.Tensor, norm: Norm, seed: int = 0) -> torch.Tensor:
    """A random +-1 sign pattern scaled to the same norm as ``v``: what chance alone fools."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.randint(0, 2, v.shape, generator=g) * 2 - 1).float().to(v.device)
    return r * (norm_of(v, norm) / norm_of(r, norm))


