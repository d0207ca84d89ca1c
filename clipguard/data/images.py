"""PIL / numpy images to one uint8 (N, 3, H, W) tensor."""

from __future__ import annotations

import numpy as np
import torch

# Photos of differing sizes are brought to one size on load (CLIP's own resize + centre crop).
LOAD_SIZE = 224


def _resize_crop(img, size: int):
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_uint8_chw(images) -> torch.Tensor:
    """Stack PIL images (any mode) as uint8 (N, 3, H, W). If sizes differ, each is resized
    (shorter side ``LOAD_SIZE``, bicubic) and centre-cropped to ``LOAD_SIZE`` first."""
    images = [im.convert("RGB") for im in images]
    if not images:
        return torch.empty(0, 3, LOAD_SIZE, LOAD_SIZE, dtype=torch.uint8)
    if len({im.size for im in images}) > 1:
        images = [_resize_crop(im, LOAD_SIZE) for im in images]
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
