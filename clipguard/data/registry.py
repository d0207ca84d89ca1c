"""Dataset sources: the registry ``SOURCES`` (spec kind -> loader) behind ``load_dataset(spec, split, limit, seed)``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from clipguard.data.base import ImageSet, stratified_indices
from clipguard.errors import ClipguardError, check_positive
from clipguard.registry import Registry
from clipguard.specs import DatasetSpec, parse_dataset_spec

SOURCES: Registry[Callable[..., ImageSet]] = Registry("--dataset")  # kind -> (spec, split, limit, seed) -> ImageSet


@SOURCES.register("toy")
def _load_toy(spec: DatasetSpec, split: str, limit: int | None, seed: int) -> ImageSet:
    from clipguard.data import toy

    try:
        images, labels = toy.toy_split(split)
    except ValueError as e:
        raise ClipguardError(f"--split: {e}") from None
    idx = stratified_indices(labels.numpy(), limit, seed)
    t = torch.from_numpy(idx)
    return ImageSet(images=images[t].contiguous(), labels=labels[t].clone(), classnames=list(toy.TOY_CLASSNAMES),
                    spec=spec.text, name="toy", split=split, limit=limit, seed=seed,
                    indices=idx.tolist() if limit else None)


@SOURCES.register("hf")
def _load_hf(spec, split, limit, seed):
    from clipguard.data.hf import load_hf

    return load_hf(spec, split, limit, seed)


@SOURCES.register("imagefolder")
def _load_folder(spec, split, limit, seed):
    from clipguard.data.folder import load_folder

    return load_folder(spec, split, limit, seed)


def list_dataset_kinds() -> list[str]:
    return sorted(SOURCES.names())


def load_dataset(spec: str | DatasetSpec, *, split: str = "test", limit: int | None = None, seed: int = 0,
                 image_column: str | None = None, label_column: str | None = None) -> ImageSet:
    """Load images as uint8 tensors.

    Args:
        spec: ``toy``, ``cifar10``, ``cifar100``, ``hf:ORG/NAME`` or ``imagefolder:PATH``.
        split: dataset split (``test`` by default).
        limit: keep this many images, stratified by class and seeded by ``seed``; None keeps all.

    Raises:
        ClipguardError: unknown spec, missing path, bad limit, unreachable hub.
    """
    check_positive("--limit", limit, "a positive number of images (or omitted for all)")
    if isinstance(spec, str):
        spec = parse_dataset_spec(spec, image_column=image_column, label_column=label_column)
    ds = SOURCES.get(spec.kind)(spec, split, limit, seed)
    if len(ds) == 0:
        raise ClipguardError(f"--dataset {spec.text!r} split {split!r} holds no images")
    assert ds.images.dtype == torch.uint8 and ds.images.ndim == 4, "datasets hold uint8 (N, 3, H, W)"
    return ds


__all__ = ["ImageSet", "load_dataset", "list_dataset_kinds"]
