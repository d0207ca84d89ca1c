"""--objective pmg (PMG-AFT, CVPR 2024) and --objective tga (TGA-ZSR, NeurIPS 2024): each loss against its paper's
equation computed here on fixed tensors (and a sign-flipped twin that must not match), the adversary they train on,
the non-ViT refusal, the options, and the toy acceptance (>= 20 points of PGD-10 4/255 robust accuracy)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.finetune.config import config_hash, finetune_config
from clipguard.finetune.objectives import OBJECTIVES, Guide

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TINY = dict(model="toy", dataset="toy", limit=256, epochs=1, batch_size=64, eps="4/255", lr=1e-2, device="cpu",
            run_dir="unused")  # configs only: nothing is written


def _bound(name, **opts):
    return OBJECTIVES.get(name).bind(finetune_config(**TINY, objective=name, **opts))


@pytest.fixture(scope="module")
def models(toy_prepared):
    """(model being trained: the toy classifier with every visual weight nudged, frozen original, clean, adv, y)."""
    frozen = toy_prepared.classifier.eval()
    trained = copy.deepcopy(frozen)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in trained.visual.parameters():
            q.add_(0.05 * q.abs().mean() * torch.randn(q.shape, generator=g))
    clean = torch.rand(6, 3, *frozen.input_size, generator=g)
    adv = (clean + (8 / 255) * torch.randn(clean.shape, generator=g).sign()).clamp(0, 1)
    y = torch.tensor([0, 1, 2, 3, 4, 5]) % frozen.text_embeddings.shape[0]
    return trained, frozen, clean, adv, y


# ---- PMG-AFT: L = CE(f(x'), y) + a KL(f0(x') || f(x')) + b KL(f(x) || f(x'))  (KL over softmax outputs)

def _pmg_paper(trained, frozen, clean, adv, y, a, b, signs=(1, 1, 1)):
    out, out_orig, out_clean = trained(adv), frozen(adv), trained(clean)
    kl = nn.KLDivLoss(reduction="none")  # KLDivLoss(log q, p) = p (log p - log q): KL(p || q), as the code calls it
    general = kl(F.log_softmax(out, 1), F.softmax(out_orig, 1)).sum(1)
    clean_term = kl(F.log_softmax(out, 1), F.softmax(out_clean, 1)).sum(1)
    ce = -F.log_softmax(out, 1).gather(1, y[:, None]).squeeze(1)
    return signs[0] * ce + signs[1] * a * general + signs[2] * b * clean_term


def test_pmg_equals_the_paper_equation(models):
    trained, frozen, clean, adv, y = models
    loss = _bound("pmg", pmg_general_weight=0.7, pmg_clean_weight=1.3).loss(trained, adv, y, Guide(clean, frozen))
    want = _pmg_paper(trained, frozen, clean, adv, y, 0.7, 1.3)
    assert loss.shape == (6,) and torch.allclose(loss, want, atol=1e-5), (loss, want)
    # every term is live here: each moves the loss well past the tolerance the comparison uses
    assert (want - _pmg_paper(trained, frozen, clean, adv, y, 0.7, 0.0)).abs().max() > 1e-3
    assert (want - _pmg_paper(trained, frozen, clean, adv, y, 0.0, 1.3)).abs().max() > 1e-3


@pytest.mark.parametrize("signs", [(-1, 1, 1), (1, -1, 1), (1, 1, -1)])
def test_pmg_twin_with_a_flipped_term_does_not_match(models, signs):
    trained, frozen, clean, adv, y = models
    loss = _bound("pmg", pmg_general_weight=0.7, pmg_clean_weight=1.3).loss(trained, adv, y, Guide(clean, frozen))
    assert not torch.allclose(loss, _pmg_paper(trained, frozen, clean, adv, y, 0.7, 1.3, signs), atol=1e-5)


def test_pmg_defaults_are_the_papers_code():
    cfg = finetune_config(**TINY, objective="pmg")
    assert (cfg.pmg_general_weight, cfg.pmg_clean_weight) == (1.0, 1.0)


# ---- TGA-ZSR: L = CE(f(x'), y) + a ||A(x') - A0(x)||_2 + b ||A(x) - A0(x)||_2, with A the text-guided attention

def _tokens_paper(clf, x):
    """Projected post-LN tokens (N, 1 + P, D) through open_clip's own output_tokens path (not the hook)."""
    v = copy.copy(clf.visual)
    v.output_tokens = True
    pooled, patches = v(clf.preprocess(x))  # pooled: ln_post(class token) @ proj; patches: ln_post(patch tokens)
    return torch.cat([pooled[:, None], patches @ v.proj], dim=1)


