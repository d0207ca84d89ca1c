"""Test-time counterattacks (--defense ttc) and the adaptive evaluation of a defense (issue 23, items 4-5).

Toy world, CPU, small n. The counterattack is checked against its equations computed here on fixed tensors (a twin
with the ascent turned into descent must fail); the acceptance numbers (non-adaptive above no defense, adaptive below
non-adaptive) come from three real `eval` runs on the same images.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from clipguard.defenses.ttc import TTC, counterattack_step, step_weights

pytestmark = pytest.mark.usefixtures("one_thread")

EPS, ALPHA, BETA = 4 / 255, 1 / 255, 2.0


def tiny_classifier(seed: int = 0):
    """A real ZeroShotClassifier whose image tower is linear, f(z) = W z + b, so the counterattack's gradient has a
    closed form: d/d delta sum ||f(x + delta) - f(x)||^2 = 2 W^T W delta."""
    from clipguard.models.classifier import ZeroShotClassifier

    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(3 * 4 * 4, 5)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(5, 48, generator=g))
        lin.bias.copy_(torch.randn(5, generator=g))
    text = nn.functional.normalize(torch.randn(3, 5, generator=g), dim=-1)
    return ZeroShotClassifier(nn.Sequential(nn.Flatten(), lin), text, 10.0, (0, 0, 0), (1, 1, 1), (4, 4)), lin


def formula(x, start, lin, *, steps: int, ascent: bool = True, tau_threshold: float = 10.0):
    """The paper's counterattack written out from its equations (independent of defenses.ttc)."""
    w, b = lin.weight.detach(), lin.bias.detach()
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    deltas = [torch.max(torch.min(start, 1 - x), -x)]
    for _ in range(steps):
        grad = (2 * flat(deltas[-1]) @ w.T @ w).reshape(x.shape)
        step = (ALPHA if ascent else -ALPHA) * grad.sign()
        d = (deltas[-1] + step).clamp(-EPS, EPS)
        deltas.append(torch.max(torch.min(d, 1 - x), -x))
    f_x = flat(x) @ w.T + b
    tau = (flat(deltas[0]) @ w.T).norm(dim=1) / f_x.norm(dim=1)
    weights = torch.exp(BETA * torch.arange(steps + 1.0))
    weights = weights / weights.sum()
    mixed = sum(weights[k] * deltas[k] for k in range(steps + 1))
    keep = (tau < tau_threshold).view(-1, 1, 1, 1)
    return x + torch.where(keep, mixed, deltas[0]), tau


def fixed_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 4, 4, generator=g)
    x[0, 0, 0, 0], x[1, 2, 3, 3] = 0.0, 1.0  # pixels at the box's edges: the [0, 1] clip matters
    start = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
    return x, start


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_counterattack_equals_the_papers_equations(steps):
    clf, lin = tiny_classifier()
    x, start = fixed_inputs()
    ttc = TTC(clf, eps=EPS, steps=steps, alpha=ALPHA, tau_threshold=10.0, beta=BETA)
    got, tau = ttc.counterattack(x, start)
    want, want_tau = formula(x, start, lin, steps=steps)
    torch.testing.assert_close(tau, want_tau)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - x).abs().max() <= EPS + 1e-6 and got.min() >= 0 and got.max() <= 1
    # the twin: descent instead of ascent (the sign flipped) is not what TTC computes
    wrong, _ = formula(x, start, lin, steps=steps, ascent=False)
    assert not torch.allclose(got, wrong, atol=1e-6)


def test_tau_rule_keeps_the_random_start_for_images_not_falsely_stable():
    clf, lin = tiny_classifier()
    x, start = fixed_inputs()
    _, tau = formula(x, start, lin, steps=2)
    threshold = float(tau.mean())  # between the two images' tau: one counterattacked, one not
    assert tau.min() < threshold < tau.max()
    got, _ = TTC(clf, eps=EPS, steps=2, alpha=ALPHA, tau_threshold=threshold, beta=BETA).counterattack(x, start)
    want, _ = formula(x, start, lin, steps=2, tau_threshold=threshold)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    keep = tau >= threshold
    torch.testing.assert_close(got[keep], x[keep] + torch.max(torch.min(start, 1 - x), -x)[keep])
    # twin: a rule that counterattacks every image differs on the stable one
    everyone, _ = formula(x, start, lin, steps=2, tau_threshold=10.0)
    assert not torch.allclose(got[keep], everyone[keep], atol=1e-6)


