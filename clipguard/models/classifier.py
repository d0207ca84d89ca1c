"""ZeroShotClassifier: the one model contract every attack, evaluation and trainer uses.

[0, 1] pixels of any size go in; the module resizes them on the device to the model's input size
(bicubic, then clamp to [0, 1]), normalises with the model's own mean/std (buffers), runs the image
tower (with any adapter), L2-normalises and returns ``logit_scale * feats @ text_embeddings.T``.
No attack ever sees normalised tensors, so eps is always in pixel units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZeroShotClassifier(nn.Module):
    """CLIP as an (N, C)-logits classifier over [0, 1] pixels.

    Args:
        visual: the image tower (``clip.model.visual``, possibly wrapped by a LoRA / VPT adapter).
        text_embeddings: (C, D) L2-normalised class embeddings (from the text-embedding store).
        logit_scale: the temperature multiplier (``clip.model.logit_scale.exp()``, 100 for OpenAI CLIP).
        mean, std: per-channel normalisation the image tower expects.
        input_size: (H, W) of the image tower.

    Shape:
        - Input: (N, 3, H, W) float in [0, 1], any H, W.
        - Output: (N, C) logits.

    Example:
        >>> clf = ZeroShotClassifier(clip.model.visual, emb, 100.0, clip.mean, clip.std, (224, 224))
        >>> logits = clf(images_uint8.float() / 255)
    """

    def __init__(self, visual: nn.Module, text_embeddings: torch.Tensor, logit_scale: float,
                 mean, std, input_size: tuple[int, int]):
        super().__init__()
        self.visual = visual
        self.input_size = tuple(input_size)
        self.logit_scale = float(logit_scale)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())

    @classmethod
    def from_clip(cls, clip, text_embeddings: torch.Tensor, visual: nn.Module | None = None):
        """Build from a :class:`~clipguard.models.loader.LoadedClip` (optionally another visual tower)."""
        return cls(visual if visual is not None else clip.model.visual,
                   text_embeddings.to(clip.device), clip.model.logit_scale.exp().item(),
                   clip.mean, clip.std, clip.input_size).to(clip.device)

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
        return self.logit_scale * feats @ self.text_embeddings.to(feats.dtype).T