def _attention_paper(clf, x, text):
    feats = _tokens_paper(clf, x)
    feats = feats / feats.norm(dim=1, keepdim=True)  # the code: image_features.norm(dim=1), the token axis
    am = torch.einsum("npd,nd->np", feats[:, 1:], text)
    am = (am - am.min(1, keepdim=True)[0]) / (am.max(1, keepdim=True)[0] - am.min(1, keepdim=True)[0])
    side = int(am.shape[1] ** 0.5)
    return F.interpolate(am.reshape(-1, 1, side, side), clf.input_size, mode="bilinear").reshape(len(x), -1)


def _tga_paper(trained, frozen, clean, adv, y, a, b, signs=(1, 1, 1)):
    text = frozen.text_embeddings[y]
    logits = trained.logit_scale * F.normalize(trained.visual(trained.preprocess(adv)), dim=-1) \
        @ trained.text_embeddings.T
    ce = F.cross_entropy(logits, y, reduction="none")
    orig = _attention_paper(frozen, clean, text)
    refine = torch.linalg.vector_norm(_attention_paper(trained, adv, text) - orig, dim=1)
    constraint = torch.linalg.vector_norm(_attention_paper(trained, clean, text) - orig, dim=1)
    return signs[0] * ce + signs[1] * a * refine + signs[2] * b * constraint


def test_tga_equals_the_paper_equation(models):
    trained, frozen, clean, adv, y = models
    loss = _bound("tga", tga_refine_weight=0.3, tga_constraint_weight=0.2).loss(trained, adv, y, Guide(clean, frozen))
    want = _tga_paper(trained, frozen, clean, adv, y, 0.3, 0.2)
    assert loss.shape == (6,) and torch.allclose(loss, want, atol=1e-5), (loss, want)
    assert (want - _tga_paper(trained, frozen, clean, adv, y, 0.3, 0.0)).abs().max() > 1e-3
    assert (want - _tga_paper(trained, frozen, clean, adv, y, 0.0, 0.2)).abs().max() > 1e-3


@pytest.mark.parametrize("signs", [(-1, 1, 1), (1, -1, 1), (1, 1, -1)])
def test_tga_twin_with_a_flipped_term_does_not_match(models, signs):
    trained, frozen, clean, adv, y = models
    loss = _bound("tga", tga_refine_weight=0.3, tga_constraint_weight=0.2).loss(trained, adv, y, Guide(clean, frozen))
    assert not torch.allclose(loss, _tga_paper(trained, frozen, clean, adv, y, 0.3, 0.2, signs), atol=1e-5)


def test_tga_defaults_are_the_papers():
    cfg = finetune_config(**TINY, objective="tga")
    assert (cfg.tga_refine_weight, cfg.tga_constraint_weight) == (0.08, 0.05)


