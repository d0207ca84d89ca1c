"""``imagefolder:PATH``: one sub-folder per class, including ImageNet's own layout.

- ``PATH/<split>/<class>/<image>`` (or ``PATH/<class>/<image>``): labels in sorted folder order, class names from
  the folder names.
- ImageNet: class folders named by WordNet id (``n01440764`` ...) are labelled by the wnid's ImageNet-1k index
  (sorted wnids: the standard order) and named with CLIP's ImageNet class names; all 1,000 make ``imagenet1k``.
  Folders of wnids that are not all ImageNet-1k classes (an ImageNet-21k subset) are labelled in sorted folder order,
  as any folder, but name no classes (a wnid is not a class name): ``--prompts FILE`` names them, in that order.
- A flat ``PATH/<split>/`` of images with a label file (ImageNet val as distributed): ``LOC_val_solution.csv``
  (Kaggle: ``ImageId,PredictionString`` starting with the wnid) or ``<split>.txt`` / ``labels.txt``
  (``<file> <label>`` per line, label an ImageNet index or a wnid), in the split folder or PATH.

Files are listed once (never opened until read) and read one at a time, so any number of files stays under the
open-file limit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from clipguard.data.prompts import load_prompts, prompts_dir
from clipguard.data.stream import Reader, error_line, files_fingerprint
from clipguard.errors import ClipguardError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
WNID = re.compile(r"^n\d{8}$")


class FileReader(Reader):
    """Images by file path (strings, so the reader pickles small)."""

    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def open(self, i: int):
        """Decoded and closed at once (a lazy ``Image.open`` would hold the file open), in the file's own mode: the
        geometry converts to RGB after resizing, as open_clip does (``data.images.eval_geometry``)."""
        with Image.open(self.files[i]) as im:
            return im.copy()

    def raw(self, i: int) -> bytes | None:
        if os.path.splitext(self.files[i])[1].lower() not in (".jpg", ".jpeg"):
            return None
        with open(self.files[i], "rb") as f:
            return f.read()

    def fingerprint(self) -> str:
        return files_fingerprint(self.files)

    def unreadable(self, i: int, err: BaseException) -> str:
        return f"cannot read an image from {self.files[i]!r} ({error_line(err)}): replace or delete the file"


def _images_in(d: Path) -> list[str]:
    """Image files under ``d`` (recursively), sorted by path."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return out


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k WordNet ids in index order (sorted), from prompts/imagenet_wnids.txt."""
    return (prompts_dir() / "imagenet_wnids.txt").read_text().split()


def imagenet_prompts():
    """CLIP's ImageNet class names (index order) and 80 templates: prompts/imagenet1k.json's ``openai`` set."""
    return load_prompts("imagenet1k", templates="openai")


def _label_file(base: Path, root: Path, split: str) -> Path | None:
    for d in (base, root):
        for name in ("LOC_val_solution.csv", f"{split}.txt", f"{split}_labels.txt", "labels.txt"):
            if (d / name).is_file():
                return d / name
    return None


def _read_label_file(path: Path) -> dict[str, str]:
    """Image stem -> label text (a wnid or an integer index)."""
    labels = {}
    for line in path.read_text().splitlines()[1 if path.suffix == ".csv" else 0:]:
        parts = line.replace(",", " ").split()
        if len(parts) >= 2:
            labels[Path(parts[0]).stem] = parts[1]
    return labels


SPLIT_NAMES = ("train", "val", "validation", "test", "dev", "holdout")


def _split_folder(root: Path, split: str, text: str) -> tuple[Path, str]:
    """(the folder to read, the split it is): ``root/<split>`` when it exists; a folder with split subfolders but not
    this one refuses the split; a folder without any (classes right under it) is one split, ``all``, whatever
    --split says, so nothing downstream takes two reads of it for two splits."""
    if (root / split).is_dir():
        return root / split, split
    splits = sorted(d.name for d in os.scandir(root) if d.is_dir() and d.name.lower() in SPLIT_NAMES)
    if splits:
        raise ClipguardError(f"--split {split!r}: {text} has no {split}/ folder (its splits: {', '.join(splits)})")
    return root, "all"


def list_folder(spec, split: str) -> tuple[list[str], np.ndarray, list[str] | None, str, dict]:
    """(files, labels, class names or None, dataset name, info) for an image folder, nothing opened."""
    root = Path(spec.path)
    base, read_split = _split_folder(root, split, spec.text)
    classes = sorted(d.name for d in os.scandir(base) if d.is_dir())
    files, labels = [], []
    if classes:
        for ci, c in enumerate(classes):
            found = _images_in(base / c)
            files += found
            labels += [ci] * len(found)
    else:
        lf = _label_file(base, root, split)
        if lf is None:
            raise ClipguardError(f"--dataset {spec.text!r}: no class folders under {str(base)!r} and no label file "
                                 f"(expected {base}/<class>/<image> or LOC_val_solution.csv / {split}.txt)")
        by_stem = _read_label_file(lf)
        files = [f for f in _images_in(base) if Path(f).stem in by_stem]
        raw = [by_stem[Path(f).stem] for f in files]
        classes = imagenet_wnids()  # label files are ImageNet's: a wnid or an ImageNet-1k index per image
        index = {w: i for i, w in enumerate(classes)}
        bad = next((r for r in raw if r not in index and not r.isdigit()), None)
        if bad is not None:
            raise ClipguardError(f"label file {str(lf)!r}: label {bad!r} is neither an ImageNet-1k wnid nor a class "
                                 f"index; for other classes use {base}/<class>/<image> folders and --prompts FILE")
        labels = [index[r] if r in index else int(r) for r in raw]
    if not files:
        raise ClipguardError(
            f"--dataset {spec.text!r}: no images under {str(base)!r} (expected {base}/<class>/<image>.png)"
        )
    labels = np.asarray(labels, dtype=np.int64)
    name, info = spec.name, {"path": str(base), "split": read_split}
    if classes and all(WNID.match(c) for c in classes):  # ImageNet layout
        wnids = imagenet_wnids()
        index = {w: i for i, w in enumerate(wnids)}
        if any(c not in index for c in classes):  # ImageNet-21k classes: CLIP's names cover only the 1,000
            info["layout"] = "wordnet"
            return files, labels, None, name, info  # no names: without --prompts, the prompts ask for a file
        if len(classes) == len(wnids):
            name = "imagenet1k"  # the whole of ImageNet-1k: its prompts (CLIP's names and 80 templates)
        prompts = imagenet_prompts()
        classes = [prompts.classnames[index[c]] for c in classes]
        info["layout"] = "imagenet"
        info["templates"] = prompts.templates  # CLIP's 80, for any ImageNet subset
    return files, labels, classes, name, info
