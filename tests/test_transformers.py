"""The transformers: model backend (issue 22, items 3-6) on tiny random CLIPModel / SiglipModel checkpoints written
here (configs, a tokenizer of single characters, image-processor configs): parity with transformers' own pipeline,
fine-tuning, every command, bad input and the --trust-remote-code gate. Offline; no weights are downloaded."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipguard.errors import ClipguardError

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

CLASSES = ["cat", "dog", "red car"]
SIZES = [(45, 37), (33, 61), (71, 38), (29, 40), (50, 50), (64, 35)]  # (W, H): odd sizes, odd crop offsets


def _tokenizer(folder: Path):
    """A CLIP BPE tokenizer of single characters (each with a ``</w>`` twin) and no merges (STACK-NOTES)."""
    vocab = {}
    for c in string.ascii_lowercase + string.digits + ".,'-{}":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")), vocab


def _images(root: Path, seed: int) -> None:
    """Odd sizes, a grey, a palette and a transparent RGBA picture per split; classes as folders."""
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(2):
            w, h = SIZES[(2 * ci + j) % len(SIZES)]
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            im = [im, im.convert("L"), im.convert("P", palette=Image.Palette.ADAPTIVE)][(ci + j) % 3]
            if (ci, j) == (2, 1):
                im = im.convert("RGBA")
                im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
            im.save(root / c / f"{j}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok, vocab = _tokenizer(root / "tok")
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"], vocab_size=len(vocab), max_position_embeddings=16)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config={**tower, **ids}, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16))
    clip.logit_scale.data.fill_(3.0)  # a temperature of ~20: logits of a few units, so 1e-4 is a tight bound
    siglip = transformers.SiglipModel(transformers.SiglipConfig(
        text_config={**tower, **ids}, vision_config={**tower, "image_size": 32, "patch_size": 8}))
    siglip.logit_scale.data.fill_(2.0)  # transformers initialises both to 0: a bias that is there, and matters
    siglip.logit_bias.data.fill_(-2.0)
    for name, model, proc in [
        ("clip", clip, transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32})),
        ("siglip", siglip, transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})),
    ]:
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        proc.save_pretrained(root / name)
    for split, seed in [("train", 1), ("test", 2)]:
        _images(root / "images" / split, seed)
    (root / "prompts.json").write_text(json.dumps({"classnames": CLASSES, "templates": {"seed": ["{c}"]}}))
    return root


def _run(world, name: str, **kw):
    from clipguard.run_options import RunOptions
    from clipguard.tasks.setup import prepare

    return prepare(RunOptions(model=f"transformers:{world / name}", dataset=f"imagefolder:{world / 'images'}",
                              prompts=str(world / "prompts.json"), device="cpu", precision="fp32", **kw))


def _reference(world, name: str, processor_cls=None) -> torch.Tensor:
    """transformers' own pipeline: the checkpoint's PIL image processor + tokenizer + model -> logits_per_image, on
    the test images in clipguard's order (class folders sorted, files sorted). SigLIP's text goes in as its processor
    hands it: padded to max_length, input_ids only (SiglipTokenizer returns no attention mask)."""
    d = world / name
    model = getattr(transformers, {"clip": "CLIPModel", "siglip": "SiglipModel"}[name]).from_pretrained(d).eval()
    proc = (processor_cls or {"clip": transformers.CLIPImageProcessorPil,
                              "siglip": transformers.SiglipImageProcessorPil}[name]).from_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    files = sorted(p for c in sorted(CLASSES) for p in (world / "images" / "test" / c).glob("*.png"))
    text = tok(CLASSES, padding="max_length", max_length=16, return_tensors="pt")
    kw = {"input_ids": text["input_ids"]} if name == "siglip" else dict(text)
    with torch.no_grad():
        return model(pixel_values=proc(images=[Image.open(f) for f in files], return_tensors="pt")["pixel_values"],
                     **kw).logits_per_image


# --------------------------------------------------------------------------------------------- spec and parity


def test_spec_forms(tmp_path):
    from clipguard.specs import parse_model_spec

    s = parse_model_spec("transformers:openai/clip-vit-base-patch32@3d74acf")
    assert (s.kind, s.repo, s.revision, s.path) == ("transformers", "openai/clip-vit-base-patch32", "3d74acf", None)
    assert parse_model_spec(f"transformers:{tmp_path}").path == str(tmp_path)
    for bad in ["transformers:clip", "transformers:a/b/c", "transformers:org/name@"]:
        with pytest.raises(ClipguardError, match="transformers:ORG/NAME"):
            parse_model_spec(bad)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_logits_equal_the_transformers_pipeline_on_every_image(world, name):
    p = _run(world, name)
    ours = p.classifier(p.data.images.float() / 255)
    ref = _reference(world, name)
    assert ours.shape == ref.shape == (6, 3)
    assert (ours - ref).abs().max().item() < 1e-4, (ours, ref)
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    assert p.data.labels.tolist() == [0, 0, 1, 1, 2, 2]  # the order _reference reads the files in
    assert p.clip.geometry.order == "transformers"
    assert p.clip.geometry.resize_mode == {"clip": "shortest", "siglip": "squash"}[name]
    if name == "siglip":  # the bias is in the logits: without it they would be off by it
        assert abs(p.clip.model.logit_bias.item()) > 1e-3
    else:
        assert p.clip.model.logit_bias is None


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_twin_open_clip_order_or_the_torchvision_processor_would_differ(world, name, monkeypatch):
    """The parity above can fail: open_clip's order (resize a palette image before RGB; CenterCrop's rounded offset)
    moves these pictures, and so does transformers' default torchvision image processor (its own bicubic)."""
    from dataclasses import replace

    from clipguard.models import hf_transformers as hf

    real = hf.preprocessing
    monkeypatch.setattr(hf, "preprocessing", lambda ck: (replace(real(ck)[0], order="open_clip"), *real(ck)[1:]))
    p = _run(world, name)
    assert (p.classifier(p.data.images.float() / 255) - _reference(world, name)).abs().max().item() > 1e-3
    torchvision_proc = {"clip": transformers.CLIPImageProcessor, "siglip": transformers.SiglipImageProcessor}[name]
    assert (_reference(world, name, torchvision_proc) - _reference(world, name)).abs().max().item() > 1e-4


