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
Reading by offset needs an uncompressed tar. A shard that is not one, or that ends before tar's end-of-archive
block (cut short: :mod:`tarfile` would silently stop at the cut and drop the samples after it), is a one-line
error naming it, as is an image that does not decode.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
from PIL import Image

from clipguard.catalogue import catalogue, wds_repo
from clipguard.data.stream import UNREADABLE, Reader, error_line, files_fingerprint
from clipguard.errors import ClipguardError

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference
REFETCH = "download it again"


def split_key(name: str) -> tuple[str, str]:
    """webdataset's ``base_plus_ext``: ``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


class TarReader(Reader):
    """Images by (shard, byte offset, size)."""

    def __init__(self, shards: list[str], where: np.ndarray, repo: str | None = None, root: str = ""):
        self.shards, self.where = shards, where  # where: int64 (N, 3) = shard index, offset, size
        self.repo, self.root = repo, root  # where a damaged shard is downloaded from again (see refetch)

    def __len__(self) -> int:
        return len(self.where)

    def raw(self, i: int) -> bytes:
        shard, offset, size = (int(v) for v in self.where[i])
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:  # the shard changed (was cut short) since it was indexed
            raise EOFError(f"the shard ends {size - len(data)} bytes into this image")
        return data

    def open(self, i: int):
        """Decoded in the file's own mode: the geometry converts to RGB after resizing, as open_clip does."""
        with Image.open(io.BytesIO(self.raw(i))) as im:
            return im.copy()

    def fingerprint(self) -> str:
        return files_fingerprint(self.shards)

    def unreadable(self, i: int, err: BaseException) -> str:
        shard, offset, _ = (int(v) for v in self.where[i])
        return (f"cannot read an image from shard {self.shards[shard]!r} (the member at byte {offset}: "
                f"{error_line(err)}): the shard is damaged; {refetch(self.shards[shard], self.repo, self.root)}")


def _shards(spec, split: str) -> tuple[list[str], Path]:
    """The shard files and the dataset folder (where classnames.txt lives)."""
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
                             "(download CLIP_benchmark's shards, e.g. hf download "
                             "clip-benchmark/wds_vtab-caltech101 --repo-type dataset --local-dir DIR)")
    return shards, root


def _source_repo(spec, root: Path) -> tuple[str | None, str]:
    """(repo, folder) to download a damaged shard again from: CLIP_benchmark's repo when the set is in the
    catalogue (else None), and the dataset folder that mirrors it."""
    entry = catalogue().get(spec.name)
    return (wds_repo(entry) if entry else None), str(root)


def refetch(shard: str, repo: str | None, root: str) -> str:
    """What to do about a damaged ``shard``: download it again, with the command when its repo is known."""
    try:
        name = Path(shard).relative_to(root)
    except ValueError:  # a shard pattern outside the dataset folder
        name = None
    if repo is None or name is None:
        return REFETCH + (f" from {repo}" if repo else "")
    return f"{REFETCH} (hf download {repo} {name} --repo-type dataset --local-dir {root})"


def _index(shard: str, si: int, repo: str | None = None, root: str = "") -> list[tuple[int, int, int, int]]:
    """(shard, offset, size, label) per sample of one tar, in tar order. The tar is read to its end-of-archive
    block (a zero block after the last member): tarfile stops without a word at a header it cannot read, or at the
    end of a file cut short."""
    samples: dict[str, dict] = {}
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                s = samples.setdefault(key, {})
                if ext == "cls":
                    s["cls"] = tar.extractfile(m).read()
                elif ext in IMAGE_EXTS:
                    s[ext] = (m.offset_data, m.size)
            f.seek(tar.offset)
            end = f.read(tarfile.BLOCKSIZE)
        if len(end) < tarfile.BLOCKSIZE or end.count(0) != len(end):
            raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}: cut short or corrupt there")
    except (tarfile.TarError, *UNREADABLE) as e:
        raise ClipguardError(f"shard {shard!r} is not a readable uncompressed tar ({error_line(e)}): "
                             f"{refetch(shard, repo, root)}") from None
    for key, s in samples.items():
        try:
            s["cls"] = int(s["cls"].decode().strip()) if "cls" in s else None
        except ValueError:  # UnicodeDecodeError included
            raise ClipguardError(f"shard {shard!r}: sample {key!r} has a cls that is not an integer "
                                 f"({s['cls'][:20]!r}): {refetch(shard, repo, root)}") from None
    out = []
    for key, s in samples.items():
        img = next((s[e] for e in IMAGE_EXTS if e in s), None)
        if img is None or s.get("cls") is None:
            raise ClipguardError(f"shard {shard!r}: sample {key!r} lacks an image ({'/'.join(IMAGE_EXTS)}) or a cls")
        out.append((si, img[0], img[1], s["cls"]))
    return out


def _lines(path: Path) -> list[str] | None:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else None


def open_wds(spec, split: str) -> tuple[TarReader, np.ndarray, list[str] | None, list[str] | None, dict]:
    """(reader, labels, class names, templates, info): the shards' index; no image is decoded here."""
    shards, root = _shards(spec, split)
    repo, folder = _source_repo(spec, root)
    rows = [r for si, s in enumerate(shards) for r in _index(s, si, repo, folder)]
    if not rows:
        raise ClipguardError(f"--dataset {spec.text!r}: the shards hold no samples")
    table = np.asarray(rows, dtype=np.int64)
    classnames = _lines(root / "classnames.txt")
    templates = _lines(root / "zeroshot_classification_templates.txt")
    return TarReader(shards, table[:, :3], repo, folder), table[:, 3], classnames, templates, \
        {"path": str(root), "shards": len(shards)}
