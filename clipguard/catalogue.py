"""The dataset catalogue: the zero-shot benchmark sets clipguard knows by name (``clipguard datasets`` lists them).

Each entry of ``prompts/catalogue.toml`` says where a set's images come from and which papers report it:

- ``wds``: CLIP_benchmark's name for the set (``vtab/caltech101``). Its WebDataset shards are the reference copy,
  published as the Hugging Face dataset repo ``clip-benchmark/wds_<name, / as ->`` (``<split>/*.tar``,
  ``classnames.txt``, ``zeroshot_classification_templates.txt``); a local copy lives in ``wds_dir(entry)``.
- ``hf``: a ``datasets.load_dataset`` id whose labels are in the same order as the class names, or None.
- ``split`` (the evaluated split of the shards), ``hf_split`` (the same images in the HF dataset), the HF columns,
  the number of classes and the suites (``tecoa``, ``fare``, ``shift``) that report it.

Class names and templates are ``prompts/<name>.json`` (``clipguard.data.prompts``). This module reads files only:
no torch, no network; :func:`local_status` looks at the local folders and caches without downloading anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

from clipguard.errors import ClipguardError
from clipguard.fsutil import read_toml
from clipguard.registry import Registry

DATA_ENV = "CLIPGUARD_DATA"  # where wds_<name>/ folders live (default ~/.cache/clipguard/datasets)
WDS_ORG = "clip-benchmark"  # the Hugging Face organisation holding CLIP_benchmark's shards
CATALOGUE_FILE = "catalogue.toml"


def prompts_dir() -> Path:
    """The shipped prompts: inside the wheel (``clipguard/_prompts``) or the checkout's ``prompts/``."""
    package = Path(__file__).resolve().parent  # clipguard/
    for cand in (package / "_prompts", package.parent / "prompts"):
        if cand.is_dir():
            return cand
    return package.parent / "prompts"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str  # clipguard's name: CLIP_benchmark's without "vtab/"; what --dataset takes; prompts/<name>.json
    title: str  # the name papers print, e.g. "Oxford-IIIT Pets"
    wds: str  # CLIP_benchmark's dataset name, e.g. "vtab/caltech101"
    hf: str | None  # Hugging Face datasets id with the same label order, or None (shards only)
    split: str  # the evaluated split of the wds shards ("test")
    image_column: str | None  # image column of the hf dataset
    label_column: str | None  # label column of the hf dataset
    n_classes: int  # number of classes = len(classnames) in prompts/<name>.json
    suites: tuple[str, ...]  # which protocols report it: "tecoa", "fare", "shift"
    hf_split: str | None = None  # the hf split holding the evaluated images, when it is named differently

    @property
    def wds_slug(self) -> str:
        """CLIP_benchmark's folder suffix: ``vtab/caltech101`` -> ``vtab-caltech101``."""
        return self.wds.replace("/", "-")

    def to_dict(self) -> dict:
        """The entry as plain JSON values."""
        return {**asdict(self), "suites": list(self.suites)}


_REQUIRED = ("title", "wds", "split", "n_classes", "suites")


def _entry(name: str, raw: dict, path: Path) -> CatalogueEntry:
    """One ``[name]`` table of catalogue.toml as an entry; a missing or unknown key names the entry."""
    known = {f.name for f in fields(CatalogueEntry)} - {"name"}
    unknown = sorted(set(raw) - known)
    missing = [k for k in _REQUIRED if k not in raw]
    if unknown or missing:
        what = f"unknown key(s) {', '.join(unknown)}" if unknown else f"missing key(s) {', '.join(missing)}"
        raise ClipguardError(f"{path}: dataset [{name}] has {what}")
    opts = {k: raw.get(k) for k in known}
    return CatalogueEntry(name=name, **{**opts, "suites": tuple(raw["suites"])})


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, CatalogueEntry]:
    p = Path(path)
    data = read_toml(p, "dataset catalogue")
    return {name: _entry(name, raw, p) for name, raw in data.items()}