def test_step_and_weights_helpers():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    d = counterattack_step(torch.zeros_like(x), torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1), x, EPS, ALPHA)
    torch.testing.assert_close(d.flatten(), torch.tensor([0.0, ALPHA, 0.0]))  # clipped to keep x + d in [0, 1]
    w = step_weights(torch.tensor([0.1, 0.3]), 0.2, 2.0, 2)
    e = torch.exp(torch.tensor([0.0, 2.0, 4.0]))
    torch.testing.assert_close(w, torch.stack([e / e.sum(), torch.tensor([1.0, 0.0, 0.0])]))


def test_paper_defaults():
    from clipguard.tasks.configs import eval_config

    d = eval_config(defense="ttc").defended
    assert (d.ttc_eps.text, d.ttc_steps, d.ttc_alpha.text, d.ttc_tau, d.ttc_beta) == ("4/255", 2, "1/255", 0.2, 2.0)
    assert d.defense_attack == "adaptive"


def test_gradients_go_through_the_unrolled_counterattack(toy_prepared):
    """The adaptive attack's gradient: through every counterattack step (create_graph), finite and not zero; the
    toy tower's fused attention has no double backward, the math kernel is chosen for it."""
    from clipguard.models.inference import attack_inputs

    clf = toy_prepared.classifier
    x = attack_inputs(clf, toy_prepared.data.images[:4], "model").requires_grad_(True)
    y = toy_prepared.data.labels[:4]
    ttc = TTC(clf)
    loss = nn.functional.cross_entropy(ttc(x), y)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and (g.flatten(1).abs().amax(1) > 0).all()


# ------------------------------------------------------------------------------------------- the three runs

N = 60
PGD = dict(model="toy", dataset="toy", limit=N, device="cpu", attack="pgd", eps="4/255", alpha="1/255", steps=10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """no defense / TTC non-adaptive / TTC adaptive: PGD-10 4/255 on the same 60 toy images; records written."""
    from clipguard.tasks.eval import eval_config, run_eval

    out = tmp_path_factory.mktemp("ttc-records")
    recs = {}
    for name, extra in (("none", {}), ("non-adaptive", {"defense": "ttc", "defense_attack": "non-adaptive"}),
                        ("adaptive", {"defense": "ttc"})):
        recs[name] = run_eval(eval_config(**PGD, **extra), progress=False)
        (out / f"{name}.json").write_text(json.dumps(recs[name]))
    return recs, out


def test_non_adaptive_above_no_defense_and_adaptive_below_non_adaptive(runs):
    recs, _ = runs
    robust = {k: r["metrics"]["robust_acc"] for k, r in recs.items()}
    assert robust["non-adaptive"] > robust["none"], robust
    assert robust["adaptive"] < robust["non-adaptive"], robust


def test_record_holds_defense_clean_accuracy_cost_and_mode(runs):
    recs, _ = runs
    assert "defense" not in recs["none"] and "defense" not in recs["none"]["config"]
    for mode in ("non-adaptive", "adaptive"):
        r = recs[mode]
        d = r["defense"]
        assert d["name"] == "ttc" and d["evaluation"] == mode and d["randomized"] is True
        assert (d["eps"], d["steps"], d["alpha"], d["tau_threshold"], d["beta"]) == (4 / 255, 2, 1 / 255, 0.2, 2.0)
        assert d["cost"]["ms_per_image"] > d["cost"]["undefended_ms_per_image"] > 0
        assert d["deviations"] and "Xing" in d["reference"]
        assert 0 < r["metrics"]["acc1"] <= 1 and r["metrics"]["counts"]["acc1"]["n"] == N  # defended clean acc1
        assert d["undefended"]["acc1"] == recs["none"]["metrics"]["acc1"]
        assert r["config"]["defense"] == "ttc"
        assert r["metrics"]["robust"][0]["defense_evaluation"] == mode
    assert recs["adaptive"]["defense"]["eot_samples"] == 4
    entry = recs["non-adaptive"]["metrics"]["robust"][0]  # the undefended classifier on the same adversarial images
    assert "undefended_adv_acc" in entry and "surrogate_robust_acc" not in entry


def test_integrity_checks_name_the_evaluation(runs):
    recs, _ = runs
    checks = {m: {c["name"]: c for c in recs[m]["checks"]} for m in ("non-adaptive", "adaptive")}
    assert checks["adaptive"]["adaptive_attack"]["passed"] is True
    assert checks["adaptive"]["randomized_defense_eot"]["passed"] is True
    assert recs["adaptive"]["checks_passed"] is True
    assert checks["non-adaptive"]["adaptive_attack"]["passed"] is False  # the paper's protocol is flagged
    assert recs["non-adaptive"]["checks_passed"] is False
    # the eps-0 and determinism checks ran on the undefended classifier (the defense draws anew every pass)
    assert checks["adaptive"]["eps0_equals_clean"]["passed"] and checks["adaptive"]["deterministic_forward"]["passed"]


def test_one_draw_per_gradient_fails_the_eot_check():
    from clipguard.tasks.eval import eval_config, run_eval

    rec = run_eval(eval_config(**{**PGD, "limit": 12, "steps": 2}, defense="ttc", defense_eot=1), progress=False)
    check = next(c for c in rec["checks"] if c["name"] == "randomized_defense_eot")
    assert check["passed"] is False and rec["checks_passed"] is False


def test_report_marks_non_adaptive_numbers(runs, tmp_path):
    from clipguard.report.build import NON_ADAPTIVE_NOTE, build_report

    _, folder = runs
    rep = build_report(folder, tmp_path / "report.md", html_out=tmp_path / "report.html")
    cols = rep["header"]
    assert "pgd-10 4/255 (non-adaptive)" in cols and "pgd-10 4/255" in cols
    labels = [row[0] for row in rep["body"]]
    assert labels.count("toy + ttc") == 1 and "toy" in labels  # the defended model is its own row
    row = rep["body"][labels.index("toy + ttc")]
    assert row[cols.index("pgd-10 4/255 (non-adaptive)")] is not None and row[cols.index("pgd-10 4/255")] is not None
    assert NON_ADAPTIVE_NOTE in (tmp_path / "report.md").read_text()
    assert "(non-adaptive)" in (tmp_path / "report.html").read_text()
    only = tmp_path / "adaptive-only"  # twin: no non-adaptive record, no mark and no note
    only.mkdir()
    for name in ("none", "adaptive"):
        (only / f"{name}.json").write_text((folder / f"{name}.json").read_text())
    rep = build_report(only, only / "report.md")
    assert not any("non-adaptive" in c for c in rep["header"])
    assert NON_ADAPTIVE_NOTE not in (only / "report.md").read_text()


# ------------------------------------------------------------------------------------------- options, errors


@pytest.mark.parametrize("args, message", [
    (["--defense", "ttc", "--ttc-eps", "25"], "--ttc-eps '25' = 25 is above 1"),
    (["--defense", "tcc"], "--defense 'tcc' is unknown (did you mean ttc?)"),
    (["--defense", "ttc", "--ttc-tau", "-1"], "--ttc-tau -1.0 must be a number >= 0"),
    (["--defense", "ttc", "--ttc-steps", "-2"], "--ttc-steps -2 must be a whole number >= 0"),
    (["--defense", "ttc", "--defense-attack", "sometimes"], "--defense-attack 'sometimes' is unknown"),
    (["--ttc-steps", "3"], "--ttc-steps is used only with --defense"),
    (["--defense", "ttc", "--defense-attack", "non-adaptive", "--defense-eot", "4"], "--defense-eot 4 averages"),
    (["--defense", "ttc", "--attack", "pgd", "--surrogate", "toy-cnn"], "--surrogate with --defense ttc"),
])
def test_bad_defense_option_is_exit_2_one_line(cli, args, message):
    code, out, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "4", *args)
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_good_defense_option_runs(cli):
    """The twin of the error cases: valid values run (clean eval, defended), exit 0."""
    code, out, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "4", "--device", "cpu",
                         "--defense", "ttc", "--ttc-eps", "2/255", "--ttc-steps", "1", "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["defense"]["eps"] == 2 / 255 and rec["defense"]["steps"] == 1
    assert rec["defense"]["evaluation"] == "clean only (no attack)"