def test_facade_scale_bias_and_text_padding(world):
    from clipguard.models.loader import load_clip

    clip = load_clip(f"transformers:{world / 'clip'}", device="cpu", precision="fp32")
    assert clip.model.logit_scale.exp().item() == pytest.approx(np.exp(3.0), rel=1e-6)
    assert clip.tokenizer(["cat"]).shape == (1, 16) and "max_length=16" in clip.tokenizer_name
    # CLIP pools the first end-of-text token of a causal tower: max_length padding = padding to the longest + mask
    tok = transformers.AutoTokenizer.from_pretrained(world / "clip")
    short = tok(CLASSES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = clip.model.hf.get_text_features(**short).pooler_output
        assert torch.allclose(clip.model.encode_text(clip.tokenizer(CLASSES)), ref, atol=1e-5)
    sig = load_clip(f"transformers:{world / 'siglip'}", device="cpu", precision="fp32")
    # twin: SigLIP's bidirectional tower sees the padding, so its max_length padding is not optional
    with torch.no_grad():
        padded = sig.model.encode_text(sig.tokenizer(CLASSES))
        unpadded = sig.model.encode_text(tok(CLASSES, padding=True, return_tensors="pt")["input_ids"])
    assert (padded - unpadded).abs().max().item() > 1e-4


def test_preprocess_from_config_alone_and_fingerprint(world, tmp_path, monkeypatch):
    import shutil

    from clipguard.models import hf_transformers as hf
    from clipguard.models.loader import load_clip, model_preprocess

    loaded = load_clip(f"transformers:{world / 'siglip'}", device="cpu", precision="fp32")
    monkeypatch.setattr(hf, "build", lambda *a, **k: pytest.fail("model_preprocess loaded weights"))
    pre = model_preprocess(f"transformers:{world / 'siglip'}")
    assert (pre.input_size, pre.mean, pre.std, pre.geometry) == (
        loaded.input_size, loaded.mean, loaded.std, loaded.geometry) == ((32, 32), (0.5,) * 3, (0.5,) * 3,
                                                                          loaded.geometry)
    # the fingerprint is the weights' digest: a copy keeps it, changed weights change it
    copy = tmp_path / "copy"
    shutil.copytree(world / "clip", copy)
    assert hf.fingerprint(hf.inspect(_spec(copy)), _digest) == hf.fingerprint(hf.inspect(_spec(world / "clip")),
                                                                               _digest)
    model = transformers.CLIPModel.from_pretrained(copy)
    model.logit_scale.data += 1
    model.save_pretrained(copy)
    assert hf.fingerprint(hf.inspect(_spec(copy)), _digest) != hf.fingerprint(hf.inspect(_spec(world / "clip")),
                                                                               _digest)


def _spec(path):
    from clipguard.specs import parse_model_spec

    return parse_model_spec(f"transformers:{path}")


def _digest(path):
    from clipguard.models.loader import file_digest

    return file_digest(path)


# ------------------------------------------------------------------------------------------------ bad input


def _bad_folder(world, tmp_path, case: str) -> Path:
    import shutil

    d = tmp_path / case
    if case == "no-config":
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"")
        return d
    shutil.copytree(world / "clip", d)
    config = json.loads((d / "config.json").read_text())
    if case == "bert":
        (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    elif case == "remote":
        (d / "config.json").write_text(json.dumps({**config, "model_type": "my-clip",
                                                   "auto_map": {"AutoModel": "modeling_my.MyClip"}}))
    elif case == "naflex":
        (d / "config.json").write_text(json.dumps({**config, "model_type": "siglip2"}))
    elif case == "no-tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).unlink()
    elif case == "no-processor":
        (d / "preprocessor_config.json").unlink()
    return d


@pytest.mark.parametrize("case, needle", [
    ("no-config", "holds no config.json"), ("bert", "is a 'bert' model"), ("remote", "--trust-remote-code"),
    ("naflex", "NaFlex"), ("no-tokenizer", "holds no tokenizer"), ("no-processor", "no preprocessor_config.json")])
def test_bad_checkpoint_is_one_line_exit_2_before_any_weights(world, tmp_path, cli, monkeypatch, case, needle):
    from clipguard.models import hf_transformers as hf

    monkeypatch.setattr(hf, "build", lambda *a, **k: pytest.fail("weights were loaded"))
    d = _bad_folder(world, tmp_path, case)
    code, out, err = cli("eval", "--model", f"transformers:{d}", "--dataset", f"imagefolder:{world / 'images'}",
                         "--prompts", world / "prompts.json", "--device", "cpu")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_remote_code_runs_only_with_the_flag(world, tmp_path, monkeypatch):
    """With the flag, inspect lets it through and build asks transformers' AutoModel for trust_remote_code=True;
    a family transformers knows is never loaded with it, flag or not."""
    from clipguard.models import hf_transformers as hf

    seen = []

    class Fake:
        @staticmethod
        def from_pretrained(source, **kw):
            seen.append(kw["trust_remote_code"])
            raise OSError("stop here")

    ck = hf.inspect(_spec(_bad_folder(world, tmp_path, "remote")), trust_remote_code=True)
    assert ck.remote_code
    monkeypatch.setattr(hf, "model_class", lambda ck: Fake)
    for checkpoint in (ck, hf.inspect(_spec(world / "clip"), trust_remote_code=True)):
        with pytest.raises(ClipguardError, match="cannot load the weights"):
            hf.build(checkpoint, trust_remote_code=True)
    assert seen == [True, False]


def test_hub_surrogate_needs_the_flag(cli, fake_task):
    import clipguard.tasks.eval as eval_task

    seen = fake_task(eval_task, "run_eval")
    args = ["eval", "--model", "toy", "--attack", "pgd", "--eps", "4/255", "--surrogate",
            "hub:chenyaofu/pytorch-cifar-models:cifar10_resnet20", "--device", "cpu"]
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--trust-remote-code" in err, err
    assert "cfg" not in seen
    code, _, err = cli(*args, "--trust-remote-code", "--json")  # twin: with the flag the options pass
    assert code == 0, err
    assert seen["cfg"].run.trust_remote_code is True


def test_hub_surrogate_build_refuses_without_the_flag(toy_prepared, monkeypatch):
    from clipguard.attacks import surrogates

    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("torch.hub ran the repository's code"))
    with pytest.raises(ClipguardError, match="--trust-remote-code"):
        surrogates.build_surrogate("hub:owner/repo:entry", toy_prepared)


