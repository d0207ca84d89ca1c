"""clipguard's zero-shot predictions equal CLIP_benchmark's on the same model, images and templates."""

import numpy as np
import pytest
import torch


class _Images(torch.utils.data.Dataset):
    """Yields (normalised tensor, label), what CLIP_benchmark's dataloaders yield after its transform."""

    def __init__(self, images_uint8, labels, mean, std, classes):
        self.x, self.y, self.classes = images_uint8, labels, classes
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i].float() / 255 - self.mean) / self.std, int(self.y[i])


def test_random_vit_b32_predictions_equal_clip_benchmark(monkeypatch):
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from clipguard.data.prompts import load_prompts
    from clipguard.models.classifier import ZeroShotClassifier
    from clipguard.models.inference import predict_logits
    from clipguard.models.loader import load_clip
    from clipguard.models.text_embeddings import compute_text_embeddings
    from clipguard.records.metrics import classification_metrics

    # clip-benchmark 1.6.2's accuracy() breaks on numpy >= 2.4 (0-d array -> float): patch it here only.
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]

    monkeypatch.setattr(zc, "accuracy", accuracy)
    clip = load_clip("ViT-B-32:none", device="cpu", precision="fp32")
    prompts = load_prompts("cifar10", templates="openai")
    templates = prompts.templates[:3]
    # Structured images at the model's size (no resize on either side): smooth colour gradients + noise.
    g = torch.Generator().manual_seed(0)
    base = torch.rand(24, 3, 1, 1, generator=g) * torch.linspace(0, 1, 224).view(1, 1, 1, 224)
    x = ((base + 0.3 * torch.rand(24, 3, 224, 224, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
    y = torch.arange(24) % 10

    emb = compute_text_embeddings(clip, prompts.classnames, templates)
    ours, _ = predict_logits(ZeroShotClassifier.from_clip(clip, emb), x, batch_size=8, progress=False)

    loader = torch.utils.data.DataLoader(_Images(x, y, clip.mean, clip.std, prompts.classnames), batch_size=8)
    weights = zc.zero_shot_classifier(clip.model, clip.tokenizer, prompts.classnames, templates, "cpu", amp=False)
    theirs, target = zc.run_classification(clip.model, weights, loader, "cpu", amp=False)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    # Their logits are 100 * cos; ours are logit_scale * cos with the model's own scale.
    scale = clip.model.logit_scale.exp().item()
    assert torch.allclose(ours / scale, theirs.float() / 100.0, atol=1e-4)
    assert len(set(ours.argmax(1).tolist())) > 1, "images must not all get one class, or equality is trivial"
    m = zc.evaluate(clip.model, loader, clip.tokenizer, prompts.classnames, templates, "cpu", amp=False)
    mine = classification_metrics(ours, y)
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert mine[k] == pytest.approx(m[k], abs=1e-6), k
    assert np.isfinite(mine["acc1"])