def catalogue() -> dict[str, CatalogueEntry]:
    """Every catalogue entry by name, in file order (read once from ``prompts/catalogue.toml``)."""
    return dict(_load(str(prompts_dir() / CATALOGUE_FILE)))


def get_entry(name: str, option: str = "--dataset") -> CatalogueEntry:
    """The entry called ``name``; an unknown name is the one-line error with close matches."""
    reg: Registry[CatalogueEntry] = Registry(option)
    for key, entry in catalogue().items():
        reg.register(key, entry)
    return reg.get(name)


def data_root() -> Path:
    """Where local dataset copies live: ``$CLIPGUARD_DATA``, else ``~/.cache/clipguard/datasets``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "clipguard" / "datasets").expanduser()


def wds_repo(entry: CatalogueEntry) -> str:
    """The Hugging Face dataset repo with CLIP_benchmark's shards, e.g. ``clip-benchmark/wds_vtab-caltech101``."""
    return f"{WDS_ORG}/wds_{entry.wds_slug}"


def wds_dir(entry: CatalogueEntry) -> Path:
    """The local copy of the shards: ``data_root()/wds_<slug>`` (the repo's own name, so
    ``hf download clip-benchmark/wds_X --repo-type dataset --local-dir $CLIPGUARD_DATA/wds_X`` fills it)."""
    return data_root() / f"wds_{entry.wds_slug}"


def _hf_home() -> Path:
    """huggingface_hub's and datasets' HF_HOME: ``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser()


def hub_cache() -> Path:
    """The Hugging Face Hub file cache, resolved as ``huggingface_hub.constants.HF_HUB_CACHE`` is."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(env).expanduser() if env else _hf_home() / "hub"


def datasets_cache() -> Path:
    """The ``datasets`` library's cache (``datasets.config.HF_DATASETS_CACHE``)."""
    env = os.environ.get("HF_DATASETS_CACHE")
    return Path(env).expanduser() if env else _hf_home() / "datasets"


def _snake(name: str) -> str:
    """``datasets.naming.camelcase_to_snakecase``, which names the cache folder of a hub dataset."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def hf_cache_dir(hf_id: str) -> Path:
    """Where ``load_dataset(hf_id)`` keeps its prepared Arrow files: ``<cache>/<namespace>___<name>``."""
    *namespace, name = hf_id.split("/")
    return datasets_cache() / "___".join([*namespace, _snake(name)])


def _shards(folder: Path) -> int:
    """Readable ``*.tar`` shards in ``folder`` (links into the hub's blob store count when their target exists)."""
    return sum(1 for p in folder.glob("*.tar") if p.exists()) if folder.is_dir() else 0


def local_status(entry: CatalogueEntry) -> dict:
    """What of ``entry`` is on this machine, without network access.

    Returns ``{"wds": {"path", "shards", "classnames"}, "hub": {"repo", "path", "shards"}, "hf": {"id", "path",
    "cached"} or None, "present"}``: shards of ``split`` in ``wds_dir``, shards of the wds repo in the Hub cache
    (any snapshot), whether ``datasets`` has prepared the hf dataset (its offline cache rule: a
    ``config/version/hash`` folder), and whether any of them is usable.
    """
    local = wds_dir(entry)
    repo_dir = hub_cache() / f"datasets--{wds_repo(entry).replace('/', '--')}"
    hub = max((_shards(s / entry.split) for s in (repo_dir / "snapshots").glob("*")), default=0)
    wds = {"path": str(local), "shards": _shards(local / entry.split),
           "classnames": (local / "classnames.txt").is_file()}
    hf = None
    if entry.hf:
        cache = hf_cache_dir(entry.hf)
        hf = {"id": entry.hf, "path": str(cache), "cached": any(p.is_dir() for p in cache.glob("*/*/*"))}
    present = wds["shards"] > 0 or hub > 0 or bool(hf and hf["cached"])
    return {"wds": wds, "hub": {"repo": wds_repo(entry), "path": str(repo_dir), "shards": hub}, "hf": hf,
            "present": present}
