"""Running a classifier over a dataset: pixels onto the device, autocast, out-of-memory-safe batches.

``predict_logits`` is the clean pass every command shares; ``run_batches`` is the batch walker that
attacks use too; ``attack_inputs`` puts uint8 images at the resolution where a perturbation lives.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
from torch import nn

from clipguard.data.stream import chunks
from clipguard.distributed import batch_range, gather_rows
from clipguard.distributed import start as start_ranks
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


def copied_ahead(batches, device: torch.device | None):
    """(position, batch) pairs of ``batches`` with each batch on ``device``, copied while the model works.

    On CUDA a helper thread draws and pins batch k + 2 (page-locked memory: the copy can run asynchronously), batch
    k + 1 is copied on a side stream, and batch k is handed over once the current stream is made to wait for its
    copy: the host-to-device copy overlaps the model's kernels instead of queuing behind them on one stream.
    Batches already on the device (``--decode device``) pass through. Elsewhere this is ``batches`` unchanged
    (``to_pixels`` moves each batch when it is used)."""
    if device is None or device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)
    it = iter(batches)

    def draw():
        item = next(it, None)
        if item is None or item[1].is_cuda or item[1].is_pinned():
            return item
        return item[0], item[1].pin_memory()

    def copy(item):
        a, x = item
        if x.is_cuda:
            return a, x, None
        with torch.cuda.stream(side):
            y = x.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return a, y, done

    def hand_over(staged):
        a, y, done = staged
        if done is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            y.record_stream(current)  # allocated on the side stream, used on this one
        return a, y

    staged = None
    with ThreadPoolExecutor(1, thread_name_prefix="clipguard-pin") as pool:
        upcoming = pool.submit(draw)
        while (item := upcoming.result()) is not None:
            upcoming = pool.submit(draw)
            issued = copy(item)
            if staged is not None:
                yield hand_over(staged)
            staged = issued
    if staged is not None:
        yield hand_over(staged)


def run_batches(images, batch_size: int, compute, consume, *, device: torch.device | None = None) -> int:
    """Walk ``images`` (a uint8/float tensor or an ``ImageStream``) in order: ``out = compute(a, b, x)`` on the
    batch ``x`` = images[a:b], then ``consume(a, b, out)``. A CUDA out-of-memory error inside ``compute`` halves
    the batch and retries it (``consume`` only ever sees finished batches). Returns the batch size that worked.
    With a CUDA ``device`` the batches arrive there already, copied while the previous one ran
    (:func:`copied_ahead`).

    Under torchrun each rank walks only its own whole batches (:func:`clipguard.distributed.batch_range`): the
    caller gathers what ``consume`` kept (:func:`clipguard.distributed.gather_rows`)."""
    pin = torch.cuda.is_available()
    start_ranks()  # under torchrun: from here an error on one rank is printed by that rank
    first, last = batch_range(images.shape[0], batch_size)
    walk = chunks(images, batch_size, pin_memory=pin, start=first, stop=last)
    for start, chunk in copied_ahead(walk, device):
        i = 0
        while i < chunk.shape[0]:
            stop = min(i + batch_size, chunk.shape[0])
            try:
                out = compute(start + i, start + stop, chunk[i:stop])
            except RuntimeError as e:
                if not is_oom(e) or batch_size == 1:
                    raise
                batch_size //= 2
                torch.cuda.empty_cache()
                continue
            consume(start + i, start + stop, out)
            i = stop
    return batch_size


def decode_rates(images, elapsed: float) -> dict:
    """For a streamed set: how fast the workers decode and how fast the model consumes (img/s), apart."""
    stats = getattr(images, "stats", None)
    return stats.rates(elapsed) if stats is not None else {}


@torch.no_grad()
def predict_logits(classifier, images, *, batch_size: int = 256, precision: str = "fp32",
                   progress: bool = True, description: str = "clean", on_batch=None) -> tuple[torch.Tensor, dict]:
    """Logits (N, C) fp32 on CPU for uint8 (or [0, 1] float) ``images`` (a tensor or an ``ImageStream``); halves
    the batch on out-of-memory.

    ``on_batch(a, b, x)`` sees every uint8 batch once, in order (per-image digests without a second read).

    Returns (logits, timings) where timings = {"wall_s", "images_per_s", "batch_size"} (+ "decode_img_s" and
    "model_img_s" for a streamed set).
    """
    device = classifier.text_embeddings.device
    out, n = [], images.shape[0]
    num_classes = classifier.text_embeddings.shape[0]

    def compute(a: int, b: int, x: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, precision):
            logits = classifier(to_pixels(x, device)).float().cpu()
        if on_batch is not None:  # after the forward: a batch halved on out-of-memory is seen once
            on_batch(a, b, x)
        return logits

    t0 = time.perf_counter()
    with progress_bar(n, description, enabled=progress, sharded=True) as advance:
        def consume(a: int, b: int, logits: torch.Tensor) -> None:
            out.append(logits)
            advance(b - a, **rate_fields(images, time.perf_counter() - t0))

        batch_size = run_batches(images, batch_size, compute, consume, device=device)
    logits = gather_rows(torch.cat(out) if out else torch.empty(0, num_classes))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return logits, {"wall_s": round(wall, 4), "images_per_s": round(n / wall, 2), "batch_size": batch_size,
                            **decode_rates(images, wall)}


def rate_fields(images, elapsed: float) -> dict:
    """Progress-bar fields ``decode=... img/s  model=... img/s`` for a streamed set (none in memory)."""
    return {k.removesuffix("_img_s"): f"{v:,.0f} img/s" for k, v in decode_rates(images, elapsed).items() if v}


def attack_inputs(classifier, batch_uint8: torch.Tensor, resolution: str) -> torch.Tensor:
    """[0, 1] pixels where the perturbation lives: the model's input size ("model", as TeCoA/FARE do)
    or the dataset's own size ("native", the classifier upsamples the perturbed image)."""
    x = to_pixels(batch_uint8, classifier.text_embeddings.device)
    if resolution == "model" and tuple(x.shape[-2:]) != classifier.input_size:
        x = classifier.resize(x)
    return x
