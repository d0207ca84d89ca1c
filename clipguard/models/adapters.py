"""Adapters for the image tower: LoRA (peft), VPT tokens or full weights, saved with a manifest.

An adapter directory holds the weights in the method's format (peft's own ``adapter_config.json`` +
``adapter_model.safetensors`` for LoRA; safetensors for VPT / full) and ``manifest.json`` naming the
base model (spec and fingerprint), method, objective and training config. The manifest is written
last, so a directory with a manifest is complete. ``load_adapter(dir, clip)`` returns the visual tower
to put into a ZeroShotClassifier; it refuses an adapter made for another base model. A ``prompt`` adapter (APT's
text context, :mod:`clipguard.models.prompt_tuning`) leaves the image tower as it is and gives the class embeddings.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import torch as safetensors_torch  # called through the module, so a test can make it fail
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write, atomic_write_json, writing_output
from clipguard.models.prompt_tuning import load_prompt_visual, save_prompt
from clipguard.models.vpt import PromptedVisual
from clipguard.registry import Registry

SCHEMA = "clipguard.adapter/1"
MANIFEST = "manifest.json"
LORA_CONFIG, LORA_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
VPT_WEIGHTS, FULL_WEIGHTS = "vpt_prompts.safetensors", "visual.safetensors"

log = logging.getLogger(__name__)

# peft is imported inside the LoRA functions only: every run (tasks.setup, for --adapter) and every fine-tuning option
# check (finetune.config -> finetune.methods) import this module, and peft adds ~2 s where no LoRA is used.


def visual_attention_names(visual: nn.Module) -> list[str]:
    """Names of the image tower's attention modules (nn.MultiheadAttention in open_clip 3.x)."""
    return [n for n, m in visual.named_modules() if isinstance(m, nn.MultiheadAttention)]


def _check_lora_targets(visual: nn.Module, targets: list[str], dropout: float = 0.0) -> None:
    """Every target must match a module, and never a MultiheadAttention's out_proj (a silent trap:
    MultiheadAttention reads ``out_proj.weight`` directly, so LoRA there gets no gradient). Dropout must be 0 on
    attention targets: peft's MultiheadAttention LoRA merges the LoRA weights into the attention weights for
    each forward, so its dropout is never applied (plain nn.Linear targets, e.g. c_fc / c_proj, honour it)."""
    mods = dict(visual.named_modules())
    if dropout and any(isinstance(m, nn.MultiheadAttention) for n, m in mods.items()
                       if any(n == t or n.endswith("." + t) for t in targets)):
        raise ClipguardError("LoRA on nn.MultiheadAttention merges its weights each forward, so dropout never "
                             "applies: use --lora-dropout 0")
    for t in targets:
        hits = [n for n in mods if n == t or n.endswith("." + t)]
        if not hits:
            raise ClipguardError(f"--lora-targets {t!r} matches no module of the image tower; use e.g. attn "
                                 "(the attention modules, the default), c_fc, c_proj")
        for n in hits:
            parent = mods.get(n.rpartition(".")[0]) if "." in n else visual
            if isinstance(parent, nn.MultiheadAttention):
                raise ClipguardError(f"--lora-targets {t!r} hits {n}, inside MultiheadAttention, which never calls "
                                     "it (LoRA there gets no gradient): target the attention module itself (attn)")


def _restore_base(module: nn.Module, args, output) -> None:
    """Forward hook: put back the pristine base weights. peft's MultiheadAttention LoRA merges before and
    unmerges after each forward, and (W + d) - d drifts W by a few ulps per call."""
    base = module.get_base_layer()
    base.in_proj_weight.data = module._pinned_in_proj
    base.out_proj.get_base_layer().weight.data = module._pinned_out_proj