# ------------------------------------------------------------------------------------------------ fine-tuning


def test_lora_wraps_the_encoder_projections_only(world):
    import copy

    from clipguard.models.adapters import apply_lora
    from clipguard.models.loader import load_clip

    for name in ("clip", "siglip"):
        clip = load_clip(f"transformers:{world / name}", device="cpu", precision="fp32")
        visual, _ = apply_lora(copy.deepcopy(clip.model.visual))
        wrapped = sorted(n.split(".lora_A")[0] for n, _ in visual.named_parameters() if "lora_A" in n)
        assert len(wrapped) == 2 * 4 and all(".encoder.layers." in n for n in wrapped), wrapped
        assert {n.split(".")[-1] for n in wrapped} == {"q_proj", "k_proj", "v_proj", "out_proj"}
        assert all("lora_" in n for n, p in visual.named_parameters() if p.requires_grad)
        assert not any(isinstance(m, torch.nn.MultiheadAttention) and hasattr(m, "base_layer")
                       for m in visual.modules())  # SigLIP's pooling head is left alone


def test_lora_finetune_compiles_saves_and_loads_back_identically(world, cli, tmp_path, monkeypatch):
    from clipguard.models import adapters
    from clipguard.models.classifier import ZeroShotClassifier

    saved = {}
    real = adapters.save_adapter

    def spy(adapter_dir, visual, **kw):
        saved["visual"] = visual
        return real(adapter_dir, visual, **kw)

    monkeypatch.setattr(adapters, "save_adapter", spy)
    out = tmp_path / "lora"
    code, _, err = cli("finetune", "--model", f"transformers:{world / 'clip'}", "--dataset",
                       f"imagefolder:{world / 'images'}", "--prompts", world / "prompts.json", "--device", "cpu",
                       "--method", "lora", "--compile", "--max-steps", "2", "--batch-size", "4", "--lr", "5e-2",
                       "--eps", "1/255", "--eval-limit", "6", "--eval-steps", "1", "--run-dir", out, "--json")
    assert code == 0, err
    record = json.loads((out / "record.json").read_text())
    assert record["finetune"]["train"]["compile_s"] > 0 and record["finetune"]["train"]["trainable_params"] == 4096
    p = _run(world, "clip", adapter=str(out))
    x = p.data.images.float() / 255
    trained = ZeroShotClassifier.from_clip(p.clip, p.text.embeddings, visual=saved["visual"].eval())
    with torch.no_grad():
        assert torch.equal(p.classifier(x), trained(x))
        base = ZeroShotClassifier.from_clip(p.clip, p.text.embeddings)(x)
        assert (p.classifier(x) - base).abs().max().item() > 1e-4  # twin: the adapter did change the model


