"""Adapters: what LoRA wraps and trains, VPT token handling, save/load round trips, base-model checks."""

import copy

import pytest
import torch
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.models.adapters import (
    apply_lora,
    load_adapter,
    read_manifest,
    save_adapter,
    trainable_parameters,
    visual_attention_names,
)
from clipguard.models.vpt import PromptedVisual

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _randomise_lora(visual: nn.Module, seed: int = 0) -> None:
    """LoRA starts with B = 0 (a no-op); give every LoRA tensor a value so outputs and gradients move."""
    g = torch.Generator().manual_seed(seed)
    for name, p in visual.named_parameters():
        if "lora_" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_vit_b32_lora_wraps_exactly_the_visual_attention():
    from peft.tuners.lora.layer import LoraLayer

    from clipguard.models.loader import load_clip

    clip = load_clip("ViT-B-32:none", device="cpu", precision="fp32")
    base = clip.model.visual
    attn = visual_attention_names(base)
    assert attn == [f"transformer.resblocks.{i}.attn" for i in range(12)]
    visual, config = apply_lora(copy.deepcopy(base), r=8, alpha=32)
    wrapped = sorted(n for n, m in visual.named_modules() if isinstance(m, LoraLayer)
                     and isinstance(m.get_base_layer(), nn.MultiheadAttention))
    assert wrapped == sorted(attn)
    assert trainable_parameters(visual) == 442_368
    assert all(p.requires_grad == ("lora_" in n) for n, p in visual.named_parameters())
    assert not any(p.requires_grad for p in base.parameters())  # the base tower is untouched

    _randomise_lora(visual)
    visual(torch.rand(1, 3, 224, 224)).square().sum().backward()
    grads = {n: p.grad for n, p in visual.named_parameters()}
    lora = [n for n in grads if "lora_" in n]
    assert len(lora) == 12 * 4  # lora_A/B for in_proj and for out_proj in every block
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in lora)
    assert all(g is None for n, g in grads.items() if "lora_" not in n)


def test_lora_base_weights_do_not_drift(toy_clip):
    """peft's MultiheadAttention LoRA merges/unmerges around every forward; (W + d) - d is not W in float."""
    visual, _ = apply_lora(copy.deepcopy(toy_clip.model.visual))
    _randomise_lora(visual)
    before = {k: v.clone() for k, v in visual.state_dict().items() if "lora_" not in k}
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        first = visual(x)
        for _ in range(20):
            last = visual(x)
    assert torch.equal(first, last)
    after = {k: v for k, v in visual.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("targets,needle", [(["out_proj"], "out_proj"), (["nosuch"], "nosuch")])
def test_bad_lora_targets_are_refused(toy_clip, targets, needle):
    with pytest.raises(ClipguardError, match=needle):
        apply_lora(copy.deepcopy(toy_clip.model.visual), targets=targets)


def test_lora_mlp_targets(toy_clip):
    visual, _ = apply_lora(copy.deepcopy(toy_clip.model.visual), r=8, targets=["c_fc", "c_proj"])
    assert trainable_parameters(visual) == 2 * 8 * (64 + 256) * 2  # 2 blocks x (c_fc + c_proj)


def _two_train_forwards(visual: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    _randomise_lora(visual)
    visual.train()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return visual(x), visual(x)


def test_lora_dropout_never_applies_on_attention_so_it_is_refused(toy_clip):
    """peft's MultiheadAttention LoRA merges the LoRA weights into the attention weights for each forward:
    dropout on the LoRA path never runs (two train-mode passes agree exactly), so asking for it is an error."""
    from peft import LoraConfig, inject_adapter_in_model

    visual = copy.deepcopy(toy_clip.model.visual)
    targets = visual_attention_names(visual)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=32, lora_dropout=0.5, target_modules=targets), visual)
    a, b = _two_train_forwards(visual)
    assert torch.equal(a, b)  # peft took dropout 0.5 and ignored it
    for t in (None, ["attn"], ["attn", "c_fc"]):
        with pytest.raises(ClipguardError, match="--lora-dropout 0"):
            apply_lora(copy.deepcopy(toy_clip.model.visual), dropout=0.5, targets=t)
    assert apply_lora(copy.deepcopy(toy_clip.model.visual))[1].lora_dropout == 0.0  # the default


