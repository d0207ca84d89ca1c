"""Hugging Face ``datasets`` sources: cifar10, cifar100, any ``hf:ORG/NAME``, and ``hf:PATH`` for a dataset saved
with ``save_to_disk``. Both are memory-mapped Arrow: rows are decoded only when read. A damaged Arrow file (cut
short, overwritten) is a one-line error naming it and how to get it back, when opened and when a row is read."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from clipguard.catalogue import catalogue, hf_cache_dir, wds_dir, wds_repo
from clipguard.data.images import to_uint8_chw
from clipguard.data.stream import UNREADABLE, Reader, error_line
from clipguard.errors import ClipguardError
from clipguard.hub import ensure_reachable_or_offline


def _guess_column(features, kinds: tuple[str, ...]) -> str | None:
    for name, feat in features.items():
        if type(feat).__name__ in kinds:
            return name
    return None


def _refetch(spec) -> str:
    """How to get a damaged Arrow file back: save the dataset again, or have ``datasets`` download it again."""
    if Path(spec.hf_path).is_dir():
        return f"save the dataset to {spec.hf_path} again (Dataset.save_to_disk) or restore the file"
    return f"delete {hf_cache_dir(spec.hf_path)} and load {spec.hf_path} once with network access to download it again"


def _damaged(files) -> tuple[str, BaseException] | None:
    """(file, error) of the first Arrow file pyarrow cannot read whole (as ``datasets`` maps it), else None."""
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, *UNREADABLE) as e:
            return str(f), e
    return None


def _arrow_files(spec) -> list[Path]:
    """The Arrow files behind ``spec``: a save_to_disk folder's, or the ``datasets`` cache's for a hub id."""
    root = Path(spec.hf_path) if Path(spec.hf_path).is_dir() else hf_cache_dir(spec.hf_path)
    return sorted(root.rglob("*.arrow")) if root.is_dir() else []


class HFReader(Reader):
    """Rows of a ``datasets.Dataset`` (memory-mapped Arrow; pickles by file reference into the workers)."""

    def __init__(self, ds, image_column: str, refetch: str = "restore the file"):
        self.ds, self.column = ds, image_column
        self.refetch = refetch  # how to get a damaged Arrow file back (see _refetch)

    def __len__(self) -> int:
        return len(self.ds)

    def open(self, i: int):
        return self.ds[i][self.column]

    def __getstate__(self):
        return {**self.__dict__, "_raw": None}  # each process makes its own undecoded view

    def raw(self, i: int) -> bytes | None:
        """The stored bytes of an ``Image`` column (None for another column type, or an image stored by path)."""
        if getattr(self, "_raw", None) is None:
            feature = self.ds.features[self.column]
            self._raw = self.ds.cast_column(self.column, datasets.Image(decode=False)) \
                if isinstance(feature, datasets.Image) else False
        if self._raw is False:
            return None
        cell = self._raw[i][self.column]
        return cell.get("bytes") if isinstance(cell, dict) else None

    def fingerprint(self) -> str:
        return f"{self.ds._fingerprint}:{self.column}"

    def unreadable(self, i: int, err: BaseException) -> str:
        files = [f["filename"] for f in self.ds.cache_files]
        where = (repr(files[0]) if len(files) == 1 else
                 f"one of the {len(files)} Arrow files in {str(Path(files[0]).parent)!r}" if files else "the dataset")
        return f"cannot read an image from row {i} of {where} ({error_line(err)}): the file is damaged; {self.refetch}"


def _hf_split(spec, split: str) -> str:
    """The split to read: the catalogue maps an evaluated split to the HF dataset's name for it."""
    return spec.split_alias[1] if spec.split_alias and split == spec.split_alias[0] else split


def _columns(spec, features) -> tuple[str | None, str | None]:
    """(image column, label column): the ones given, else the Image / ClassLabel feature."""
    return (spec.image_column or _guess_column(features, ("Image",)),
            spec.label_column or _guess_column(features, ("ClassLabel",)))