def test_every_command_runs_on_a_transformers_model(world, cli, tmp_path):
    """bench runs eval (PGD), uap, certify and fine-tuning (VPT, full) cells on the tiny SigLIP, and evaluates the VPT
    adapter; `attack` writes an adversarial set."""
    common = (f'model = "transformers:{world / "siglip"}"\ndataset = "imagefolder:{world / "images"}"\n'
              f'prompts = "{world / "prompts.json"}"\ndevice = "cpu"\n')
    ft = 'kind = "finetune"\nsplit = "train"\neps = "1/255"\nmax_steps = 1\nbatch_size = 6\neval_limit = 6\n'
    suite = tmp_path / "suite.toml"
    suite.write_text(
        f'[suite]\nname = "hf"\n[defaults]\n{common}'
        '[[cell]]\nid = "pgd"\nattack = "pgd"\neps = "0,2/255"\nsteps = 2\n'
        '[[cell]]\nid = "uap"\nkind = "uap"\neps = "8/255"\nepochs = 1\n'
        '[[cell]]\nid = "cert"\nkind = "certify"\nsigma = 0.25\nn0 = 8\nn = 16\ncheck_images = 0\n'
        f'[[cell]]\nid = "vpt"\n{ft}method = "vpt"\nvpt_tokens = 2\n'
        f'[[cell]]\nid = "full"\n{ft}method = "full"\n'
        '[[cell]]\nid = "vpt-eval"\nadapter = "@vpt"\n')
    code, _, err = cli("bench", "run", suite, "--out", tmp_path / "out")
    assert code == 0, err
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "records").glob("*.json")}
    assert set(records) == {"pgd", "uap", "cert", "vpt", "full", "vpt-eval"}
    assert all(r["model_spec"] == f"transformers:{world / 'siglip'}" for r in records.values())
    assert records["vpt-eval"]["metrics"]["acc1"] == records["vpt"]["metrics"]["acc1"]
    code, _, err = cli("attack", "--model", f"transformers:{world / 'clip'}", "--dataset",
                       f"imagefolder:{world / 'images'}", "--prompts", world / "prompts.json", "--attack", "fgsm",
                       "--eps", "4/255", "--adv-set", tmp_path / "adv.safetensors", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "adv.safetensors").is_file()


