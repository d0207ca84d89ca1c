"""``--compile`` (torch.compile, inductor, on this CPU) and the bf16-vs-fp32 check of every bf16 robust record.

Compiling the toy classifier takes seconds once inductor's cache (``/tmp/torchinductor_$USER``) holds its kernels,
about a minute on a machine that never compiled anything (inductor builds its C++ runtime first).
"""

from dataclasses import replace

import pytest
import torch

from clipguard.attacks import integrity as ic
from clipguard.attacks.registry import AttackConfig
from clipguard.attacks.sweep import robust_sweep
from clipguard.models.classifier import ZeroShotClassifier, compile_classifier
from clipguard.specs import parse_eps, parse_eps_list

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

# Compiled kernels sum in another order: the toy's logits (logit_scale x cosine, |logit| <= 100) moved by at most
# 1.1e-5 when measured; argmax must not move at all.
LOGITS_ATOL = 1e-4
TOY = dict(model="toy", dataset="toy", limit=300, device="cpu", batch_size=128)  # batches 128, 128, 44


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _eval_spied(monkeypatch, **kw):
    """run_eval on the toy, keeping what its prepare() returned, its clean logits and the dynamo graphs compiled
    during the timed clean pass."""
    import clipguard.tasks.eval as ev
    from clipguard.models.inference import predict_logits as real_predict
    from clipguard.tasks.setup import prepare as real_prepare

    seen = {}

    def prepare(*a, **k):
        seen["p"] = real_prepare(*a, **k)
        return seen["p"]

    def predict(*a, **k):
        before = _graphs()
        out = real_predict(*a, **k)
        seen["logits"], seen["new_graphs"] = out[0], _graphs() - before
        return out

    monkeypatch.setattr(ev, "prepare", prepare)
    monkeypatch.setattr(ev, "predict_logits", predict)
    rec = ev.run_eval(ev.eval_config(**TOY, **kw), progress=False)
    return rec, seen


def test_compile_gives_eager_predictions_through_eval(monkeypatch):
    """The real eval path: the same argmax on every image, logits within LOGITS_ATOL, the same metrics; compiling
    happened in prepare (compile_s) and nothing compiled inside the timed clean pass (its img/s excludes it)."""
    eager, e = _eval_spied(monkeypatch)
    compiled, c = _eval_spied(monkeypatch, compile=True)
    assert torch.equal(c["logits"].argmax(1), e["logits"].argmax(1))
    torch.testing.assert_close(c["logits"], e["logits"], atol=LOGITS_ATOL, rtol=0)
    assert compiled["metrics"] == eager["metrics"]
    assert e["p"].compile_s is None and c["p"].compile_s > 0
    assert c["new_graphs"] == 0, "a graph compiled inside the timed pass: its img/s would include compiling"
    assert compiled["config"]["compile"] is True and "compile" not in eager["config"]


def test_compiled_attack_matches_eager_and_is_warmed_up(toy_prepared):
    """compile_classifier(attack_precision="fp32") warms forward + backward up: a PGD run then compiles nothing and
    finds the same adversarial predictions as eager (gradients agree to float rounding; sign steps follow)."""
    p = toy_prepared
    clf = p.classifier
    compiled = ZeroShotClassifier(clf.visual, clf.text_embeddings, clf.logit_scale, clf.mean.flatten().tolist(),
                                  clf.std.flatten().tolist(), clf.input_size).eval()
    seconds = compile_classifier(compiled, tuple(p.data.images.shape[1:]), attack_precision="fp32")
    assert seconds > 0
    from clipguard.attacks.runner import run_attack

    cfg = AttackConfig("pgd", parse_eps("4/255"), steps=3, seed=0)
    x, y = p.data.images[:100], p.data.labels[:100]
    eager = run_attack(clf, x, y, cfg, batch_size=64, progress=False)
    before = _graphs()
    comp = run_attack(compiled, x, y, cfg, batch_size=64, progress=False)
    assert _graphs() == before, "the attack recompiled: the warm-up missed one of its passes"
    assert torch.equal(comp.clean_pred, eager.clean_pred)
    assert (comp.adv_pred != eager.adv_pred).sum() <= 1  # measured: 0


