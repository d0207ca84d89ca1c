"""Dataset sources: the registry ``SOURCES`` (spec kind -> loader) behind ``load_dataset(spec, split, limit, seed,
size)``; ``size`` is the one preprocessing protocol (``data.images``), applied once here at load."""

from __future__ import annotations

from collections.abc import Callable

import torch

from clipguard.data.base import ImageSet, stratified_indices
from clipguard.errors import ClipguardError, check_positive
from clipguard.registry import Registry
from clipguard.specs import DatasetSpec, parse_dataset_spec

# kind -> (spec, split, limit, seed, size) -> ImageSet; size is (H, W) (open_clip eval geometry) or None (native)
SOURCES: Registry[Callable[..., ImageSet]] = Registry("--dataset")


@SOURCES.register("toy")
def _load_toy(spec: DatasetSpec, split: str, limit: int | None, seed: int, size=None) -> ImageSet:
    from clipguard.data import toy
    from clipguard.data.images import tensor_geometry

    try:
        images, labels = toy.toy_split(split)
    except ValueError as e:
        raise ClipguardError(f"--split: {e}") from None
    idx = stratified_indices(labels.numpy(), limit, seed)
    t = torch.from_numpy(idx)
    # At 32x32 (the toy model's input) nothing changes; any other size goes through PIL and the same geometry.
    return ImageSet(images=tensor_geometry(images[t].contiguous(), size), labels=labels[t].clone(),
                    classnames=list(toy.TOY_CLASSNAMES), spec=spec.text, name="toy", split=split, limit=limit,
                    seed=seed, indices=idx.tolist() if limit else None)


@SOURCES.register("hf")
def _load_hf(spec, split, limit, seed, size=None):
    from clipguard.data.hf import load_hf

    return load_hf(spec, split, limit, seed, size)


@SOURCES.register("imagefolder")
def _load_folder(spec, split, limit, seed, size=None):
    from clipguard.data.folder import load_folder

    return load_folder(spec, split, limit, seed, size)


def list_dataset_kinds() -> list[str]:
    return sorted(SOURCES.names())


def load_dataset(spec: str | DatasetSpec, *, split: str = "test", limit: int | None = None, seed: int = 0,
                 image_column: str | None = None, label_column: str | None = None,
                 size: int | tuple[int, int] | None = None) -> ImageSet:
    """Load images as uint8 tensors, through the one preprocessing protocol.

    Args:
        spec: ``toy``, ``cifar10``, ``cifar100``, ``hf:ORG/NAME`` or ``imagefolder:PATH``.
        split: dataset split (``test`` by default).
        limit: keep this many images, stratified by class and seeded by ``seed``; None keeps all.
        size: (H, W) (a model's ``input_size``; an int means square): every image goes once through open_clip's
            eval geometry for it (shorter side bicubic, centre crop), whatever the sizes in the set. None keeps
            the images at their own size (they must then all have one size).

    Returns:
        An ImageSet whose ``info["preprocess"]`` (and record) names the protocol used.

    Raises:
        ClipguardError: unknown spec, missing path, bad limit, unreachable hub, mixed sizes with ``size=None``.
    """
    from clipguard.data.images import as_size, protocol_name

    check_positive("--limit", limit, "a positive number of images (or omitted for all)")
    size = as_size(size)
    if isinstance(spec, str):
        spec = parse_dataset_spec(spec, image_column=image_column, label_column=label_column)
    ds = SOURCES.get(spec.kind)(spec, split, limit, seed, size)
    if len(ds) == 0:
        raise ClipguardError(f"--dataset {spec.text!r} split {split!r} holds no images")
    assert ds.images.dtype == torch.uint8 and ds.images.ndim == 4, "datasets hold uint8 (N, 3, H, W)"
    assert size is None or tuple(ds.images.shape[-2:]) == size, "the source must apply the size it is given"
    ds.info["preprocess"] = protocol_name(size)
    return ds


__all__ = ["ImageSet", "load_dataset", "list_dataset_kinds"]