def test_tga_attention_under_vpt_reads_the_patch_tokens(models):
    """VPT inserts prompt tokens; the map still reads the last grid tokens, and equals the unprompted map when
    the prompts are dropped (they are: VPT removes them before pooling), so at any prompt values it is a map."""
    from clipguard.models.classifier import ZeroShotClassifier
    from clipguard.models.vpt import PromptedVisual

    trained, frozen, clean, adv, y = models
    # a new classifier: copy.copy of a module shares its _modules dict, so setting .visual on a shallow copy would
    # put the prompts into the session's toy_prepared classifier too (what broke test_prompt_tuning in CI)
    vpt = ZeroShotClassifier(PromptedVisual(frozen.visual, 3), frozen.text_embeddings, frozen.logit_scale,
                             frozen.mean.flatten().tolist(), frozen.std.flatten().tolist(), frozen.input_size)
    loss = _bound("tga").loss(vpt, adv, y, Guide(clean, frozen))
    assert loss.shape == (6,) and torch.isfinite(loss).all()
    assert loss.requires_grad  # the prompts receive gradients through the attention terms too


def test_tga_is_refused_on_a_non_vit_tower_in_one_line():
    from open_clip.model import ModifiedResNet

    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=8, heads=2, image_size=32, width=8)
    with pytest.raises(ClipguardError) as e:
        OBJECTIVES.get("tga").check(resnet)
    msg = str(e.value)
    assert "\n" not in msg and "ModifiedResNet" in msg and "--objective" in msg


def test_finetune_setup_refuses_tga_on_a_resnet_tower(toy_prepared):
    """Through the loop: the refusal comes from setup, before a tower is built or a step is taken."""
    from dataclasses import replace
    from types import SimpleNamespace

    from open_clip.model import ModifiedResNet

    from clipguard.finetune.loop import setup

    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=64, heads=2, image_size=32, width=8)
    clip = replace(toy_prepared.clip, model=SimpleNamespace(visual=resnet))  # the shared fixture stays as it is
    p = replace(toy_prepared, clip=clip)
    with pytest.raises(ClipguardError, match="^--objective tga needs an open_clip ViT image tower.*ModifiedResNet"):
        setup(finetune_config(**TINY, objective="tga"), p)
    assert setup(finetune_config(**TINY, objective="tga"), toy_prepared).objective.name == "tga"  # twin: a ViT


@pytest.mark.parametrize("arch", ["RN50", "ViT-B-32", "ViT-B-16-SigLIP", "coca_ViT-B-32", "convnext_base",
                                  "ViT-B-32-256"])
def test_tga_refusal_from_the_spec_agrees_with_the_loaded_tower(arch):
    """The spec's verdict (before weights load) is the loaded tower's verdict, on real open_clip architectures built
    at random init: a precheck that refused a ViT, or let a ResNet / timm tower through, would disagree here."""
    import open_clip

    from clipguard.finetune.objectives import check_vit_spec

    torch.manual_seed(0)
    visual = open_clip.create_model(arch, pretrained=None).visual
    try:
        OBJECTIVES.get("tga").check(visual)
        loaded = None
    except ClipguardError as e:
        loaded = str(e)
    try:
        check_vit_spec(f"{arch}:none")
        early = None
    except ClipguardError as e:
        early = str(e)
    assert (early is None) == (loaded is None), (early, loaded)
    if early:
        assert "\n" not in early and arch in early and "--objective" in early


def test_finetune_refuses_tga_before_any_weights_load(cli, tmp_path):
    """RN50:openai is not in this machine's cache and the hub is unreachable: had the model loaded first, the error
    would be the missing weights. A transformers: checkpoint that does not exist is refused alike, by its kind."""
    code, _, err = cli("finetune", "--model", "RN50:openai", "--objective", "tga", "--run-dir", tmp_path / "r")
    assert code == 2 and "ResNet" in err and "--objective tga" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("finetune", "--model", "transformers:someone/clip", "--objective", "tga",
                       "--run-dir", tmp_path / "r")
    assert code == 2 and "transformers checkpoint" in err
    assert finetune_config(**TINY, objective="tga").objective == "tga"  # twin: the toy ViT passes the spec check


def test_tga_check_accepts_the_toy_vit_also_under_lora(toy_clip):
    from clipguard.models.adapters import apply_lora

    OBJECTIVES.get("tga").check(toy_clip.model.visual)  # the twin of the refusal: a ViT passes
    OBJECTIVES.get("tga").check(apply_lora(copy.deepcopy(toy_clip.model.visual), 4, 8, 0.0, None)[0])


