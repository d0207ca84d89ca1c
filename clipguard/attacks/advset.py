"""Saved adversarial sets: ``adv.safetensors`` holding images, labels and a JSON manifest.

``--quantize`` stores uint8 (what an attacker who saves PNGs delivers): each pixel becomes the level k/255
nearest to the attack's output inside the eps-ball of the exact clean image the attack perturbed, so the
stored set is still within eps. ``image_digest`` names the clean images a set was made from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors import torch as safetensors_torch  # called through the module: tests make its save_file fail

from clipguard.data.stream import chunks
from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write, writing_output

SCHEMA = "clipguard.advset/1"


def quantize(adv: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Round [0,1] ``adv`` to uint8, staying inside the Linf ball of radius ``eps`` around ``clean``.

    ``clean`` is the exact image the attack perturbed: uint8, or float [0,1] (at model resolution the resized
    clean image lies between lattice points; rounding it first would move the ball's centre by up to half a
    level and let the stored set exceed eps by as much). Each pixel becomes the level k/255 nearest to ``adv``
    among ceil((clean - eps) * 255) .. floor((clean + eps) * 255) within 0 .. 255, so
    ``max |q / 255 - clean| <= eps`` holds exactly (up to float rounding, far below 1e-6).

    Raises:
        ClipguardError: eps below half a level around an off-lattice clean pixel, where no level lies
            within eps (only a uint8 clean image, or eps >= 0.5/255, guarantees one).
    """
    if adv.shape != clean.shape:
        raise ValueError(f"quantize: adv {tuple(adv.shape)} and clean {tuple(clean.shape)} differ in shape")
    out = torch.empty(adv.shape, dtype=torch.uint8)
    tol = 1e-6  # in levels: float64 error is ~1e-13, so an exact k/255 bound never loses its level
    for i in range(0, adv.shape[0], 64):  # float64 at 224 px is 1.2 MB per image: chunks keep it small
        a = adv[i:i + 64].detach().cpu().double()
        c = clean[i:i + 64].detach().cpu()
        c = c.double() / 255 if c.dtype == torch.uint8 else c.double()
        lo = torch.ceil((c - eps) * 255 - tol).clamp_(min=0)
        hi = torch.floor((c + eps) * 255 + tol).clamp_(max=255)
        if bool((lo > hi).any()):
            raise ClipguardError(f"--quantize: no uint8 image lies within eps {eps:.6g} of the clean images the "
                                 "attack perturbed (resized, between uint8 levels); use eps >= 0.5/255 or "
                                 "--resolution native")
        out[i:i + 64] = torch.minimum(torch.maximum(torch.round(a * 255), lo), hi).to(torch.uint8)
    return out


def image_digest(images: torch.Tensor) -> str:
    """``sha256:<hex>`` over uint8 images (shape, then bytes, contiguous on CPU): ties a saved set to the exact
    clean images it was made from, not only to their labels."""
    if images.dtype != torch.uint8:
        raise ValueError(f"image_digest wants the uint8 clean images, got {images.dtype}")
    h = hashlib.sha256(json.dumps(list(images.shape)).encode())
    for _, x in chunks(images, 1024):  # a streamed set is hashed batch by batch: the same bytes, the same digest
        h.update(x.detach().cpu().contiguous().numpy().data)  # the buffer itself, no copy
    return "sha256:" + h.hexdigest()


@dataclass
class AdvSet:
    images: torch.Tensor  # float [0,1] or uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    manifest: dict


def save_adv_set(path, images: torch.Tensor, labels: torch.Tensor, manifest: dict) -> None:
    manifest = {"schema": SCHEMA, **manifest, "n": int(labels.shape[0]), "dtype": str(images.dtype).split(".")[-1],
                "shape": list(images.shape)}
    tensors = {"images": images.contiguous(), "labels": labels.to(torch.int64).contiguous()}
    meta = {"manifest": json.dumps(manifest)}
    with writing_output(path, "the adversarial set", hold=True):  # a full disk costs the set, not the record
        atomic_write(path, lambda tmp: safetensors_torch.save_file(tensors, tmp, metadata=meta))


def load_adv_set(path) -> AdvSet:
    try:
        with safe_open(str(path), framework="pt") as f:
            manifest = json.loads((f.metadata() or {}).get("manifest", "{}"))
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ClipguardError(f"--adv-set {str(path)!r} cannot be read ({e})") from None
    if manifest.get("schema") != SCHEMA:
        raise ClipguardError(f"--adv-set {str(path)!r} is not a clipguard adversarial set (no {SCHEMA} manifest)")
    return AdvSet(images, labels, manifest)
