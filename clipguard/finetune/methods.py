"""What trains: the registry ``METHODS``.

Each method turns the frozen base image tower into the module that trains, leaving the base untouched
(LoRA and full work on a copy; VPT shares the frozen tower and adds tokens); ``prompt`` (APT) leaves the tower
as it is and trains text context vectors instead (``Method.classifier``). Only the parameters that
train have ``requires_grad``; the adapter format of each method lives in ``clipguard.models.adapters``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from clipguard.errors import ClipguardError
from clipguard.models.adapters import apply_lora
from clipguard.models.prompt_tuning import PromptedClassifier, PromptLearner, file_digest
from clipguard.models.vpt import PromptedVisual
from clipguard.registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[nn.Module, object], nn.Module]  # (base visual, FinetuneConfig) -> module to train
    default_lr: float  # AdamW peak lr when --lr is not given (pretrained CLIP; the toy wants more)
    summary: str
    # (prepared base, FinetuneConfig) -> the classifier that trains, when it is not the image tower (prompt: text)
    classifier: Callable[[object, object], nn.Module] | None = None
    deviations: tuple[str, ...] = ()  # where it differs from its paper's protocol (the record names each)


# peft's LoRA on nn.MultiheadAttention merges the LoRA weights into the attention's weights before each forward and
# takes them out after (Parameter .data swaps): inductor refuses to compile that with a backward (measured with torch
# 2.14: "Encountered a set_ on a graph input"). LoRA on nn.Linear targets, VPT and full fine-tuning compile.
LORA_MHA_NO_COMPILE = ("--compile cannot compile LoRA on the attention modules (peft merges their weights in place "
                       "every forward, which torch.compile cannot trace with a backward): fine-tune without "
                       "--compile, or with --lora-targets c_fc,c_proj, --method vpt or --method full")


def _lora(visual: nn.Module, cfg) -> nn.Module:
    model = apply_lora(copy.deepcopy(visual), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)[0]
    if cfg.run.compile and any(isinstance(getattr(m, "base_layer", None), nn.MultiheadAttention)
                               for m in model.modules()):
        raise ClipguardError(LORA_MHA_NO_COMPILE)
    return model


def _vpt(visual: nn.Module, cfg) -> nn.Module:
    return PromptedVisual(visual, cfg.vpt_tokens)


def _full(visual: nn.Module, cfg) -> nn.Module:
    return copy.deepcopy(visual).requires_grad_(True)


def _frozen(visual: nn.Module, cfg) -> nn.Module:
    return visual  # --method prompt: the image tower (the base's, or --base-adapter's) stays as it is


def _prompt_classifier(p, cfg) -> nn.Module:
    """APT: learnable text context (``models.prompt_tuning``) on ``p``'s frozen classifier (with its tower)."""
    learner = PromptLearner(p.clip, p.prompts.classnames, n_ctx=cfg.prompt_tokens,
                            class_specific=cfg.prompt_class_specific, init=cfg.prompt_init)
    if cfg.run.base_adapter:  # recorded in the adapter: loading it on another tower is refused
        learner.base_adapter = {"path": str(cfg.run.base_adapter), "digest": file_digest(cfg.run.base_adapter)}
    return PromptedClassifier(p.classifier, learner)


# Li et al., CVPR 2024 (github.com/TreeLLi/APT): what clipguard's --method prompt does differently.
APT_DEVIATIONS = (
    "optimizer: AdamW with linear warm-up + cosine (--lr, default 2e-3) instead of SGD lr 0.002, momentum 0.9, "
    "weight decay 5e-4, one warm-up epoch at constant lr 1e-5, cosine",
    "training adversary defaults are clipguard's (--steps 2, --alpha = eps); APT's: 3 steps, alpha = 2/3 eps "
    "(pass --steps 3 --alpha)",
    "no training augmentation (APT: random resized crop + flip); the whole split, or --limit, instead of k shots",
    "adversarial examples against the current prompt only (APT's default 'onfly'; 'constant' and 'perturbed' are "
    "not offered); class token at the end only (APT's default)",
    "precision: fp32 (bf16 autocast on a capable GPU) instead of APT's fp16 CLIP",
)

METHODS: Registry[Method] = Registry("--method")
for _m in [
    Method("lora", _lora, 5e-4, "peft LoRA on the image tower (default: the visual attention modules)"),
    Method("vpt", _vpt, 1e-3, "learnable prompt tokens after the class token; the tower stays frozen"),
    Method("full", _full, 1e-5, "all image-tower weights"),
    Method("prompt", _frozen, 2e-3, "APT: learnable text context vectors; both towers stay frozen",
           classifier=_prompt_classifier, deviations=APT_DEVIATIONS),
]:
    METHODS.register(_m.name, _m)


def trainable_state(module: nn.Module) -> dict:
    """The tensors that train, by name (what a checkpoint keeps)."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
