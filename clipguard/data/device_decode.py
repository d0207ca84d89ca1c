"""``--decode device``: JPEG files decoded by ``torchvision.io.decode_jpeg`` on the run's device (nvJPEG on a GPU,
libjpeg-turbo on the CPU) and brought to the model's input size there, by the same geometry as the PIL protocol of
:mod:`clipguard.data.images` (shorter side resized, antialiased bicubic; centre crop).

The decode workers then only read bytes; the GPU does the work PIL did on the CPU cores. It is not bit-identical
to the PIL protocol (another JPEG decoder, and torch's float bicubic rounds where PIL's fixed-point one does), so
it is opt-in, records name it (``dataset.preprocess``), and a prepared cache made one way is never read the other.
It matches one geometry, OpenAI CLIP's (:data:`DEVICE_GEOMETRY`): a model whose own is another (SigLIP's squash,
MobileCLIP's bilinear, a transformers processor's order) is refused in one line (:func:`unmatched_geometry`).
How close it comes is measured against PIL itself (tests/test_device_decode.py, the README's tolerance:
:data:`TOLERANCE`). Items that are not JPEG, or that the decoder refuses (CMYK on nvJPEG, say), go through the PIL
protocol unchanged: every image is decoded one way or the other, and the counts are reported.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from clipguard.data.images import DEFAULT_GEOMETRY, Geometry, eval_geometry, protocol_suffix
from clipguard.run_options import DECODES, check_decode  # --decode: PIL on the CPU workers, or torchvision on --device

# What --decode device keeps to against the PIL protocol (tests check it on JPEGs of many sizes, qualities and
# aspect ratios: on the CPU, and on a GPU where one is lent): the mean absolute difference of every image, in pixel
# levels of 255, below torchvision's own bound between nvJPEG and libjpeg-turbo (its test_decode_jpeg_cuda), and the
# share of images whose top-1 prediction is unchanged.
TOLERANCE = {"mean_abs": 2.0, "top1_agreement": 0.99}

JPEG_MAGIC = b"\xff\xd8\xff"

# The one model geometry :func:`geometry` reproduces: shorter side, bicubic, centre crop, open_clip's order (a JPEG
# decodes to RGB or grey, so the order of the RGB conversion does not matter here).
DEVICE_GEOMETRY = DEFAULT_GEOMETRY


def unmatched_geometry(geometry: Geometry | None, protocol: str) -> str | None:
    """Why ``--decode device`` cannot give a model its own pixels (``protocol``: what its geometry is called), or
    None when it can (:data:`DEVICE_GEOMETRY`)."""
    if geometry is None or geometry == DEVICE_GEOMETRY:
        return None
    return (f"it resizes only by open_clip's shorter side, bicubic, and this model's images are made by "
            f"{protocol!r}")


def is_jpeg(data) -> bool:
    return bytes(data[:3]) == JPEG_MAGIC


def output_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """(H', W') an (h, w) image is resized to before the centre crop: the PIL protocol's rule
    (:func:`clipguard.data.images.eval_geometry`): torchvision's ``Resize(H)`` for a square input (shorter side to
    H, the other truncated), open_clip's ``ResizeKeepRatio`` (both scaled by the smaller ratio, rounded) otherwise."""
    th, tw = size
    if th == tw:
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(th * long / short)
        return (th, new_long) if h <= w else (new_long, th)
    ratio = min(h / th, w / tw)
    return round(h / ratio), round(w / ratio)


def geometry(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, w) on any device -> uint8 (3, H, W): the PIL protocol's resize and centre crop, in torch."""
    h, w = img.shape[-2:]
    new = output_size(int(h), int(w), size)
    if new != (h, w):
        img = F.resize(img, list(new), interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(img, list(size))


def decode_batch(items: list[torch.Tensor], size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, int]:
    """Items of one batch -> (uint8 (N, 3, H, W) on ``device``, how many went through PIL).

    Each item is either an encoded JPEG (uint8 1-D, the file's bytes) or an image already through the PIL protocol
    (uint8 (3, H, W), a non-JPEG file decoded by a worker). JPEGs are decoded together in one call; a batch the
    decoder refuses is decoded one by one, and an image it still refuses goes through PIL here.
    """
    out = torch.empty((len(items), 3, *size), dtype=torch.uint8, device=device)
    jpeg = [k for k, it in enumerate(items) if it.ndim == 1]
    pil = 0
    for k, it in enumerate(items):
        if it.ndim == 3:
            out[k] = it.to(device, non_blocking=True)
    if not jpeg:
        return out, len(items)
    on = device if device.type == "cuda" else torch.device("cpu")  # decode_jpeg decodes on cuda or the CPU
    try:
        decoded = _decode_jpeg([items[k] for k in jpeg], on)
    except RuntimeError:
        decoded = [None] * len(jpeg)
    for k, img in zip(jpeg, decoded, strict=True):
        if img is None:
            try:
                img = _decode_jpeg(items[k], on)
            except RuntimeError:
                out[k] = pil_protocol(items[k], size).to(device)
                pil += 1
                continue
        out[k] = geometry(img.to(device, non_blocking=True), size)
    return out, pil + len(items) - len(jpeg)


def _decode_jpeg(data, device: torch.device):
    """``torchvision.io.decode_jpeg`` to RGB, without EXIF rotation (as PIL's open). torchvision 0.29 warns that its
    decoders will move to TorchCodec; they are what a GPU image ships (0.26 there), so the warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def pil_protocol(data: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, H, W) through the PIL protocol (the fallback)."""
    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        a = np.array(eval_geometry(im, size), dtype=np.uint8)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


__all__ = ["DECODES", "DEVICE_GEOMETRY", "TOLERANCE", "check_decode", "decode_batch", "geometry", "is_jpeg",
           "output_size", "protocol_suffix", "unmatched_geometry"]
