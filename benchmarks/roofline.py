"""Roofline arithmetic for the perf records: the FLOPs an image costs, the device's peak, achieved / peak.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` on images at the model's input
size (batches of 1 and 2: per-image and per-batch FLOPs apart), multiply-add = 2 FLOPs, matmuls, convolutions
and attention only (elementwise ops, norms and softmax are not counted: well under 1% of a ViT). Counting runs
with nn.MultiheadAttention's fused fast path off and SDPA's math backend, so attention shows up as the matmuls it
is (the fused kernels of a real run do the same arithmetic); on the fast path the counter sees no attention FLOPs
at all. Checked against open_clip's docs/model_profile.csv (image GFLOPs, also multiply-add x 2): ViT-B-32 at 224
counts 8.818 GFLOP (profile 8.82), ViT-L-14 162.03 (162.03).

A workload's roofline line: achieved TFLOP/s = FLOPs per image x images/s; ratio = achieved / the device's peak
dense TFLOP/s in the precision its matmuls ran in (None where the peak is unknown, e.g. on a CPU).

    import roofline  # from a script in benchmarks/
    f = roofline.image_flops(classifier, (3, 224, 224))  # clean forward
    line = roofline.roofline("eval", f, 14454, precision="bf16", device=torch.device("cuda"))
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# Peak dense (no 2:4 sparsity) TFLOP/s per matmul precision, keyed by a substring of torch.cuda.get_device_name;
# the first key found in the name wins, so the specific names come first. fp32 = the non-tensor-core FP32 rate.
# Sources: NVIDIA's H100 datasheet and the H100 Tensor Core GPU Architecture whitepaper (the datasheet gives
# tensor rates with sparsity, "1/2 lower without"): H100 SXM5 BF16/FP16 989.4, TF32 494.7, FP32 66.9 (torch
# names it "NVIDIA H100 80GB HBM3"); H100 PCIe BF16/FP16 756.5, TF32 378, FP32 51.2. NVIDIA's H200 datasheet:
# H200 SXM has H100 SXM's compute (BF16 1,979 and TF32 989 with sparsity, FP32 67), only more and faster memory.
# A100 datasheet: BF16/FP16 312, TF32 156, FP32 19.5. NVL boards (H100 NVL, H200 NVL) run lower clocks and are
# not listed: their peak is None rather than an SXM figure.
_H100_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVL": {},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100": _H100_SXM,
    "H200": _H100_SXM,
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The peak dense TFLOP/s of the named device in ``precision`` (bf16, fp16, tf32, fp32); None if unknown."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(precision)
    return None


def device_name(device: torch.device | str) -> str:
    """torch's name of a CUDA device ("NVIDIA H100 80GB HBM3"); "cpu" / "mps" otherwise; a string is a name."""
    if isinstance(device, str):
        return device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def matmul_precision(precision: str, device: torch.device) -> str:
    """The precision fp32 matmuls actually run in: tf32 on a CUDA device that allows it, else as given."""
    if precision == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


@contextlib.contextmanager
def _counting():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel hides its matmuls from the counter
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def count_flops(fn) -> int:
    """FLOPs (multiply-add = 2) of the matmuls, convolutions and attention ``fn()`` runs."""
    with _counting() as counter:
        fn()
    return int(counter.get_total_flops())


def image_flops(model: nn.Module, image_shape, *, grad: str | None = None, batch_size: int = 1) -> int:
    """FLOPs per image of ``model`` on images of ``image_shape`` (C, H, W), in batches of ``batch_size``.

    ``grad``: None = the forward (no grad); ``"input"`` = forward + the gradient to the input only, as an attack
    step takes it (parameters frozen for the count: no weight gradients); ``"params"`` = forward + backward to
    the parameters that require grad (a training step: activation gradients down to the first trainable layer,
    then the trainable weights' own). Parameters, their ``requires_grad`` and ``.grad`` are left as they were.

    Counted on batches of 1 and 2 images: the difference is what each image costs, the rest is paid once per
    batch (peft merging LoRA into attention weights each forward) and is shared by ``batch_size`` images.
    """
    if grad not in (None, "input", "params"):
        raise ValueError(f"grad={grad!r}: use None, 'input' or 'params'")
    one, two = (_batch_flops(model, (n, *image_shape), grad) for n in (1, 2))
    per_image, per_batch = two - one, 2 * one - two
    return round(per_image + per_batch / batch_size)


def _batch_flops(model: nn.Module, shape, grad: str | None) -> int:
    params = list(model.parameters())
    device = next(iter([*params, *model.buffers()])).device
    x = torch.rand(*shape, device=device)
    if grad is None:
        with torch.no_grad():
            return count_flops(lambda: model(x))
    flags, grads = [q.requires_grad for q in params], [q.grad for q in params]
    if grad == "input":
        x.requires_grad_(True)
        for q in params:
            q.requires_grad_(False)
    try:  # .backward, not autograd.grad: the counter's module hooks refuse autograd.grad
        with torch.enable_grad():
            return count_flops(lambda: model(x).float().sum().backward())
    finally:
        for q, flag, g in zip(params, flags, grads, strict=True):
            q.requires_grad_(flag)
            q.grad = g


def roofline(workload: str, flops_per_image: float, images_per_s: float, *, precision: str,
             device: torch.device | str, flops_model: str | None = None) -> dict:
    """One roofline line: achieved TFLOP/s = FLOPs per image x images/s, against the peak of ``device`` (a
    torch.device or a device name) in ``precision`` (the precision its matmuls ran in: bf16, fp16, tf32 or
    fp32). ``peak_tflops``, ``ratio`` and ``images_per_s_at_peak`` are None where the peak is unknown (a CPU,
    an unlisted GPU); ``flops_model`` says in words what one image's FLOPs are made of."""
    name = device_name(device)
    peak = peak_tflops(name, precision)
    achieved = flops_per_image * images_per_s / 1e12
    line = {"workload": workload, "flops_per_image": int(flops_per_image), "images_per_s": images_per_s,
            "achieved_tflops": float(f"{achieved:.6g}"), "peak_tflops": peak,
            "ratio": round(achieved / peak, 4) if peak else None,
            "images_per_s_at_peak": round(peak * 1e12 / flops_per_image, 1) if peak else None,
            "precision": precision, "device": name}
    if flops_model:
        line["flops_model"] = flops_model
    return line


def describe(line: dict) -> str:
    """A roofline line in one sentence, for a script's output."""
    head = (f"{line['workload']}: {line['flops_per_image'] / 1e9:.4g} GFLOP/img x {line['images_per_s']:,.1f} img/s"
            f" = {line['achieved_tflops']:.4g} TFLOP/s")
    if line["ratio"] is None:
        return f"{head} ({line['precision']}, {line['device']}: peak unknown)"
    return (f"{head} = {line['ratio']:.1%} of {line['peak_tflops']:g} ({line['precision']}, {line['device']}; "
            f"{line['images_per_s_at_peak']:,.0f} img/s at peak)")
