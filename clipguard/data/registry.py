"""Dataset sources: the registry ``SOURCES`` (spec kind -> loader) behind ``load_dataset(spec, split, limit, seed,
size)``; ``size`` is the one preprocessing protocol (``data.images``), applied once here at load."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from clipguard.data.base import ImageSet, stratified_indices
from clipguard.data.stream import ImageStream, Reader, choose_mode, naming_the_file
from clipguard.errors import ClipguardError, check_positive
from clipguard.registry import Registry
from clipguard.specs import DatasetSpec, parse_dataset_spec

# kind -> (spec, split) -> Source (the toy world, generated in memory: -> ImageSet)
SOURCES: Registry[Callable[..., Source | ImageSet]] = Registry("--dataset")


@SOURCES.register("toy")
def _load_toy(spec: DatasetSpec, split: str, limit: int | None, seed: int, size=None,
              preprocess: str = "open_clip", geometry=None) -> ImageSet:
    from clipguard.data import toy
    from clipguard.data.images import tensor_geometry

    splits = toy.DATASETS[spec.name]
    if split not in splits:
        if len(splits) == 1:
            raise ClipguardError(f"--dataset {spec.name} has only a {next(iter(splits))} split (got --split {split!r})")
        raise ClipguardError(f"--split: unknown toy split {split!r}; valid splits: {', '.join(splits)} (the shift set "
                             f"is --dataset {toy.SHIFT_NAME})")
    images, labels = toy.toy_split(splits[split])
    idx = stratified_indices(labels.numpy(), limit, seed)
    t = torch.from_numpy(idx)
    # At 32x32 (the toy model's input) open_clip's geometry changes nothing; any other size (or TeCoA's geometry)
    # goes through PIL, as a decoded file would.
    return ImageSet(images=tensor_geometry(images[t].contiguous(), size, preprocess, geometry),
                    labels=labels[t].clone(), classnames=list(toy.TOY_CLASSNAMES), spec=spec.text,
                    name=spec.name,
                    split=split, limit=limit, seed=seed, indices=idx.tolist() if limit else None)


@dataclass
class Source:
    """A dataset opened for reading: every label known, no image decoded yet."""

    reader: Reader
    labels: np.ndarray  # int64 (N,), the whole split
    classnames: list[str] | None = None  # names the source itself carries (ClassLabel, folders, classnames.txt)
    templates: list[str] | None = None  # templates the source carries (CLIP_benchmark's wds folders)
    name: str | None = None  # canonical name, when the source knows better than the spec (ImageNet layout)
    split: str | None = None  # the split read, when the source knows better (a folder without split folders: all)
    info: dict = field(default_factory=dict)


@SOURCES.register("hf")
def _open_hf(spec: DatasetSpec, split: str) -> Source:
    from clipguard.data.hf import open_hf

    reader, labels, names, info = open_hf(spec, split)
    return Source(reader, labels, names, info=info)


@SOURCES.register("imagefolder")
def _open_folder(spec: DatasetSpec, split: str) -> Source:
    from clipguard.data.folder import FileReader, list_folder

    files, labels, classes, name, info = list_folder(spec, split)
    return Source(FileReader(files), labels, classes, info.pop("templates", None), name=name, info=info,
                  split=info.pop("split"))


@SOURCES.register("wds")
def _open_wds(spec: DatasetSpec, split: str) -> Source:
    from clipguard.data.wds import open_wds

    reader, labels, classes, templates, info = open_wds(spec, split)
    return Source(reader, labels, classes, templates, info=info)


@SOURCES.register("prepared")
def _open_prepared(spec: DatasetSpec, split: str) -> Source:
    from clipguard.data.prepared import PreparedReader

    reader = PreparedReader(spec.path)
    m = reader.manifest
    return Source(reader, reader.labels(), m.get("classnames"), m.get("templates"), name=m.get("name"),
                  info={"prepared": str(reader.path), "source_spec": m.get("spec")})


def list_dataset_kinds() -> list[str]:
    return sorted(SOURCES.names())


def load_dataset(spec: str | DatasetSpec, *, split: str = "test", limit: int | None = None, seed: int = 0,
                 image_column: str | None = None, label_column: str | None = None,
                 size: int | tuple[int, int] | None = None, mode: str = "auto", workers: int | None = None,
                 use_prepared: bool = True, streaming: bool = False, decode: str = "pil",
                 decode_device=None, preprocess: str = "open_clip", geometry=None) -> ImageSet:
    """Load a dataset as uint8 images, through the one preprocessing protocol.

    Args:
        spec: ``toy``, ``cifar10``, ``cifar100``, a catalogue name, ``hf:ORG/NAME`` or ``hf:PATH`` (saved to disk),
            ``imagefolder:PATH`` (ImageNet's layout included), ``wds:PATH`` (CLIP_benchmark's shards) or
            ``prepared:PATH``.
        split: dataset split (``test`` by default).
        limit: keep this many images, stratified by class and seeded by ``seed``; None keeps all.
        size: (H, W) (a model's ``input_size``; an int means square): every image goes once through the model's
            open_clip eval transform for it (``geometry``), whatever the sizes in the set. None keeps the images at
            their own size (they must then all have one size; held in memory).
        mode: ``memory`` (decode once into one uint8 tensor), ``stream`` (decode batch by batch when read: memory
            bounded by a few batches) or ``auto`` (memory up to ``data.stream.MEMORY_BYTES``). Same pixels.
        workers: decode processes (None: the machine's cores; 0: this process).
        use_prepared: read a finished prepared cache of exactly this selection and size when one exists.
        streaming: an ``hf`` hub dataset read as a stream: its first ``limit`` rows, nothing else downloaded.
        decode: ``pil`` (the protocol, on the CPU workers) or ``device``: JPEG files decoded and resized on
            ``decode_device`` (:mod:`clipguard.data.device_decode`; close to PIL, not identical: the record's
            ``preprocess`` names it). Needs a ``size`` and files to decode (not the toy set, not ``--streaming``).
        preprocess: the geometry that brings images to ``size``: ``open_clip`` (the protocol) or ``tecoa`` (TeCoA's
            Resize(256) bilinear + CenterCrop(224): :func:`clipguard.data.images.tecoa_geometry`). Needs a square
            ``size``, PIL decoding and a source read from disk (not ``--streaming``).
        geometry: the model's :class:`clipguard.data.images.Geometry` at ``size`` (``LoadedClip.geometry``,
            ``models.loader.model_geometry``): resize mode, interpolation, fill; None: OpenAI CLIP's (shorter side
            bicubic, centre crop). ``--decode device`` matches only that one.

    Returns:
        An ImageSet whose ``images`` is a uint8 (N, 3, H, W) tensor or an ``ImageStream`` of that shape, and whose
        ``info["preprocess"]`` (and record) names the protocol used.

    Raises:
        ClipguardError: unknown spec, missing path, bad limit, unreachable hub, mixed sizes with ``size=None``.
    """
    from clipguard.data.device_decode import check_decode, unmatched_geometry
    from clipguard.data.images import DEFAULT_GEOMETRY, as_size, protocol_name

    geometry = geometry or DEFAULT_GEOMETRY
    check_positive("--limit", limit, "a positive number of images (or omitted for all)")
    size = as_size(size)
    _check_preprocess(preprocess, size, decode, streaming)
    if isinstance(spec, str):
        spec = parse_dataset_spec(spec, image_column=image_column, label_column=label_column)
    if check_decode(decode) == "device":
        decode_device = torch.device(decode_device or "cpu")
        why = ("the toy images are generated, not decoded" if spec.kind == "toy" else
               "--streaming decodes the rows as they arrive" if streaming else
               "a prepared cache holds decoded pixels" if spec.kind == "prepared" else
               "it resizes to the model's input (--resolution model)" if size is None else
               unmatched_geometry(geometry, protocol_name(size, None, preprocess, geometry)))
        if why:
            raise ClipguardError(f"--decode device does not apply to --dataset {spec.text!r}: {why}; "
                                 "leave --decode at pil")
    else:
        decode_device = None
    protocol = protocol_name(size, decode_device, preprocess, geometry)
    if streaming and spec.kind != "hf":
        raise ClipguardError(f"--streaming reads Hugging Face hub datasets; {spec.text!r} is read from disk anyway")
    if spec.kind == "toy":
        ds = _load_toy(spec, split, limit, seed, size, preprocess, geometry)
    elif streaming:
        from clipguard.data.hf import read_hf_stream

        images, labels, names, info = read_hf_stream(spec, split, limit, size, geometry)
        ds = ImageSet(images=images, labels=torch.from_numpy(labels), classnames=names, spec=spec.text,
                      name=spec.name, split=split, limit=limit, seed=seed, info=info)
    else:
        src = SOURCES.get(spec.kind)(spec, split)
        _check_prepared_geometry(src, spec, size, preprocess, protocol_name(size, None, preprocess, geometry))
        ds = from_source(src, spec, split, limit, seed, size, mode, workers, use_prepared, decode_device=decode_device,
                         preprocess=preprocess, geometry=geometry)
    if len(ds) == 0:
        raise ClipguardError(f"--dataset {spec.text!r} split {split!r} holds no images")
    assert ds.images.dtype == torch.uint8 and ds.images.ndim == 4, "datasets hold uint8 (N, 3, H, W)"
    assert size is None or tuple(ds.images.shape[-2:]) == size, "the source must apply the size it is given"
    ds.info["preprocess"] = protocol
    return ds


def from_source(src: Source, spec: DatasetSpec, split: str, limit, seed: int, size, mode: str, workers,
                 use_prepared: bool, decode_device: torch.device | None = None,
                 preprocess: str = "open_clip", geometry=None) -> ImageSet:
    """The ``limit`` selection of ``src`` as an ImageSet: in memory, or streamed (by ``mode`` and size);
    ``decode_device``: JPEGs decoded there (``--decode device``); ``preprocess`` and the model's ``geometry``: how
    images reach ``size``."""
    from clipguard.data.images import DEFAULT_GEOMETRY, protocol_name, to_uint8_chw

    geometry = geometry or DEFAULT_GEOMETRY

    idx = stratified_indices(src.labels, limit, seed)
    labels, reader, info = src.labels[idx], src.reader, dict(src.info)
    if not reader.holds_pixels:
        reader.preprocess = preprocess  # a fresh Source's own reader: what its read() applies, in every worker
        reader.geometry = geometry
    if size is None and reader.holds_pixels:
        size = tuple(reader.size)  # a prepared cache's own size is its only size
    if size is None:  # native: each image at its own size, decoded here (small sets: CIFAR-like)
        images = to_uint8_chw((_open(reader, int(i)) for i in idx), None, what=f"--dataset {spec.text!r}")
    else:
        positions = idx
        if use_prepared and not reader.holds_pixels:
            from clipguard.data.prepared import cache_key, find_prepared, prepared_root

            if prepared_root().is_dir():  # fingerprinting a source costs a stat per file: only when caches exist
                found = find_prepared(cache_key(reader, idx, labels,
                                                protocol_name(size, decode_device, preprocess, geometry)))
                if found is not None:
                    from clipguard.data.prepared import PreparedReader

                    reader, positions, info["prepared"] = PreparedReader(found), np.arange(len(idx)), str(found)
        stream = ImageStream(reader, positions, size, workers, decode_device=decode_device)
        info["data_mode"] = choose_mode(mode, stream.nbytes())
        images = stream if info["data_mode"] == "stream" else stream.materialize()
    return ImageSet(images=images, labels=torch.from_numpy(np.ascontiguousarray(labels)), classnames=src.classnames,
                    spec=spec.text, name=src.name or spec.name, split=src.split or split, limit=limit, seed=seed,
                    indices=idx.tolist() if limit else None, info=info, templates=src.templates)


def _check_preprocess(preprocess: str, size, decode: str, streaming: bool) -> None:
    """Refuse (one line) a ``--preprocess`` that could not be applied as named, before anything is read."""
    from clipguard.config import choice
    from clipguard.data.images import tecoa_side
    from clipguard.run_options import PREPROCESSES

    if choice(*PREPROCESSES)(preprocess, "--preprocess") == "open_clip":
        return
    why = ("the images keep their own size here (--resolution native): there is nothing to resize" if size is None
           else "--decode device resizes by open_clip's geometry only: leave --decode at pil" if decode == "device"
           else "--streaming decodes hub rows by open_clip's geometry only: download the set" if streaming else None)
    if why:
        raise ClipguardError(f"--preprocess {preprocess} does not apply: {why}")
    tecoa_side(size)  # a non-square input size is refused here, not in every worker


def _check_prepared_geometry(src: Source, spec: DatasetSpec, size, preprocess: str, protocol: str) -> None:
    """A prepared cache's pixels were made by one geometry (its manifest's ``preprocess``): refuse a run that
    names another (``--preprocess``, or a model whose own geometry ``protocol`` names is not the one), which would
    record a geometry its images never went through."""
    from clipguard.data.images import TECOA_NAME

    made = str(getattr(src.reader, "manifest", {}).get("preprocess") or "")
    if size is None or not src.reader.holds_pixels or made == protocol:
        return
    if made.startswith(TECOA_NAME) != (preprocess == "tecoa"):
        other = "tecoa" if made.startswith(TECOA_NAME) else "open_clip"
        raise ClipguardError(f"--dataset {spec.text!r} holds images made by {made!r}, not by --preprocess "
                             f"{preprocess}: use --preprocess {other}, or prepare the set again with --preprocess "
                             f"{preprocess}")
    raise ClipguardError(f"--dataset {spec.text!r} holds images made by {made!r}, but this model takes {protocol!r}: "
                         "prepare the set again for this model (`clipguard prepare --model MODEL`)")


def _open(reader: Reader, i: int):
    """Item ``i`` as a PIL image; a damaged file is the reader's one-line error naming it."""
    with naming_the_file(reader, i):
        im = reader.open(i)
        im.load()  # PIL decodes lazily: a truncated file fails here, inside the naming
        return im


__all__ = ["ImageSet", "Source", "load_dataset", "list_dataset_kinds"]
