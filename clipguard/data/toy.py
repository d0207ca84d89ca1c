"""The toy world: deterministic 32x32 images of coloured shapes with captions.

Every image is one filled shape (6 shapes x 6 colours) at a random position and size on a tinted grey
background with Gaussian noise. Captioned images over all 36 combinations train the toy CLIP; a
10-class label set in which both attributes matter ("red circle" vs "red square" vs "green circle")
is the zero-shot benchmark. Everything is generated from fixed numpy seeds, so any machine, process
or run yields the same bytes.

Images are uint8 tensors of shape (N, 3, H, W); divide by 255 for the project's [0, 1] pixels.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SHAPES = ["circle", "square", "triangle", "cross", "star", "ring"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan"]
# Saturated RGB values, far apart from each other and from the grey background.
COLOUR_RGB = np.array(
    [[220, 40, 40], [40, 190, 60], [50, 80, 235], [235, 215, 40], [160, 50, 200], [40, 210, 215]],
    dtype=np.float32,
)

# Hard-coded (no file read at import) and checked against prompts/toy.json by tests/test_toy_world.py.
TOY_CLASSNAMES = [
    "red circle", "green circle", "blue square", "red square", "yellow triangle",
    "blue triangle", "green cross", "yellow cross", "purple star", "cyan star",
]
TOY_TEMPLATES = ["a photo of a {c}.", "a picture of a {c}.", "an image of a {c}."]

# Fixed seeds: the test and train splits must never share a random stream.
_SPLITS = {"test": (100, 1_000), "train": (200, 2_000), "shift": (100, 3_000)}  # name -> (images per class, seed)
# How a split's images look: the shift split is the toy world's distribution-shift set (as ImageNet-R is to
# ImageNet): the same classes on darker backgrounds, with stronger shade jitter and noise. It is the dataset
# `toy-shift` (test split only; records and reports name it so); prompts/toy-shift.json holds the toy's class names.
STYLES = {"test": {}, "train": {}, "shift": {"background": (25.0, 95.0), "jitter": 40.0, "noise": 28.0}}
SHIFT_NAME = "toy-shift"
DATASETS = {"toy": {"test": "test", "train": "train"}, SHIFT_NAME: {"test": "shift"}}  # name -> {split: _SPLITS key}


def _class_attributes() -> list[tuple[int, int]]:
    """(shape index, colour index) of each entry of TOY_CLASSNAMES."""
    out = []
    for name in TOY_CLASSNAMES:
        colour, shape = name.split(" ")
        out.append((SHAPES.index(shape), COLOURS.index(colour)))
    return out


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of one shape of 'radius' r, given pixel offsets from its centre."""
    name = SHAPES[shape]
    dist = np.hypot(dx, dy)
    if name == "circle":
        return dist <= r
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if name == "triangle":  # apex up; the half-width grows linearly from apex to base
        top, bottom = -r, 0.75 * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) * (r / (bottom - top)))
    if name == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if name == "star":  # five points: the radius oscillates with the angle
        theta = np.arctan2(dy, dx) + np.pi / 2
        return dist <= r * (0.65 + 0.35 * np.cos(5 * theta))
    if name == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    raise ValueError(f"shape index {shape} out of range 0..{len(SHAPES) - 1}")


def render(shape: int, colour: int, rng: np.random.Generator, size: int = 32, *,
           background: tuple[float, float] = (70.0, 180.0), jitter: float = 15.0, noise: float = 10.0) -> np.ndarray:
    """Draw one image of SHAPES[shape] in COLOURS[colour] (``background``: the grey level's range; ``jitter``: the
    shade's per-channel jitter; ``noise``: the pixel noise's std, all in 0..255 units).

    Shape:
        returns uint8 (3, size, size).
    """
    r = rng.uniform(0.19, 0.38) * size  # radius 6..12 px at size 32: big enough to tell shapes apart
    cx, cy = rng.uniform(r, size - 1 - r, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = _shape_mask(shape, xx - cx, yy - cy, r)

    grey = rng.uniform(*background)
    tint = grey + rng.uniform(-20.0, 20.0, size=3)  # per-channel tint, still clearly greyish
    fill = COLOUR_RGB[colour] + rng.uniform(-jitter, jitter, size=3)  # jitter in the shade
    img = np.where(mask[None], fill[:, None, None], tint[:, None, None].astype(np.float32))
    img = img + rng.normal(0.0, noise, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def caption_set(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n captioned images spread evenly over all 36 shape x colour combinations, in random order.

    Each caption is a random TOY_TEMPLATES entry filled with "<colour> <shape>".

    Shape:
        returns uint8 (n, 3, 32, 32) images and n captions.
    """
    rng = np.random.default_rng(seed)
    combos = rng.permutation(np.arange(n) % (len(SHAPES) * len(COLOURS)))
    templates = rng.integers(0, len(TOY_TEMPLATES), size=n)
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    captions = []
    for i, (combo, t) in enumerate(zip(combos, templates, strict=True)):
        shape, colour = divmod(int(combo), len(COLOURS))
        images[i] = render(shape, colour, rng)
        captions.append(TOY_TEMPLATES[t].format(c=f"{COLOURS[colour]} {SHAPES[shape]}"))
    return torch.from_numpy(images), captions


def class_set(per_class: int, seed: int, **style) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly per_class images of each TOY_CLASSNAMES class, shuffled (``style``: :func:`render`'s look).

    Shape:
        returns uint8 (10 * per_class, 3, 32, 32) images and int64 (10 * per_class,) labels.
    """
    rng = np.random.default_rng(seed)
    attrs = _class_attributes()
    # Shuffled so any prefix (e.g. the first 200 test images) covers every class.
    labels = rng.permutation(np.repeat(np.arange(len(TOY_CLASSNAMES)), per_class))
    images = np.empty((len(labels), 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = render(*attrs[label], rng, **style)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


@functools.cache
def _cached_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    per_class, seed = _SPLITS[split]
    return class_set(per_class, seed, **STYLES[split])


def toy_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed labelled toy split: "test" (1,000 images, 100 per class), "train" (2,000, 200 per class) or "shift"
    (1,000, 100 per class: the distribution-shift set, see STYLES).

    Labels index TOY_CLASSNAMES. Generated once per process; callers get fresh copies they may mutate.

    Shape:
        returns uint8 (N, 3, 32, 32) images and int64 (N,) labels.

    Raises:
        ValueError: unknown split name.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown toy split {split!r}; valid splits: {', '.join(sorted(_SPLITS))}")
    images, labels = _cached_split(split)
    return images.clone(), labels.clone()

