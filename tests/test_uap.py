"""Universal adversarial perturbations on the toy world: `clipguard uap fit` / `clipguard uap eval`.

One SGD fit (the acceptance command) is shared by the module; everything else fits small sets.
"""

from __future__ import annotations

import json

import pytest
import torch

from clipguard.cli.app import run

EPS = 16 / 255


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _fit(tmp, name: str, *args: str) -> tuple[str, dict]:
    out, rec = tmp / f"{name}.safetensors", tmp / f"{name}.json"
    code = run(["uap", "fit", "--model", "toy", "--dataset", "toy", "--split", "train", "--uap", str(out),
                "--device", "cpu", "--out", str(rec), "--json", *args])
    assert code == 0
    return str(out), json.loads(rec.read_text())


@pytest.fixture(scope="module")
def sgd_uap(tmp_path_factory):
    """The acceptance command: clipguard uap fit --model toy --dataset toy --split train --eps 16/255 --uap u.st"""
    return _fit(tmp_path_factory.mktemp("uap"), "u", "--eps", "16/255")


def _eval(cli, tmp_path, uap: str, *args: str) -> dict:
    out = tmp_path / "eval.json"
    code, _, err = cli("uap", "eval", "--uap", uap, "--model", "toy", "--dataset", "toy", "--split", "test",
                       "--device", "cpu", "--out", out, *args)
    assert code == 0, err
    return json.loads(out.read_text())


def _fooling(p, v: torch.Tensor) -> float:
    from clipguard.uap.core import predict, universal_attack

    inputs = lambda b: b.float() / 255  # noqa: E731 (toy: native size == model input size)
    clean, adv = predict(p.classifier, p.data.images, inputs, None, universal_attack(v))
    return (clean != adv).float().mean().item()


def test_sgd_uap_fools_held_out_images(cli, tmp_path, sgd_uap, toy_prepared):
    path, fit = sgd_uap
    assert fit["schema"] == "clipguard.result/1" and fit["task"] == "uap_fit" and fit["checks_passed"]
    assert fit["attack"]["eps"] == {"text": "16/255", "value": EPS} and fit["attack"]["method"] == "sgd"
    assert fit["timings"]["images_per_s"] > 0 and fit["metrics"]["fooling_history"]
    rec = _eval(cli, tmp_path, path, "--png", tmp_path / "png")
    m = rec["metrics"]
    assert rec["task"] == "uap_evaluation" and rec["data"]["split"] == "test" and rec["data"]["n"] == 1000
    assert m["fooling_rate"] >= 0.5, m
    assert m["fooling_rate"] >= 3 * m["random_fooling_rate"], m
    assert m["perturbed_acc"] < m["acc1"] and m["attack_success_rate"] > 0.4
    assert rec["uap"]["transfer"] is False and rec["checks_passed"]
    assert sorted(p.split("/")[-1] for p in rec["pngs"]) == ["uap_grid.png", "uap_perturbation.png"]
    # Independently of the record: random +-eps sign patterns (the same L-inf norm) barely fool.
    from clipguard.uap.file import UAPFile

    v = UAPFile.from_disk(path).delta
    uap_rate = _fooling(toy_prepared, v)
    g = torch.Generator().manual_seed(123)
    rand = [_fooling(toy_prepared, EPS * (torch.randint(0, 2, v.shape, generator=g) * 2 - 1).float())
            for _ in range(3)]
    assert uap_rate >= 0.5 and uap_rate >= 3 * max(rand), (uap_rate, rand)


