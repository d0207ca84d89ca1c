"""``imagefolder:PATH`` — one sub-folder per class, class names from the folder names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipguard.data.base import ImageSet, stratified_indices
from clipguard.data.images import to_uint8_chw
from clipguard.errors import ClipguardError
from clipguard.specs import DatasetSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _read(path: Path):
    """One image file as RGB, decoded and closed (torchvision's ImageFolder loader; a lazy ``Image.open``
    per file would hold every file open until the stack)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def load_folder(spec: DatasetSpec, split: str, limit: int | None, seed: int, size=None) -> ImageSet:
    root = Path(spec.path)
    # A split sub-folder (PATH/test/<class>/...) is used when present, else PATH itself holds the classes.
    base = root / split if (root / split).is_dir() else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((base / c).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(ci)
    if not files:
        raise ClipguardError(
            f"--dataset {spec.text!r}: no images under {str(base)!r} (expected {base}/<class>/<image>.png)"
        )
    labels = np.asarray(labels, dtype=np.int64)
    idx = stratified_indices(labels, limit, seed)
    try:
        images = to_uint8_chw((_read(files[i]) for i in idx), size, what=f"--dataset {spec.text!r}")
    except OSError as e:
        raise ClipguardError(f"--dataset {spec.text!r}: cannot read an image ({e})") from None
    return ImageSet(images=images, labels=torch.from_numpy(labels[idx]), classnames=classes, spec=spec.text,
                    name=spec.name, split=split, limit=limit, seed=seed,
                    indices=idx.tolist() if limit else None, info={"path": str(base)})
