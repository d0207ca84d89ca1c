"""Fine-tuning objectives: the registry ``OBJECTIVES``.

Each objective is one loss per image over adversarial pixels: the training adversary maximises it (PGD on δ)
and the optimizer minimises its batch mean, as TeCoA and FARE do.

- tecoa: cross-entropy over ``logit_scale * cos(image, class text)`` with the frozen text embeddings
  (Mao et al., "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models", ICLR 2023).
- ce: the same cross-entropy over plain cosine logits (no temperature), the reference notebook's variant;
  its gradients are ~100x flatter, so it needs a larger learning rate.
- fare: unsupervised ``||f(x+δ) - f0(x)||²`` to the frozen original encoder's clean features
  (Schlarmann et al., "Robust CLIP", ICML 2024); labels are not used.
- noise: tecoa's cross-entropy at ``x + N(0, sigma² I)`` (``--sigma``, [0, 1] pixel units, a fresh draw every
  forward, not clamped): Gaussian data augmentation, the training recipe of Cohen et al., "Certified Adversarial
  Robustness via Randomized Smoothing", ICML 2019, for a base classifier that `clipguard certify` smooths. With
  ``--eps 0`` it is exactly their recipe; with a PGD adversary, a one-sample SmoothAdv (Salman et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from clipguard.registry import Registry

# (classifier, x_adv in [0, 1], labels, reference features or None) -> (N,) loss per image
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    name: str
    loss: LossFn
    reference: bool  # needs f0(x): the frozen original encoder's clean, unnormalised features
    summary: str
    options: tuple[str, ...] = ()  # FinetuneConfig fields the loss takes as keyword arguments (noise: sigma)

    def bind(self, cfg) -> Objective:
        """This objective with its ``options`` taken from a FinetuneConfig: a loss of the common signature."""
        if not self.options:
            return self
        return replace(self, loss=partial(self.loss, **{k: getattr(cfg, k) for k in self.options}))


def _tecoa(clf, x, y, ref):
    return F.cross_entropy(clf(x).float(), y, reduction="none")


def _ce(clf, x, y, ref):
    cosine = clf.features(x) @ clf.text_embeddings.to(x.dtype).T
    return F.cross_entropy(cosine.float(), y, reduction="none")


def _fare(clf, x, y, ref):
    feats = clf.visual(clf.preprocess(x)).float()
    return (feats - ref).pow(2).sum(dim=1)


def _noise(clf, x, y, ref, *, sigma: float):
    return F.cross_entropy(clf(x + sigma * torch.randn_like(x)).float(), y, reduction="none")


OBJECTIVES: Registry[Objective] = Registry("--objective")
for _o in [
    Objective("tecoa", _tecoa, False, "cross-entropy over logit_scale x cosine to the class text embeddings"),
    Objective("ce", _ce, False, "cross-entropy over plain cosine logits (no temperature)"),
    Objective("fare", _fare, True, "unsupervised: squared L2 to the frozen encoder's clean features"),
    Objective("noise", _noise, False, "tecoa's cross-entropy under Gaussian noise of std --sigma (Cohen et al.)",
              options=("sigma",)),
]:
    OBJECTIVES.register(_o.name, _o)
