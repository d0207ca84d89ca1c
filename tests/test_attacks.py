"""Attacks on the toy world: real torchattacks runs against the real toy CLIP, no mocks."""

import json

import pytest
import torch

from clipguard.attacks.registry import AttackConfig, build_attack, list_attacks
from clipguard.attacks.runner import run_attack
from clipguard.errors import ClipguardError
from clipguard.specs import parse_eps

EPS8 = parse_eps("8/255")


def _acc(pred, labels):
    return (pred == labels).float().mean().item()


@pytest.fixture(scope="module")
def pgd8(toy_prepared):
    p = toy_prepared
    return run_attack(p.classifier, p.data.images, p.data.labels, AttackConfig("pgd", EPS8, parse_eps("2/255"), 10),
                      progress=False)


def test_registry_lists_attacks():
    assert list_attacks() == ["fgsm", "pgd", "apgd", "autoattack"]
    with pytest.raises(ClipguardError, match="fgsm, pgd, apgd, autoattack"):
        build_attack(torch.nn.Identity(), AttackConfig("nosuch"))


def test_pgd_breaks_the_toy_clip_within_eps(toy_prepared, pgd8):
    labels = toy_prepared.data.labels
    assert _acc(pgd8.clean_pred, labels) >= 0.90
    assert _acc(pgd8.adv_pred, labels) <= 0.10
    assert pgd8.stats["max_linf"] <= EPS8.value + 1e-6 and pgd8.stats["nan"] == 0
    assert 0 <= pgd8.stats["min"] and pgd8.stats["max"] <= 1


def test_fgsm_is_weaker_than_pgd(toy_prepared, pgd8):
    p = toy_prepared
    fgsm = run_attack(p.classifier, p.data.images, p.data.labels, AttackConfig("fgsm", EPS8), progress=False)
    assert _acc(fgsm.adv_pred, p.data.labels) >= _acc(pgd8.adv_pred, p.data.labels)
    assert _acc(fgsm.adv_pred, p.data.labels) < _acc(fgsm.clean_pred, p.data.labels)  # FGSM still hurts


def test_random_noise_of_the_same_size_barely_hurts(toy_prepared, pgd8):
    p = toy_prepared
    g = torch.Generator().manual_seed(0)
    x = p.data.images.float() / 255
    noisy = (x + EPS8.value * torch.sign(torch.rand(x.shape, generator=g) - 0.5)).clamp(0, 1)
    with torch.no_grad():
        clean = _acc(p.classifier(x).argmax(1), p.data.labels)
        noise = _acc(p.classifier(noisy).argmax(1), p.data.labels)
    assert clean - noise <= 0.05, "uniform +-eps noise must cost <= 5 points: the PGD drop is adversarial"
    assert noise - _acc(pgd8.adv_pred, p.data.labels) > 0.5


def test_eps_zero_equals_clean_exactly(toy_prepared):
    p = toy_prepared
    run = run_attack(p.classifier, p.data.images, p.data.labels, AttackConfig("pgd", parse_eps("0")), progress=False)
    assert torch.equal(run.adv_pred, run.clean_pred) and run.stats["max_linf"] == 0.0


def test_restarts_never_weaken_pgd(toy_prepared):
    p = toy_prepared
    x, y = p.data.images[:60], p.data.labels[:60]
    one = run_attack(p.classifier, x, y, AttackConfig("pgd", parse_eps("4/255"), steps=3, restarts=1), progress=False)
    three = run_attack(p.classifier, x, y, AttackConfig("pgd", parse_eps("4/255"), steps=3, restarts=3),
                       progress=False)
    assert _acc(three.adv_pred, y) <= _acc(one.adv_pred, y)


def test_apgd_and_autoattack_run(toy_prepared):
    p = toy_prepared
    x, y = p.data.images[:20], p.data.labels[:20]
    for name in ("apgd", "autoattack"):
        run = run_attack(p.classifier, x, y, AttackConfig(name, EPS8, steps=5), progress=False)
        assert _acc(run.adv_pred, y) <= 0.2 and run.stats["max_linf"] <= EPS8.value + 1e-6, name


