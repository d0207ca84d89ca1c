"""Hugging Face ``datasets`` sources: cifar10, cifar100 and any ``hf:ORG/NAME``."""

from __future__ import annotations

import numpy as np
import torch

from clipguard.data.base import ImageSet, stratified_indices
from clipguard.data.images import to_uint8_chw
from clipguard.errors import ClipguardError
from clipguard.specs import DatasetSpec


def _guess_column(features, kinds: tuple[str, ...]) -> str | None:
    for name, feat in features.items():
        if type(feat).__name__ in kinds:
            return name
    return None


def load_hf(spec: DatasetSpec, split: str, limit: int | None, seed: int, size=None) -> ImageSet:
    import datasets

    try:
        ds = datasets.load_dataset(spec.hf_path, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ClipguardError(f"--split {split!r} does not exist in {spec.hf_path}: {e}") from None
        raise ClipguardError(f"--dataset {spec.text!r}: {e}") from None
    except Exception as e:  # offline, unknown repo, no permission: all are "can't get it from the hub"
        raise ClipguardError(
            f"cannot load dataset {spec.text!r} ({spec.hf_path}) from the Hugging Face hub "
            f"({type(e).__name__}); offline? set HF_DATASETS_CACHE to a cache that holds it, "
            "or export it as folders and use --dataset imagefolder:PATH"
        ) from None
    img_col = spec.image_column or _guess_column(ds.features, ("Image",))
    lab_col = spec.label_column or _guess_column(ds.features, ("ClassLabel",))
    for opt, col in (("--image-column", img_col), ("--label-column", lab_col)):
        if col is None or col not in ds.features:
            raise ClipguardError(
                f"{opt} {col!r} is not a column of {spec.hf_path}; columns: {', '.join(ds.features)}"
            )
    labels = np.asarray(ds[lab_col], dtype=np.int64)
    idx = stratified_indices(labels, limit, seed)
    sub = ds.select(idx.tolist()) if len(idx) < len(ds) else ds
    images = to_uint8_chw((row[img_col] for row in sub), size, what=f"--dataset {spec.text!r}")
    feat = ds.features[lab_col]
    names = list(feat.names) if hasattr(feat, "names") else None
    return ImageSet(images=images, labels=torch.from_numpy(labels[idx]), classnames=names, spec=spec.text,
                    name=spec.name, split=split, limit=limit, seed=seed,
                    indices=idx.tolist() if limit else None, info={"hf_path": spec.hf_path})
