import json

import pytest
import torch

from clipguard.models.inference import run_batches
from clipguard.records.metrics import classification_metrics


def test_run_batches_halves_on_out_of_memory_and_covers_everything():
    seen, tried = [], []

    def compute(a, b, x):
        tried.append(b - a)
        if b - a > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        assert x.tolist() == list(range(a, b))  # the batch handed over is images[a:b]
        return x.tolist()

    final = run_batches(torch.arange(50), 32, compute, lambda a, b, out: seen.extend(out))
    assert final == 8 and seen == list(range(50)) and tried[:3] == [32, 16, 8]


def test_run_batches_reraises_other_errors():
    def compute(a, b, x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batches(torch.arange(10), 4, compute, lambda *a: None)


def test_classification_metrics():
    """Below 5 classes top-5 is meaningless (every image counts as correct): acc5 is None, JSON null
    (CLIP_benchmark writes NaN), never 1.0."""
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [2, 0, 1], [0, 1, 2]])
    m = classification_metrics(logits, torch.tensor([0, 2, 2, 2]))
    assert m["acc1"] == 0.5 and m["acc5"] is None
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert json.loads(json.dumps(m))["acc5"] is None


def test_classification_metrics_acc5_with_enough_classes():
    # 6 classes; each row ranks the classes as listed (best first).
    ranks = [[0, 1, 2, 3, 4, 5],   # label 0: top-1
             [1, 2, 3, 4, 5, 0],   # label 3: in the top 5, not top-1
             [5, 4, 3, 2, 1, 0],   # label 0: last, outside the top 5
             [2, 0, 1, 3, 4, 5]]   # label 4: 5th, inside the top 5
    logits = torch.zeros(4, 6)
    for i, order in enumerate(ranks):
        logits[i, order] = torch.arange(6, 0, -1).float()
    m = classification_metrics(logits, torch.tensor([0, 3, 0, 4]))
    assert m["acc1"] == 0.25 and m["acc5"] == 0.75
    five = classification_metrics(logits[:, :5], torch.tensor([0, 3, 0, 4]))  # exactly 5 classes: a real number
    assert isinstance(five["acc5"], float)
