"""Adversarial prompt tuning (APT, `finetune --method prompt`): the prompt learner against open_clip itself, the loss
against its formula, frozen towers, the adapter on every command, and the refusals."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipguard.errors import ClipguardError

TOY_CLASSES = ["red circle", "green circle", "blue square", "red square", "yellow triangle", "blue triangle",
               "green cross", "yellow cross", "purple star", "cyan star"]
# The README's APT row (seed 0): UC, 8 tokens, random init, lr 5e-2, APT's adversary (3 steps, 2/3 eps).
APT = ["--model", "toy", "--dataset", "toy", "--method", "prompt", "--prompt-tokens", "8", "--eps", "4/255",
       "--alpha", "2.67/255", "--steps", "3", "--epochs", "3", "--batch-size", "64", "--lr", "5e-2",
       "--eval-limit", "300", "--eval-batch-size", "100", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _open_clip_text(clip, texts):
    return F.normalize(clip.model.encode_text(clip.tokenizer(texts)).float(), dim=-1)


@pytest.mark.parametrize("class_specific", [False, True])
def test_learner_with_template_words_equals_open_clip_encode_text(toy_clip, class_specific):
    from clipguard.models.prompt_tuning import PromptLearner

    learner = PromptLearner(toy_clip, TOY_CLASSES, init="a photo of a", class_specific=class_specific)
    assert learner.n_ctx == 4 and learner.ctx.shape == ((10, 4, 16) if class_specific else (4, 16))
    with torch.no_grad():
        ours = learner()
        ref = _open_clip_text(toy_clip, [f"a photo of a {c}." for c in TOY_CLASSES])
        other = _open_clip_text(toy_clip, [f"a photo of the {c}." for c in TOY_CLASSES])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert (ours - other).abs().max() > 1e-3  # twin: a different prompt is told apart


def test_gradients_reach_the_context_only(toy_prepared):
    from clipguard.finetune.objectives import OBJECTIVES
    from clipguard.models.prompt_tuning import PromptedClassifier, PromptLearner

    torch.manual_seed(0)
    clf = PromptedClassifier(toy_prepared.classifier, PromptLearner(toy_prepared.clip, TOY_CLASSES, n_ctx=4)).train()
    x, y = toy_prepared.data.images[:8].float() / 255, toy_prepared.data.labels[:8]
    OBJECTIVES.get("tecoa").loss(clf, x, y, None).mean().backward()
    got = [n for n, p in clf.named_parameters() if p.grad is not None]
    assert got == ["prompt_learner.ctx"] and clf.prompt_learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in toy_prepared.clip.model.parameters())


def test_apt_loss_equals_cross_entropy_formula_on_fixed_tensors(toy_prepared):
    """APT's training loss: CE(logit_scale * cos(f(x_adv), g([SOS] ctx classname . [EOT])), y). The reference runs
    open_clip's own encode_image / encode_text, with the context put in by a hook on its token embedding."""
    from clipguard.finetune.objectives import OBJECTIVES
    from clipguard.models.prompt_tuning import PromptedClassifier, PromptLearner

    clip = toy_prepared.clip
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(10, 3, 16, generator=g) * 0.02  # class-specific, fixed
    clf = PromptedClassifier(toy_prepared.classifier,
                             PromptLearner(clip, TOY_CLASSES, n_ctx=3, class_specific=True, ctx=ctx)).train()
    x = torch.rand(6, 3, 32, 32, generator=g)
    y = torch.tensor([0, 3, 9, 5, 1, 8])
    loss = OBJECTIVES.get("tecoa").loss(clf, x, y, None)

    def put_ctx(module, args, out):
        out = out.clone()
        out[:, 1:4] = ctx
        return out

    hook = clip.model.token_embedding.register_forward_hook(put_ctx)
    try:
        with torch.no_grad():
            text = _open_clip_text(clip, [f"X X X {c}." for c in TOY_CLASSES])
    finally:
        hook.remove()
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    with torch.no_grad():
        image = F.normalize(clip.model.encode_image((x - mean) / std), dim=-1)
    s = clip.model.logit_scale.exp() * image @ text.T
    ref = torch.logsumexp(s, dim=1) - s[torch.arange(6), y]
    flipped = torch.logsumexp(s, dim=1) + s[torch.arange(6), y]  # twin: the true-class term's sign flipped
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(loss.detach(), flipped, atol=1e-3)