def test_saved_uap_within_eps_and_reloads_bit_identically(sgd_uap, tmp_path):
    from safetensors.torch import load_file

    from clipguard.uap.file import UAPFile, tensor_digest

    path, fit = sgd_uap
    a, b = UAPFile.from_disk(path), UAPFile.from_disk(path)
    assert a.delta.dtype == torch.float32 and tuple(a.delta.shape) == (1, 3, 32, 32)
    assert float(a.delta.abs().max()) <= EPS + 1e-7  # float32 rounding of eps only
    assert torch.equal(a.delta, b.delta) and tensor_digest(a.delta) == fit["uap"]["sha256"]
    assert torch.equal(load_file(path)["uap"], a.delta)
    m = a.manifest
    assert m["source"]["model"] == "toy" and m["source"]["fingerprint"] == fit["weights_digest"]
    assert m["data"]["split"] == "train" and m["attack"]["norm"] == "linf" and m["attack"]["method"] == "sgd"
    assert m["fitting"]["fooling_rate"] == fit["metrics"]["fooling_rate"]
    a.to_disk(tmp_path / "again.safetensors")  # a re-save holds the same bits
    assert torch.equal(UAPFile.from_disk(tmp_path / "again.safetensors").delta, a.delta)


def test_l2_uap_within_eps(tmp_path):
    from clipguard.uap.file import UAPFile

    path, fit = _fit(tmp_path, "l2", "--norm", "l2", "--eps", "1", "--epochs", "4", "--limit", "512",
                     "--batch-size", "64")
    v = UAPFile.from_disk(path).delta
    assert float(v.flatten().norm(p=2)) <= 1 + 1e-5 and fit["uap"]["l2"] <= 1 + 1e-5
    assert fit["metrics"]["fooling_rate"] > 0.05 and fit["checks_passed"]


def test_deepfool_uap_fools_held_out_images(cli, tmp_path):
    path, fit = _fit(tmp_path, "df", "--method", "deepfool", "--eps", "16/255", "--limit", "300", "--epochs", "3")
    assert fit["attack"]["method"] == "deepfool" and fit["uap"]["linf"] <= EPS + 1e-7
    m = _eval(cli, tmp_path, path, "--limit", "500")["metrics"]
    assert m["fooling_rate"] >= 0.3, m


def test_targeted_uap(cli, tmp_path):
    path, fit = _fit(tmp_path, "t", "--eps", "16/255", "--target-class", "red circle", "--limit", "500",
                     "--epochs", "3")
    assert fit["attack"]["target_class_name"] == "red circle" and fit["attack"]["target_class"] == 0
    m = _eval(cli, tmp_path, path, "--limit", "300")["metrics"]
    assert m["targeted_success_rate"] >= 0.5, m


def test_uap_of_another_size_is_resized_and_stays_in_the_ball(cli, tmp_path, sgd_uap):
    from clipguard.specs import Norm
    from clipguard.uap.core import fit_to
    from clipguard.uap.file import UAPFile

    src = UAPFile.from_disk(sgd_uap[0])
    small = UAPFile(torch.nn.functional.avg_pool2d(src.delta, 2).contiguous(), dict(src.manifest))
    small.to_disk(tmp_path / "small.safetensors")
    rec = _eval(cli, tmp_path, str(tmp_path / "small.safetensors"), "--limit", "200")
    assert rec["uap"]["resized"] and rec["uap"]["applied_shape"] == [1, 3, 32, 32] and rec["checks_passed"]
    big = fit_to(src.delta, (64, 64), Norm.L2, 1.0)
    assert tuple(big.shape[-2:]) == (64, 64) and float(big.norm()) <= 2.0 + 1e-5  # radius x sqrt(area ratio)
    assert float(fit_to(src.delta, (224, 224), Norm.LINF, EPS).abs().max()) <= EPS + 1e-7


def _bad_shape_file(tmp_path, src_path: str, shape) -> str:
    from safetensors.torch import save_file

    from clipguard.uap.file import UAPFile, tensor_digest

    src, t = UAPFile.from_disk(src_path), torch.zeros(shape)
    manifest = {**src.manifest, "shape": list(shape), "sha256": tensor_digest(t)}
    path = tmp_path / f"bad_{'x'.join(map(str, shape))}.safetensors"
    save_file({"uap": t}, str(path), metadata={"manifest": json.dumps(manifest)})
    return str(path)


