"""Hugging Face ``datasets`` sources: cifar10, cifar100, any ``hf:ORG/NAME``, and ``hf:PATH`` for a dataset saved
with ``save_to_disk``. Both are memory-mapped Arrow: rows are decoded only when read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipguard.data.stream import Reader
from clipguard.errors import ClipguardError


def _guess_column(features, kinds: tuple[str, ...]) -> str | None:
    for name, feat in features.items():
        if type(feat).__name__ in kinds:
            return name
    return None


class HFReader(Reader):
    """Rows of a ``datasets.Dataset`` (memory-mapped Arrow; pickles by file reference into the workers)."""

    def __init__(self, ds, image_column: str):
        self.ds, self.column = ds, image_column

    def __len__(self) -> int:
        return len(self.ds)

    def open(self, i: int):
        return self.ds[i][self.column]

    def __getstate__(self):
        return {**self.__dict__, "_raw": None}  # each process makes its own undecoded view

    def raw(self, i: int) -> bytes | None:
        """The stored bytes of an ``Image`` column (None for another column type, or an image stored by path)."""
        if getattr(self, "_raw", None) is None:
            import datasets

            feature = self.ds.features[self.column]
            self._raw = self.ds.cast_column(self.column, datasets.Image(decode=False)) \
                if isinstance(feature, datasets.Image) else False
        if self._raw is False:
            return None
        cell = self._raw[i][self.column]
        return cell.get("bytes") if isinstance(cell, dict) else None

    def fingerprint(self) -> str:
        return f"{self.ds._fingerprint}:{self.column}"


def _hf_split(spec, split: str) -> str:
    """The split to read: the catalogue maps an evaluated split to the HF dataset's name for it."""
    return spec.split_alias[1] if spec.split_alias and split == spec.split_alias[0] else split


def _columns(spec, features) -> tuple[str | None, str | None]:
    """(image column, label column): the ones given, else the Image / ClassLabel feature."""
    return (spec.image_column or _guess_column(features, ("Image",)),
            spec.label_column or _guess_column(features, ("ClassLabel",)))


def _open(spec, split: str):
    import datasets

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
        return datasets.load_dataset(spec.hf_path, split=split)  # a hub id, or a folder of data files
    except ValueError as e:
        if "split" in str(e).lower():
            raise ClipguardError(f"--split {split!r} does not exist in {spec.hf_path}: {e}") from None
        raise ClipguardError(f"--dataset {spec.text!r}: {e}") from None
    except ClipguardError:
        raise
    except FileNotFoundError as e:
        raise ClipguardError(f"--dataset {spec.text!r}: {e}") from None
    except Exception as e:  # offline, unknown repo, no permission: all are "can't get it from the hub"
        raise ClipguardError(
            f"cannot load dataset {spec.text!r} ({spec.hf_path}) from the Hugging Face hub "
            f"({type(e).__name__}); offline? set HF_DATASETS_CACHE to a cache that holds it, "
            "or export it as folders and use --dataset imagefolder:PATH"
        ) from None


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
    return HFReader(ds, img_col), labels, names, {"hf_path": spec.hf_path}


def read_hf_stream(spec, split: str, limit: int | None, size):
    """``--streaming``: the first ``limit`` rows of a hub dataset, read as a stream (nothing else is downloaded);
    returns (uint8 images, labels, class names, info). Not stratified: the record says "first N rows"."""
    import datasets

    from clipguard.data.images import to_uint8_chw

    if limit is None:
        raise ClipguardError("--streaming reads the first --limit rows of the stream: give --limit N")
    split = _hf_split(spec, split)
    try:
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
    images = to_uint8_chw((r[img_col] for r in rows), size, what=f"--dataset {spec.text!r}")
    feat = (features or {}).get(lab_col)
    names = list(feat.names) if hasattr(feat, "names") else None
    labels = np.asarray([r[lab_col] for r in rows], dtype=np.int64)
    return images, labels, names, {"hf_path": spec.hf_path, "streaming": f"first {len(rows)} rows of the stream"}