@pytest.fixture(scope="module")
def apt_run(tmp_path_factory):
    """One short APT run through the CLI; the loaded base model's weights are snapshotted as it loads."""
    from clipguard.cli.app import run
    from clipguard.models import loader

    out, seen, real = tmp_path_factory.mktemp("apt") / "run", [], loader.load_clip

    def spy(*a, **kw):
        clip = real(*a, **kw)
        seen.append((clip, {k: v.detach().clone() for k, v in clip.model.state_dict().items()}))
        return clip

    loader.load_clip = spy
    try:
        assert run(["finetune", *APT, "--eval-base", "--run-dir", str(out), "--json"]) == 0
    finally:
        loader.load_clip = real
    return out, json.loads((out / "record.json").read_text()), seen


def test_prompt_tuning_leaves_both_towers_bit_identical_and_the_adapter_is_small(apt_run):
    out, rec, seen = apt_run
    clip, before = seen[0]  # the model the run trained on
    after = clip.model.state_dict()
    assert before.keys() == after.keys() and any(k.startswith("visual.") for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                     after[k])]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "prompt" and manifest["trainable_params"] == 8 * 16
    size = sum((out / f).stat().st_size for f in [*manifest["files"], "manifest.json"])
    assert size < 16_000, size  # a few KB: the context and what it was made for
    info = json.loads((out / "prompt.json").read_text())
    assert info["n_ctx"] == 8 and not info["class_specific"] and info["classnames"] == TOY_CLASSES


def test_prompt_tuning_raises_robust_accuracy_on_the_toy(apt_run):
    """APT keeps the image tower frozen and gains far less than TeCoA's LoRA on the toy, not the issue's 20 points
    (README: +11.5 with this recipe at seed 0, about none at seed 1); the seed-0 run must show a clear gain over the
    base toy CLIP under PGD-10 4/255 on 300 held-out images (measured +9)."""
    _, rec, _ = apt_run
    base, m = rec["base_metrics"], rec["metrics"]
    assert base["robust_acc"] < 0.40 and base["acc1"] > 0.95
    assert m["robust_acc"] - base["robust_acc"] >= 0.05, (base, m)
    assert m["acc1"] >= 0.70 and rec["finetune"]["method"] == "prompt" and rec["checks_passed"]
    assert any("SGD" in d for d in rec["finetune"]["train"]["method_deviations"])  # the paper's optimizer, named


