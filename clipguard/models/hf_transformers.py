"""Hugging Face transformers ``CLIPModel`` / ``SiglipModel`` checkpoints behind open_clip's interface.

``transformers:ORG/NAME[@revision]`` (a hub id) or ``transformers:/path/to/saved`` (a ``save_pretrained`` folder).
:func:`inspect` reads the checkpoint's small files first (config.json: the architecture; preprocessor_config.json:
the geometry, mean/std and input size; the tokenizer's files), so a folder that is no CLIP/SigLIP checkpoint, a
config of another architecture, remote code without ``--trust-remote-code`` or a missing tokenizer is one line
before any weights load. :func:`build` then loads the weights and wraps the model in :class:`HFClip`, which has what
clipguard uses of an open_clip model: ``.visual`` (normalised pixels -> projected image embeddings),
``.encode_text(tokens)``, ``.logit_scale`` (the log of the temperature, so ``.exp()`` is it) and ``.logit_bias``
(SigLIP's; None for CLIP).

This module is imported only for such a spec (``models.loader`` imports it inside the dispatch), so transformers
(~2 s) loads only then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clipguard.data.images import Geometry
from clipguard.errors import ClipguardError

TRUST_FLAG = "--trust-remote-code"
FAMILIES = {"clip": "CLIPModel", "siglip": "SiglipModel"}  # config.json model_type -> transformers class
# PIL's resample numbers (Image.Resampling) that clipguard's geometry can reproduce
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
SMALL_FILES = ["*.json", "*.txt", "*.model", "*.py"]  # what a hub checkpoint is inspected from, before weights
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint's small files say, read before any weights load."""

    text: str  # the spec as typed
    source: str  # what from_pretrained gets: a folder, or the hub id
    folder: Path  # the local folder holding config.json (a save_pretrained folder or a hub snapshot)
    revision: str | None  # hub: the revision asked for (None: main)
    commit: str | None  # hub: the snapshot's commit; None for a local folder
    model_type: str  # config.json's model_type ("clip", "siglip", or a remote-code model's)
    remote_code: bool  # the model class comes from the checkpoint's own Python files (config auto_map)
    config: dict = field(repr=False)
    preprocessor: dict = field(repr=False)


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _hub_folder(text: str, repo: str, revision: str | None) -> tuple[Path, str]:
    """Download (or find in the cache) a hub checkpoint's small files; (snapshot folder, commit)."""
    # Lazy: huggingface_hub's download machinery is needed only for a hub id.
    from huggingface_hub import snapshot_download

    from clipguard.hub import ensure_reachable_or_offline

    ensure_reachable_or_offline()
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=SMALL_FILES))
    except Exception as e:  # huggingface_hub raises many types (offline, gated, missing repo or revision)
        raise ClipguardError(f"--model {text!r}: cannot get {repo}'s config from the Hugging Face hub "
                             f"({type(e).__name__}); offline? download it once, or save it with save_pretrained "
                             "and pass transformers:/path/to/folder") from None
    return folder, folder.name


