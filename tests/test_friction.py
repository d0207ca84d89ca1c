"""What a new user hit on the first day (issue 26, the friction items): options that did nothing, units that ran
silently to a wrong number. Each is a one-line refusal now; each has a twin that still runs."""

import pytest

from clipguard.errors import ClipguardError
from clipguard.finetune.config import finetune_config
from clipguard.tasks.configs import certify_config, eval_config, uap_fit_config


@pytest.mark.parametrize("opts, says", [
    ({"eps": "4/255", "norm": "l2", "sanity": True}, "--eps, --norm, --sanity are used only with --attack"),
    ({"steps": 10}, "--steps is used only with --attack"),
    ({"attack_precision": "bf16"}, "--attack-precision is used only with --attack"),
])
def test_attack_options_without_an_attack_are_refused(opts, says):
    with pytest.raises(ClipguardError, match=says):
        eval_config(**opts)


def test_clean_options_alone_still_run_clean():
    cfg = eval_config(resolution="native", limit=5)  # --resolution also places the clean images: allowed
    assert cfg.attack is None and cfg.resolution == "native"
    assert eval_config(attack="pgd", eps="4/255", steps=3).steps == 3


@pytest.mark.parametrize("make, opts, says", [
    (eval_config, {"attack": "pgd", "eps": "0.5"}, "did you mean 0.5/255"),
    (eval_config, {"attack": "pgd", "eps": "0,1"}, "did you mean 1/255"),
    (eval_config, {"attack": "pgd", "eps": "8/255", "alpha": "0.2"}, "--alpha 0.2 .* did you mean 0.2/255"),
    (uap_fit_config, {"eps": "0.5", "uap": "/tmp/u.safetensors"}, "did you mean 0.5/255"),
    (finetune_config, {"eps": "1", "run_dir": "unused"}, "did you mean 1/255"),
    (certify_config, {"sigma": 25}, "did you mean 25/255"),
])
def test_a_bare_linf_value_far_above_32_255_asks_about_255(make, opts, says):
    with pytest.raises(ClipguardError, match=says):
        make(**opts)


def test_values_that_are_meant_still_parse():
    assert eval_config(attack="pgd", eps="128/255").eps[0].value == 128 / 255  # a fraction says it is meant
    assert eval_config(attack="pgd", norm="l2", eps="0.5").eps[0].value == 0.5  # L2 radii are larger
    assert eval_config(attack="pgd", eps="0.1").eps[0].value == 0.1  # 25.5/255: plausible, no hint
    cfg = certify_config(sigma="64/255", radii="0,1/255,2")
    assert cfg.sigma == 64 / 255 and cfg.radii == (0.0, 1 / 255, 2.0)  # radii above 1 are L2 norms: allowed


def test_the_cli_takes_fractions_for_sigma_and_radii(cli, fake_task):
    import clipguard.tasks.certify as task

    got = fake_task(task, "run_certify")
    code, _, err = cli("certify", "--sigma", "64/255", "--radii", "0,1/255", "--json")
    assert code == 0, err
    assert got["cfg"].sigma == 64 / 255 and got["cfg"].radii == (0.0, 1 / 255)
    code, _, err = cli("certify", "--sigma", "25")
    assert code == 2 and "did you mean 25/255" in err and len(err.strip().splitlines()) == 1


def test_names_are_forgiving_where_they_cannot_be_ambiguous():
    from clipguard.models.loader import load_clip
    from clipguard.registry import suggest

    assert eval_config(attack="PGD").attack == "pgd"  # attack names are lower case: PGD is pgd
    assert suggest("vit-b-32", ["ViT-S-32", "ViT-B-32", "ViT-M-32"]).startswith("ViT-B-32")  # case first
    with pytest.raises(ClipguardError, match=r"unknown pretrained tag 'opnai' for ViT-B-32 \(did you mean openai\?\)"):
        load_clip("ViT-B-32:opnai", device="cpu")  # refused before any download
    with pytest.raises(ClipguardError, match=r"unknown architecture 'vit-b-32'; close matches: ViT-B-32,"):
        load_clip("vit-b-32:openai", device="cpu")


def test_records_time_the_whole_run_and_each_eps_and_keep_only_what_was_used(cli, tmp_path):
    import csv
    import json

    out, preds = tmp_path / "r.json", tmp_path / "p.csv"
    code, _, err = cli("eval", "--limit", "6", "--attack", "pgd", "--eps", "0,8/255", "--steps", "2", "--device", "cpu",
                       "--predictions", preds, "--out", out)
    assert code == 0, err
    rec = json.loads(out.read_text())
    t = rec["timings"]
    assert t["total_s"] >= t["wall_s"] + sum(e["wall_s"] for e in rec["metrics"]["robust"])  # clean + each eps
    rows = list(csv.DictReader(preds.open()))
    names = {int(r["label"]): r["label_name"] for r in rows}
    assert len(set(names.values())) == len(names) and all(n and not n.isdigit() for n in names.values())
    assert all(r["adv_pred_name@8/255"] for r in rows)
    code, _, err = cli("eval", "--limit", "6", "--device", "cpu", "--out", out)  # clean only
    config = json.loads(out.read_text())["config"]
    assert code == 0 and not {"attack", "eps", "norm", "steps", "sanity"} & set(config) and config["limit"] == 6