def test_eval_and_attack_load_the_prompt_adapter(apt_run, cli, tmp_path):
    out, rec, _ = apt_run
    code, stdout, err = cli("eval", "--model", "toy", "--adapter", out, "--dataset", "toy", "--limit", "300",
                            "--batch-size", "100", "--device", "cpu", "--json")
    assert code == 0, err
    got = json.loads(stdout)
    assert got["metrics"]["acc1"] == rec["metrics"]["acc1"]  # the record's numbers come from the adapter alone
    assert got["text_embeddings"]["key"].startswith("prompt-adapter:") and got["text_embeddings"]["cache"] == "none"
    code, stdout, err = cli("attack", "--model", "toy", "--adapter", out, "--limit", "20", "--attack", "fgsm",
                            "--eps", "4/255", "--adv-set", tmp_path / "adv.safetensors", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["config"]["adapter"] == str(out)


def _save_prompt_adapter(d: Path, clip, classnames, *, class_specific=False, base_adapter=None) -> Path:
    from clipguard.models.adapters import save_adapter
    from clipguard.models.prompt_tuning import PromptLearner

    learner = PromptLearner(clip, classnames, n_ctx=2, class_specific=class_specific)
    learner.base_adapter = base_adapter
    save_adapter(d, learner, method="prompt", clip=clip)
    return d


def test_class_specific_prompts_for_other_classes_are_refused_in_one_line(toy_clip, cli, tmp_path):
    from clipguard.models.prompt_tuning import load_prompt_embeddings

    other = _save_prompt_adapter(tmp_path / "other", toy_clip, ["cat", "dog"], class_specific=True)
    code, _, err = cli("eval", "--model", "toy", "--adapter", other, "--limit", "10", "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "class-specific prompts for 2 other classes" in lines[0], err
    mine = _save_prompt_adapter(tmp_path / "mine", toy_clip, TOY_CLASSES, class_specific=True)  # twin: accepted
    assert load_prompt_embeddings(mine, toy_clip, TOY_CLASSES).embeddings.shape == (10, 64)
    unified = _save_prompt_adapter(tmp_path / "uc", toy_clip, ["cat", "dog"])  # a unified context transfers
    assert load_prompt_embeddings(unified, toy_clip, TOY_CLASSES).embeddings.shape == (10, 64)


def test_base_adapter_stacks_and_a_mismatch_is_refused(toy_clip, tmp_path):
    from clipguard.models.adapters import save_adapter
    from clipguard.models.prompt_tuning import file_digest
    from clipguard.models.vpt import PromptedVisual
    from clipguard.run_options import RunOptions
    from clipguard.tasks.setup import adapted

    def vpt(name, seed):
        torch.manual_seed(seed)
        save_adapter(tmp_path / name, PromptedVisual(toy_clip.model.visual, 2), method="vpt", clip=toy_clip)
        return str(tmp_path / name)

    tower, other = vpt("tecoa", 0), vpt("other", 1)
    prompt = _save_prompt_adapter(tmp_path / "apt", toy_clip, TOY_CLASSES,
                                  base_adapter={"path": tower, "digest": file_digest(tower)})
    visual, text = adapted(RunOptions(adapter=str(prompt), base_adapter=tower), toy_clip, TOY_CLASSES)
    assert isinstance(visual, PromptedVisual) and text.embeddings.shape == (10, 64)
    for run, words in [(RunOptions(adapter=str(prompt)), "pass --base-adapter"),
                       (RunOptions(adapter=str(prompt), base_adapter=other), "is not the image-tower adapter"),
                       (RunOptions(adapter=tower, base_adapter=tower), "is an image-tower adapter too"),
                       (RunOptions(adapter=str(_save_prompt_adapter(tmp_path / "bare", toy_clip, TOY_CLASSES)),
                                   base_adapter=tower), "leave --base-adapter out")]:
        with pytest.raises(ClipguardError, match=words) as e:
            adapted(run, toy_clip, TOY_CLASSES)
        assert "\n" not in str(e.value)


def test_public_load_classifier_stacks_a_prompt_adapter_on_its_base(toy_clip, tmp_path):
    """``load_classifier(adapter=PROMPT, base_adapter=TOWER)`` is the classifier the commands build from
    ``--adapter PROMPT --base-adapter TOWER``; without the base it is refused in one line, as on the command line."""
    from clipguard import load_classifier
    from clipguard.models.adapters import save_adapter
    from clipguard.models.prompt_tuning import file_digest
    from clipguard.models.vpt import PromptedVisual
    from clipguard.run_options import RunOptions
    from clipguard.tasks.setup import prepare

    torch.manual_seed(0)
    tower = tmp_path / "tower"
    save_adapter(tower, PromptedVisual(toy_clip.model.visual, 2), method="vpt", clip=toy_clip)
    prompt = _save_prompt_adapter(tmp_path / "apt", toy_clip, TOY_CLASSES,
                                  base_adapter={"path": str(tower), "digest": file_digest(tower)})
    clf = load_classifier("toy", dataset="toy", adapter=str(prompt), base_adapter=str(tower), device="cpu")
    p = prepare(RunOptions(model="toy", dataset="toy", limit=20, adapter=str(prompt), base_adapter=str(tower),
                           device="cpu", precision="fp32"))
    x = p.data.images.float() / 255
    with torch.no_grad():
        torch.testing.assert_close(clf(x), p.classifier(x))
        bare = load_classifier("toy", dataset="toy", device="cpu")  # twin: the stack changes the logits
        assert (bare(x) - clf(x)).abs().max() > 1e-3
    with pytest.raises(ClipguardError, match="pass --base-adapter"):
        load_classifier("toy", dataset="toy", adapter=str(prompt), device="cpu")


def test_prompt_options_are_checked(toy_clip, tmp_path):
    from clipguard.finetune.config import finetune_config
    from clipguard.models.prompt_tuning import PromptLearner

    with pytest.raises(ClipguardError, match="use --prompt-tokens 10 or fewer"):
        PromptLearner(toy_clip, TOY_CLASSES, n_ctx=16)  # the toy's text context holds 16 tokens
    with pytest.raises(ClipguardError, match="--objective fare never reads the class text"):
        finetune_config(method="prompt", objective="fare", run_dir=str(tmp_path / "run"))
    with pytest.raises(ClipguardError, match="--base-adapter is the frozen image tower under --method prompt"):
        finetune_config(method="lora", base_adapter="x", run_dir=str(tmp_path / "run"))
    assert finetune_config(method="prompt", prompt_tokens=4, run_dir=str(tmp_path / "run")).method == "prompt"


def test_resume_continues_prompt_tuning_bit_for_bit(tmp_path, kill_at_checkpoint):
    from clipguard.finetune.config import finetune_config
    from clipguard.tasks.finetune import run_finetune

    opts = dict(model="toy", dataset="toy", limit=128, method="prompt", prompt_tokens=2, max_steps=4, save_every=2,
                batch_size=32, eps="4/255", lr=5e-2, device="cpu", eval_limit=10, eval_batch_size=10, eval_steps=1)
    run_finetune(finetune_config(**opts, run_dir=str(tmp_path / "whole")), progress=False)
    killed = kill_at_checkpoint(2)
    with pytest.raises(killed):
        run_finetune(finetune_config(**opts, run_dir=str(tmp_path / "cut")), progress=False)
    kill_at_checkpoint(-1)
    run_finetune(finetune_config(**opts, resume=str(tmp_path / "cut")), progress=False)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "prompt_ctx.safetensors"))["ctx"] for d in ("whole", "cut"))
    assert torch.equal(a, b)