def test_lora_dropout_applies_on_linear_targets(toy_clip):
    visual, cfg = apply_lora(copy.deepcopy(toy_clip.model.visual), dropout=0.5, targets=["c_fc", "c_proj"])
    assert cfg.lora_dropout == 0.5
    a, b = _two_train_forwards(visual)
    assert not torch.allclose(a, b)
    visual.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(visual(x), visual(x))


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_vpt_tokens_are_removed_before_pooling(pool):
    """With an identity transformer the prompts cannot touch the image tokens, so a prompted tower must
    give exactly the base output for both poolings (i.e. the prompts were dropped before pooling)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vt = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                           output_dim=16, pool_type=pool).eval()
    vt.transformer = nn.Identity()
    vpt = PromptedVisual(vt, 5)
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(vpt(x), vt(x), atol=1e-6)


def test_vpt_trains_only_the_tokens(toy_clip):
    base = toy_clip.model.visual
    before = {k: v.clone() for k, v in base.state_dict().items()}
    vpt = PromptedVisual(base, 10)
    assert [n for n, p in vpt.named_parameters() if p.requires_grad] == ["prompts"]
    x = torch.rand(4, 3, 32, 32)
    assert not torch.allclose(vpt(x), base(x))  # the tokens do take part
    vpt(x).square().sum().backward()
    assert vpt.prompts.grad is not None and vpt.prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def _build(method: str, clip) -> nn.Module:
    if method == "lora":
        visual = apply_lora(copy.deepcopy(clip.model.visual))[0]
        _randomise_lora(visual)
    elif method == "vpt":
        visual = PromptedVisual(clip.model.visual, 4)
    else:
        visual = copy.deepcopy(clip.model.visual)
        visual.proj.data.add_(0.01)
    return visual.eval()


@pytest.mark.parametrize("method", ["lora", "vpt", "full"])
def test_save_load_round_trip(toy_clip, tmp_path, method):
    visual = _build(method, toy_clip)
    save_adapter(tmp_path, visual, method=method, clip=toy_clip, info={"objective": "tecoa"})
    manifest = read_manifest(tmp_path)
    assert manifest["base"]["spec"] == "toy" and manifest["base"]["fingerprint"] == toy_clip.fingerprint
    assert manifest["method"] == method and manifest["objective"] == "tecoa"
    loaded = load_adapter(tmp_path, toy_clip)
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), visual(x))
        assert not torch.allclose(loaded(x), toy_clip.model.visual(x))


def test_lora_adapter_is_peft_format(toy_clip, tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file

    save_adapter(tmp_path, _build("lora", toy_clip), method="lora", clip=toy_clip)
    cfg = LoraConfig.from_pretrained(str(tmp_path))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 32, 0.0)
    assert sorted(cfg.target_modules) == visual_attention_names(toy_clip.model.visual)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 8 and all("lora_" in k for k in keys)


def test_adapter_for_another_base_is_refused_naming_both(toy_clip, tmp_path, cli):
    save_adapter(tmp_path, _build("vpt", toy_clip), method="vpt", clip=toy_clip)
    code, _, err = cli("eval", "--model", "toy@seed1", "--adapter", tmp_path, "--limit", "10", "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "'toy'" in lines[0] and "'toy@seed1'" in lines[0]


@pytest.mark.parametrize("make,needle", [(lambda p: p / "missing", "no such directory"),
                                         (lambda p: p, "manifest.json")])
def test_not_an_adapter(toy_clip, tmp_path, make, needle):
    with pytest.raises(ClipguardError, match=needle):
        load_adapter(make(tmp_path), toy_clip)


def test_adapter_from_before_weight_digests_matches_its_base_by_name(toy_clip, tmp_path, caplog):
    """Pretrained tags used to be fingerprinted by name alone (ViT-B-32:openai); now the weights digest follows
    (ViT-B-32:openai@sha256:...). An older adapter still loads on the same name, with a warning; a digest
    that differs is refused."""
    import dataclasses

    old = dataclasses.replace(toy_clip, fingerprint="clipguard-toy:fake")
    save_adapter(tmp_path, _build("vpt", toy_clip), method="vpt", clip=old)
    now = dataclasses.replace(toy_clip, fingerprint="clipguard-toy:fake@sha256:" + "1" * 64)
    with caplog.at_level("WARNING"):
        load_adapter(tmp_path, now)
    assert "without a weights digest" in caplog.text
    save_adapter(tmp_path, _build("vpt", toy_clip), method="vpt", clip=now)
    with pytest.raises(ClipguardError, match="was made for base model"):
        load_adapter(tmp_path, dataclasses.replace(toy_clip, fingerprint="clipguard-toy:fake@sha256:" + "2" * 64))
    with pytest.raises(ClipguardError, match="was made for base model"):
        load_adapter(tmp_path, dataclasses.replace(toy_clip, fingerprint="clipguard-toy:other@sha256:" + "1" * 64))
