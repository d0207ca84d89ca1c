import pytest
import torch

from clipguard.models.inference import run_batches
from clipguard.records.metrics import classification_metrics


def test_run_batches_halves_on_out_of_memory_and_covers_everything():
    seen, tried = [], []

    def compute(a, b):
        tried.append(b - a)
        if b - a > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(range(a, b))

    final = run_batches(50, 32, compute, lambda a, b, out: seen.extend(out))
    assert final == 8 and seen == list(range(50)) and tried[:3] == [32, 16, 8]


def test_run_batches_reraises_other_errors():
    def compute(a, b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batches(10, 4, compute, lambda *a: None)


def test_classification_metrics():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [2, 0, 1], [0, 1, 2]])
    m = classification_metrics(logits, torch.tensor([0, 2, 2, 2]))
    assert m["acc1"] == 0.5 and m["acc5"] == 1.0
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 1 / 3) / 2)
