"""Parsing of the spec strings users type: eps values, model specs and dataset specs.

Every parser raises :class:`ClipguardError` with a one-line message that names the bad value and
suggests the fix; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

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


def parse_eps(text: str, *, name: str = "--eps", allow_zero: bool = True) -> Eps:
    """Parse ``"8/255"``, ``"0.0314"`` or ``"0"`` into an :class:`Eps` in [0, 1] pixel units."""
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
    if value > 1:
        raise ClipguardError(
            f"{name} {text!r} = {value:g} is above 1: eps is in [0, 1] pixel units, "
            f"did you mean {text}/255?"
        )
    if value < 0 or (value == 0 and not allow_zero):
        raise ClipguardError(f"{name} {text!r} must be {'>= 0' if allow_zero else '> 0'} (e.g. 8/255)")
    canon = f"{num}/{den}" if den is not None else (f"{value:g}" if value else "0")
    return Eps(value=value, text=canon.replace(" ", ""))


def parse_eps_list(text: str, *, name: str = "--eps") -> list[Eps]:
    """Parse a comma list such as ``"0,1/255,2/255,4/255,8/255"``."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ClipguardError(f"{name} is empty: give one value or a comma list such as 0,4/255,8/255")
    return [parse_eps(p.strip(), name=name) for p in parts]


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSpec:
    """Where a CLIP model comes from. ``kind`` is one of toy, pretrained, file, hf-hub, random."""

    kind: str
    arch: str | None = None  # open_clip model name, e.g. "ViT-B-32"
    tag: str | None = None  # pretrained tag, e.g. "openai"
    path: str | None = None  # local weights file for kind == "file"
    repo: str | None = None  # "org/name" for kind == "hf-hub"
    variant: str = "seed0"  # toy variant
    text: str = ""  # the spec as typed

    def __str__(self) -> str:
        return self.text


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_TAGS = ("none", "random")


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``toy``, ``toy@seed1``, ``ARCH:TAG``, ``ARCH:/path/weights.safetensors``,
    ``ARCH:none`` (random init) or ``hf-hub:ORG/NAME``. Arch names are checked by the loader."""
    t = str(text).strip()
    if t == "toy" or t.startswith("toy@"):
        variant = t.split("@", 1)[1] if "@" in t else "seed0"
        return ModelSpec(kind="toy", arch="clipguard-toy", variant=variant, text=t)
    if t.startswith("hf-hub:"):
        repo = t[len("hf-hub:"):]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ClipguardError(f"--model {t!r}: hf-hub specs look like hf-hub:ORG/NAME")
        return ModelSpec(kind="hf-hub", repo=repo, text=t)
    if ":" not in t or not t.split(":", 1)[0] or not t.split(":", 1)[1]:
        raise ClipguardError(
            f"--model {t!r} is not a model spec: use ARCH:TAG (e.g. ViT-B-32:openai), "
            "ARCH:/path/weights.safetensors, hf-hub:ORG/NAME or toy"
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
    """Where images come from. ``kind`` is one of toy, hf, imagefolder."""

    kind: str
    name: str  # canonical name used in records and to find prompts/<name>.json
    hf_path: str | None = None  # Hugging Face dataset name
    path: str | None = None  # local folder for imagefolder
    image_column: str | None = None
    label_column: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text


# Known datasets: name -> (Hugging Face path, image column, label column).
KNOWN_HF = {
    "cifar10": ("uoft-cs/cifar10", "img", "label"),
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label"),
}


def parse_dataset_spec(
    text: str, *, image_column: str | None = None, label_column: str | None = None
) -> DatasetSpec:
    """Parse ``toy``, ``cifar10``, ``cifar100``, ``hf:ORG/NAME`` or ``imagefolder:PATH``."""
    t = str(text).strip()
    if t == "toy":
        return DatasetSpec(kind="toy", name="toy", text=t)
    if t in KNOWN_HF:
        hf_path, img, lab = KNOWN_HF[t]
        return DatasetSpec(kind="hf", name=t, hf_path=hf_path, image_column=image_column or img,
                           label_column=label_column or lab, text=t)
    if t.startswith("hf:"):
        hf_path = t[3:]
        if not hf_path:
            raise ClipguardError("--dataset 'hf:' needs a name: hf:ORG/NAME")
        return DatasetSpec(kind="hf", name=hf_path.split("/")[-1], hf_path=hf_path,
                           image_column=image_column, label_column=label_column, text=t)
    if t.startswith("imagefolder:"):
        path = t[len("imagefolder:"):]
        if not Path(path).is_dir():
            raise ClipguardError(f"--dataset {t!r}: no such directory {path!r} (one sub-folder per class)")
        return DatasetSpec(kind="imagefolder", name=Path(path).resolve().name, path=str(Path(path).resolve()),
                           text=t)
    close = suggest(t, ["toy", *KNOWN_HF])
    hint = f" (did you mean {close}?)" if close else ""
    raise ClipguardError(
        f"--dataset {t!r} is unknown{hint}: use toy, cifar10, cifar100, hf:ORG/NAME or imagefolder:PATH"
    )