def _read_json(path: Path, text: str, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ClipguardError(f"--model {text!r}: {path} ({what}) cannot be read: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ClipguardError(f"--model {text!r}: {path} ({what}) is not a JSON object")
    return data


def inspect(spec, *, trust_remote_code: bool = False) -> Checkpoint:
    """Read a ``transformers:`` checkpoint's config, image-processor config and tokenizer files; load no weights.

    Raises:
        ClipguardError: no such folder / no config.json, another architecture (a BERT config, SigLIP2's NaFlex),
            remote code without ``--trust-remote-code``, no preprocessor_config.json, no tokenizer files.
    """
    text = spec.text
    if spec.path is not None:
        folder, commit, source = Path(spec.path), None, str(Path(spec.path).resolve())
        if not folder.is_dir():
            raise ClipguardError(f"--model {text!r}: no such folder {spec.path!r} (a folder written by "
                                 "model.save_pretrained, or transformers:ORG/NAME for a hub model)")
    else:
        folder, commit = _hub_folder(text, spec.repo, spec.revision)
        source = spec.repo
    if not (folder / "config.json").is_file():
        raise ClipguardError(f"--model {text!r}: {folder} holds no config.json, so it is no transformers checkpoint "
                             "(save one with model.save_pretrained(DIR))")
    config = _read_json(folder / "config.json", text, "the model config")
    model_type = str(config.get("model_type", ""))
    remote = model_type not in FAMILIES and bool(config.get("auto_map"))
    if remote and not trust_remote_code:
        raise ClipguardError(f"--model {text!r}: model type {model_type!r} runs the checkpoint's own Python code "
                             f"(config auto_map); add {TRUST_FLAG} if you trust {source}")
    if not remote and model_type not in FAMILIES:
        why = (" (SigLIP2's NaFlex variable-resolution model, not supported: use a fixed-resolution SigLIP2 "
               "checkpoint, model_type siglip)" if model_type == "siglip2" else "")
        raise ClipguardError(f"--model {text!r}: {folder / 'config.json'} is a {model_type or 'untyped'!r} "
                             f"model{why}; the transformers backend loads CLIPModel and SiglipModel checkpoints "
                             f"(model_type {' or '.join(FAMILIES)})")
    if not (folder / "preprocessor_config.json").is_file():
        raise ClipguardError(f"--model {text!r}: {folder} holds no preprocessor_config.json (the image processor "
                             "names the model's resize, crop and mean/std): save it with "
                             "processor.save_pretrained(DIR)")
    preprocessor = _read_json(folder / "preprocessor_config.json", text, "the image-processor config")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ClipguardError(f"--model {text!r}: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])} ...): "
                             "save it with tokenizer.save_pretrained(DIR) (or processor.save_pretrained(DIR))")
    return Checkpoint(text=text, source=source, folder=folder, revision=spec.revision, commit=commit,
                      model_type=model_type, remote_code=remote, config=config, preprocessor=preprocessor)


# ------------------------------------------------------------------------------------------ preprocessing


def _size(d, key_pairs, text: str, what: str) -> tuple[int, int]:
    if isinstance(d, int):
        return (d, d)
    if isinstance(d, dict):
        for keys in key_pairs:
            if all(k in d for k in keys):
                vals = [int(d[k]) for k in keys]
                return (vals[0], vals[-1])
    raise ClipguardError(f"--model {text!r}: preprocessor_config.json {what} {d!r} is not a size clipguard reads")


def preprocessing(ck: Checkpoint) -> tuple[Geometry, tuple[int, int], tuple, tuple]:
    """(geometry, input size (H, W), mean, std) from the image-processor config, as transformers applies them.

    A ``CLIPImageProcessor`` (``size.shortest_edge`` + centre crop) is shortest-side resize then crop; a
    ``SiglipImageProcessor`` (``size.height/width``, no crop) is squash. Anything clipguard's one geometry cannot
    reproduce (a resize side other than the crop, another rescale factor, a resample other than nearest / bilinear /
    bicubic) is refused in one line rather than approximated.
    """
    p, text = ck.preprocessor, ck.text
    resample = p.get("resample", 3)
    if resample not in RESAMPLE:
        raise ClipguardError(f"--model {text!r}: image-processor resample {resample!r} (PIL) is not one clipguard "
                             "reproduces (nearest 0, bilinear 2, bicubic 3)")
    if p.get("do_rescale", True) and abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ClipguardError(f"--model {text!r}: image-processor rescale_factor {p.get('rescale_factor')} is not "
                             "1/255; clipguard's pixels are [0, 1]")
    if not p.get("do_resize", True):
        raise ClipguardError(f"--model {text!r}: the image processor does not resize (do_resize false); clipguard "
                             "needs one input size")
    size = p.get("size", {})
    if p.get("do_center_crop", False):
        crop = _size(p.get("crop_size"), [("height", "width")], text, "crop_size")
        side = _size(size, [("shortest_edge",), ("height", "width")], text, "size")
        if not (isinstance(size, dict) and "shortest_edge" in size) or side[0] != min(crop):
            raise ClipguardError(f"--model {text!r}: the image processor resizes to {size} and then crops "
                                 f"{crop}; clipguard's geometry resizes the shorter side to the crop size itself")
        geometry, input_size = Geometry("shortest", RESAMPLE[resample], order="transformers"), crop
    else:
        input_size = _size(size, [("height", "width")], text, "size")
        geometry = Geometry("squash", RESAMPLE[resample], order="transformers")
    vision = ck.config.get("vision_config", {})
    image_size = vision.get("image_size")
    if image_size is not None and _size(image_size, [], text, "vision image_size") != tuple(input_size):
        raise ClipguardError(f"--model {text!r}: the image processor makes {input_size} images but the vision "
                             f"tower takes {image_size}")
    if p.get("do_normalize", True):
        mean, std = tuple(float(v) for v in p.get("image_mean")), tuple(float(v) for v in p.get("image_std"))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return geometry, tuple(input_size), mean, std


# --------------------------------------------------------------------------------------------- the facade


class HFVisual(nn.Module):
    """The image tower: normalised pixels (N, 3, H, W) -> projected image embeddings (N, D), unnormalised.

    CLIP: ``vision_model`` (class token after ``post_layernorm``) then ``visual_projection``; SigLIP: ``vision_model``
    with its attention-pooling head. ``forward_prompted`` is the VPT path (models.vpt.PromptedVisual): prompt tokens
    enter after the pre-norm (CLIP: after the class token; SigLIP, which has none: first) and leave before pooling.
    """

    def __init__(self, hf_model: nn.Module, family: str):
        super().__init__()
        self.family = family
        self.vision_model = hf_model.vision_model
        self.visual_projection = getattr(hf_model, "visual_projection", None)
        if family == "siglip" and not getattr(self.vision_model, "use_head", True):
            raise ClipguardError("this SigLIP checkpoint has no vision pooling head (vision_use_head false): its "
                                 "image embeddings are not defined")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=x).pooler_output
        return self.visual_projection(pooled) if self.visual_projection is not None else pooled

    def lora_targets(self) -> list[str]:
        """The attention projections (q/k/v/out_proj, plain nn.Linear) of the encoder layers: the default LoRA
        targets (SigLIP's pooling head is an nn.MultiheadAttention and is left alone)."""
        names = ("q_proj", "k_proj", "v_proj", "out_proj")
        return [n for n, m in self.named_modules()
                if isinstance(m, nn.Linear) and n.rpartition(".")[2] in names and ".encoder." in f".{n}"]

    def prompt_geometry(self) -> tuple[int, tuple[int, int], torch.device]:
        """(token width, patch size, device) for VPT's initialisation."""
        patch = self.vision_model.embeddings.patch_embedding
        return patch.out_channels, tuple(patch.kernel_size), patch.weight.device

    def forward_prompted(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        vm, n = self.vision_model, prompts.shape[0]
        h = vm.embeddings(x)
        if self.family == "clip":
            h = vm.pre_layrnorm(h)  # per token, so the prompts go through it too (as open_clip's ln_pre in vpt.py)
            p = vm.pre_layrnorm(prompts.to(h.dtype)).unsqueeze(0).expand(h.shape[0], -1, -1)
            h = torch.cat([h[:, :1], p, h[:, 1:]], dim=1)
            h = vm.encoder(inputs_embeds=h).last_hidden_state
            pooled = vm.post_layernorm(h[:, 0])
            return self.visual_projection(pooled)
        p = prompts.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        h = vm.encoder(inputs_embeds=torch.cat([p, h], dim=1)).last_hidden_state[:, n:]  # drop them before pooling
        return vm.head(vm.post_layernorm(h))


class HFClip(nn.Module):
    """A transformers CLIPModel / SiglipModel with open_clip's attributes (``visual``, ``encode_text``,
    ``logit_scale`` as a log value, ``logit_bias``)."""

    def __init__(self, hf_model: nn.Module, family: str):
        super().__init__()
        self.hf = hf_model
        self.family = family
        self.visual = HFVisual(hf_model, family)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.hf.logit_scale.reshape(())

    @property
    def logit_bias(self) -> torch.Tensor | None:
        bias = getattr(self.hf, "logit_bias", None)
        return None if bias is None else bias.reshape(())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings of token ids. No attention mask: CLIP's causal text tower pools the first
        end-of-text token, which padding after it cannot reach; SigLIP was trained on max_length padding, attended."""
        out = self.hf.get_text_features(input_ids=tokens)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


class HFTokenizer:
    """texts -> LongTensor token ids, padded as the model expects: to the text tower's length (CLIP: 77, SigLIP:
    64, ``max_position_embeddings``), truncated there. Picklable (it holds the transformers tokenizer)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(texts, padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")
        return out["input_ids"].long()


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(bytes.fromhex(_file_digest(p)))
    return h.hexdigest()


def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(ck: Checkpoint, digest_file) -> str:
    """Hub: ``transformers:ORG/NAME@rev:<commit>`` (the snapshot pins config, weights and tokenizer); a folder:
    ``transformers@sha256:<hex>`` over its weights files (``digest_file``: the loader's remembered digest)."""
    if ck.commit is not None:
        return f"transformers:{ck.source}@rev:{ck.commit}"
    files = [ck.folder / n for n in WEIGHTS_FILES if (ck.folder / n).is_file()]
    files += sorted(ck.folder.glob("model-*-of-*.safetensors")) + sorted(ck.folder.glob("pytorch_model-*-of-*.bin"))
    if not files:
        raise ClipguardError(f"--model {ck.text!r}: {ck.folder} holds no weights (model.safetensors or "
                             "pytorch_model.bin): save them with model.save_pretrained(DIR)")
    parts = [digest_file(p).removeprefix("sha256:") for p in files]
    return "transformers@sha256:" + hashlib.sha256("".join(parts).encode()).hexdigest()


def tokenizer_files_digest(ck: Checkpoint) -> str:
    files = [p for p in ck.folder.iterdir() if p.is_file() and (p.name in TOKENIZER_FILES or p.name.startswith(
        ("tokenizer", "special_tokens", "merges", "added_tokens")))]
    return _digest(files)[:16]


def build(ck: Checkpoint, *, trust_remote_code: bool = False):
    """Load the weights and tokenizer of an inspected checkpoint.

    Returns:
        (HFClip, HFTokenizer, tokenizer name)
    """
    # Lazy: transformers (~2 s) is needed only for this model kind; the loader imports this module only then.
    import transformers

    revision = ck.commit or ck.revision
    trust = bool(trust_remote_code and ck.remote_code)  # never passed for a family transformers itself knows
    try:
        with _no_progress_bars(transformers):  # its "Loading weights" bar is noise on a command's stderr
            model = model_class(ck).from_pretrained(ck.source, revision=revision, trust_remote_code=trust,
                                                    dtype=torch.float32)
    except Exception as e:  # transformers raises OSError, ValueError, RuntimeError ... for an unloadable checkpoint
        raise ClipguardError(f"--model {ck.text!r}: transformers cannot load the weights ({type(e).__name__}: "
                             f"{_one_line(e)})") from None
    family = ck.model_type if not ck.remote_code else _remote_family(model, ck)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(ck.source, revision=revision, trust_remote_code=trust)
    except Exception as e:
        raise ClipguardError(f"--model {ck.text!r}: the tokenizer cannot be loaded ({type(e).__name__}: "
                             f"{_one_line(e)}); save it with tokenizer.save_pretrained(DIR)") from None
    length = int(model.config.text_config.max_position_embeddings)
    name = f"transformers {type(tok).__name__} max_length={length} files={tokenizer_files_digest(ck)}"
    return HFClip(model.float().eval(), family), HFTokenizer(tok, length), name


@contextlib.contextmanager
def _no_progress_bars(transformers):
    """transformers' own tqdm bars off while it loads, as they were after."""
    log = transformers.utils.logging
    was = log.is_progress_bar_enabled()
    log.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            log.enable_progress_bar()


def model_class(ck: Checkpoint):
    """transformers' own class for a family it knows (CLIPModel, SiglipModel: never the checkpoint's code), else
    AutoModel (the checkpoint's code, which build loads only under --trust-remote-code)."""
    # Lazy: see build.
    import transformers

    return transformers.AutoModel if ck.remote_code else getattr(transformers, FAMILIES[ck.model_type])


def _remote_family(model, ck: Checkpoint) -> str:
    """A remote-code model is used through CLIP's or SigLIP's layout, which it must have."""
    if hasattr(model, "vision_model") and hasattr(model, "visual_projection") and hasattr(model, "logit_scale"):
        return "clip"
    if hasattr(getattr(model, "vision_model", None), "head") and hasattr(model, "logit_bias"):
        return "siglip"
    raise ClipguardError(f"--model {ck.text!r}: the remote-code model {type(model).__name__} has neither CLIP's "
                         "layout (vision_model, visual_projection, logit_scale) nor SigLIP's")


def input_size(ck: Checkpoint) -> tuple[int, int]:
    return preprocessing(ck)[1]


def info(ck: Checkpoint) -> dict:
    """Provenance for records: ``model`` / ``pretrained`` fields and where the checkpoint came from."""
    pretrained = f"rev:{ck.commit}" if ck.commit else str(ck.folder.resolve())
    classes = ck.config.get("architectures") or [FAMILIES.get(ck.model_type, ck.model_type)]
    out = {"arch": ck.text, "pretrained": pretrained, "source": ck.source, "model_class": classes[0],
           "model_type": ck.model_type, "image_processor": ck.preprocessor.get("image_processor_type")}
    if ck.remote_code:
        out["remote_code"] = True
    return out