def test_attack_command_compiles_before_its_timed_attack(monkeypatch, tmp_path):
    """``clipguard attack --compile`` (run_craft) warms the attack's forward + backward up in prepare: the record
    has compile_s and no graph compiles inside the timed attack. uap fit/eval and certify share Prepared.timings."""
    import clipguard.attacks.runner as runner
    from clipguard.tasks.attack import run_craft
    from clipguard.tasks.configs import attack_set_config

    real, seen = runner.run_attack, {}

    def spied(*a, **k):
        before = _graphs()
        out = real(*a, **k)
        seen["new_graphs"] = _graphs() - before
        return out

    monkeypatch.setattr(runner, "run_attack", spied)
    cfg = attack_set_config(**{**TOY, "limit": 100}, attack="pgd", steps=2, compile=True,
                            adv_set=str(tmp_path / "adv.safetensors"))
    rec = run_craft(cfg, progress=False)
    assert rec["timings"]["compile_s"] > 0 and seen["new_graphs"] == 0


def test_compile_changes_no_config_hash():
    """compile is a speed option: absent from records and hashes at its default, so every existing run keeps its
    finetune config hash (resume) and record config; set, the record says so."""
    from clipguard.config import flat
    from clipguard.finetune.config import finetune_config, hashed_fields
    from clipguard.tasks.eval import eval_config

    assert "compile" not in flat(eval_config()) and flat(eval_config(compile=True))["compile"] is True
    assert "compile" not in hashed_fields(finetune_config(model="toy", dataset="toy", run_dir="x"))


def test_compile_mode_reaches_torch_compile_and_is_speed_only(monkeypatch):
    """--compile-mode is handed to torch.compile (reduce-overhead = CUDA graphs on a GPU; on this CPU it compiles as
    default, so the predictions stay eager's), is left out of records at its default and never hashed."""
    from clipguard.finetune.config import finetune_config, hashed_fields

    seen = []
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: (seen.append(kw), real(self, **kw))[1])
    eager, e = _eval_spied(monkeypatch)
    rec, c = _eval_spied(monkeypatch, compile=True, compile_mode="reduce-overhead")
    assert seen == [{"mode": "reduce-overhead"}]
    assert torch.equal(c["logits"].argmax(1), e["logits"].argmax(1)) and c["new_graphs"] == 0
    assert rec["config"]["compile_mode"] == "reduce-overhead" and "compile_mode" not in eager["config"]
    assert "compile_mode" not in hashed_fields(finetune_config(model="toy", dataset="toy", compile=True, method="vpt",
                                                               compile_mode="max-autotune", run_dir="x"))


@pytest.mark.parametrize("opts, says", [
    ({"compile": True, "compile_mode": "fastest"},
     "--compile-mode 'fastest' is unknown: choose from default, reduce-overhead"),
    ({"compile_mode": "reduce-overhead"}, "add --compile"),
])
def test_bad_compile_mode_is_one_line(opts, says):
    from clipguard.errors import ClipguardError
    from clipguard.run_options import RunOptions

    with pytest.raises(ClipguardError, match=says):
        RunOptions(**opts)


def test_compile_is_one_shared_option_in_the_performance_panel(cli, monkeypatch):
    import clipguard.tasks.eval as ev
    from clipguard.config import PERF
    from clipguard.run_options import RunOptions

    assert RunOptions.__dataclass_fields__["compile"].metadata["opt"].panel == PERF
    got = {}
    monkeypatch.setattr(ev, "run_eval", lambda cfg, progress: got.setdefault("cfg", cfg) and {"schema": "x"})
    code, _, err = cli("eval", "--compile", "--json")
    assert code == 0, err
    assert got["cfg"].run.compile is True


