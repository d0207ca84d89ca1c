"""Surrogate models for transfer attacks: each is a [0, 1] pixels -> (N, C) logits module.

Specs: ``toy-cnn``, ``clip:ARCH:TAG`` / ``clip:toy@seed1`` (another CLIP as a zero-shot classifier on the
same prompts), ``hub:OWNER/REPO:ENTRY`` (torch.hub, e.g. a CIFAR-10 ResNet-20) or a TorchScript file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clipguard.data.toy import DATASETS as TOY_DATASETS
from clipguard.errors import ClipguardError
from clipguard.models.classifier import ZeroShotClassifier
from clipguard.models.text_embeddings import get_text_embeddings
from clipguard.models.toy import load_toy_cnn
from clipguard.registry import Registry

# Input normalisation of known torch.hub repositories (they expect normalised tensors).
HUB_NORMALISATION = {
    "chenyaofu/pytorch-cifar-models": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Normalised(nn.Module):
    """Wraps a model that expects normalised input so it takes [0, 1] pixels (mean/std as buffers)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


# Spec form (an exact name, or a prefix ending in ":") -> (spec, prepared) -> [0, 1] -> logits module.
SURROGATES: Registry[Callable[[str, object], nn.Module]] = Registry("--surrogate")


@SURROGATES.register("toy-cnn")
def _toy_cnn(spec: str, prepared) -> nn.Module:
    if prepared.data.name not in TOY_DATASETS:
        raise ClipguardError(f"--surrogate toy-cnn classifies the toy classes only, not {prepared.data.spec!r}")
    return load_toy_cnn(device=str(prepared.clip.device))


@SURROGATES.register("clip:")
def _clip(spec: str, prepared) -> nn.Module:
    # Lazy: option checks import this module (check_surrogate_spec) before any loading; the loader imports
    # open_clip (~2 s), which a bad option's one-line error should not wait for.
    from clipguard.models.loader import load_clip

    clip = load_clip(spec[len("clip:"):], device=str(prepared.clip.device), precision="fp32")
    text = get_text_embeddings(clip, prepared.prompts.classnames, prepared.prompts.templates)
    return ZeroShotClassifier.from_clip(clip, text.embeddings).eval()


@SURROGATES.register("hub:")
def _hub(spec: str, prepared) -> nn.Module:
    rest = spec[len("hub:"):]
    if rest.count(":") != 1 or rest.split(":")[0].count("/") != 1:
        raise ClipguardError(f"--surrogate {spec!r}: hub specs look like hub:OWNER/REPO:ENTRY")
    repo, entry = rest.split(":")
    try:  # trust_repo=True: the user opted in with --trust-remote-code (build_surrogate checks it)
        model = torch.hub.load(repo, entry, pretrained=True, trust_repo=True, verbose=False)
    except Exception as e:
        raise ClipguardError(
            f"--surrogate {spec!r}: cannot load {repo}:{entry} through torch.hub ({type(e).__name__}); "
            f"offline? put the repository and weights in the hub cache {torch.hub.get_dir()}"
        ) from None
    mean, std = HUB_NORMALISATION.get(repo, IMAGENET)
    return Normalised(model, mean, std).to(prepared.clip.device)


def _torchscript(spec: str, prepared) -> nn.Module:
    try:
        return torch.jit.load(spec, map_location=prepared.clip.device)
    except Exception as e:
        raise ClipguardError(f"--surrogate {spec!r}: not a loadable TorchScript file ({type(e).__name__})") from None


def _form(spec: str) -> str | None:
    """The registered form ``spec`` belongs to (an exact name or a ``prefix:``), else None."""
    return next((k for k in SURROGATES if spec == k or (k.endswith(":") and spec.startswith(k))), None)


REMOTE_CODE = ("hub:",)  # forms that run a repository's code (torch.hub's hubconf.py): only with --trust-remote-code


def check_surrogate_spec(spec: str, *, trust_remote_code: bool = False) -> None:
    """Fail fast (before any model loads) on a spec that names no known surrogate form, or one that would run a
    repository's code (``hub:``) without ``--trust-remote-code``."""
    if _form(spec) is None and not Path(spec).is_file():
        raise ClipguardError(
            f"--surrogate {spec!r} is unknown: use toy-cnn, clip:ARCH:TAG, hub:OWNER/REPO:ENTRY "
            "or a TorchScript file path"
        )
    if _form(spec) in REMOTE_CODE and not trust_remote_code:
        raise ClipguardError(f"--surrogate {spec!r} runs the repository's own Python code (torch.hub's hubconf.py): "
                             "add --trust-remote-code if you trust it")


def build_surrogate(spec: str, prepared, *, trust_remote_code: bool = False) -> nn.Module:
    """A frozen, eval-mode [0, 1] -> logits surrogate whose classes match ``prepared``'s dataset; ``hub:`` specs
    need ``trust_remote_code`` (``--trust-remote-code``)."""
    check_surrogate_spec(spec, trust_remote_code=trust_remote_code)
    form = _form(spec)
    model = SURROGATES.get(form)(spec, prepared) if form else _torchscript(spec, prepared)
    model = model.eval().requires_grad_(False)
    n_classes = len(prepared.prompts.classnames)
    with torch.no_grad():
        h, w = prepared.data.images.shape[-2:]
        out = model(torch.zeros(1, 3, h, w, device=prepared.clip.device))
    if out.ndim != 2 or out.shape[1] != n_classes:
        raise ClipguardError(
            f"--surrogate {spec!r} outputs {tuple(out.shape)} logits but {prepared.data.spec!r} has {n_classes} classes"
        )
    return model