def _pin_base_weights(visual: nn.Module) -> None:
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA  # lazy: see the note on peft above

    for m in visual.modules():
        if isinstance(m, LoraMHA):
            base = m.get_base_layer()  # buffers (not attributes) so .to(device) and deepcopy carry them
            m.register_buffer("_pinned_in_proj", base.in_proj_weight.data, persistent=False)
            m.register_buffer("_pinned_out_proj", base.out_proj.get_base_layer().weight.data, persistent=False)
            m.register_forward_hook(_restore_base)


def apply_lora(visual: nn.Module, r: int = 8, alpha: int = 32, dropout: float = 0.0,
               targets: list[str] | None = None):
    """Inject peft LoRA layers into ``visual`` in place (pass a copy to keep the original).

    Args:
        visual: an open_clip image tower on its final device.
        r, alpha, dropout: LoRA rank, scaling numerator (scale = alpha / r) and dropout on the LoRA path
            (plain nn.Linear targets only: it must be 0 when a target is an attention module, where peft
            merges the LoRA weights for each forward and never applies dropout).
        targets: module names or name suffixes; None = the visual attention modules.

    Returns:
        (visual, LoraConfig); only the LoRA tensors require grad.

    Raises:
        ClipguardError: a target matches nothing, hits a MultiheadAttention's out_proj, or has an
            unsupported type; non-zero dropout on an attention target.
    """
    from peft import LoraConfig, inject_adapter_in_model  # lazy: see the note on peft above

    # default: the visual attention modules; a transformers tower (models.hf_transformers) names its q/k/v/out_proj
    default = visual.lora_targets() if hasattr(visual, "lora_targets") else visual_attention_names(visual)
    targets = list(targets) if targets else default
    _check_lora_targets(visual, targets, dropout)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(config, visual)
    except ValueError as e:
        raise ClipguardError(f"--lora-targets {','.join(targets)}: peft cannot wrap them ({e})") from None
    _pin_base_weights(visual)
    return visual, config


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------ per-method formats


def _save_lora(d: Path, visual: nn.Module) -> list[str]:
    from peft import get_peft_model_state_dict  # lazy: see the note on peft above

    cfg = visual.peft_config["default"].to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}  # as peft's save_pretrained
    atomic_write(d / LORA_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2, sort_keys=True)))
    sd = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(visual).items()}
    atomic_write(d / LORA_WEIGHTS, lambda tmp: safetensors_torch.save_file(sd, tmp))
    return [LORA_CONFIG, LORA_WEIGHTS]


