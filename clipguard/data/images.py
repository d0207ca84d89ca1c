"""PIL / numpy images to one uint8 (N, 3, H, W) tensor, through the one preprocessing protocol.

The protocol (applied once, at load): with a ``size=(H, W)`` every image goes through the model's own open_clip eval
transform for that input size (``open_clip.image_transform(size, is_train=False, resize_mode=, interpolation=,
fill_color=)`` minus ToTensor/Normalize), described by a :class:`Geometry`: shorter side resized then centre crop
(OpenAI CLIP, the default), ``squash`` (SigLIP) or ``longest`` + pad, bicubic or bilinear (MobileCLIP), in open_clip's
order (resize, crop, then RGB: a palette image is resized by nearest neighbour, RGBA premultiplied); with
``size=None`` images keep their own size. ``--preprocess tecoa`` (:func:`tecoa_geometry`) is the one named
alternative geometry, for TeCoA's own protocol; ``protocol_name`` names whichever was used (records, prepared-cache
keys).
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
ORDERS = ("open_clip", "transformers")  # Geometry.order: whose order of operations (and crop rounding)


@dataclass(frozen=True)
class Geometry:
    """How an image reaches a model's input size: a model's own open_clip preprocess config (``resize_mode``,
    ``interpolation``, ``fill_color``; ``open_clip.image_transform``'s arguments of the same names), minus the
    normalisation (mean/std are applied on the device, inside the classifier). The default is OpenAI CLIP's:
    shorter side bicubic, then centre crop."""

    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0
    # whose order of operations: open_clip's (resize, crop, then RGB) or "transformers" (a transformers checkpoint's
    # PIL image processor: RGB first, then resize, and a centre crop whose offset is floored, not rounded)
    order: str = "open_clip"

    def __post_init__(self):
        if self.order not in ORDERS or (self.order == "transformers" and self.resize_mode == "longest"):
            raise ClipguardError(f"geometry order {self.order!r} with resize mode {self.resize_mode!r} is unknown: "
                                 f"use one of {', '.join(ORDERS)} (transformers: shortest or squash)")
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


def protocol_name(size, decode_device=None, preprocess: str = "open_clip", geometry: Geometry | None = None) -> str:
    """What records store as ``dataset.preprocess``: ``native``, ``open_clip eval geometry HxW (resize_mode=...,
    interpolation=...)`` (the model's :class:`Geometry`; plus the decoder, for ``--decode device`` on
    ``decode_device``) or, for ``preprocess="tecoa"``, TeCoA's geometry with its resize side. The prepared cache is
    keyed by it too, so each geometry has its own cache."""
    size = as_size(size)
    if size is None:
        return NATIVE
    if preprocess == "tecoa":
        return f"{TECOA_NAME} {size[0]}x{size[1]}: torchvision Resize({tecoa_side(size)}) bilinear + CenterCrop"
    g = geometry or DEFAULT_GEOMETRY
    fill = f", fill_color={g.fill_color}" if g.resize_mode == "longest" else ""
    library = "transformers image-processor" if g.order == "transformers" else "open_clip eval"
    name = (f"{library} geometry {size[0]}x{size[1]} (resize_mode={g.resize_mode}, "
            f"interpolation={effective_interpolation(g, size)}{fill})")
    if decode_device is not None:
        name += protocol_suffix(decode_device)
    return name


def protocol_suffix(device: torch.device | str) -> str:
    """What ``dataset.preprocess`` adds for ``--decode device`` (:mod:`clipguard.data.device_decode`; the decoder
    depends on the device type). Here, not there: the device decoder builds on this module, never the reverse."""
    kind = torch.device(device).type
    return f"; JPEG decoded on {kind} by torchvision.io.decode_jpeg, resized by torch antialiased bicubic"


_MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
          "nearest": InterpolationMode.NEAREST}


def effective_interpolation(geometry: Geometry, size) -> str:
    """The interpolation :func:`eval_geometry` uses: the geometry's, except for ``shortest`` at a non-square size,
    where open_clip's ``ResizeKeepRatio(image_size)`` is built without it and resizes bicubic (open_clip 3.3)."""
    h, w = as_size(size)
    keep_ratio = geometry.resize_mode == "shortest" and h != w and geometry.order == "open_clip"
    return "bicubic" if keep_ratio else geometry.interpolation


def _keep_ratio(img, size: tuple[int, int], longest: bool) -> list[int]:
    """open_clip's ``ResizeKeepRatio`` rule: both sides divided by the smaller (shortest) or larger (longest) of the
    two source/target ratios, rounded."""
    src_h, src_w = img.size[1], img.size[0]
    ratios = (src_h / size[0], src_w / size[1])
    ratio = max(ratios) if longest else min(ratios)
    return [round(src_h / ratio), round(src_w / ratio)]


def _crop_or_pad(img, size: tuple[int, int], fill: int):
    """open_clip's ``CenterCropOrPad``: pad a side shorter than ``size`` with ``fill`` (the extra pixel right and
    bottom), then centre crop."""
    h, w = size
    if w > img.size[0] or h > img.size[1]:
        dw, dh = max(w - img.size[0], 0), max(h - img.size[1], 0)
        img = F.pad(img, [dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2], fill=fill)
    return F.center_crop(img, [h, w])


def eval_geometry(img, size, geometry: Geometry | None = None):
    """A model's open_clip eval transform for an (H, W) input, before ToTensor/Normalize: what
    ``image_transform(size, is_train=False, resize_mode=, interpolation=, fill_color=)`` does to a PIL image (any
    mode); returns an RGB PIL image.

    - ``shortest`` (the default): square sizes use torchvision's ``Resize(H)`` (shorter side to H) as open_clip does;
      non-square sizes open_clip's ``ResizeKeepRatio`` rule, bicubic (see :func:`effective_interpolation`); then
      ``CenterCrop``.
    - ``squash``: ``Resize((H, W))``, the whole image with its aspect ratio changed (SigLIP).
    - ``longest``: the longer side to fit, then centre pad with ``fill_color`` (and crop).

    The image is converted to RGB last, as open_clip's ``MaybeConvertMode`` does after the resize and crop: PIL
    resizes a palette ("P") image by nearest neighbour and an RGBA one premultiplied by its alpha. RGB and grey images
    give the same pixels either way.
    """
    g = geometry or DEFAULT_GEOMETRY
    h, w = as_size(size)
    if g.order == "transformers":
        return _transformers_geometry(img, (h, w), g)
    mode = _MODES[effective_interpolation(g, (h, w))]
    if g.resize_mode == "squash":
        img = F.resize(img, [h, w], mode)
    elif g.resize_mode == "longest":
        img = _crop_or_pad(F.resize(img, _keep_ratio(img, (h, w), longest=True), mode), (h, w), g.fill_color)
    else:
        img = Resize(h, interpolation=mode)(img) if h == w else F.resize(img, _keep_ratio(img, (h, w), False), mode)
        img = CenterCrop((h, w))(img)
    return img.convert("RGB")


def _transformers_geometry(img, size: tuple[int, int], g: Geometry):
    """transformers' PIL image processors (``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``; the slow
    ``CLIPProcessor`` of transformers 4): convert to RGB first (transparency composited on white, as
    ``transformers.image_transforms.convert_to_rgb`` does in transformers 5), then ``squash`` to (H, W) or resize the
    shorter side to min(H, W) (the longer one truncated, as torchvision's ``Resize(int)``) and centre crop at the
    floored offset ``(side - crop) // 2`` (torchvision's CenterCrop rounds it: one pixel apart when the difference is
    odd)."""
    h, w = size
    if "A" in img.getbands() or img.info.get("transparency") is not None:  # transformers 5 composites it on white
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img, mode = img.convert("RGB"), _MODES[g.interpolation]
    if g.resize_mode == "squash":
        return F.resize(img, [h, w], mode)
    img = F.resize(img, min(h, w), mode)
    top, left = (img.size[1] - h) // 2, (img.size[0] - w) // 2
    return img.crop((left, top, left + w, top + h))


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


def tecoa_geometry(img, size, geometry: Geometry | None = None):
    """TeCoA's test-time geometry for its non-CIFAR sets, on a PIL image; returns an RGB PIL image. ``geometry`` (the
    model's own) is ignored: TeCoA's protocol is the same for every model.

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


# --preprocess name -> (PIL image, size, the model's Geometry) -> RGB PIL image at size (run_options.PREPROCESSES:
# the same names)
GEOMETRIES = {"open_clip": eval_geometry, "tecoa": tecoa_geometry}


def _fmt(hw: tuple[int, ...]) -> str:
    return f"{hw[1]}x{hw[0]}"  # W x H, as image sizes are usually written


def to_uint8_chw(images: Iterable, size=None, *, what: str = "the dataset", preprocess: str = "open_clip",
                 geometry: Geometry | None = None) -> torch.Tensor:
    """Stack PIL images (any mode) as uint8 (N, 3, H, W).

    Args:
        images: PIL images (an iterable: each is converted as it comes, so files can be opened lazily).
        size: (H, W) (or an int): every image goes through :func:`eval_geometry` for that size (or the
            ``preprocess`` geometry of :data:`GEOMETRIES`); None keeps each image's own size, which must then be
            the same for all.
        what: names the data in the error (e.g. ``--dataset 'imagefolder:photos'``).
        preprocess: ``open_clip`` (the protocol) or ``tecoa`` (:func:`tecoa_geometry`).
        geometry: the model's :class:`Geometry` for ``open_clip`` (None: :data:`DEFAULT_GEOMETRY`).

    Raises:
        ClipguardError: ``size`` is None and the images differ in size.
    """
    size, apply = as_size(size), GEOMETRIES[preprocess]
    arrays, shapes = [], {}
    for im in images:
        im = apply(im, size, geometry) if size is not None else im.convert("RGB")
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


def tensor_geometry(images: torch.Tensor, size, preprocess: str = "open_clip", geometry: Geometry | None = None
                    ) -> torch.Tensor:
    """uint8 (N, 3, h, w) tensors through the same protocol (via PIL); unchanged when ``size`` is None, or when
    already at ``size`` under open_clip's geometry, whatever its :class:`Geometry` (a same-size resize, crop or pad is
    the image; TeCoA's resize-then-crop is not)."""
    size = as_size(size)
    if size is None or (preprocess == "open_clip" and tuple(images.shape[-2:]) == size):
        return images
    return to_uint8_chw((Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images), size,
                        preprocess=preprocess, geometry=geometry)


__all__ = ["DEFAULT_GEOMETRY", "GEOMETRIES", "Geometry", "as_size", "effective_interpolation", "eval_geometry",
           "protocol_name", "protocol_suffix", "tecoa_geometry", "tensor_geometry", "to_uint8_chw"]
