import pytest
import torch

from clipguard.errors import ClipguardError
from clipguard.models.classifier import ZeroShotClassifier
from clipguard.models.loader import load_clip, resolve_precision


def test_unknown_arch_lists_close_matches():
    with pytest.raises(ClipguardError, match="ViT-B-32"):
        load_clip("ViT-B-33:openai", device="cpu")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ClipguardError, match="openai"):
        load_clip("ViT-B-32:nosuchtag", device="cpu")


def test_truncated_safetensors_is_a_clear_error(tmp_path, toy_clip):
    from clipguard.models.toy import toy_weights_path

    data = toy_weights_path().read_bytes()
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ClipguardError, match="truncated"):
        load_clip(f"clipguard-toy:{bad}", device="cpu")


def test_local_weights_file_gets_a_digest_fingerprint(toy_clip):
    from clipguard.models.toy import toy_weights_path

    clip = load_clip(f"clipguard-toy:{toy_weights_path()}", device="cpu")
    assert clip.fingerprint.startswith("sha256:") and clip.fingerprint == toy_clip.fingerprint


def test_toy_loader_contract(toy_clip):
    assert toy_clip.input_size == (32, 32) and toy_clip.device.type == "cpu"
    assert toy_clip.precision == "fp32" and not toy_clip.model.training
    assert not any(p.requires_grad for p in toy_clip.model.parameters())
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_classifier_resizes_and_is_differentiable(toy_clip):
    emb = torch.nn.functional.normalize(torch.randn(10, toy_clip.model.text_projection.shape[1]), dim=-1)
    clf = ZeroShotClassifier.from_clip(toy_clip, emb)
    x = torch.rand(4, 3, 48, 40, requires_grad=True)  # any size goes in
    logits = clf(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Already at input size: no resize, so the result equals a manual normalise + encode.
    y = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(toy_clip.mean).view(1, 3, 1, 1), torch.tensor(toy_clip.std).view(1, 3, 1, 1)
    manual = torch.nn.functional.normalize(toy_clip.model.encode_image((y - mean) / std), dim=-1)
    ref = toy_clip.model.logit_scale.exp() * manual @ emb.T
    assert torch.allclose(clf(y), ref, atol=1e-5)