def _load_lora(d: Path, base: nn.Module) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict  # lazy: see the note above

    config = LoraConfig.from_pretrained(str(d))
    visual = copy.deepcopy(base)
    inject_adapter_in_model(config, visual)
    _pin_base_weights(visual)
    result = set_peft_model_state_dict(visual, safetensors_torch.load_file(str(d / LORA_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise ClipguardError(f"--adapter {str(d)!r}: LoRA weights do not fit this model ({result.unexpected_keys[0]})")
    return visual


def _save_vpt(d: Path, visual: nn.Module) -> list[str]:
    sd = {"prompts": visual.prompts.detach().contiguous().cpu()}
    atomic_write(d / VPT_WEIGHTS, lambda tmp: safetensors_torch.save_file(sd, tmp))
    return [VPT_WEIGHTS]


def _load_vpt(d: Path, base: nn.Module) -> nn.Module:
    prompts = safetensors_torch.load_file(str(d / VPT_WEIGHTS))["prompts"]
    vpt = PromptedVisual(base, prompts.shape[0])
    vpt.prompts.data.copy_(prompts)
    return vpt


def _save_full(d: Path, visual: nn.Module) -> list[str]:
    sd = {k: v.detach().contiguous().cpu() for k, v in visual.state_dict().items()}
    atomic_write(d / FULL_WEIGHTS, lambda tmp: safetensors_torch.save_file(sd, tmp))
    return [FULL_WEIGHTS]


def _load_full(d: Path, base: nn.Module) -> nn.Module:
    visual = copy.deepcopy(base)
    visual.load_state_dict(safetensors_torch.load_file(str(d / FULL_WEIGHTS)), strict=True)
    return visual


FORMATS: Registry[tuple[Callable, Callable]] = Registry("adapter method")  # method -> (save, load)
FORMATS.register("lora", (_save_lora, _load_lora))
FORMATS.register("vpt", (_save_vpt, _load_vpt))
FORMATS.register("full", (_save_full, _load_full))
FORMATS.register("prompt", (save_prompt, load_prompt_visual))  # text side: prompt_tuning.load_prompt_embeddings


def save_adapter(adapter_dir: str | Path, visual: nn.Module, *, method: str, clip, info: dict | None = None) -> Path:
    """Write ``visual``'s adapter (format by ``method``) and then the manifest; returns the manifest path.

    ``info`` (objective, config, ...) is stored in the manifest as given.
    """
    d = Path(adapter_dir)
    with writing_output(d, "the adapter"):  # a full disk is one line (the run's checkpoint is kept)
        d.mkdir(parents=True, exist_ok=True)
        files = FORMATS.get(method)[0](d, visual)
        manifest = {"schema": SCHEMA, "method": method,
                    "base": {"spec": clip.spec.text, "fingerprint": clip.fingerprint, "arch": clip.info.get("arch")},
                    "files": files, "trainable_params": trainable_parameters(visual),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
        return atomic_write_json(d / MANIFEST, manifest)


def read_manifest(adapter_dir: str | Path) -> dict:
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ClipguardError(f"--adapter {str(d)!r}: no such directory")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise ClipguardError(f"--adapter {str(d)!r} holds no {MANIFEST}: not an adapter made by "
                             "`clipguard finetune` (or its training has not finished)") from None
    except json.JSONDecodeError as e:
        raise ClipguardError(f"--adapter {str(d)!r}: {MANIFEST} is not valid JSON ({e})") from None
    if manifest.get("schema") != SCHEMA or manifest.get("method") not in FORMATS:
        raise ClipguardError(f"--adapter {str(d)!r}: {MANIFEST} is not a {SCHEMA} manifest with a known method")
    return manifest


def _same_base(saved: str | None, current: str, adapter_dir) -> bool:
    """Whether an adapter made on the base fingerprinted ``saved`` fits the model fingerprinted ``current``.

    Fingerprints of pretrained tags and hub models used to be the name alone (``ARCH:TAG``, ``hf-hub:ORG/NAME``)
    and now carry the weights (``NAME@sha256:...``, ``NAME@rev:...``): an adapter saved before matches the same
    name, with a warning that its base weights cannot be checked.
    """
    if saved == current:
        return True
    if saved and "@" not in saved and not saved.startswith("sha256:") and current.partition("@")[0] == saved:
        log.warning("--adapter %s names its base model %r without a weights digest (saved by an older clipguard): "
                    "cannot check it was trained on these weights (%s)", adapter_dir, saved, current)
        return True
    return False


def load_adapter(adapter_dir: str | Path, clip) -> nn.Module:
    """The image tower of ``clip`` with the adapter in ``adapter_dir`` applied (eval mode, frozen).

    ``clip.model.visual`` itself is never modified (LoRA and full work on a copy; VPT shares it frozen).

    Raises:
        ClipguardError: missing directory or manifest, or an adapter made for another base model
            (the message names both specs).

    Example:
        >>> visual = load_adapter("runs/lora", clip)
        >>> clf = ZeroShotClassifier.from_clip(clip, emb, visual=visual)
    """
    manifest = read_manifest(adapter_dir)
    base = manifest["base"]
    if not _same_base(base.get("fingerprint"), clip.fingerprint, adapter_dir):
        raise ClipguardError(
            f"--adapter {str(adapter_dir)!r} was made for base model {base.get('spec')!r} ({base.get('fingerprint')}) "
            f"but --model is {clip.spec.text!r} ({clip.fingerprint}): pass --model {base.get('spec')}")
    visual = FORMATS.get(manifest["method"])[1](Path(adapter_dir), clip.model.visual)
    return visual.to(clip.device).eval().requires_grad_(False)
