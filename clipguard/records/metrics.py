"""The metric formulas, in one place: zero-shot accuracy (CLIP_benchmark's names) and attack success.

Reports and gates never recompute these: they read what a record holds.
"""

from __future__ import annotations

import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """acc1, acc5 and mean per-class recall, as CLIP_benchmark names them.

    acc5 is None (JSON null) below 5 classes, where top-5 would count every image as correct (CLIP_benchmark
    writes NaN there; None survives JSON without a non-standard literal). Readers must allow None.
    """
    labels = labels.cpu()
    topk = logits.cpu().topk(min(5, logits.shape[1]), dim=1).indices
    pred = topk[:, 0]
    acc1 = (pred == labels).float().mean().item()
    acc5 = (topk == labels[:, None]).any(1).float().mean().item() if logits.shape[1] >= 5 else None
    recalls = [(pred[labels == c] == c).float().mean().item() for c in labels.unique().tolist()]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of predictions equal to their label."""
    return (pred.cpu() == labels.cpu()).float().mean().item()


def attack_success_rate(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor) -> float:
    """Share of the clean-correct images that the attack makes wrong (0 when none was correct)."""
    labels = labels.cpu()
    correct = clean_pred.cpu() == labels
    fooled = correct & (adv_pred.cpu() != labels)
    return fooled.sum().item() / max(int(correct.sum()), 1)
