"""Robust fine-tuning on the toy world: acceptance numbers, resume, VPT invariants, bad input, the CLI."""

import json
from dataclasses import replace

import pytest
import torch

from clipguard.errors import ClipguardError
from clipguard.finetune.config import finetune_config

# The toy acceptance setting: PGD 4/255 (2 steps) training, PGD-10 4/255 evaluation on 300 held-out images.
TRAIN = ["--model", "toy", "--dataset", "toy", "--eps", "4/255", "--epochs", "3", "--batch-size", "64"]
EVAL = ["--eval-limit", "300", "--eval-batch-size", "100", "--device", "cpu"]
# A few steps on 256 images and a token evaluation: for tests of mechanics, not of robustness.
TINY = dict(model="toy", dataset="toy", limit=256, epochs=2, batch_size=64, eps="4/255", lr=1e-2, device="cpu",
            eval_limit=20, eval_batch_size=20, eval_steps=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _finetune(out, *args) -> dict:
    from clipguard.cli.app import run

    assert run(["finetune", *TRAIN, *EVAL, "--run-dir", str(out), "--json", *args]) == 0
    return json.loads((out / "record.json").read_text())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "lora"
    return out, _finetune(out, "--method", "lora", "--lr", "1e-2", "--eval-base")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "full"
    return out, _finetune(out, "--method", "full", "--lr", "1e-3")


def test_lora_tecoa_raises_robust_accuracy_by_20_points(lora_run):
    out, rec = lora_run
    base, m = rec["base_metrics"], rec["metrics"]
    assert base["robust_acc"] < 0.40 and base["acc1"] > 0.95  # the toy CLIP breaks at 4/255
    assert m["robust_acc"] - base["robust_acc"] >= 0.20, (base, m)
    assert m["acc1"] >= 0.70
    assert rec["task"] == "finetune" and rec["attack"]["steps"] == 10 and rec["attack"]["eps"][0]["text"] == "4/255"
    assert rec["finetune"]["train"]["trainable_params"] == 6_144 and rec["finetune"]["train"]["wall_s"] < 90
    assert rec["checks_passed"] and (out / "manifest.json").is_file() and (out / "adapter_config.json").is_file()


def test_full_finetuning_does_at_least_as_well(lora_run, full_run):
    assert full_run[1]["metrics"]["robust_acc"] >= lora_run[1]["metrics"]["robust_acc"]
    assert full_run[1]["metrics"]["acc1"] >= 0.70


def test_eval_with_adapter_reproduces_the_record(lora_run, cli):
    out, rec = lora_run
    code, stdout, err = cli("eval", "--model", "toy", "--adapter", out, "--dataset", "toy", "--limit", "300",
                            "--batch-size", "100", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["metrics"]["acc1"] == rec["metrics"]["acc1"]


def test_attack_loads_the_adapter(lora_run, cli, tmp_path):
    out, _ = lora_run
    code, stdout, err = cli("attack", "--model", "toy", "--adapter", out, "--limit", "20", "--attack", "fgsm",
                            "--eps", "4/255", "--adv-set", tmp_path / "adv.safetensors", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["config"]["adapter"] == str(out)


def test_uap_loads_the_adapter(lora_run, cli, tmp_path):
    out, _ = lora_run
    code, stdout, err = cli("uap", "fit", "--model", "toy", "--adapter", out, "--limit", "64", "--epochs", "1",
                            "--uap", tmp_path / "uap.safetensors", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["adapter"] == str(out)


def test_resume_with_a_changed_config_is_refused(lora_run, cli):
    out, _ = lora_run
    code, _, err = cli("finetune", *TRAIN, *EVAL, "--method", "lora", "--lr", "2e-2", "--eval-base", "--resume", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--lr 0.02" in lines[0] and "was made with 0.01" in lines[0]


def test_an_existing_run_is_not_overwritten(lora_run, cli):
    out, _ = lora_run
    code, _, err = cli("finetune", *TRAIN, *EVAL, "--run-dir", out)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--method", "nosuch"], "--method 'nosuch'"),
    (["--objective", "tecoaa"], "tecoa"),
    (["--vpt-tokens", "0"], "--vpt-tokens 0"),
    (["--lr", "-1"], "--lr -1"),
    (["--eps", "4"], "4/255"),
    (["--train-attack", "transfer"], "--surrogate"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--lora-dropout", "0.1"], "dropout never applies"),
])
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    code, _, err = cli("finetune", "--run-dir", tmp_path / "x", *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], err
    assert not (tmp_path / "x").exists()  # refused before anything ran


def test_resume_ends_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, kill_at_checkpoint):
    from safetensors.torch import load_file

    from clipguard.tasks.finetune import run_finetune

    # 4 steps per epoch, checkpoints at steps 3 and 6: the kill lands mid-epoch, the resume crosses an epoch.
    cfg = finetune_config(**TINY, save_every=3, run_dir=str(tmp_path / "a"))
    whole = run_finetune(cfg, progress=False)["finetune"]["train"]

    b = replace(cfg, run_dir=str(tmp_path / "b"))
    with pytest.raises(kill_at_checkpoint(3)):
        run_finetune(b, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "b" / "manifest.json").exists()
    rec = run_finetune(replace(b, resume=b.run_dir), progress=False)
    assert rec["finetune"]["train"]["resumed_from_step"] == 3 and rec["finetune"]["train"]["steps"] == 8
    # the record reports the whole training, not only the part after the resume (the leaderboard's training cost
    # reads it): the same images and the same first and last losses as the uninterrupted run (bit-identical steps)
    t = rec["finetune"]["train"]
    assert t["images"] == whole["images"] == 8 * TINY["batch_size"] and t["history"] == "whole run"
    assert (t["loss_first10"], t["loss_last10"]) == (whole["loss_first10"], whole["loss_last10"])
    assert t["this_session"]["images"] == 5 * TINY["batch_size"] and t["wall_s"] > t["this_session"]["wall_s"]
    again = run_finetune(replace(b, resume=b.run_dir), progress=False)["finetune"]["train"]  # a finished run
    assert again["this_session"]["images"] == 0 and again["images"] == t["images"]
    assert (again["loss_first10"], again["loss_last10"]) == (t["loss_first10"], t["loss_last10"])
    assert t["wall_s"] <= again["wall_s"] < t["wall_s"] + 0.5  # + this session's loop, which trained nothing
    wa, wb = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa if "lora_B" in k)  # it did train


def test_vpt_gains_5_points_training_only_the_tokens(tmp_path, monkeypatch):
    """VPT gains far less than LoRA per second on the toy: 10 tokens reach +2..+5 points only after ~40
    epochs (README), so this test uses 50 tokens for 5 epochs (measured +10 and +11 points on two seeds)."""
    import clipguard.models.adapters as adapters
    from clipguard.models.loader import load_clip
    from clipguard.models.vpt import PromptedVisual
    from clipguard.tasks.finetune import run_finetune

    seen = {}
    real = adapters.save_adapter

    def spy(d, visual, **kw):
        seen["visual"] = visual
        return real(d, visual, **kw)

    monkeypatch.setattr(adapters, "save_adapter", spy)
    cfg = finetune_config(method="vpt", vpt_tokens=50, lr=5e-2, epochs=5, batch_size=64, eps="4/255", device="cpu",
                          eval_limit=300, eval_batch_size=100, eval_base=True, run_dir=str(tmp_path))
    rec = run_finetune(cfg, progress=False)
    base, m = rec["base_metrics"], rec["metrics"]
    assert m["robust_acc"] - base["robust_acc"] >= 0.05 and m["acc1"] >= 0.70, (base, m)
    trained, fresh = seen["visual"], load_clip("toy", device="cpu").model.visual
    assert [n for n, p in trained.named_parameters() if p.requires_grad] == ["prompts"]
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.visual.state_dict().items())
    torch.manual_seed(0)
    assert not torch.equal(trained.prompts, PromptedVisual(fresh, 50).prompts)  # the tokens moved from init
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["vpt_prompts.safetensors"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import clipguard.finetune.objectives as obj
    from clipguard.tasks.finetune import run_finetune

    calls = {"n": 0}
    tecoa = obj.OBJECTIVES.get("tecoa")

    def poisoned(clf, x, y, ref):
        loss = tecoa.loss(clf, x, y, ref)
        if clf.training:  # the update's loss, not the adversary's
            calls["n"] += 1
            if calls["n"] == 6:
                return loss * float("nan")
        return loss

    monkeypatch.setitem(obj.OBJECTIVES._entries, "tecoa", obj.Objective("tecoa", poisoned, False, ""))
    with pytest.raises(ClipguardError, match=r"step 6/8.*last good checkpoint \(step 4\)"):
        run_finetune(finetune_config(**TINY, save_every=2, run_dir=str(tmp_path)), progress=False)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 4
    assert not (tmp_path / "manifest.json").exists()


def test_train_step_is_one_update_and_a_non_finite_loss_never_steps(tmp_path):
    """train_step moves the weights, AdamW's moments and the schedule once; a NaN loss is refused before the optimizer
    steps, so none of the three takes it (the checkpoint test above cannot see weights that are never saved)."""
    import math

    import clipguard.finetune.loop as loop
    from clipguard.finetune.objectives import OBJECTIVES
    from clipguard.tasks.setup import prepare

    cfg = finetune_config(**{**TINY, "limit": 16}, run_dir=str(tmp_path))
    p = prepare(cfg.run)
    s = loop.setup(cfg, p)
    x, y = p.data.images[:8], p.data.labels[:8]

    def snapshot() -> list[torch.Tensor]:  # weights, then AdamW's state, then the schedule's step
        moments = [torch.as_tensor(v) for st in s.opt.state.values() for v in st.values()]
        return [t.detach().clone() for t in (*s.params, *moments)] + [torch.tensor(s.sched.last_epoch)]

    n, before = len(s.params), snapshot()
    loss = loop.train_step(s, x, y, len(y), cfg.grad_clip)
    stepped = snapshot()
    # the twin: a finite loss moves the weights, creates AdamW's moments and steps the schedule once
    assert math.isfinite(loss) and not all(torch.equal(a, b) for a, b in zip(before[:n], stepped[:n], strict=True))
    assert len(before) == n + 1 < len(stepped) and int(stepped[-1]) == int(before[-1]) + 1
    tecoa = OBJECTIVES.get("tecoa").loss
    s.objective = replace(s.objective, loss=lambda clf, xa, ya, ref: tecoa(clf, xa, ya, ref) * float("nan"))
    with pytest.raises(loop.NonFiniteLoss, match="training loss became nan"):
        loop.train_step(s, x, y, len(y), cfg.grad_clip)
    after = snapshot()
    assert len(after) == len(stepped) and all(torch.equal(a, b) for a, b in zip(after, stepped, strict=True))


@pytest.mark.parametrize("objective,attack,surrogate", [("fare", "pgd", None), ("ce", "transfer", "clip:toy@seed1")])
def test_objectives_and_transfer_run(tmp_path, objective, attack, surrogate):
    from clipguard.tasks.finetune import run_finetune

    cfg = finetune_config(**{**TINY, "epochs": 1}, objective=objective, train_attack=attack, surrogate=surrogate,
                          run_dir=str(tmp_path))
    rec = run_finetune(cfg, progress=False)
    train = rec["finetune"]["train"]
    assert train["steps"] == 4 and train["loss_last10"] is not None and rec["finetune"]["objective"] == objective


def test_cli_builds_the_config(fake_task, cli, tmp_path):
    import clipguard.tasks.finetune as loop

    got = fake_task(loop, "run_finetune")
    code, _, err = cli("finetune", "--resume", tmp_path, "--method", "lora", "--lora-targets", "c_fc, c_proj",
                       "--eps", "4/255", "--lr", "0.02", "--json")
    assert code == 0, err
    cfg = got["cfg"]
    assert cfg.run_dir == str(tmp_path) and cfg.resume == str(tmp_path) and cfg.lora_targets == ["c_fc", "c_proj"]
    assert (cfg.eps.text, cfg.lr, cfg.method, cfg.run.split) == ("4/255", 0.02, "lora", "train")
    assert json.loads((tmp_path / "record.json").read_text())["schema"] == "clipguard.result/1"


def test_fields_added_later_keep_old_runs_resumable(monkeypatch, tmp_path):
    """A run made before --max-steps / --sigma / --streaming existed has the same hash as the same run today
    (those fields hash only when set); setting one does change the hash."""
    monkeypatch.chdir(tmp_path)  # the configs probe (create) their --run-dir: not in the checkout
    from clipguard.finetune.config import config_hash, hashed_fields

    cfg = finetune_config(**TINY, run_dir="unused")
    assert not {"max_steps", "sigma", "streaming"} & set(hashed_fields(cfg))
    assert config_hash(finetune_config(**TINY, max_steps=5, run_dir="unused")) != config_hash(cfg)


def test_resume_alone_continues_with_the_runs_own_options(fake_task, cli, tmp_path):
    """``finetune --resume DIR`` takes every training option from DIR's checkpoint; a given option that would change
    the run is refused in one line, one that agrees is accepted."""
    import clipguard.tasks.finetune as loop
    from clipguard.finetune.config import config_hash, hashed_fields

    made = finetune_config(**TINY, method="vpt", vpt_tokens=3, run_dir=str(tmp_path))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"step": 1, "config": hashed_fields(made),
                                                          "config_hash": config_hash(made)}))
    got = fake_task(loop, "run_finetune")
    code, _, err = cli("finetune", "--resume", tmp_path, "--json")
    assert code == 0, err
    cfg = got["cfg"]
    assert (cfg.method, cfg.vpt_tokens, cfg.lr, cfg.eps.text, cfg.run.limit) == ("vpt", 3, 1e-2, "4/255", 256)
    assert config_hash(cfg) == config_hash(made)  # check_resume will accept it
    code, _, err = cli("finetune", "--resume", tmp_path, "--eps", "4/255", "--json")  # agrees: fine
    assert code == 0, err
    code, _, err = cli("finetune", "--resume", tmp_path, "--lr", "0.5", "--json")
    assert code == 2 and "--lr 0.5" in err and "was made with 0.01" in err and len(err.strip().splitlines()) == 1


def test_the_training_bar_ends_at_its_total(tmp_path, monkeypatch):
    """100 images in steps of 64: 64 + 36 per epoch. The bar's total is the images the steps take (it used to be
    steps x 64 = 128 per epoch, so the bar stopped at 200/256)."""
    from contextlib import contextmanager

    import clipguard.finetune.loop as loop
    from clipguard.tasks.finetune import run_finetune

    seen = {"done": 0}

    @contextmanager
    def bar(total, description, **kw):
        seen["total"] = total
        yield lambda n, **fields: seen.update(done=seen["done"] + n)

    monkeypatch.setattr(loop, "progress_bar", bar)
    run_finetune(finetune_config(**{**TINY, "limit": 100, "eval_limit": 10}, run_dir=str(tmp_path)), progress=True)
    assert seen["total"] == seen["done"] == 200