def test_seed_table_has_the_transformers_row_and_opts_in_to_the_hub_surrogate(tmp_path):
    """benchmarks/seed-table.toml: every cell's configs build (options parsed and checked, no model loads), the
    transformers checkpoint row is there, and without trust_remote_code its hub: surrogate cells are refused."""
    from clipguard.tasks.bench import CELL_KINDS, load_suite

    _, cells = load_suite(Path(__file__).resolve().parents[1] / "benchmarks" / "seed-table.toml")
    hf_cells = [c for c in cells if c.get("model") == "transformers:openai/clip-vit-base-patch32"]
    assert {c["id"] for c in hf_cells} >= {"hf-base-transfer", "hf-lora-tecoa", "hf-lora-tecoa-transfer"}

    def build(cell):
        opts = {k: v for k, v in cell.items() if k not in ("id", "kind", "label")}
        if str(opts.get("adapter", "")).startswith("@"):
            opts["adapter"] = str(tmp_path / "adapters" / opts["adapter"][1:])
        CELL_KINDS.get(cell["kind"]).configs({**opts, "_cell": cell["id"]}, tmp_path)

    for cell in cells:
        build(cell)
    refused = 0
    for cell in cells:
        if str(cell.get("surrogate", "")).startswith("hub:"):
            with pytest.raises(ClipguardError, match="--trust-remote-code"):
                build({k: v for k, v in cell.items() if k != "trust_remote_code"})
            refused += 1
    assert refused >= 10


def test_json_runs_keep_stderr_free_of_transformers_progress_bars(world, cli, capsys):
    """transformers draws a "Loading weights" bar on stderr while it loads; a --json run shows none, and the bars are
    back on for the caller afterwards. Twin: the same load through transformers directly draws it here."""
    from transformers.utils import logging as tlog

    transformers.CLIPModel.from_pretrained(world / "clip")
    assert "Loading weights" in capsys.readouterr().err  # the bar exists and this capture sees it
    code, out, err = cli("eval", "--model", f"transformers:{world / 'clip'}", "--dataset",
                         f"imagefolder:{world / 'images'}", "--prompts", world / "prompts.json", "--device", "cpu",
                         "--json")
    assert code == 0, err
    assert "Loading weights" not in err and json.loads(out)["metrics"]["acc1"] is not None
    assert tlog.is_progress_bar_enabled()
