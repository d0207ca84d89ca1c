"""Fine-tuning objectives: ``list_objectives()`` / ``get_objective(name)``.

Each objective is one loss over adversarial pixels: the training adversary maximises it (PGD on δ)
and the optimizer minimises it, as TeCoA and FARE do.

- tecoa: cross-entropy over ``logit_scale * cos(image, class text)`` with the frozen text embeddings
  (Mao et al., "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models", ICLR 2023).
- ce: the same cross-entropy over plain cosine logits (no temperature), the reference notebook's variant;
  its gradients are ~100x flatter, so it needs a larger learning rate.
- fare: unsupervised ``||f(x+δ) - f0(x)||²`` to the frozen original encoder's clean features
  (Schlarmann et al., "Robust CLIP", ICML 2024); labels are not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipguard.errors import ClipguardError

# (classifier, x_adv in [0, 1], labels, reference features or None) -> scalar loss (mean over the batch)
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    name: str
    loss: LossFn
    reference: bool  # needs f0(x): the frozen original encoder's clean, unnormalised features
    summary: str


def _tecoa(clf, x, y, ref):
    return F.cross_entropy(clf(x).float(), y)


def _ce(clf, x, y, ref):
    cosine = clf.features(x) @ clf.text_embeddings.to(x.dtype).T
    return F.cross_entropy(cosine.float(), y)


def _fare(clf, x, y, ref):
    feats = clf.visual(clf.preprocess(x)).float()
    return (feats - ref).pow(2).sum(dim=1).mean()


_OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("tecoa", _tecoa, False, "cross-entropy over logit_scale x cosine to the class text embeddings"),
    Objective("ce", _ce, False, "cross-entropy over plain cosine logits (no temperature)"),
    Objective("fare", _fare, True, "unsupervised: squared L2 to the frozen encoder's clean features"),
]}


def list_objectives() -> list[str]:
    return list(_OBJECTIVES)


def get_objective(name: str) -> Objective:
    if name not in _OBJECTIVES:
        raise ClipguardError(f"--objective {name!r} is unknown: choose from {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[name]
