"""``wds:PATH``: WebDataset tar shards in CLIP_benchmark's ``wds_*`` layout.

``PATH`` is a dataset folder as CLIP_benchmark publishes it (``PATH/<split>/0.tar, 1.tar, ...`` with
``nshards.txt``, ``PATH/classnames.txt``, ``PATH/zeroshot_classification_templates.txt``) or a shard pattern with
brace ranges (``PATH/test/{0..3}.tar``; the class names and templates are then read from the folder above the
shards). A sample is the tar members sharing a key (webdataset's rule: the path up to the first dot of the file
name): an image (``webp``, ``png``, ``jpg``, ``jpeg``, in that order of preference, as CLIP_benchmark) and its
label (``cls``). Samples are in shard order, then tar order: CLIP_benchmark's order.

The shards are indexed once (member offsets, read with :mod:`tarfile`, which seeks over the image data) and read
by offset, so a ``--limit`` selection, a seeded training order and any number of decode workers all work without
reading a shard from the start; the ``webdataset`` package writes the test fixtures and checks the same samples.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from clipguard.data.stream import Reader, files_fingerprint
from clipguard.errors import ClipguardError

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference


def split_key(name: str) -> tuple[str, str]:
    """webdataset's ``base_plus_ext``: ``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


class TarReader(Reader):
    """Images by (shard, byte offset, size)."""

    def __init__(self, shards: list[str], where: np.ndarray):
        self.shards, self.where = shards, where  # where: int64 (N, 3) = shard index, offset, size

    def __len__(self) -> int:
        return len(self.where)

    def raw(self, i: int) -> bytes:
        shard, offset, size = (int(v) for v in self.where[i])
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def open(self, i: int):
        from PIL import Image

        with Image.open(io.BytesIO(self.raw(i))) as im:
            return im.convert("RGB")

    def fingerprint(self) -> str:
        return files_fingerprint(self.shards)


def _shards(spec, split: str) -> tuple[list[str], Path]:
    """The shard files and the dataset folder (where classnames.txt lives)."""
    import braceexpand

    path = spec.path
    if Path(path).is_dir():
        root = Path(path)
        d = root / split
        if not d.is_dir():
            splits = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ClipguardError(f"--dataset {spec.text!r}: no split folder {split!r} (splits: {', '.join(splits)})")
        n_file = d / "nshards.txt"
        if n_file.is_file():
            shards = [str(d / f"{i}.tar") for i in range(int(n_file.read_text().strip()))]
        else:
            shards = sorted((str(p) for p in d.glob("*.tar")), key=lambda s: (len(Path(s).stem), Path(s).stem))
    else:
        shards = list(braceexpand.braceexpand(path))
        root = Path(shards[0]).parent.parent if shards else Path(path).parent
    missing = [s for s in shards if not Path(s).is_file()]
    if missing or not shards:
        raise ClipguardError(f"--dataset {spec.text!r}: shard {missing[0] if missing else path!r} not found "
                             "(download CLIP_benchmark's shards, e.g. huggingface-cli download "
                             "clip-benchmark/wds_cifar10 --repo-type dataset --local-dir DIR)")
    return shards, root


def _index(shard: str, si: int) -> list[tuple[int, int, int, int]]:
    """(shard, offset, size, label) per sample of one tar, in tar order."""
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_key(m.name)
            s = samples.setdefault(key, {})
            if ext == "cls":
                s["cls"] = int(tar.extractfile(m).read().decode().strip())
            elif ext in IMAGE_EXTS:
                s[ext] = (m.offset_data, m.size)
    out = []
    for key, s in samples.items():
        img = next((s[e] for e in IMAGE_EXTS if e in s), None)
        if img is None or "cls" not in s:
            raise ClipguardError(f"shard {shard!r}: sample {key!r} lacks an image ({'/'.join(IMAGE_EXTS)}) or a cls")
        out.append((si, img[0], img[1], s["cls"]))
    return out


def _lines(path: Path) -> list[str] | None:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else None


def open_wds(spec, split: str) -> tuple[TarReader, np.ndarray, list[str] | None, list[str] | None, dict]:
    """(reader, labels, class names, templates, info): the shards' index; no image is decoded here."""
    shards, root = _shards(spec, split)
    rows = [r for si, s in enumerate(shards) for r in _index(s, si)]
    if not rows:
        raise ClipguardError(f"--dataset {spec.text!r}: the shards hold no samples")
    table = np.asarray(rows, dtype=np.int64)
    classnames = _lines(root / "classnames.txt")
    templates = _lines(root / "zeroshot_classification_templates.txt")
    return TarReader(shards, table[:, :3]), table[:, 3], classnames, templates, \
        {"path": str(root), "shards": len(shards)}