def test_public_load_classifier_takes_its_class_embeddings_from_a_prompt_adapter(toy_clip, tmp_path):
    from clipguard import load_classifier
    from clipguard.models.prompt_tuning import load_prompt_embeddings

    d = _save_prompt_adapter(tmp_path / "uc", toy_clip, TOY_CLASSES)
    clf = load_classifier("toy", dataset="toy", adapter=str(d), device="cpu")
    torch.testing.assert_close(clf.text_embeddings, load_prompt_embeddings(d, toy_clip, TOY_CLASSES).embeddings)
    plain = load_classifier("toy", dataset="toy", device="cpu")  # twin: the templates' embeddings differ
    assert (plain.text_embeddings - clf.text_embeddings).abs().max() > 1e-3


def test_base_adapter_alone_is_refused_outside_prompt_training(cli, tmp_path):
    """--base-adapter without a prompt --adapter evaluated the adapted tower while the record named no adapter, so a
    report labelled it the bare model. Now one line says to pass it as --adapter; as --adapter it runs (twin)."""
    code, _, err = cli("finetune", "--model", "toy", "--dataset", "toy", "--limit", "64", "--epochs", "1",
                       "--batch-size", "32", "--eval-limit", "8", "--eval-steps", "1", "--device", "cpu",
                       "--run-dir", tmp_path / "lora")
    assert code == 0, err
    code, _, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "8", "--device", "cpu",
                       "--base-adapter", tmp_path / "lora")
    assert code == 2 and "pass it as --adapter" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "8", "--device", "cpu",
                         "--adapter", tmp_path / "lora", "--json")
    assert code == 0 and json.loads(out)["adapter"] == str(tmp_path / "lora")



def test_records_tell_an_adapter_from_one_trained_again_into_its_folder(cli, tmp_path):
    """A record names an adapter by path and by what it held (sha256 over its weight files, method, the fine-tune's
    config hash): an adapter trained again into the same folder with another --lr gives the same path and another
    digest; the same adapter evaluated twice gives the same digest (twin)."""
    import shutil

    def train(lr):
        code, _, err = cli("finetune", "--model", "toy", "--dataset", "toy", "--limit", "64", "--epochs", "1",
                           "--batch-size", "32", "--lr", lr, "--eval-limit", "8", "--eval-steps", "1", "--device",
                           "cpu", "--run-dir", tmp_path / "lora")
        assert code == 0, err

    def evaluated():
        code, out, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "8", "--device", "cpu",
                             "--adapter", tmp_path / "lora", "--json")
        assert code == 0, err
        return json.loads(out)["adapters"]["adapter"]

    train("1e-2")
    first, again = evaluated(), evaluated()
    manifest = json.loads((tmp_path / "lora" / "manifest.json").read_text())
    assert first == again and first["path"] == str(tmp_path / "lora") and first["method"] == "lora"
    assert first["config_hash"] == manifest["config_hash"] and first["weights_digest"].startswith("sha256:")
    shutil.rmtree(tmp_path / "lora")
    train("2e-2")
    retrained = evaluated()
    assert retrained["path"] == first["path"] and retrained["weights_digest"] != first["weights_digest"]
    assert retrained["config_hash"] != first["config_hash"]