@pytest.mark.parametrize("case", ["eps0", "eps_neg", "norm_l3", "target", "shape_aspect", "shape_channels",
                                  "not_a_uap"])
def test_bad_input_is_one_line_exit_2(cli, tmp_path, sgd_uap, case):
    fit = ["uap", "fit", "--uap", tmp_path / "x.safetensors", "--device", "cpu", "--limit", "20"]
    ev = ["uap", "eval", "--device", "cpu", "--limit", "20", "--uap"]
    args, needle = {
        "eps0": ([*fit, "--eps", "0"], "must be > 0"),
        "eps_neg": ([*fit, "--eps=-1/255"], "must be > 0"),
        "norm_l3": ([*fit, "--norm", "l3"], "--norm 'l3'"),
        "target": ([*fit, "--target-class", "pink hexagon"], "not in the class list"),
        "shape_aspect": ([*ev, _bad_shape_file(tmp_path, sgd_uap[0], (1, 3, 16, 40))], "does not fit"),
        "shape_channels": ([*ev, _bad_shape_file(tmp_path, sgd_uap[0], (1, 1, 32, 32))], "(1, 3, H, W)"),
        "not_a_uap": ([*ev, tmp_path / "nope.safetensors"], "no such file"),
    }[case]
    code, _, err = cli(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], err
    assert not (tmp_path / "x.safetensors").exists()


def test_fit_command_passes_its_options(cli, fake_task):
    import clipguard.tasks.uap as ur

    seen = fake_task(ur, "run_uap_fit", {"fake": True})
    code, out, err = cli("uap", "fit", "--uap", "v.safetensors", "--model", "toy@seed1", "--eps", "8/255", "--norm",
                         "l2", "--method", "deepfool", "--target-fooling", "0.7", "--epochs", "4", "--batch-size",
                         "32", "--target-class", "red circle", "--resolution", "native", "--json")
    assert code == 0, err
    assert json.loads(out) == {"fake": True}
    assert seen["cfg"] == ur.uap_fit_config(uap="v.safetensors", model="toy@seed1", eps="8/255", norm="l2",
                                            method="deepfool", target_fooling=0.7, epochs=4, batch_size=32,
                                            target_class="red circle", resolution="native")
    assert seen["progress"] is False


def test_uap_bench_cell_evaluates_with_the_cells_own_columns_and_limit(monkeypatch, tmp_path):
    """A uap cell fits on its split and evaluates on the test split with the same model and data options
    (columns, limit, prompts...); eval_* keys override one. Regression: columns and limit were dropped."""
    import clipguard.tasks.uap as ur
    from clipguard.tasks.bench import CELL_KINDS

    seen = {}
    monkeypatch.setattr(ur, "run_uap_fit", lambda cfg, progress: seen.setdefault("fit", cfg) and {
        "metrics": {}, "timings": {}})
    monkeypatch.setattr(ur, "run_uap_eval", lambda cfg, progress: seen.setdefault("eval", cfg) and {})
    cell = {"_cell": "u", "model": "toy", "dataset": "hf:me/shapes", "image_column": "picture",
            "label_column": "kind", "limit": 40, "templates": "openai", "eps": "8/255"}
    CELL_KINDS.get("uap")(cell, tmp_path, False)
    fit, ev = seen["fit"].run, seen["eval"].run
    assert (fit.split, ev.split) == ("train", "test")
    for opts in (fit, ev):
        assert (opts.image_column, opts.label_column, opts.limit, opts.templates, opts.dataset) == \
            ("picture", "kind", 40, "openai", "hf:me/shapes")
    seen.clear()
    CELL_KINDS.get("uap")({**cell, "eval_limit": 7, "eval_split": "validation"}, tmp_path, False)
    assert (seen["eval"].run.limit, seen["eval"].run.split, seen["fit"].run.limit) == (7, "validation", 40)
