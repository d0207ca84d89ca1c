"""Saved adversarial sets: ``adv.safetensors`` holding images, labels and a JSON manifest.

``--quantize`` stores uint8 (what an attacker who saves PNGs delivers): each pixel is rounded to k/255
and then clipped to the eps-ball of the clean uint8 pixel, so the stored set is still within eps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write

SCHEMA = "clipguard.advset/1"


def quantize(adv: torch.Tensor, clean_uint8: torch.Tensor, eps: float) -> torch.Tensor:
    """Round [0,1] ``adv`` to uint8, keeping |q - clean| <= floor(eps * 255) levels (so <= eps)."""
    k = math.floor(eps * 255 + 1e-6)
    q = torch.round(adv * 255)
    lo, hi = clean_uint8.float() - k, clean_uint8.float() + k
    return torch.minimum(torch.maximum(q, lo), hi).clamp(0, 255).to(torch.uint8)


@dataclass
class AdvSet:
    images: torch.Tensor  # float [0,1] or uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    manifest: dict


def save_adv_set(path, images: torch.Tensor, labels: torch.Tensor, manifest: dict) -> None:
    from safetensors.torch import save_file

    manifest = {"schema": SCHEMA, **manifest, "n": int(labels.shape[0]), "dtype": str(images.dtype).split(".")[-1],
                "shape": list(images.shape)}
    tensors = {"images": images.contiguous(), "labels": labels.to(torch.int64).contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"manifest": json.dumps(manifest)}))


def load_adv_set(path) -> AdvSet:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            manifest = json.loads((f.metadata() or {}).get("manifest", "{}"))
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ClipguardError(f"--adv-set {str(path)!r} cannot be read ({e})") from None
    if manifest.get("schema") != SCHEMA:
        raise ClipguardError(f"--adv-set {str(path)!r} is not a clipguard adversarial set (no {SCHEMA} manifest)")
    return AdvSet(images, labels, manifest)
