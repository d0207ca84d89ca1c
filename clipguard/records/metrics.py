"""The metric formulas, in one place: zero-shot accuracy (CLIP_benchmark's names) and attack success.

Every count-based metric is ``k / n`` of Python ints (a float64 rounded once), never a float32 mean: 2 of 200 is
0.01 exactly, so a gate ``>= 0.01`` holds at the number a report prints. The dict that holds such a metric also
holds its counts, ``"counts": {name: {"k": k, "n": n}}`` (:func:`put`). Reports and gates never recompute these:
they read what a record holds.
"""

from __future__ import annotations

from fractions import Fraction

import torch

# the interval of every counted metric, and its level (--confidence): in records.intervals, which loads no torch
from clipguard.records.intervals import (  # noqa: F401 (re-exported: metrics.interval, metrics.CONFIDENCE)
    CONFIDENCE,
    INTERVAL_METHOD,
    at_confidence,
    at_run_confidence,
    confidence,
    interval,
)


def ratio(k: int, n: int) -> float:
    """``k / n`` as a float64 rounded once from the integers; 0 of 0 is 0.0 (its counts say n = 0)."""
    return int(k) / int(n) if n else 0.0


def put(metrics: dict, name: str, k: int, n: int) -> dict:
    """``metrics[name] = k / n``, its interval at the current level (95 % unless ``--confidence`` says otherwise)
    ``metrics[name + "_ci"] = [lo, hi]`` and ``metrics["counts"][name] = {"k": k, "n": n}``; returns ``metrics``."""
    k, n = int(k), int(n)
    metrics[name] = ratio(k, n)
    metrics[f"{name}_ci"] = interval(k, n)
    metrics.setdefault("counts", {})[name] = {"k": k, "n": n}
    return metrics


def count(mask: torch.Tensor) -> int:
    """True entries of a boolean tensor, as a Python int."""
    return int(mask.sum())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """acc1, acc5 and mean per-class recall, as CLIP_benchmark names them, plus their ``counts``.

    acc5 is None (JSON null) below 5 classes, where top-5 would count every image as correct (CLIP_benchmark
    writes NaN there; None survives JSON without a non-standard literal). Readers must allow None. Mean per-class
    recall is the mean of each present class's k/n, summed exactly (fractions) and rounded once.
    """
    labels = labels.cpu()
    topk = logits.cpu().topk(min(5, logits.shape[1]), dim=1).indices
    pred, n = topk[:, 0], labels.shape[0]
    m = put({}, "acc1", count(pred == labels), n)
    if logits.shape[1] >= 5:
        put(m, "acc5", count((topk == labels[:, None]).any(1)), n)
    else:
        m["acc5"] = None
    classes = labels.unique().tolist()
    recalls = [Fraction(count(pred[labels == c] == c), count(labels == c)) for c in classes]
    m["mean_per_class_recall"] = float(sum(recalls) / len(recalls)) if recalls else 0.0
    return {k: m[k] for k in ("acc1", "acc1_ci", "acc5", *(("acc5_ci",) if "acc5_ci" in m else ()),
                              "mean_per_class_recall", "counts")}


def accuracy_counts(pred: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(predictions equal to their label, predictions)."""
    return count(pred.cpu() == labels.cpu()), int(labels.shape[0])


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of predictions equal to their label."""
    return ratio(*accuracy_counts(pred, labels))


def attack_success_counts(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor) -> tuple[int, int]:
    """(clean-correct images the attack makes wrong, clean-correct images)."""
    labels = labels.cpu()
    correct = clean_pred.cpu() == labels
    return count(correct & (adv_pred.cpu() != labels)), count(correct)


def attack_success_rate(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor) -> float:
    """Share of the clean-correct images that the attack makes wrong (0 when none was correct)."""
    return ratio(*attack_success_counts(labels, clean_pred, adv_pred))
