"""Adversarial prompt tuning (APT): learnable text context in place of a template's words.

Li et al., "One Prompt Word is Enough to Boost Adversarial Robustness for Pre-trained Vision-Language Models",
CVPR 2024 (github.com/TreeLLi/APT, built on CoOp: Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022). The class prompt ``[SOS] [V]_1 ... [V]_M classname . [EOT]`` goes through open_clip's own text
transformer with the M context embeddings ``[V]`` learnable: one unified context for every class (UC, the paper's
default) or one per class (CSC). Both towers stay frozen; gradients reach the context only.

The adapter is the context alone (``prompt_ctx.safetensors``) plus ``prompt.json`` (M, UC/CSC, initial words, the
class names it was trained for, the image-tower adapter it was trained on top of, with its digest). A run computes
the class embeddings from it once, after loading (one text-tower pass over the classes); they are not put in the
text-embedding store (their key would be the adapter's digest, and the pass costs less than reading the store).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import torch as safetensors_torch
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write
from clipguard.models.classifier import ZeroShotClassifier
from clipguard.models.text_embeddings import TextEmbeddings

PROMPT_WEIGHTS, PROMPT_INFO = "prompt_ctx.safetensors", "prompt.json"
PLACEHOLDER = "X"  # CoOp's stand-in word for a context slot before its embedding is swapped in
INIT_STD = 0.02  # APT's (and CoOp's) random initialisation of the context: N(0, 0.02²)


def text_tower(clip) -> nn.Module:
    """The module holding open_clip's text transformer (``CLIP`` itself, or ``CustomTextCLIP.text``)."""
    model = clip.model
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    names = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if tower is None or not all(hasattr(tower, n) for n in names) or getattr(tower, "cls_emb", None) is not None \
            or not hasattr(clip.tokenizer, "encode") or not hasattr(clip.tokenizer, "eot_token_id"):
        raise ClipguardError(f"--method prompt needs an open_clip text transformer with CLIP's BPE tokenizer; "
                             f"{clip.spec.text!r} has {type(model).__name__} with {type(clip.tokenizer).__name__}: "
                             "tune the image tower instead (--method lora, vpt or full)")
    return tower


