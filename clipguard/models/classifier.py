"""ZeroShotClassifier: the one model contract every attack, evaluation and trainer uses.

[0, 1] pixels of any size go in; the module resizes them on the device to the model's input size
(bicubic, then clamp to [0, 1]), normalises with the model's own mean/std (buffers), runs the image
tower (with any adapter), L2-normalises and returns ``logit_scale * feats @ text_embeddings.T + logit_bias``
(the model's own logits: SigLIP's bias as open_clip's ``CustomTextCLIP`` adds it, 0 for CLIP).
No attack ever sees normalised tensors, so eps is always in pixel units.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.models.inference import autocast_for


class ZeroShotClassifier(nn.Module):
    """CLIP as an (N, C)-logits classifier over [0, 1] pixels.

    Args:
        visual: the image tower (``clip.model.visual``, possibly wrapped by a LoRA / VPT adapter).
        text_embeddings: (C, D) L2-normalised class embeddings (from the text-embedding store).
        logit_scale: the temperature multiplier (``clip.model.logit_scale.exp()``, 100 for OpenAI CLIP).
        mean, std: per-channel normalisation the image tower expects.
        input_size: (H, W) of the image tower.
        geometry: the model's own ``data.images.Geometry`` (``LoadedClip.geometry``): how the commands bring a
            dataset's images to ``input_size`` at load (``clipguard.load_images(..., model=classifier)`` reads it).
        logit_bias: added to every logit (``clip.model.logit_bias``: SigLIP's, e.g. -10; 0 for CLIP, whose
            logits then stay bit-identical). A shift of all logits leaves softmax, cross-entropy, margins and
            argmax unchanged; sigmoid probabilities and the logits' values (as a record or file shows them) move.

    Shape:
        - Input: (N, 3, H, W) float in [0, 1], any H, W.
        - Output: (N, C) logits.

    Example:
        >>> clf = ZeroShotClassifier(clip.model.visual, emb, 100.0, clip.mean, clip.std, (224, 224))
        >>> logits = clf(images_uint8.float() / 255)
    """

    def __init__(self, visual: nn.Module, text_embeddings: torch.Tensor, logit_scale: float,
                 mean, std, input_size: tuple[int, int], logit_bias: float = 0.0, geometry=None):
        super().__init__()
        self.visual = visual
        self.input_size = tuple(input_size)
        self.logit_scale = float(logit_scale)
        self.logit_bias = float(logit_bias)  # a Python float like logit_scale: a constant to torch.compile
        self.geometry = geometry  # how its images were brought to input_size at load (None: OpenAI CLIP's)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())

    @classmethod
    def from_clip(cls, clip, text_embeddings: torch.Tensor, visual: nn.Module | None = None):
        """Build from a :class:`~clipguard.models.loader.LoadedClip` (optionally another visual tower)."""
        return cls(visual if visual is not None else clip.model.visual,
                   text_embeddings.to(clip.device), clip.model.logit_scale.exp().item(),
                   clip.mean, clip.std, clip.input_size,
                   logit_bias=model_logit_bias(clip.model) or 0.0, geometry=clip.geometry).to(clip.device)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels at the input size: bicubic (antialiased when shrinking), clamped to [0, 1]."""
        if tuple(x.shape[-2:]) == self.input_size:
            return x
        down = x.shape[-2] > self.input_size[0] or x.shape[-1] > self.input_size[1]
        return F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False,
                             antialias=down).clamp(0, 1)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to the input size and normalise with the model's mean/std; differentiable."""
        return (self.resize(x) - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features for [0, 1] pixels."""
        return F.normalize(self.visual(self.preprocess(x)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        logits = self.logit_scale * feats @ self.text_embeddings.to(feats.dtype).T
        return logits + self.logit_bias if self.logit_bias else logits


def model_logit_bias(model: nn.Module) -> float | None:
    """The logit bias a model adds to ``logit_scale * cos`` (open_clip's SigLIP ``CustomTextCLIP.logit_bias``, an
    nn.Parameter, or a backend's float); None when it has none (CLIP). The scale's exp is not applied to it."""
    bias = getattr(model, "logit_bias", None)
    if bias is None:
        return None
    bias = torch.as_tensor(bias).detach()
    if bias.numel() != 1:
        raise ClipguardError(f"the model's logit_bias has shape {tuple(bias.shape)}: clipguard adds one scalar to "
                             "every logit; use a model with a scalar bias (open_clip's SigLIP configs)")
    return float(bias.float().item())


WARMUP_IMAGES = 4  # images in the dummy batch a compiled classifier is warmed up on (batch size stays dynamic)


def compile_failed(e: Exception):
    """The one-line error for a torch.compile failure (dynamo / inductor raise many types; the fix is the same)."""
    return ClipguardError(f"--compile: torch.compile failed on this machine ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); run without --compile")


def compile_classifier(classifier: ZeroShotClassifier, image_shape, *, precision: str = "fp32",
                       attack_precision: str | None = None, mode: str = "default") -> float:
    """``torch.compile`` the classifier's forward in place (``nn.Module.compile``: the same object, attributes
    and state_dict keys, so every attack and evaluation uses it unchanged) and warm it up on one dummy batch of
    ``image_shape`` (C, H, W) for each pass that follows, so compiling happens here and not inside a timed run:
    the clean forward (no grad, ``precision``) and, when an attack follows, its forward and forward + backward in
    ``attack_precision``. The batch dimension is marked dynamic: any batch size (but 1, which dynamo specialises)
    reuses the same graphs. ``mode`` is torch.compile's (``reduce-overhead``: CUDA graphs, recorded per batch
    shape on first use; on a CPU it compiles as ``default``).

    Returns:
        Seconds spent compiling and warming up (the record's ``compile_s``, apart from run time).

    Raises:
        ClipguardError: torch.compile failed here (inductor needs a C++ compiler on CPU, Triton on GPU).
    """
    device = classifier.text_embeddings.device
    passes = [(False, precision)]
    if attack_precision is not None:
        passes += [(False, attack_precision), (True, attack_precision)]
    classifier.compile(mode=None if mode == "default" else mode)
    t0 = time.perf_counter()
    try:
        for grad, prec in dict.fromkeys(passes):  # each (grad mode, autocast) pair is one graph; once each
            # mid-grey, not torch.rand: the warm-up draws nothing from the global RNG the run is seeded with
            x = torch.full((WARMUP_IMAGES, *image_shape), 0.5, device=device, requires_grad=grad)
            torch._dynamo.mark_dynamic(x, 0)
            with torch.set_grad_enabled(grad), autocast_for(device, prec):
                out = classifier(x)
            if grad:  # the input gradient, as an attack takes it (no parameter .grad is touched)
                torch.autograd.grad(out.float().sum(), x)
    except Exception as e:  # dynamo / inductor raise many types; the user's fix is the same
        raise compile_failed(e) from None
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round(time.perf_counter() - t0, 3)