@pytest.mark.parametrize("surrogate", ["toy-cnn", "clip:toy@seed1"])
def test_transfer_sits_between_white_box_and_clean(toy_prepared, pgd8, surrogate):
    from clipguard.attacks.surrogates import build_surrogate

    p = toy_prepared
    sur = build_surrogate(surrogate, p)
    run = run_attack(p.classifier, p.data.images, p.data.labels, AttackConfig("pgd", EPS8, parse_eps("2/255"), 10),
                     resolution="native", craft_on=sur, progress=False)
    white, transfer, clean = (_acc(r, p.data.labels) for r in (pgd8.adv_pred, run.adv_pred, run.clean_pred))
    assert white <= transfer <= clean + 0.01
    assert _acc(run.source_adv_pred, p.data.labels) <= 0.2, "the surrogate itself must be broken white-box"


def test_eval_attack_record_has_checks_and_both_eps_forms(cli, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "100", "--attack", "pgd",
                            "--eps", "0,4/255,8/255", "--steps", "5", "--sanity", "--out", out, "--device", "cpu")
    assert code == 0, err
    rec = json.loads(out.read_text())
    assert rec["task"] == "robustness" and rec["attack"]["resolution"] == "model"
    assert [e["text"] for e in rec["attack"]["eps"]] == ["0", "4/255", "8/255"]
    assert rec["attack"]["eps"][2]["value"] == pytest.approx(8 / 255)
    curve = [e["robust_acc"] for e in rec["metrics"]["robust"]]
    assert curve[0] == rec["metrics"]["acc1"] and curve[0] >= curve[1] >= curve[2]
    names = {c["name"] for c in rec["checks"]}
    assert {"linf_within_eps", "in_unit_range", "no_nan", "zero_grad_share", "eps0_equals_clean",
            "deterministic_forward", "eps_sweep_monotone", "stronger_than_fgsm", "steps_converged",
            "restarts_5_vs_1"} <= names
    cheap = [c for c in rec["checks"] if c["name"] in ("linf_within_eps", "in_unit_range", "no_nan",
                                                       "eps0_equals_clean", "deterministic_forward")]
    assert all(c["passed"] for c in cheap)


def test_saved_set_round_trips(cli, tmp_path):
    from safetensors.torch import load_file

    args = ["--model", "toy", "--dataset", "toy", "--limit", "60", "--device", "cpu"]
    for quant in (False, True):
        adv = tmp_path / f"adv{int(quant)}.safetensors"
        rec_path = tmp_path / f"craft{int(quant)}.json"
        code, _, err = cli("attack", *args, "--eps", "8/255", "--steps", "5", "--adv-set", adv, "--out", rec_path,
                           *(["--quantize"] if quant else []))
        assert code == 0, err
        crafted = json.loads(rec_path.read_text())
        code, out, err = cli("eval", *args, "--adv-set", adv, "--json")
        assert code == 0, err
        evaluated = json.loads(out)
        t = load_file(str(adv))
        if quant:
            assert t["images"].dtype == torch.uint8
            from clipguard.data.registry import load_dataset

            clean = load_dataset("toy", limit=60).images
            assert (t["images"].int() - clean.int()).abs().max() <= 8
        else:
            assert evaluated["metrics"]["robust_acc"] == crafted["metrics"]["robust_acc"]
        assert evaluated["metrics"]["robust_acc"] <= 0.2