@pytest.mark.parametrize("args, says", [
    (["eval", "--nosuch"], "No such option: --nosuch"),
    (["eval", "--limit", "x"], "Invalid value for '--limit'"),
    (["bogus"], "No such command 'bogus'"),
])
def test_usage_errors_are_one_line_like_every_other_error(cli, args, says):
    code, _, err = cli(*args)
    assert code == 2 and err.startswith("Error: ") and says in err and len(err.strip().splitlines()) == 1, err
    assert "╭" not in err  # no Typer box


def test_output_says_what_ran(cli):
    from clipguard.cli.output import model_label

    assert [e.text for e in eval_config(attack="pgd", eps="0,8/255,4/255,8/255").eps] == ["0", "8/255", "4/255"]
    assert model_label({"model_spec": "toy", "adapter": "runs/lora1"}) == "toy + adapter runs/lora1"
    assert model_label({"model_spec": "toy", "source": {"adapter": "a"}}) == "toy + adapter a"  # attack records
    code, out, err = cli("prepare", "--dataset", "toy")
    assert code == 0 and "nothing to prepare" in out, err


@pytest.mark.parametrize("columns", ["80", "200"])
def test_the_catalogue_table_reads_whole_at_80_columns(columns):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "clipguard.cli.app", "datasets"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": columns}).stdout
    assert "imagenet1k" in out and "…" not in out  # no cut words ("Image…", "clip-…")
    assert ("clip-benchmark/wds_imagenet1k" in out) == (columns == "200")


def _toy_folder(root, splits=("",), n=12):
    """Toy test images as PNG class folders, under each of ``splits`` ("" = right under root)."""
    from PIL import Image

    from clipguard.data.toy import TOY_CLASSNAMES, toy_split

    images, labels = toy_split("test")
    for s in splits:
        for i in range(n):
            d = root / s / TOY_CLASSNAMES[int(labels[i])].replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(d / f"{s or 'x'}{i:03d}.png")
    return root


def test_a_flat_folder_is_one_split_and_held_out_checks_compare_images(cli, tmp_path):
    import json

    flat = _toy_folder(tmp_path / "flat")
    uap = tmp_path / "u.safetensors"
    code, out, err = cli("uap", "fit", "--dataset", f"imagefolder:{flat}", "--split", "train", "--uap", uap,
                         "--epochs", "1", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["data"]["split"] == "all"  # not "train": the folder has no train/
    code, _, err = cli("uap", "eval", "--dataset", f"imagefolder:{flat}", "--split", "test", "--uap", uap,
                       "--device", "cpu")
    assert code == 2 and "was fitted on 12 of the 12 images evaluated here" in err, err  # same images, any name
    split = _toy_folder(tmp_path / "split", splits=("train", "test"))
    code, _, err = cli("eval", "--dataset", f"imagefolder:{split}", "--split", "validation", "--device", "cpu")
    assert code == 2 and "has no validation/ folder (its splits: test, train)" in err, err
    code, out, err = cli("eval", "--dataset", f"imagefolder:{split}", "--split", "test", "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["data"]["split"] == "test", err



def test_finetune_refuses_to_evaluate_on_its_training_images(cli, tmp_path, monkeypatch):
    import clipguard.tasks.finetune as ft

    flat = _toy_folder(tmp_path / "flat")
    monkeypatch.setattr(ft, "train", lambda *a, **k: pytest.fail("trained although the evaluation is not held out"))
    code, _, err = cli("finetune", "--dataset", f"imagefolder:{flat}", "--run-dir", tmp_path / "run", "--device", "cpu",
                       "--eval-split", "test")
    assert code == 2 and "shares 12 of its 12 images with the training images" in err, err
    two = _toy_folder(tmp_path / "two", splits=("train", "test"))  # the same pictures, but separate split folders:
    def reached(cfg, p, progress):  # a proper layout is trusted by split (no need to read every training image)
        raise ClipguardError("training reached")

    monkeypatch.setattr(ft, "train", reached)
    code, _, err = cli("finetune", "--dataset", f"imagefolder:{two}", "--run-dir", tmp_path / "run2", "--device",
                       "cpu")
    assert code == 2 and "training reached" in err, err


def test_a_skipped_check_is_not_reported_as_failed():
    from clipguard.records.rows import failed_checks

    rec = {"checks": [{"name": "skipped", "passed": None}, {"name": "bad", "passed": False, "eps": "8/255"},
                      {"name": "good", "passed": True}], "checks_passed": False}
    assert failed_checks(rec) == ["bad@8/255"]
    assert failed_checks({"checks": [{"name": "skipped", "passed": None}], "checks_passed": None}) == []