class TextEncoder(nn.Module):
    """open_clip's ``encode_text`` from token *embeddings* on: + positions, transformer (causal mask), ln_final,
    the EOT token's features (the tower's own pooling), projection. The tower's modules are shared, frozen."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.transformer, self.ln_final = tower.transformer, tower.ln_final
        self.positional_embedding, self.text_projection = tower.positional_embedding, tower.text_projection
        self.attn_mask = tower.attn_mask  # open_clip keeps it as a non-persistent buffer; shared here
        self.pool_type = getattr(tower, "text_pool_type", "argmax")
        self.eos_id = getattr(tower, "text_eos_id", None)

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool  # lazy: open_clip's import costs ~6 s; torch is loaded

        cast = self.transformer.get_cast_dtype()
        x = embeds.to(cast) + self.positional_embedding[:embeds.shape[1]].to(cast)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class PromptLearner(nn.Module):
    """Learnable context vectors and the class prompts around them -> (C, D) L2-normalised class embeddings.

    Args:
        clip: a LoadedClip with an open_clip text transformer and CLIP's BPE tokenizer.
        classnames: the classes, in label order.
        n_ctx: context tokens M (ignored when ``init`` is given: its token count).
        class_specific: one context per class (CSC) instead of one shared by all (UC).
        init: words whose token embeddings initialise the context (``"a photo of a"``); None: N(0, 0.02²).
        ctx: the context itself (a saved adapter's; nothing is drawn from the random state).

    Example:
        >>> learner = PromptLearner(clip, ["cat", "dog"], n_ctx=4)
        >>> learner().shape  # (2, D), differentiable in learner.ctx only
    """

    def __init__(self, clip, classnames: list[str], n_ctx: int = 16, class_specific: bool = False,
                 init: str | None = None, ctx: torch.Tensor | None = None):
        super().__init__()
        tower, tok = text_tower(clip), clip.tokenizer
        init_ids = tok.encode(init) if init else None
        if init is not None and not init_ids:
            raise ClipguardError(f"--prompt-init {init!r} has no words: give the words that start the prompt "
                                 "(e.g. 'a photo of a') or leave it out for a random context")
        n_ctx = len(init_ids) if init_ids else int(n_ctx)
        context = tok.context_length or tower.positional_embedding.shape[0]
        longest = max(classnames, key=lambda c: len(tok.encode(c)))
        room = context - 2 - len(tok.encode(f"{longest}."))  # SOS + context + name + "." + EOT
        if n_ctx > room:
            raise ClipguardError(f"--prompt-tokens {n_ctx} does not fit the model's {context}-token text context "
                                 f"with class {longest!r}: use --prompt-tokens {max(room, 1)} or fewer")
        self.classnames, self.n_ctx, self.class_specific, self.init = list(classnames), n_ctx, class_specific, init
        self.encoder = TextEncoder(tower)
        tokens = tok([" ".join([PLACEHOLDER] * n_ctx) + f" {c}." for c in classnames]).to(clip.device)
        with torch.no_grad():
            embeds = tower.token_embedding(tokens)
            if ctx is not None:
                ctx = ctx.to(clip.device)
            elif init_ids:
                ctx = tower.token_embedding(torch.tensor(init_ids, device=clip.device))
                ctx = ctx.expand(len(classnames), -1, -1).clone() if class_specific else ctx.clone()
            else:
                shape = (len(classnames), n_ctx, embeds.shape[-1]) if class_specific else (n_ctx, embeds.shape[-1])
                ctx = torch.empty(shape, device=clip.device, dtype=embeds.dtype).normal_(0, INIT_STD)
        self.ctx = nn.Parameter(ctx.float())
        self.register_buffer("tokens", tokens, persistent=False)  # pooling reads the EOT position from them
        self.register_buffer("prefix", embeds[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("suffix", embeds[:, 1 + n_ctx:].clone(), persistent=False)  # name, ".", EOT, padding
        self.base_adapter: dict | None = None  # the image-tower adapter trained under (set by finetune), saved

    def forward(self) -> torch.Tensor:
        ctx = self.ctx if self.class_specific else self.ctx.expand(len(self.classnames), -1, -1)
        embeds = torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)
        return F.normalize(self.encoder(embeds, self.tokens).float(), dim=-1)


class PromptedClassifier(ZeroShotClassifier):
    """The classifier that trains under ``--method prompt``: ``base``'s frozen image tower, normalisation and
    temperature, with class embeddings from ``learner``.

    ``text_embeddings`` is computed with a graph in train mode (the objective's loss reaches the context) and, once
    per weight update, without one in eval mode (the training adversary's steps, which only need input gradients:
    the class embeddings do not depend on the image, so this is the same number at a fraction of the cost).
    """

    def __init__(self, base: ZeroShotClassifier, learner: PromptLearner):
        nn.Module.__init__(self)  # the parent's text_embeddings buffer is this class's property
        for k, v in vars(base).items():  # plain attributes (input_size, logit_scale, logit_bias ...) as the base's
            if not k.startswith("_") and k != "training":
                setattr(self, k, v)
        self.visual = base.visual
        self.register_buffer("mean", base.mean.clone())
        self.register_buffer("std", base.std.clone())
        self.prompt_learner = learner
        self._cached: tuple[int, torch.Tensor] | None = None

    @property
    def text_embeddings(self) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return self.prompt_learner()
        version = self.prompt_learner.ctx._version
        if self._cached is None or self._cached[0] != version:
            with torch.no_grad():
                self._cached = (version, self.prompt_learner())
        return self._cached[1]

    def train(self, mode: bool = True):
        self._cached = None  # the loop switches modes around every update: never a stale context
        return super().train(mode)


def file_digest(adapter_dir: str | Path) -> str:
    """sha256 over an adapter's weight files (those its manifest lists): what a prompt adapter records of the
    image-tower adapter it was trained on top of."""
    d = Path(adapter_dir)
    try:
        files = json.loads((d / "manifest.json").read_text())["files"]
        h = hashlib.sha256()
        for name in sorted(files):
            h.update(name.encode())
            h.update((d / name).read_bytes())
    except (OSError, ValueError, KeyError) as e:
        raise ClipguardError(f"--base-adapter {str(d)!r}: not a complete adapter ({e})") from None
    return "sha256:" + h.hexdigest()


def save_prompt(d: Path, learner: PromptLearner) -> list[str]:
    """The adapter format (``models.adapters.FORMATS["prompt"]``): the context vectors + what they were made for."""
    sd = {"ctx": learner.ctx.detach().float().contiguous().cpu()}
    atomic_write(d / PROMPT_WEIGHTS, lambda tmp: safetensors_torch.save_file(sd, tmp))
    info = {"n_ctx": learner.n_ctx, "class_specific": learner.class_specific, "init": learner.init,
            "class_position": "end", "classnames": learner.classnames, "base_adapter": learner.base_adapter}
    atomic_write(d / PROMPT_INFO, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    return [PROMPT_WEIGHTS, PROMPT_INFO]


def load_prompt_visual(d: Path, base: nn.Module) -> nn.Module:
    """The image tower under a prompt adapter: the base's, unchanged (the class embeddings come from
    :func:`load_prompt_embeddings`)."""
    return base


def load_prompt_embeddings(adapter_dir: str | Path, clip, classnames: list[str],
                           base_adapter: str | None = None) -> TextEmbeddings:
    """Class embeddings for ``classnames`` from a prompt adapter, computed once (no text store: see the module note).

    A class-specific context is refused for other class names (or another order); a unified one transfers to any
    classes (APT's cross-dataset setting). The image-tower adapter it was trained on top of must be ``base_adapter``
    (same weight files), and none when it was trained on the bare tower.

    Raises:
        ClipguardError: one line naming the mismatch and the option that fixes it.
    """
    d = Path(adapter_dir)
    info = json.loads((d / PROMPT_INFO).read_text())
    trained_on = info.get("base_adapter")
    if trained_on and not base_adapter:
        raise ClipguardError(f"--adapter {str(d)!r} was trained on top of the image-tower adapter "
                             f"{trained_on['path']!r}: pass --base-adapter {trained_on['path']}")
    if base_adapter and not trained_on:
        raise ClipguardError(f"--adapter {str(d)!r} was trained on the base model's own image tower, not on "
                             f"--base-adapter {base_adapter!r}: leave --base-adapter out")
    if trained_on and file_digest(base_adapter) != trained_on["digest"]:
        raise ClipguardError(f"--base-adapter {base_adapter!r} is not the image-tower adapter --adapter {str(d)!r} "
                             f"was trained on ({trained_on['path']!r}, {trained_on['digest'][:19]}): pass that one")
    if info["class_specific"] and list(classnames) != info["classnames"]:
        raise ClipguardError(f"--adapter {str(d)!r} holds class-specific prompts for {len(info['classnames'])} other "
                             f"classes ({', '.join(info['classnames'][:3])}, ...), not this dataset's "
                             f"{len(classnames)} ({', '.join(classnames[:3])}, ...): use a dataset with those "
                             "classes, or a unified-context adapter")
    ctx = safetensors_torch.load_file(str(d / PROMPT_WEIGHTS))["ctx"]
    learner = PromptLearner(clip, list(classnames), n_ctx=info["n_ctx"], class_specific=info["class_specific"],
                            ctx=ctx)
    with torch.no_grad():
        emb = learner().cpu()
    h = hashlib.sha256(json.dumps({"adapter": (d / PROMPT_WEIGHTS).read_bytes().hex(), "model": clip.fingerprint,
                                   "classnames": list(classnames)}).encode()).hexdigest()
    return TextEmbeddings(emb, f"prompt-adapter:{h}", "none")