@pytest.mark.parametrize("args,needle", [
    (["--attack", "pgd", "--eps", "2"], "above 1"),
    (["--attack", "pgd", "--eps", "abc"], "not a number"),
    (["--attack", "pgd", "--eps", "-1/255"], ">= 0"),
    (["--attack", "pgd", "--steps", "0"], "--steps 0"),
    (["--attack", "nosuch"], "fgsm, pgd, apgd, autoattack"),
    (["--attack", "pgd", "--resolution", "huge"], "choose from model, native"),
    (["--attack", "pgd", "--surrogate", "nosuch-model"], "nosuch-model"),
])
def test_bad_attack_input_is_one_line_exit_2(cli, args, needle):
    code, _, err = cli("eval", "--limit", "10", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_adv_set_for_another_dataset_size_is_refused(cli, tmp_path):
    adv = tmp_path / "a.safetensors"
    assert cli("attack", "--limit", "20", "--steps", "1", "--adv-set", adv)[0] == 0
    code, _, err = cli("eval", "--limit", "30", "--adv-set", adv)
    assert code == 2 and "20 images" in err and "30 images" in err and len(err.strip().splitlines()) == 1


def test_attack_png_grid(cli, tmp_path):
    code, _, err = cli("attack", "--limit", "10", "--steps", "2", "--adv-set", tmp_path / "a.safetensors",
                       "--png", tmp_path / "png")
    assert code == 0, err
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 8 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_library_refuses_conflicting_options_before_loading():
    from clipguard.tasks.eval import EvalConfig, run_eval

    with pytest.raises(ClipguardError, match="exclude each other"):
        run_eval(EvalConfig(attack="pgd", adv_set="x.safetensors"), progress=False)
    with pytest.raises(ClipguardError, match="--surrogate is used only with --attack"):
        run_eval(EvalConfig(surrogate="toy-cnn"), progress=False)


def test_apgd_restarts_run_inside_apgd(toy_prepared):
    p = toy_prepared
    x, y = p.data.images[:10], p.data.labels[:10]
    run = run_attack(p.classifier, x, y, AttackConfig("apgd", parse_eps("2/255"), steps=3, restarts=2), progress=False)
    assert run.stats["max_linf"] <= 2 / 255 + 1e-6


def test_attack_and_eval_adv_set_check_the_saved_set(cli, tmp_path):
    """`attack` records its attack's checks and the saved set's (within eps of the clean images, in [0, 1], finite),
    so `attack --strict` has something to fail on; `eval --adv-set` checks the set it scores. Twin: a set pushed 2/255
    past its eps after it was saved fails eval's within-eps check, and --strict exits 1 after writing the record."""
    from clipguard.attacks.advset import load_adv_set, save_adv_set

    adv = tmp_path / "a.safetensors"
    code, out, err = cli("attack", "--limit", "20", "--steps", "2", "--eps", "4/255", "--adv-set", adv, "--strict",
                         "--json")
    assert code == 0, err
    rec = json.loads(out)
    names = {c["name"]: c for c in rec["checks"]}
    assert rec["checks_passed"] is True and {"linf_within_eps", "adv_set_linf_within_eps", "adv_set_in_unit_range",
                                             "adv_set_no_nan"} <= set(names)
    assert 0 < names["adv_set_linf_within_eps"]["value"] <= 4 / 255 + 1e-6
    assert names["linf_within_eps"]["eps"] == "4/255"
    code, out, err = cli("eval", "--limit", "20", "--adv-set", adv, "--json")
    assert code == 0 and json.loads(out)["checks_passed"] is True

    s = load_adv_set(adv)
    pushed = (s.images.float() + 6 / 255 * torch.sign(torch.randn_like(s.images.float()))).clamp(0, 1)
    save_adv_set(tmp_path / "b.safetensors", pushed, s.labels,
                 {k: v for k, v in s.manifest.items() if k not in ("schema", "n", "dtype", "shape")})
    code, out, err = cli("eval", "--limit", "20", "--adv-set", tmp_path / "b.safetensors", "--strict",
                         "--out", tmp_path / "b.json")
    bad = json.loads((tmp_path / "b.json").read_text())
    assert code == 1 and bad["checks_passed"] is False and "adv_set_linf_within_eps" in err
    assert [c["name"] for c in bad["checks"] if not c["passed"]] == ["adv_set_linf_within_eps"]


def test_saved_set_checks_in_l2_and_uint8():
    from clipguard.attacks.integrity import saved_set_checks

    clean = torch.full((3, 3, 4, 4), 0.5)
    inside = clean.clone()
    inside[0, 0, 0, 0] += 0.3  # L2 0.3 on one image
    ok = saved_set_checks(inside, clean, 0.5, "l2")
    assert [c["passed"] for c in ok] == [True, True, True] and abs(ok[0]["value"] - 0.3) < 1e-6
    spread = clean + 0.05  # every one of 48 values moved 0.05: L-inf 0.05, L2 0.35
    assert saved_set_checks(spread, clean, 0.3, "l2")[0]["passed"] is False
    assert saved_set_checks(spread, clean, 0.06, "linf")[0]["passed"] is True
    q = (clean * 255).round().to(torch.uint8)
    assert saved_set_checks(q + 1, q, 1 / 255, "linf")[0]["passed"] is True  # a quantized set, uint8 against uint8
    assert saved_set_checks(q + 2, q, 1 / 255, "linf")[0]["passed"] is False