# ---- bf16 vs fp32: every robust record whose attack did not run in fp32 carries the check

def test_precision_check_tolerance_is_half_a_point_both_ways():
    """On 256 images one image (0.39 points) passes, two (0.78) fail, in either direction; exactly 0.5 passes."""
    n = 256
    assert ic.PRECISION_POINTS == 0.005
    assert ic.precision_check(0.5 + 1 / n, 0.5, "bf16", n)["passed"]
    assert ic.precision_check(0.5, 0.5 + 1 / n, "bf16", n)["passed"]
    assert ic.precision_check(0.305, 0.300, "bf16", n)["passed"]
    for low, fp32 in ((0.5 + 2 / n, 0.5), (0.5, 0.5 + 2 / n), (0.306, 0.300)):
        c = ic.precision_check(low, fp32, "bf16", n)
        assert not c["passed"] and c["value"]["bf16"] == low and c["value"]["fp32"] == fp32, c
    assert ic.precision_check(0.4, 0.4, "fp16", n)["name"] == "fp16_matches_fp32"


def _checks(p, name: str, eps: str, precision: str, **kw) -> list[dict]:
    base = AttackConfig(name, parse_eps(eps.split(",")[0]), steps=kw.pop("steps", 1), seed=0)
    _, checks, _ = robust_sweep(p, base, parse_eps_list(eps), batch_size=128, resolution="model",
                                precision=precision, progress=False, **kw)
    return checks


def test_bf16_attack_on_the_toy_passes_the_check(toy_prepared):
    """PGD-5 at 8/255 in bf16 vs fp32 on the toy's first 256 images: within half a point (measured: one image
    apart, 0.1563 vs 0.1602; the tolerance allows exactly one)."""
    checks = _checks(toy_prepared, "pgd", "8/255", "bf16", steps=5)
    (c,) = [c for c in checks if c["name"] == "bf16_matches_fp32"]
    assert c["passed"] and c["eps"] == "8/255" and c["value"]["images"] == 256, c
    assert abs(c["value"]["bf16"] - c["value"]["fp32"]) <= ic.PRECISION_POINTS


def test_fp32_attack_has_no_precision_check(toy_prepared):
    assert not [c for c in _checks(toy_prepared, "fgsm", "8/255", "fp32") if c["name"].endswith("_matches_fp32")]


class GradientlessInBf16(ZeroShotClassifier):
    """A classifier whose bf16 forward is broken on purpose: under autocast its input gradient is exactly zero
    (what bf16 rounding does to small-eps gradients, made total). The attack then cannot move in bf16."""

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            x = x.detach() + 0 * x  # same values, zero gradient
        return super().forward(x)


def test_bf16_check_fails_on_a_classifier_broken_in_bf16(toy_prepared):
    """The twin: through robust_sweep, at two eps, with a bf16 forward built to fail. The check fails, names both
    numbers, and so the record's checks_passed (all checks passed) is false."""
    p = toy_prepared
    c0 = p.classifier
    broken = GradientlessInBf16(c0.visual, c0.text_embeddings, c0.logit_scale, c0.mean.flatten().tolist(),
                                c0.std.flatten().tolist(), c0.input_size).eval()
    checks = _checks(replace(p, classifier=broken), "fgsm", "4/255,8/255", "bf16")
    prec = [c for c in checks if c["name"] == "bf16_matches_fp32"]
    assert [c["eps"] for c in prec] == ["4/255", "8/255"]
    for c in prec:
        assert not c["passed"], c
        assert c["value"]["bf16"] > c["value"]["fp32"] + 0.1, c  # bf16 "robust": the attack never moved
    assert not all(c["passed"] for c in checks)