def test_defaults_leave_older_records_and_hashes_unchanged():
    from clipguard.config import flat
    from clipguard.tasks.configs import certify_config, eval_config

    keys = {"defense", "defense_attack", "defense_eot", "ttc_eps", "ttc_steps", "ttc_alpha", "ttc_tau", "ttc_beta"}
    assert not keys & set(flat(eval_config()))
    assert {"defense", "ttc_steps"} <= set(flat(eval_config(defense="ttc", ttc_steps=3)))  # twin: set, recorded
    with pytest.raises(Exception, match="--defense-attack and --defense-eot apply to eval and attack only"):
        certify_config(defense="ttc", defense_attack="non-adaptive")


# ------------------------------------------------------------------------------------------- AutoAttack's flags


class NoisyLogits(nn.Module):
    """A classifier whose logits get fresh noise on every pass: AutoAttack's randomized-defense flag must fire."""

    def __init__(self, clf, scale: float):
        super().__init__()
        self.clf, self.scale = clf, scale

    def forward(self, x):
        out = self.clf(x)
        return out + self.scale * torch.randn_like(out)


@pytest.mark.parametrize("scale, flagged", [(1.0, True), (0.0, False)])
def test_autoattack_flags_become_integrity_checks(toy_prepared, scale, flagged):
    from clipguard.attacks.integrity import cheap_checks
    from clipguard.attacks.registry import AttackConfig
    from clipguard.attacks.runner import run_attack
    from clipguard.specs import parse_eps

    model = NoisyLogits(toy_prepared.classifier, scale)
    model.text_embeddings, model.input_size = toy_prepared.classifier.text_embeddings, (32, 32)
    cfg = AttackConfig("autoattack", eps=parse_eps("1/255"), aa_version="custom", aa_attacks=("apgd-ce",))
    images, labels = toy_prepared.data.images[:6], toy_prepared.data.labels[:6]
    run = run_attack(model, images, labels, cfg, batch_size=6, progress=False)
    checks = {c["name"]: c for c in cheap_checks(run, cfg.eps.value)}
    assert {"aa_randomized", "aa_zero_gradients", "aa_square_beats_white_box", "aa_dynamic"} <= set(checks)
    assert checks["aa_randomized"]["passed"] is (not flagged)
    assert ("randomized" in run.stats["aa_flags"]) is flagged