def _open(spec, split: str):
    split = _hf_split(spec, split)
    local = Path(spec.hf_path)
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():  # save_to_disk's layout
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ClipguardError(f"--split {split!r} is not in {spec.hf_path} (splits: {', '.join(ds)})")
                ds = ds[split]
            return ds
        if not local.exists():  # a hub id: offline, the cache answers at once instead of 30 s of retries
            ensure_reachable_or_offline()
        return datasets.load_dataset(spec.hf_path, split=split)  # a hub id, or a folder of data files
    except ClipguardError:
        raise
    except Exception as e:
        broken = _damaged(_arrow_files(spec))  # a damaged file is named, whatever datasets made of it
        if broken is not None:
            raise ClipguardError(f"cannot read {broken[0]!r} ({error_line(broken[1])}): the Arrow file is damaged; "
                                 f"{_refetch(spec)}") from None
        if isinstance(e, ValueError) and "split" in str(e).lower():
            raise ClipguardError(f"--split {split!r} does not exist in {spec.hf_path}: {e}") from None
        if isinstance(e, ValueError | FileNotFoundError):
            raise ClipguardError(f"--dataset {spec.text!r}: {e}") from None
        # offline, unknown repo, no permission: all are "can't get it from the hub"
        raise ClipguardError(
            f"cannot load dataset {spec.text!r} ({spec.hf_path}) from the Hugging Face hub "
            f"({type(e).__name__}); offline? set HF_DATASETS_CACHE to a cache that holds it, "
            f"{_local_routes(spec)}or export it as folders and use --dataset imagefolder:PATH"
        ) from None


def _local_routes(spec) -> str:
    """For a catalogue set: where CLIP_benchmark's shards would be found without any network."""
    entry = catalogue().get(spec.text)
    if entry is None:
        return ""
    return f"put CLIP_benchmark's shards ({wds_repo(entry)}) in {str(wds_dir(entry))!r} ($CLIPGUARD_DATA), "


def open_hf(spec, split: str) -> tuple[HFReader, np.ndarray, list[str] | None, dict]:
    """(reader, labels, class names, info) for an HF dataset; only the label column is read here."""
    ds = _open(spec, split)
    img_col, lab_col = _columns(spec, ds.features)
    for opt, col in (("--image-column", img_col), ("--label-column", lab_col)):
        if col is None or col not in ds.features:
            raise ClipguardError(
                f"{opt} {col!r} is not a column of {spec.hf_path}; columns: {', '.join(ds.features)}"
            )
    labels = np.asarray(ds[lab_col], dtype=np.int64)
    feat = ds.features[lab_col]
    names = list(feat.names) if hasattr(feat, "names") else None
    return HFReader(ds, img_col, _refetch(spec)), labels, names, {"hf_path": spec.hf_path}


def read_hf_stream(spec, split: str, limit: int | None, size, geometry=None):
    """``--streaming``: the first ``limit`` rows of a hub dataset, read as a stream (nothing else is downloaded),
    brought to ``size`` by the model's ``geometry`` (``data.images.Geometry``; None: OpenAI CLIP's); returns (uint8
    images, labels, class names, info). Not stratified: the record says "first N rows"."""
    if limit is None:
        raise ClipguardError("--streaming reads the first --limit rows of the stream: give --limit N")
    split = _hf_split(spec, split)
    try:
        ensure_reachable_or_offline()
        ds = datasets.load_dataset(spec.hf_path, split=split, streaming=True)
        features = ds.features
        img_col, lab_col = _columns(spec, features or {})
        if img_col is None or lab_col is None:
            raise ClipguardError(f"--dataset {spec.text!r}: name the columns with --image-column/--label-column")
        rows = list(ds.select_columns([img_col, lab_col]).take(limit))
    except ClipguardError:
        raise
    except Exception as e:  # offline, unknown repo, no such split
        raise ClipguardError(f"cannot stream {spec.text!r} ({spec.hf_path}, split {split!r}): "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    images = to_uint8_chw((r[img_col] for r in rows), size, what=f"--dataset {spec.text!r}", geometry=geometry)
    feat = (features or {}).get(lab_col)
    names = list(feat.names) if hasattr(feat, "names") else None
    labels = np.asarray([r[lab_col] for r in rows], dtype=np.int64)
    return images, labels, names, {"hf_path": spec.hf_path, "streaming": f"first {len(rows)} rows of the stream"}