def test_bf16_record_carries_the_check(cli, tmp_path):
    """`clipguard eval --attack-precision bf16`: the record has the check at every eps and checks_passed follows."""
    import json

    out = tmp_path / "r.json"
    code, _, err = cli("eval", "--limit", "256", "--attack", "fgsm", "--eps", "8/255", "--attack-precision", "bf16",
                       "--device", "cpu", "--out", out)
    assert code == 0, err
    rec = json.loads(out.read_text())
    (c,) = [c for c in rec["checks"] if c["name"] == "bf16_matches_fp32"]
    assert c["value"]["images"] == 256 and {"bf16", "fp32"} <= set(c["value"])
    assert rec["checks_passed"] == all(x["passed"] for x in rec["checks"])
    assert c["passed"], c  # measured: one image apart (0.3672 vs 0.3633)


TINY_FT = dict(model="toy", dataset="toy", limit=256, epochs=2, batch_size=64, eps="4/255", lr=1e-2, device="cpu",
               eval_limit=20, eval_batch_size=20, eval_steps=1, lora_targets=["c_fc", "c_proj"])


def _train_summary(tmp_path, name: str, **kw) -> dict:
    from clipguard.finetune.config import finetune_config
    from clipguard.tasks.finetune import run_finetune

    return run_finetune(finetune_config(**TINY_FT, **kw, run_dir=str(tmp_path / name)), progress=False)[
        "finetune"]["train"]


def test_finetune_compiles_the_training_passes_before_the_clock(tmp_path, monkeypatch):
    """finetune --compile compiles the LoRA tower's passes (adversary: eval forward + input gradient; objective:
    train forward + backward) in a warm-up that puts random state, buffers and gradients back: no step compiles,
    the summary reports compile_s apart, and training follows the eager run (same random starts and data order;
    kernels round differently, so the losses agree closely, not bit for bit)."""
    import clipguard.finetune.loop as loop
    import clipguard.models.adapters as adapters

    at = {}
    real_compile, real_save = loop.compile_trainable, adapters.save_adapter

    def compile_spy(*a, **k):
        out = real_compile(*a, **k)
        at["compiled"] = _graphs()
        return out

    def save_spy(*a, **k):
        at["trained"] = _graphs()
        return real_save(*a, **k)

    monkeypatch.setattr(loop, "compile_trainable", compile_spy)
    monkeypatch.setattr(adapters, "save_adapter", save_spy)
    e, c = _train_summary(tmp_path, "eager"), _train_summary(tmp_path, "comp", compile=True)
    assert e["compile_s"] is None and c["compile_s"] > 0
    assert at["trained"] == at["compiled"], "a training step compiled: its img/s would include compiling"
    assert c["loss_first10"] == pytest.approx(e["loss_first10"], rel=LOSS_RTOL), (c, e)
    TRAIN_LOSS["eager"] = e["loss_first10"]


# Mean training loss of the 8 steps, compiled vs eager: measured 4.9e-7 relative apart (LoRA on c_fc/c_proj, TeCoA).
LOSS_RTOL = 1e-5
TRAIN_LOSS: dict[str, float] = {}


def test_a_warm_up_that_draws_random_numbers_would_show(tmp_path, monkeypatch):
    """The twin: the warm-up's adversary draws random starts; not putting the random state back moves every random
    start of the run, and the losses then leave LOSS_RTOL."""
    import contextlib

    if "eager" not in TRAIN_LOSS:
        TRAIN_LOSS["eager"] = _train_summary(tmp_path, "eager")["loss_first10"]
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kw: contextlib.nullcontext())
    c = _train_summary(tmp_path, "comp", compile=True)
    assert c["loss_first10"] != pytest.approx(TRAIN_LOSS["eager"], rel=LOSS_RTOL)


@pytest.mark.parametrize("targets", [[], ["--lora-targets", "attn"]])  # the default targets, and named ones
def test_lora_on_attention_refuses_compile_in_one_line(cli, tmp_path, targets):
    code, _, err = cli("finetune", "--model", "toy", "--dataset", "toy", "--compile", "--run-dir", tmp_path / "r",
                       "--device", "cpu", *targets)
    assert code == 2 and "--compile cannot compile LoRA on the attention modules" in err and "Traceback" not in err
