"""Running a classifier over a dataset: pixels onto the device, autocast, out-of-memory-safe batches.

``predict_logits`` is the clean pass every command shares; ``run_batches`` is the batch walker that
attacks use too; ``attack_inputs`` puts uint8 images at the resolution where a perturbation lives.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.progress import progress_bar

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESOLUTIONS = ("model", "native")  # where a perturbation lives: the model's input size, or the dataset's own


def check_resolution(resolution: str) -> str:
    if resolution not in RESOLUTIONS:
        raise ClipguardError(f"--resolution {resolution!r}: use model or native")
    return resolution


def autocast_for(device: torch.device, precision: str):
    """``nullcontext`` for fp32, else autocast to bf16/fp16 on the device (chosen once per loop)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class Autocast(nn.Module):
    """Runs the wrapped [0, 1] -> logits module under autocast (bf16 attacks, bf16 training) and returns fp32."""

    def __init__(self, model: nn.Module, precision: str):
        super().__init__()
        self.model, self.precision = model, precision
        self.text_embeddings = getattr(model, "text_embeddings", None)  # AutoAttack reads the class count

    def forward(self, x):
        with autocast_for(x.device, self.precision):
            return self.model(x).float()


def to_pixels(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float [0, 1] on ``device`` (converted on the device); float input is taken as
    [0, 1] pixels already (saved adversarial sets)."""
    if batch.dtype != torch.uint8:
        return batch.to(device, non_blocking=True).float()
    return batch.to(device, non_blocking=True).float().div_(255)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_batches(n: int, batch_size: int, compute, consume) -> int:
    """Walk [0, n) in batches: ``out = compute(start, stop)`` then ``consume(start, stop, out)``. A CUDA
    out-of-memory error inside ``compute`` halves the batch and retries it (``consume`` only ever sees
    finished batches). Returns the batch size that worked."""
    i = 0
    while i < n:
        stop = min(i + batch_size, n)
        try:
            out = compute(i, stop)
        except RuntimeError as e:
            if not is_oom(e) or batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            continue
        consume(i, stop, out)
        i = stop
    return batch_size


@torch.no_grad()
def predict_logits(classifier, images: torch.Tensor, *, batch_size: int = 256, precision: str = "fp32",
                   progress: bool = True, description: str = "clean") -> tuple[torch.Tensor, dict]:
    """Logits (N, C) fp32 on CPU for uint8 (or [0, 1] float) ``images``; halves the batch on out-of-memory.

    Returns (logits, timings) where timings = {"wall_s", "images_per_s", "batch_size"}.
    """
    device = classifier.text_embeddings.device
    out, n = [], images.shape[0]

    def compute(a: int, b: int) -> torch.Tensor:
        with autocast_for(device, precision):
            return classifier(to_pixels(images[a:b], device)).float().cpu()

    t0 = time.perf_counter()
    with progress_bar(n, description, enabled=progress) as advance:
        batch_size = run_batches(n, batch_size, compute, lambda a, b, logits: (out.append(logits), advance(b - a)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return torch.cat(out), {"wall_s": round(wall, 4), "images_per_s": round(n / wall, 2), "batch_size": batch_size}


def attack_inputs(classifier, batch_uint8: torch.Tensor, resolution: str) -> torch.Tensor:
    """[0, 1] pixels where the perturbation lives: the model's input size ("model", as TeCoA/FARE do)
    or the dataset's own size ("native", the classifier upsamples the perturbed image)."""
    x = to_pixels(batch_uint8, classifier.text_embeddings.device)
    if resolution == "model" and tuple(x.shape[-2:]) != classifier.input_size:
        x = classifier.resize(x)
    return x
