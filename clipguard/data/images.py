"""PIL / numpy images to one uint8 (N, 3, H, W) tensor, through the one preprocessing protocol.

The protocol (applied once, at load): with a ``size=(H, W)`` every image goes through open_clip's eval
geometry for that input size (``open_clip.image_transform(size, is_train=False)`` minus ToTensor/Normalize:
shorter side resized with PIL bicubic, then centre crop); with ``size=None`` images keep their own size.
``--preprocess tecoa`` (:func:`tecoa_geometry`) is the one named alternative geometry, for TeCoA's own protocol;
``protocol_name`` names whichever was used (records, prepared-cache keys).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize
from torchvision.transforms import functional as F

from clipguard.errors import ClipguardError

NATIVE = "native"

RESIZE_MODES = ("shortest", "squash", "longest")  # open_clip's ``resize_mode`` values
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # open_clip's ``interpolation`` values


@dataclass(frozen=True)
class Geometry:
    """How an image reaches a model's input size: a model's own open_clip preprocess config (``resize_mode``,
    ``interpolation``, ``fill_color``; ``open_clip.image_transform``'s arguments of the same names), minus the
    normalisation (mean/std are applied on the device, inside the classifier). The default is OpenAI CLIP's:
    shorter side bicubic, then centre crop."""

    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ClipguardError(f"resize mode {self.resize_mode!r} is unknown: use one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ClipguardError(f"interpolation {self.interpolation!r} is unknown: use one of "
                                 f"{', '.join(INTERPOLATIONS)}")


DEFAULT_GEOMETRY = Geometry()


def as_size(size) -> tuple[int, int] | None:
    """``None`` (native), an int (square) or (H, W) -> ``None`` or an (H, W) tuple of ints."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    return (h, w)


def protocol_name(size, decode_device=None, preprocess: str = "open_clip") -> str:
    """What records store as ``dataset.preprocess``: ``native``, ``open_clip eval geometry HxW`` (plus the
    decoder, for ``--decode device`` on ``decode_device``) or, for ``preprocess="tecoa"``, TeCoA's geometry with
    its resize side. The prepared cache is keyed by it too, so each geometry has its own cache."""
    size = as_size(size)
    if size is None:
        return NATIVE
    if preprocess == "tecoa":
        return f"{TECOA_NAME} {size[0]}x{size[1]}: torchvision Resize({tecoa_side(size)}) bilinear + CenterCrop"
    name = f"open_clip eval geometry {size[0]}x{size[1]}"
    if decode_device is not None:
        name += protocol_suffix(decode_device)
    return name


def protocol_suffix(device: torch.device | str) -> str:
    """What ``dataset.preprocess`` adds for ``--decode device`` (:mod:`clipguard.data.device_decode`; the decoder
    depends on the device type). Here, not there: the device decoder builds on this module, never the reverse."""
    kind = torch.device(device).type
    return f"; JPEG decoded on {kind} by torchvision.io.decode_jpeg, resized by torch antialiased bicubic"


def eval_geometry(img, size):
    """open_clip's eval geometry for an (H, W) input: what ``image_transform(size, is_train=False)`` does
    before ToTensor/Normalize (``resize_mode='shortest'``, bicubic), on a PIL image; returns an RGB PIL image.

    Square sizes use the same torchvision transforms open_clip composes (``Resize(H, BICUBIC)`` on the shorter
    side, then ``CenterCrop``); non-square sizes use open_clip's ``ResizeKeepRatio`` rule (each side scaled by
    the smaller ratio, rounded) through torchvision's resize, then ``CenterCrop``. The image is converted to RGB
    first, as torchvision's ImageFolder loader does before open_clip's transform (identical for RGB and L).
    """
    h, w = as_size(size)
    img = img.convert("RGB")
    if h == w:
        img = Resize(h, interpolation=InterpolationMode.BICUBIC)(img)
    else:  # open_clip.transform.ResizeKeepRatio(size), longest=0
        src_h, src_w = img.size[1], img.size[0]
        ratio = min(src_h / h, src_w / w)
        img = F.resize(img, [round(src_h / ratio), round(src_w / ratio)], InterpolationMode.BICUBIC)
    return CenterCrop((h, w))(img)


TECOA_NAME = "TeCoA geometry"  # how protocol_name (records, prepared manifests) starts for --preprocess tecoa


def tecoa_side(size) -> int:
    """The shorter side TeCoA resizes to before its centre crop: 256 for its 224 px model; for another (square)
    input size the same 256:224 ratio, which TeCoA's code (ViT-B/32 only) never needed.

    Raises:
        ClipguardError: a non-square input size (TeCoA's code has only square crops).
    """
    h, w = as_size(size)
    if h != w:
        raise ClipguardError(f"--preprocess tecoa crops a square (TeCoA's 224x224), but this model takes {h}x{w}: "
                             "use --preprocess open_clip")
    return round(h * 256 / 224)


def tecoa_geometry(img, size):
    """TeCoA's test-time geometry for its non-CIFAR sets, on a PIL image; returns an RGB PIL image.

    TeCoA's ``finetuning.py`` (cvlab-columbia/ZSRobust4FoundationModel) builds ``preprocess224 = Compose([
    Resize(256), CenterCrop(224), ToTensor()])``: shorter side to 256 with torchvision's default interpolation
    (bilinear; on a PIL image, PIL's antialiased bilinear), longer side ``int(256 * long / short)``, then the centre
    224x224. Its datasets hand it RGB images (torchvision's loaders ``convert("RGB")``), so the image is converted
    first here too (it matters for palette images, which PIL would otherwise resize by nearest neighbour). Its
    CIFAR-10/100 and STL-10 get ``ToTensor()`` only: that is ``--resolution native``, not this function.
    """
    h, _ = as_size(size)
    side = tecoa_side(size)
    img = img.convert("RGB")
    return CenterCrop(h)(Resize(side, interpolation=InterpolationMode.BILINEAR)(img))


# --preprocess name -> geometry(PIL image, size) -> RGB PIL image at size (run_options.PREPROCESSES: the same names)
GEOMETRIES = {"open_clip": eval_geometry, "tecoa": tecoa_geometry}


def _fmt(hw: tuple[int, ...]) -> str:
    return f"{hw[1]}x{hw[0]}"  # W x H, as image sizes are usually written


def to_uint8_chw(images: Iterable, size=None, *, what: str = "the dataset", preprocess: str = "open_clip"
                 ) -> torch.Tensor:
    """Stack PIL images (any mode) as uint8 (N, 3, H, W).

    Args:
        images: PIL images (an iterable: each is converted as it comes, so files can be opened lazily).
        size: (H, W) (or an int): every image goes through :func:`eval_geometry` for that size (or the
            ``preprocess`` geometry of :data:`GEOMETRIES`); None keeps each image's own size, which must then be
            the same for all.
        what: names the data in the error (e.g. ``--dataset 'imagefolder:photos'``).
        preprocess: ``open_clip`` (the protocol) or ``tecoa`` (:func:`tecoa_geometry`).

    Raises:
        ClipguardError: ``size`` is None and the images differ in size.
    """
    size, geometry = as_size(size), GEOMETRIES[preprocess]
    arrays, shapes = [], {}
    for im in images:
        im = geometry(im, size) if size is not None else im.convert("RGB")
        a = np.asarray(im, dtype=np.uint8)
        shapes.setdefault(a.shape[:2], len(arrays))
        arrays.append(a)
    if not arrays:
        h, w = size or (0, 0)
        return torch.empty(0, 3, h, w, dtype=torch.uint8)
    if len(shapes) > 1:
        seen = ", ".join(_fmt(s) for s in list(shapes)[:3]) + (", ..." if len(shapes) > 3 else "")
        raise ClipguardError(
            f"{what}: images differ in size ({seen}) and cannot be stacked at native resolution: "
            "use --resolution model (each image resized and centre-cropped to the model's input)"
        )
    arr = np.stack(arrays)  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def tensor_geometry(images: torch.Tensor, size, preprocess: str = "open_clip") -> torch.Tensor:
    """uint8 (N, 3, h, w) tensors through the same protocol (via PIL); unchanged when ``size`` is None, or when
    already at ``size`` under open_clip's geometry (its crop of a same-size image is the image; TeCoA's
    resize-then-crop is not)."""
    size = as_size(size)
    if size is None or (preprocess == "open_clip" and tuple(images.shape[-2:]) == size):
        return images
    return to_uint8_chw((Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images), size,
                        preprocess=preprocess)


__all__ = ["GEOMETRIES", "as_size", "eval_geometry", "protocol_name", "protocol_suffix", "tecoa_geometry",
           "tensor_geometry", "to_uint8_chw"]
