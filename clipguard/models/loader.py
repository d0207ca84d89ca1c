"""The one GPU-aware CLIP loader every command uses.

``load_clip("ViT-B-32:openai")`` returns a :class:`LoadedClip` holding the open_clip model (eval mode,
parameters frozen), its tokenizer, mean/std, input size, device, precision and a fingerprint that keys
the text-embedding store and ties adapters to their base: ``sha256:<hex>`` of a local weights file (toy too),
``ARCH:random-seed0``, ``ARCH:TAG@sha256:<hex>`` for a pretrained tag (the file open_clip loaded) and
``hf-hub:ORG/NAME@rev:<commit>`` for a hub model (see :func:`weights_fingerprint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip import factory as open_clip_factory
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from clipguard.data.images import DEFAULT_GEOMETRY, Geometry, as_size
from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write_json, cache_root
from clipguard.hub import ensure_reachable_or_offline
from clipguard.models import toy
from clipguard.models.inference import DTYPES
from clipguard.models.tokenizers import load_tokenizer
from clipguard.registry import suggest
from clipguard.specs import ModelSpec, parse_model_spec

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class LoadedClip:
    """A CLIP model ready for zero-shot use. ``precision`` is the autocast dtype of clean passes."""

    model: torch.nn.Module  # open_clip CLIP, eval mode, requires_grad False
    tokenizer: Callable[[list[str]], torch.Tensor]  # open_clip's tokenizer: texts -> LongTensor token ids
    mean: tuple[float, float, float]  # normalisation the model expects, applied inside the classifier
    std: tuple[float, float, float]
    input_size: tuple[int, int]  # (H, W) the image tower takes
    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16"
    fingerprint: str  # weights digest (local files); tag or hub name + weights digest or hub revision
    spec: ModelSpec
    info: dict = field(default_factory=dict)  # provenance for records
    # the model's own resize rule (open_clip preprocess config / a transformers image-processor config)
    geometry: Geometry = DEFAULT_GEOMETRY
    # the tokenizer and its context length (models.tokenizers: "hf:timm/ViT-B-16-SigLIP@64",
    # "open_clip:SimpleTokenizer@77"); in the text-embedding key unless it is open_clip's BPE ("" = not named)
    tokenizer_name: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; anything else is passed to ``torch.device`` after a check."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ClipguardError(f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClipguardError(f"--device {device!r}: CUDA is not available here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ClipguardError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that supports it (clean passes), else fp32."""
    if precision not in PRECISIONS:
        raise ClipguardError(f"--precision {precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, as ``sha256:<hex>``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _digest_cache_path() -> Path:
    return cache_root() / "weights-digests.json"


def cached_file_digest(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """:func:`file_digest`, remembered in a small JSON (default ``<cache root>/weights-digests.json``) keyed by
    the file's real path, size and mtime, so a 600 MB checkpoint is hashed once, not on every load."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = Path(cache) if cache is not None else _digest_cache_path()
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    hit = known.get(real)
    if isinstance(hit, dict) and {k: hit.get(k) for k in stamp} == stamp and hit.get("digest"):
        return hit["digest"]
    digest = file_digest(real)
    known[real] = {**stamp, "digest": digest}
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        atomic_write_json(cache, known)
    return digest


def hf_cache_location(path: str | os.PathLike) -> tuple[str, str] | None:
    """(repo id, commit) of a file in a Hugging Face hub cache, laid out as
    ``.../models--ORG--NAME/snapshots/<commit>/<file>``; None for any other path."""
    parts = Path(path).parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return parts[i - 1][len("models--"):].replace("--", "/"), parts[i + 1]
    return None


def _hf_blob_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 of a hub-cache file's content, read off its blob name: a snapshot entry links to
    ``../../blobs/<etag>``, and an LFS file's etag (every weights file) is the sha256 of its bytes."""
    p = Path(path)
    if not p.is_symlink():
        return None
    blob = p.resolve()
    if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return "sha256:" + blob.name
    return None


def weights_fingerprint(name: str, path: str | os.PathLike, *, hub: bool = False,
                        digest_cache: str | os.PathLike | None = None) -> str:
    """The fingerprint of a named model from the weights file open_clip resolved for it.

    ``name`` is ``ARCH:TAG`` (a pretrained tag) or ``hf-hub:ORG/NAME`` (``hub=True``). The name alone would let
    new weights under the same name reuse stale text embeddings and adapters, so the fingerprint adds:

    - hf-hub models: the hub revision (``@rev:<commit>`` from ``snapshots/<commit>/``), which pins the
      config as well as the weights;
    - pretrained tags: the content digest (``@sha256:<hex>``), read off the hub cache's blob name when the file
      lives there, else hashed once and remembered by (path, size, mtime) in ``digest_cache``.

    A hub model outside a hub cache falls back to the content digest.
    """
    if hub:
        loc = hf_cache_location(path)
        if loc is not None:
            return f"{name}@rev:{loc[1]}"
    digest = _hf_blob_sha256(path) or cached_file_digest(path, digest_cache)
    return f"{name}@{digest}"


@contextlib.contextmanager
def _recording_checkpoints(paths: list[str]):
    """Note every weights file open_clip's ``create_model`` loads (it resolves tags and hub names itself)."""
    real = open_clip_factory.load_checkpoint

    def recording(model, checkpoint_path, *args, **kwargs):
        paths.append(str(checkpoint_path))
        return real(model, checkpoint_path, *args, **kwargs)

    open_clip_factory.load_checkpoint = recording
    try:
        yield
    finally:
        open_clip_factory.load_checkpoint = real


def create_model_noting_weights(*args, **kwargs) -> tuple[torch.nn.Module, str | None]:
    """``open_clip.create_model(*args, **kwargs)`` and the path of the weights file it loaded (None: none)."""
    paths: list[str] = []
    with _recording_checkpoints(paths):
        model = open_clip.create_model(*args, **kwargs)
    return model, (paths[-1] if paths else None)


def _named_fingerprint(name: str, path: str | None, *, hub: bool = False) -> str:
    if path is None or not os.path.isfile(path):
        log.warning("could not see which weights file open_clip loaded for %s: the text-embedding store keys it "
                    "by name alone", name)
        return name
    return weights_fingerprint(name, path, hub=hub)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (.safetensors, or a torch checkpoint); a broken file is a ClipguardError."""
    p = Path(path)
    if not p.is_file():
        raise ClipguardError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ClipguardError(
                f"weights file {str(p)!r} is truncated or not a safetensors file ({e}); download it again"
            ) from None
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt pickles
        raise ClipguardError(f"weights file {str(p)!r} cannot be read ({type(e).__name__}: {e})") from None
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


@contextlib.contextmanager
def _quiet():
    """open_clip warns "no pretrained weights loaded" when we create a model to load our own weights."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _check_arch(arch: str) -> None:
    toy.register_toy_config()  # so "clipguard-toy:/path/weights.safetensors" works like any architecture

    if arch not in open_clip.list_models():
        close = suggest(arch, open_clip.list_models())
        hint = f"; close matches: {close}" if close else "; see open_clip.list_models()"
        raise ClipguardError(f"--model: unknown architecture {arch!r}{hint}")


def _check_tag(spec: ModelSpec) -> None:
    """An ``ARCH:TAG`` spec whose tag open_clip does not know: one line with close matches."""
    tags = open_clip.list_pretrained_tags_by_model(spec.arch)
    if spec.tag not in tags:
        close = suggest(spec.tag, tags)
        known = ", ".join(tags[:6]) + (f" and {len(tags) - 6} more (open_clip.list_pretrained())"
                                       if len(tags) > 6 else "")
        raise ClipguardError(
            f"--model {spec.text!r}: unknown pretrained tag {spec.tag!r} for {spec.arch}"
            + (f" (did you mean {close}?)" if close else "")
            + f"; known: {known or 'none'} (or ARCH:/path/weights.safetensors, ARCH:none)"
        )


def _build(spec: ModelSpec) -> tuple[torch.nn.Module, str, dict]:
    """Create the open_clip model for ``spec``; returns (model, fingerprint, info)."""
    if spec.kind == "toy":
        toy.register_toy_config()
        try:
            path = toy.toy_weights_path(spec.variant)
        except ValueError as e:
            raise ClipguardError(f"--model {spec.text!r}: {e}") from None
        with _quiet():
            model = open_clip.create_model(toy.TOY_MODEL_NAME, pretrained=None)
        model.load_state_dict({k: v.float() for k, v in read_state_dict(path).items()}, strict=True)
        model.visual.image_mean, model.visual.image_std = tuple(toy.TOY_MEAN), tuple(toy.TOY_STD)
        return model, file_digest(path), {"arch": toy.TOY_MODEL_NAME, "pretrained": f"toy@{spec.variant}"}
    if spec.kind == "hf-hub":
        ensure_reachable_or_offline()  # offline: the cache answers at once instead of 30 s of retries
        try:
            model, weights = create_model_noting_weights(f"hf-hub:{spec.repo}")
        except Exception as e:
            raise ClipguardError(
                f"--model {spec.text!r}: cannot load from the Hugging Face hub ({type(e).__name__}); "
                "offline? download the weights and use ARCH:/path/weights.safetensors"
            ) from None
        fingerprint = _named_fingerprint(f"hf-hub:{spec.repo}", weights, hub=True)
        return model, fingerprint, {"arch": spec.repo, "pretrained": "hf-hub", "weights_file": weights}
    _check_arch(spec.arch)
    if spec.kind == "random":
        with torch.random.fork_rng():
            torch.manual_seed(0)  # deterministic random init, so a fingerprint names one model
            model = open_clip.create_model(spec.arch, pretrained=None)
        return model, f"{spec.arch}:random-seed0", {"arch": spec.arch, "pretrained": None}
    if spec.kind == "file":
        sd = read_state_dict(spec.path)
        with _quiet():
            model = open_clip.create_model(spec.arch, pretrained=None)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ClipguardError(f"weights {spec.path!r} do not fit {spec.arch}: {first}") from None
        return model, file_digest(spec.path), {"arch": spec.arch, "pretrained": spec.path}
    _check_tag(spec)
    ensure_reachable_or_offline()
    try:
        model, weights = create_model_noting_weights(spec.arch, pretrained=spec.tag, require_pretrained=True)
    except Exception as e:
        raise ClipguardError(
            f"--model {spec.text!r}: cannot get the pretrained weights ({type(e).__name__}); "
            "offline? put them in the Hugging Face cache or pass ARCH:/path/weights.safetensors"
        ) from None
    fingerprint = _named_fingerprint(f"{spec.arch}:{spec.tag}", weights)
    return model, fingerprint, {"arch": spec.arch, "pretrained": spec.tag, "weights_file": weights}


def load_clip(spec: str | ModelSpec, *, device: str = "auto", precision: str = "auto",
              trust_remote_code: bool = False) -> LoadedClip:
    """Load a CLIP model from a spec string.

    Args:
        spec: ``ViT-B-32:openai``, ``ViT-B-32:/path/w.safetensors``, ``ViT-B-32:none`` (random init),
            ``hf-hub:ORG/NAME``, ``transformers:ORG/NAME[@REV]`` / ``transformers:DIR`` (a transformers CLIPModel
            or SiglipModel: :mod:`clipguard.models.hf_transformers`) or ``toy`` / ``toy@seed1``.
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``auto`` (bf16 on a capable GPU, else fp32), ``fp32``, ``bf16`` or ``fp16``.
        trust_remote_code: let a transformers checkpoint run its own Python code (``--trust-remote-code``).

    Returns:
        A :class:`LoadedClip`; the model is in eval mode with frozen parameters, weights in fp32.

    Raises:
        ClipguardError: unknown architecture (with close matches), bad tag, broken weights file, a tokenizer that
            cannot be found (offline: which files to place where; raised before the weights load, but for hf-hub).

    Example:
        >>> clip = load_clip("toy", device="cpu")
        >>> clip.input_size
        (32, 32)
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if spec.kind == "transformers":
        return _load_transformers(spec, dev, prec, trust_remote_code)
    if spec.kind != "hf-hub":  # before the weights: a tokenizer that cannot be found fails in a second
        tokenizer, tokenizer_name = _tokenizer_for(spec)
    model, fingerprint, info = _build(spec)
    if spec.kind == "hf-hub":  # its config (naming the tokenizer) comes from the hub with the weights
        tokenizer, tokenizer_name = _tokenizer_for(spec)
    model = model.to(dev).eval().requires_grad_(False)
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = tuple(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    geometry = geometry_from_cfg(getattr(model.visual, "preprocess_cfg", None))  # open_clip's merge, as it set it
    info.update({"spec": spec.text, "fingerprint": fingerprint})
    return LoadedClip(model=model, tokenizer=tokenizer, mean=mean, std=std, input_size=size, device=dev,
                      precision=prec, fingerprint=fingerprint, spec=spec, info=info, tokenizer_name=tokenizer_name,
                      geometry=geometry)


def _tokenizer_for(spec: ModelSpec) -> tuple[Callable, str]:
    """The model's own tokenizer (its config's Hugging Face tokenizer and context length, else open_clip's) and its
    name (``models.tokenizers``)."""
    if spec.kind == "hf-hub":
        return load_tokenizer(f"hf-hub:{spec.repo}", spec.text)
    arch = toy.TOY_MODEL_NAME if spec.kind == "toy" else spec.arch
    _check_arch(arch)  # an unknown architecture is named first (and the toy config is registered)
    return load_tokenizer(arch, spec.text)


def _load_transformers(spec: ModelSpec, dev: torch.device, prec: str, trust_remote_code: bool) -> LoadedClip:
    """A transformers checkpoint: its small files checked first (one line, nothing heavy loaded), then the weights."""
    # Lazy: the backend imports transformers (~2 s), which only a transformers: spec needs.
    from clipguard.models import hf_transformers as hf

    ck = hf.inspect(spec, trust_remote_code=trust_remote_code)
    geometry, size, mean, std = hf.preprocessing(ck)
    fingerprint = hf.fingerprint(ck, cached_file_digest)
    model, tokenizer, tokenizer_name = hf.build(ck, trust_remote_code=trust_remote_code)
    model = model.to(dev).eval().requires_grad_(False)
    info = {**hf.info(ck), "spec": spec.text, "fingerprint": fingerprint}
    return LoadedClip(model=model, tokenizer=tokenizer, mean=mean, std=std, input_size=size, device=dev,
                      precision=prec, fingerprint=fingerprint, spec=spec, info=info, geometry=geometry,
                      tokenizer_name=tokenizer_name)


def model_input_size(spec: str | ModelSpec) -> tuple[int, int]:
    """(H, W) a model's image tower takes, from its config (no weights loaded): :func:`model_preprocess`'s."""
    return model_preprocess(spec).input_size


@dataclass(frozen=True)
class Preprocess:
    """A model's own preprocessing: what ``--resolution model`` brings its images to, and how it normalises them."""

    input_size: tuple[int, int]  # (H, W) the image tower takes
    mean: tuple[float, ...]  # normalisation, applied inside the classifier
    std: tuple[float, ...]
    geometry: Geometry = DEFAULT_GEOMETRY  # resize mode, interpolation, fill (data.images.eval_geometry)


def geometry_from_cfg(cfg: dict | None) -> Geometry:
    """open_clip's preprocess config (``model.visual.preprocess_cfg``, or a merged dict) as a Geometry. Its
    ``interpolation="random"`` (a training option) is bicubic at eval, as in ``open_clip.image_transform``."""
    cfg = cfg or {}
    interpolation = cfg.get("interpolation") or "bicubic"
    return Geometry(resize_mode=cfg.get("resize_mode") or "shortest",
                    interpolation="bicubic" if interpolation == "random" else interpolation,
                    fill_color=int(cfg.get("fill_color") or 0))


def _from_open_clip_cfg(model_cfg: dict, overlay: dict | None = None) -> Preprocess:
    """What ``open_clip.create_model`` sets as ``visual.preprocess_cfg``: its defaults (``PreprocessCfg``), the
    pretrained tag's or hub config's values over them (``merge_preprocess_dict``), the size from the vision config."""
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), overlay or {})
    size = model_cfg.get("vision_cfg", {}).get("image_size", PreprocessCfg().size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean, std = ((tuple(v) if isinstance(v, list | tuple) else (float(v),) * 3) for v in (cfg["mean"], cfg["std"]))
    return Preprocess(size, mean, std, geometry_from_cfg(cfg))  # a single mean/std: per channel, as image_transform


def _arch_preprocess(spec: ModelSpec) -> Preprocess:
    """``ARCH:none`` and ``ARCH:/path/weights``: open_clip's defaults at the architecture's size (as
    ``create_model(arch, pretrained=None or a file)``); ``ARCH:TAG`` adds the tag's config."""
    _check_arch(spec.arch)
    overlay = None
    if spec.kind == "pretrained":
        _check_tag(spec)
        overlay = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
    return _from_open_clip_cfg(open_clip.get_model_config(spec.arch), overlay)


def _toy_preprocess(spec: ModelSpec) -> Preprocess:
    _check_arch(toy.TOY_MODEL_NAME)  # registers the toy config
    size = open_clip.get_model_config(toy.TOY_MODEL_NAME)["vision_cfg"]["image_size"]
    return Preprocess(as_size(size), tuple(toy.TOY_MEAN), tuple(toy.TOY_STD), DEFAULT_GEOMETRY)


def _hub_preprocess(spec: ModelSpec) -> Preprocess:
    """The hub repo's ``open_clip_config.json`` (model and preprocess config), from the cache when offline."""
    ensure_reachable_or_offline()  # offline: the cache answers at once instead of 30 s of retries
    try:
        path = download_pretrained_from_hf(spec.repo, filename="open_clip_config.json")
        config = json.loads(Path(path).read_text())
        model_cfg = config.get("model_cfg", config)
    except Exception as e:
        raise ClipguardError(
            f"--model {spec.text!r}: cannot load from the Hugging Face hub ({type(e).__name__}); "
            "offline? download the weights and use ARCH:/path/weights.safetensors"
        ) from None
    return _from_open_clip_cfg(model_cfg, config.get("preprocess_cfg"))


# spec kind -> the model's Preprocess from its config alone (no weights, no tokenizer); a kind without one here is
# loaded on the CPU and read off its LoadedClip
CONFIG_PREPROCESS: dict[str, Callable[[ModelSpec], Preprocess]] = {
    "toy": _toy_preprocess, "random": _arch_preprocess, "file": _arch_preprocess, "pretrained": _arch_preprocess,
    "hf-hub": _hub_preprocess}


def _transformers_preprocess(spec: ModelSpec) -> Preprocess:
    """A transformers checkpoint's image-processor config (reading it runs none of the checkpoint's code)."""
    # Lazy: the backend imports transformers (~2 s), which only a transformers: spec needs.
    from clipguard.models import hf_transformers as hf

    geometry, size, mean, std = hf.preprocessing(hf.inspect(spec, trust_remote_code=True))
    return Preprocess(size, mean, std, geometry)


CONFIG_PREPROCESS["transformers"] = _transformers_preprocess


def model_preprocess(spec: str | ModelSpec) -> Preprocess:
    """A model's own input size, mean/std and :class:`Geometry`, read from its config: no weights, no tokenizer.

    The same values :func:`load_clip` puts in its :class:`LoadedClip` (open_clip merges them the same way):
    ``ARCH:TAG`` the pretrained tag's config (``open_clip.get_pretrained_cfg``: SigLIP squash, MobileCLIP bilinear
    with mean 0 / std 1 ...), ``ARCH:none`` / ``ARCH:/path`` open_clip's defaults (OpenAI mean/std, shorter side
    bicubic), ``hf-hub:ORG/NAME`` the repo's ``open_clip_config.json``, ``toy`` the toy's own.

    Raises:
        ClipguardError: unknown architecture or tag; a hub config that is not cached while offline.

    Example:
        >>> model_preprocess("ViT-B-16-SigLIP:webli").geometry.resize_mode
        'squash'
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    read = CONFIG_PREPROCESS.get(spec.kind)
    if read is not None:
        return read(spec)
    clip = load_clip(spec, device="cpu", precision="fp32")
    return Preprocess(clip.input_size, tuple(clip.mean), tuple(clip.std), clip.geometry)


def model_geometry(spec: str | ModelSpec) -> Geometry:
    """The :class:`Geometry` of :func:`model_preprocess` (no weights, no tokenizer)."""
    return model_preprocess(spec).geometry