def test_autoattack_through_ttc_flags_a_dynamic_defense_answered_by_the_adaptive_attack(toy_prepared):
    """AutoAttack sees gradient calls inside TTC's forward (its dynamic-defense flag): in an adaptive run the
    check passes (the attack went through the unrolled steps) and the randomized flag fails (custom, not rand).
    pyautoattack never resets its call counters: the next, undefended, run must not inherit the flag."""
    from clipguard.attacks.integrity import cheap_checks
    from clipguard.attacks.registry import AttackConfig
    from clipguard.attacks.runner import run_attack
    from clipguard.specs import parse_eps
    from clipguard.tasks.eval import eval_config, run_eval

    rec = run_eval(eval_config(model="toy", dataset="toy", limit=4, device="cpu", attack="autoattack", eps="1/255",
                               aa_version="custom", aa_attacks="apgd-ce", defense="ttc"), progress=False)
    checks = {c["name"]: c for c in rec["checks"]}
    assert checks["aa_dynamic"]["value"] is True and checks["aa_dynamic"]["passed"] is True
    assert checks["aa_randomized"]["passed"] is False and rec["checks_passed"] is False
    cfg = AttackConfig("autoattack", eps=parse_eps("1/255"), aa_version="custom", aa_attacks=("apgd-ce",))
    plain = run_attack(toy_prepared.classifier, toy_prepared.data.images[:4], toy_prepared.data.labels[:4], cfg,
                       batch_size=4, progress=False)
    assert {c["name"]: c["passed"] for c in cheap_checks(plain, cfg.eps.value)}["aa_dynamic"] is True


def test_suite_cells_and_attack_take_the_defense(tmp_path):
    """A bench cell's options (type-checked) and `clipguard attack` carry the defense; the saved set names it."""
    from clipguard.attacks.advset import load_adv_set
    from clipguard.config import from_options
    from clipguard.errors import ClipguardError
    from clipguard.tasks.attack import run_craft
    from clipguard.tasks.configs import EvalConfig, attack_set_config

    cell = from_options(EvalConfig, {"defense": "ttc", "ttc_steps": 1}, where="suite cell 'c'")
    assert cell.defended.defense == "ttc" and cell.defended.ttc_steps == 1
    with pytest.raises(ClipguardError, match="suite cell 'c': ttc_steps = 'x' should be int"):
        from_options(EvalConfig, {"defense": "ttc", "ttc_steps": "x"}, where="suite cell 'c'")
    out = tmp_path / "adv.safetensors"
    rec = run_craft(attack_set_config(model="toy", dataset="toy", limit=8, device="cpu", eps="4/255", steps=2,
                                      adv_set=str(out), defense="ttc", defense_attack="non-adaptive"), progress=False)
    assert rec["defense"]["evaluation"] == "non-adaptive" and rec["defense"]["cost"]["ms_per_image"] > 0
    assert "undefended_adv_acc" in rec["metrics"]
    assert load_adv_set(out).manifest["source"]["defense"] == {"name": "ttc", "evaluation": "non-adaptive"}


def test_eot_is_the_log_of_the_mean_softmax():
    """EOT's output equals log(mean_k softmax(z_k)) over the draws, computed here; one draw is the model itself."""
    from clipguard.defenses.adaptive import EOT

    draws = [torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 0.5]]), torch.tensor([[1.0, 1.0, 1.0]])]

    class Cycle(nn.Module):
        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, x):
            self.i += 1
            return draws[(self.i - 1) % 3]

    want = torch.log(torch.stack([torch.softmax(z, 1) for z in draws]).mean(0))
    torch.testing.assert_close(EOT(Cycle(), 3)(torch.zeros(1)), want)
    assert not torch.allclose(torch.stack(draws).mean(0), want)  # twin: averaging logits is another thing
    torch.testing.assert_close(EOT(Cycle(), 1)(torch.zeros(1)), draws[0])