# ---- the adversary: both papers' training PGD maximises the cross-entropy, not the whole guided loss

def test_training_adversary_ascends_the_cross_entropy_only(models):
    from contextlib import nullcontext
    from dataclasses import replace

    from clipguard.finetune.adversary import build_train_attack

    trained, frozen, clean, adv, y = models
    eps = finetune_config(**TINY).eps  # 4/255

    def craft(objective):
        torch.manual_seed(0)
        attack = build_train_attack("pgd", trained, objective, surrogate=None, eps=eps, alpha=eps, steps=3,
                                    autocast=nullcontext)
        return attack(clean, y, Guide(clean, frozen))

    pmg = _bound("pmg")
    x_pmg, x_tecoa = craft(pmg), craft(OBJECTIVES.get("tecoa"))
    assert torch.equal(x_pmg, x_tecoa)  # TeCoA's adversary, as PMG-AFT's and TGA-ZSR's code use
    x_whole = craft(replace(pmg, adversary_loss=None))  # the twin: ascending the whole PMG loss differs
    assert not torch.equal(x_pmg, x_whole)


# ---- options

def test_weights_are_refused_with_another_objective():
    with pytest.raises(ClipguardError, match="--pmg-clean-weight is used only with --objective pmg"):
        finetune_config(**TINY, objective="tecoa", pmg_clean_weight=0.5)
    with pytest.raises(ClipguardError, match="--tga-refine-weight is used only with --objective tga"):
        finetune_config(**TINY, objective="pmg", tga_refine_weight=0.1)
    finetune_config(**TINY, objective="pmg", pmg_clean_weight=0.5)  # the twin: with its own objective it is taken
    with pytest.raises(ClipguardError, match="--method prompt leaves"):
        finetune_config(**TINY, objective="tga", method="prompt")


def test_weights_at_default_leave_the_hash_alone_and_change_it_otherwise():
    base = config_hash(finetune_config(**TINY, objective="pmg"))
    assert config_hash(finetune_config(**TINY, objective="pmg", pmg_general_weight=1.0)) == base
    assert config_hash(finetune_config(**TINY, objective="pmg", pmg_general_weight=0.5)) != base


# ---- acceptance on the toy world: README's recipe (LoRA r=8, PGD-2 4/255 training, 3 epochs, batch 64, lr 1e-2),
# PGD-10 4/255 on 300 held-out images

@pytest.fixture(scope="module", params=["pmg", "tga"])
def toy_run(request, tmp_path_factory):
    from clipguard.cli.app import run

    out = tmp_path_factory.mktemp("ft") / request.param
    assert run(["finetune", "--model", "toy", "--dataset", "toy", "--eps", "4/255", "--epochs", "3", "--batch-size",
                "64", "--lr", "1e-2", "--method", "lora", "--objective", request.param, "--eval-limit", "300",
                "--eval-batch-size", "100", "--device", "cpu", "--eval-base", "--run-dir", str(out), "--json"]) == 0
    return request.param, json.loads((out / "record.json").read_text())


def test_toy_robust_accuracy_rises_by_20_points(toy_run):
    name, rec = toy_run
    base, m = rec["base_metrics"], rec["metrics"]
    assert base["robust_acc"] < 0.40 and base["acc1"] > 0.95
    assert m["robust_acc"] - base["robust_acc"] >= 0.20, (name, base, m)
    assert m["acc1"] >= 0.70
    train = rec["finetune"]["train"]
    assert rec["finetune"]["objective"] == name and train["objective_deviations"]  # deviations in the record
    assert train["objective_options"] == ({"pmg_general_weight": 1.0, "pmg_clean_weight": 1.0} if name == "pmg"
                                          else {"tga_refine_weight": 0.08, "tga_constraint_weight": 0.05})
