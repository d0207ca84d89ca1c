"""Parsing of the spec strings users type: eps values, model specs and dataset specs.

Every parser raises :class:`ClipguardError` with a one-line message that names the bad value and
suggests the fix; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path

from clipguard.catalogue import catalogue, wds_dir
from clipguard.errors import ClipguardError
from clipguard.registry import suggest

# ---------------------------------------------------------------------------------------------- eps


@dataclass(frozen=True)
class Eps:
    """A perturbation budget in [0, 1] pixel units, keeping the text the user typed."""

    value: float  # L-inf or L2 radius, [0, 1] pixel units
    text: str  # canonical text form, e.g. "8/255"

    def to_record(self) -> dict:
        return {"text": self.text, "value": self.value}


_EPS_RE = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+))?\s*$")


def parse_eps(text: str, *, name: str = "--eps", allow_zero: bool = True, upper: float | None = 1) -> Eps:
    """Parse ``"8/255"``, ``"0.0314"`` or ``"0"`` into an :class:`Eps` in [0, 1] pixel units: the one parser of
    every pixel-unit value (eps, alpha, sigma, radii). ``upper``: the largest value that can be meant (None: no
    bound, as for L2 radii); above it the error asks whether ``/255`` was meant."""
    m = _EPS_RE.match(str(text))
    if not m:
        raise ClipguardError(
            f"{name} {text!r} is not a number: use [0, 1] pixel units such as 8/255 or 0.0314"
        )
    num, den = m.group(1), m.group(2)
    try:
        frac = Fraction(num) / Fraction(den) if den is not None else Fraction(num)
    except ZeroDivisionError:
        raise ClipguardError(f"{name} {text!r} divides by zero: use e.g. 8/255") from None
    value = float(frac)
    if upper is not None and value > upper:
        hint = f", did you mean {text}/255?" if den is None else " (255/255 is the whole range of a pixel)"
        raise ClipguardError(f"{name} {text!r} = {value:g} is above {upper:g}: values are in [0, 1] pixel units{hint}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ClipguardError(f"{name} {text!r} must be {'>= 0' if allow_zero else '> 0'} (e.g. 8/255)")
    canon = f"{num}/{den}" if den is not None else (f"{value:g}" if value else "0")
    return Eps(value=value, text=canon.replace(" ", ""))


LINF_PLAUSIBLE = 32 / 255  # above this, a bare L-inf radius (0.5, 1) is almost surely a forgotten /255


def check_linf_eps(eps: Eps, name: str = "--eps") -> Eps:
    """An L-inf radius above 1 is refused (none is larger than a pixel's range), and a bare decimal one above 32/255
    with the /255 hint (a fraction says it is meant)."""
    if eps.value > 1:
        hint = f": did you mean {eps.text}/255?" if "/" not in eps.text else " (255/255 is the whole range of a pixel)"
        raise ClipguardError(f"{name} {eps.text} = {eps.value:g} is above 1: an L-inf radius is in [0, 1] pixel "
                             f"units{hint}")
    if eps.value > LINF_PLAUSIBLE and "/" not in eps.text:
        raise ClipguardError(f"{name} {eps.text} as an L-inf radius changes every pixel by up to "
                             f"{eps.value * 255:g}/255, which no image survives: did you mean {eps.text}/255? (write "
                             f"it as a fraction, e.g. {round(eps.value * 255)}/255, if you mean it)")
    return eps


def parse_eps_list(text: str, *, name: str = "--eps", upper: float | None = 1) -> list[Eps]:
    """Parse a comma list such as ``"0,1/255,2/255,4/255,8/255"``."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ClipguardError(f"{name} is empty: give one value or a comma list such as 0,4/255,8/255")
    return [parse_eps(p.strip(), name=name, upper=upper) for p in parts]


class Norm(StrEnum):
    """A threat model: the ball a perturbation lives in (linf: max |delta| per pixel; l2: ||delta||_2 per image).
    ``Norm("linf")``, ``Norm.LINF`` and the string ``"linf"`` compare equal."""

    LINF = "linf"
    L2 = "l2"


def parse_norm(text: str | Norm) -> Norm:
    if isinstance(text, Norm):
        return text
    try:
        return Norm(str(text).lower())
    except ValueError:
        raise ClipguardError(f"--norm {text!r} is unknown: use linf or l2") from None


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSpec:
    """Where a CLIP model comes from. ``kind`` is one of toy, pretrained, file, hf-hub, random, transformers."""

    kind: str
    arch: str | None = None  # open_clip model name, e.g. "ViT-B-32"
    tag: str | None = None  # pretrained tag, e.g. "openai"
    path: str | None = None  # local weights file for kind == "file"; the save_pretrained folder for "transformers"
    repo: str | None = None  # "org/name" for kind == "hf-hub" or a hub "transformers" checkpoint
    variant: str = "seed0"  # toy variant
    text: str = ""  # the spec as typed
    revision: str | None = None  # hub revision of a "transformers" checkpoint (ORG/NAME@revision); None: main

    def __str__(self) -> str:
        return self.text


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_TAGS = ("none", "random")


TRANSFORMERS = "transformers:"


def _transformers_spec(t: str) -> ModelSpec:
    """``transformers:ORG/NAME[@revision]`` (a hub id) or ``transformers:PATH`` (a save_pretrained folder: a path that
    exists, or one starting with / . or ~). The folder's content is checked at load (models.hf_transformers)."""
    rest = t[len(TRANSFORMERS):]
    if rest.startswith(("/", ".", "~")) or (rest and Path(rest).exists()):
        return ModelSpec(kind="transformers", path=str(Path(rest).expanduser()), text=t)
    repo, _, revision = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or ("@" in rest and not revision):
        raise ClipguardError(f"--model {t!r}: transformers specs look like transformers:ORG/NAME, "
                             "transformers:ORG/NAME@REVISION or transformers:/path/to/saved_folder")
    return ModelSpec(kind="transformers", repo=repo, revision=revision or None, text=t)


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``toy``, ``toy@seed1``, ``ARCH:TAG``, ``ARCH:/path/weights.safetensors``,
    ``ARCH:none`` (random init), ``hf-hub:ORG/NAME`` or ``transformers:ORG/NAME[@REV]`` / ``transformers:DIR``.
    Arch names are checked by the loader."""
    t = str(text).strip()
    if t == "toy" or t.startswith("toy@"):
        variant = t.split("@", 1)[1] if "@" in t else "seed0"
        return ModelSpec(kind="toy", arch="clipguard-toy", variant=variant, text=t)
    if t.startswith(TRANSFORMERS):
        return _transformers_spec(t)
    if t.startswith("hf-hub:"):
        repo = t[len("hf-hub:"):]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ClipguardError(f"--model {t!r}: hf-hub specs look like hf-hub:ORG/NAME")
        return ModelSpec(kind="hf-hub", repo=repo, text=t)
    if ":" not in t or not t.split(":", 1)[0] or not t.split(":", 1)[1]:
        raise ClipguardError(
            f"--model {t!r} is not a model spec: use ARCH:TAG (e.g. ViT-B-32:openai), "
            "ARCH:/path/weights.safetensors, hf-hub:ORG/NAME, transformers:ORG/NAME or toy"
        )
    arch, tag = t.split(":", 1)
    if tag.lower() in RANDOM_TAGS:
        return ModelSpec(kind="random", arch=arch, tag=None, text=t)
    if "/" in tag or tag.endswith(_WEIGHT_SUFFIXES) or Path(tag).exists():
        return ModelSpec(kind="file", arch=arch, path=tag, text=t)
    return ModelSpec(kind="pretrained", arch=arch, tag=tag, text=t)


# ------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class DatasetSpec:
    """Where images come from. ``kind`` is one of toy, hf, imagefolder, wds, prepared."""

    kind: str
    name: str  # canonical name used in records and to find prompts/<name>.json
    hf_path: str | None = None  # Hugging Face dataset name, or a folder saved with save_to_disk
    path: str | None = None  # local folder (imagefolder, prepared), or wds folder / shard pattern
    image_column: str | None = None
    label_column: str | None = None
    text: str = ""
    split_alias: tuple[str, str] | None = None  # (split typed, split read): ImageNet's test is HF's validation

    def __str__(self) -> str:
        return self.text


SPEC_FORMS = ("toy, toy-shift, a catalogue name (clipguard datasets), hf:ORG/NAME, imagefolder:PATH, wds:PATH or "
              "prepared:PATH")


def _wds_name(path: str) -> str:
    """``.../wds_vtab-caltech101[/test/{0..3}.tar]`` -> the catalogue name of that CLIP_benchmark set, else the
    folder name without ``wds_``."""
    p = Path(path)
    folder = next((q.name for q in (p, *p.parents) if q.name.startswith("wds_")), p.name)
    short = folder.removeprefix("wds_")
    by_wds = {e.wds.replace("/", "-"): e.name for e in catalogue().values()}
    return by_wds.get(short, short)


def _catalogue_spec(t: str, image_column: str | None, label_column: str | None) -> DatasetSpec | None:
    """A catalogue name: its CLIP_benchmark shards when present under the data root, else its HF dataset."""
    entry = catalogue().get(t)
    if entry is None:
        return None
    local = wds_dir(entry)
    if entry.hf and not local.is_dir():
        alias = (entry.split, entry.hf_split) if entry.hf_split else None
        return DatasetSpec(kind="hf", name=entry.name, hf_path=entry.hf, text=t, split_alias=alias,
                           image_column=image_column or entry.image_column,
                           label_column=label_column or entry.label_column)
    return DatasetSpec(kind="wds", name=entry.name, path=str(local), text=t)


def parse_dataset_spec(
    text: str, *, image_column: str | None = None, label_column: str | None = None
) -> DatasetSpec:
    """Parse ``toy`` (``toy-shift``: its distribution-shift set), a catalogue name (``cifar10``, ``imagenet1k``...),
    ``hf:ORG/NAME`` or ``hf:PATH`` (saved with ``save_to_disk``), ``imagefolder:PATH``, ``wds:PATH`` (a CLIP_benchmark
    folder or a shard pattern with braces) or ``prepared:PATH`` (a cache made by ``clipguard prepare``). Paths are
    checked here, the content at load."""
    t = str(text).strip()
    if t in ("toy", "toy-shift"):  # the toy world's test/train splits, and its distribution-shift set
        return DatasetSpec(kind="toy", name=t, text=t)
    found = _catalogue_spec(t, image_column, label_column)
    if found is not None:
        return found
    kind, _, rest = t.partition(":")
    if kind in ("hf", "imagefolder", "wds", "prepared") and not rest:
        raise ClipguardError(f"--dataset {t!r} needs a {'name' if kind == 'hf' else 'path'} after '{kind}:'")
    if kind == "hf":
        local = Path(rest).is_dir()
        return DatasetSpec(kind="hf", name=Path(rest).name if local else rest.split("/")[-1],
                           hf_path=str(Path(rest).resolve()) if local else rest,
                           image_column=image_column, label_column=label_column, text=t)
    if kind in ("imagefolder", "prepared"):
        if not Path(rest).is_dir():
            what = "one sub-folder per class" if kind == "imagefolder" else "made by clipguard prepare"
            raise ClipguardError(f"--dataset {t!r}: no such directory {rest!r} ({what})")
        return DatasetSpec(kind=kind, name=Path(rest).resolve().name, path=str(Path(rest).resolve()), text=t)
    if kind == "wds":
        if "{" not in rest and not Path(rest).exists():
            raise ClipguardError(f"--dataset {t!r}: no such folder or shard {rest!r} (CLIP_benchmark's layout: "
                                 "DIR/test/0.tar ... with DIR/classnames.txt)")
        return DatasetSpec(kind="wds", name=_wds_name(rest), path=rest, text=t)
    close = suggest(t, ["toy", "toy-shift", *catalogue()])
    hint = f" (did you mean {close}?)" if close else ""
    raise ClipguardError(f"--dataset {t!r} is unknown{hint}: use {SPEC_FORMS}")
