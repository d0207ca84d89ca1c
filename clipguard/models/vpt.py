"""Visual prompt tuning (VPT-shallow) for open_clip's VisionTransformer.

N learnable tokens go in after the class token, before the pre-norm; the image tower itself stays frozen
and shared. They are dropped again before pooling, so ``tok`` pooling reads the class token and ``avg``
pooling averages the patch tokens only, exactly as the base model does.
Reference: Jia et al., "Visual Prompt Tuning", ECCV 2022 (shallow variant).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PromptedVisual(nn.Module):
    """An open_clip VisionTransformer with ``n_tokens`` learnable prompt tokens.

    Args:
        visual: the (frozen) image tower; it is shared, not copied, and never modified.
        n_tokens: number of prompt tokens (>= 1).

    Shape:
        - Input: (N, 3, H, W) normalised images at the tower's input size.
        - Output: (N, D) image features (unnormalised), like ``visual(x)``.

    Example:
        >>> vpt = PromptedVisual(clip.model.visual, 10)
        >>> [n for n, p in vpt.named_parameters() if p.requires_grad]
        ['prompts']
    """

    def __init__(self, visual: nn.Module, n_tokens: int):
        super().__init__()
        if hasattr(visual, "forward_prompted"):  # a transformers tower (models.hf_transformers) inserts them itself
            width, patch, device = visual.prompt_geometry()
        elif not hasattr(visual, "class_embedding") or not hasattr(visual, "_embeds"):
            raise TypeError(f"VPT needs an open_clip VisionTransformer, not {type(visual).__name__}")
        else:
            width, patch = visual.class_embedding.shape[-1], visual.conv1.kernel_size
            device = visual.class_embedding.device
        self.visual = visual.requires_grad_(False)
        self.n_tokens = int(n_tokens)
        # VPT's init: uniform with the Xavier bound of a patch-embedding fan-in.
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + width))
        prompts = torch.empty(self.n_tokens, width, device=device)
        self.prompts = nn.Parameter(prompts.uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if hasattr(v, "forward_prompted"):
            return v.forward_prompted(x, self.prompts)
        # _embeds = patchify, class token, positions, patch dropout, then ln_pre. LayerNorm acts per token,
        # so ln_pre(prompts) inserted after it equals inserting the prompts before the pre-norm.
        x = v._embeds(x)
        p = v.ln_pre(self.prompts.to(x.dtype)).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
        x = v.transformer(x)
        x = torch.cat([x[:, :1], x[:, 1 + self.n_tokens:]], dim=1)  # drop the prompts before pooling
        pooled, tokens = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return (pooled, tokens) if getattr(v, "output_tokens", False) else pooled
