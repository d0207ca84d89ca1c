"""Each model's own preprocessing (issue 22, item 1): pixel parity with open_clip itself.

For OpenAI CLIP (ViT and ResNet), SigLIP (squash) and MobileCLIP (bilinear, mean 0 / std 1), from the pretrained tag's
preprocess config only (no weights), ``clipguard.load_images(..., model=SPEC)`` must give the pixels that
``open_clip.image_transform`` gives, on odd-size RGB, grey, palette and RGBA images; every check has a twin that feeds
it a broken geometry (shortest for a squash model, bicubic for a bilinear one, RGB conversion before the resize).
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clipguard
from clipguard.data.images import DEFAULT_GEOMETRY, Geometry, eval_geometry, protocol_name, to_uint8_chw
from clipguard.data.registry import load_dataset
from clipguard.errors import ClipguardError
from clipguard.models.classifier import ZeroShotClassifier
from clipguard.models.loader import geometry_from_cfg, model_geometry, model_input_size, model_preprocess

SPECS = ["ViT-B-32:openai", "RN50:openai", "ViT-B-16-SigLIP:webli", "MobileCLIP-S1:datacompdr"]
TOL = 1 / 255  # the acceptance: at most one pixel level apart


def _save(root, cls, name, im):
    (root / cls).mkdir(parents=True, exist_ok=True)
    im.save(root / cls / name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of odd sizes and modes: RGB, grey, palette (small: upscaled; large: downscaled), a palette with
    a transparent index, RGBA with real transparency, opaque RGBA, grey + alpha."""
    root = tmp_path_factory.mktemp("modes")
    rng = np.random.default_rng(0)

    def noise(h, w, c=3):
        return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    _save(root, "a", "rgb.png", Image.fromarray(noise(37, 61)))
    _save(root, "a", "grey.png", Image.fromarray(noise(80, 45, 1)))
    _save(root, "a", "palette.png", Image.fromarray(noise(50, 71)).quantize(64))
    _save(root, "a", "palette_big.png", Image.fromarray(noise(300, 410)).quantize(16))
    pal = Image.fromarray(noise(63, 29)).quantize(32)
    pal.info["transparency"] = 3
    _save(root, "b", "palette_transparent.png", pal)
    rgba = noise(41, 53, 4)
    rgba[..., 3] = rng.integers(0, 256, (41, 53))
    _save(root, "b", "rgba.png", Image.fromarray(rgba, "RGBA"))
    opaque = noise(90, 33, 4)
    opaque[..., 3] = 255
    _save(root, "b", "rgba_opaque.png", Image.fromarray(opaque, "RGBA"))
    la = noise(47, 58, 2)
    _save(root, "b", "grey_alpha.png", Image.fromarray(la, "LA"))
    return root


def _files(root):
    return sorted(p for p in root.rglob("*.png"))  # imagefolder's order: class folders, then file names


def _tag_cfg(spec: str) -> tuple[int, dict]:
    """(input size, preprocess config) straight from open_clip: the model config's size and the tag's config."""
    arch, tag = spec.split(":")
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    return size, {k: cfg[k] for k in ("mean", "std", "resize_mode", "interpolation") if k in cfg}


def _open_clip_pixels(files, spec: str, *, normalise: bool = False) -> torch.Tensor:
    """open_clip's own eval transform of each file as opened (mean 0 / std 1: raw pixels, unless ``normalise``)."""
    size, cfg = _tag_cfg(spec)
    if not normalise:
        cfg = {**cfg, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    t = open_clip.image_transform(size, is_train=False, **cfg)
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(t(im))
    return torch.stack(out)


def _max_diff(ours_uint8: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours_uint8.float() / 255 - ref).abs().max().item()


@pytest.mark.parametrize("spec", SPECS)
def test_load_images_for_a_model_matches_open_clip_pixels(folder, spec):
    data = clipguard.load_images(f"imagefolder:{folder}", model=spec)
    ref = _open_clip_pixels(_files(folder), spec)
    assert data.images.shape == ref.shape and len(data) == 8
    assert _max_diff(data.images, ref) <= TOL
    # the normalised tensors: clipguard's classifier normalisation vs open_clip's whole transform
    pp = model_preprocess(spec)
    clf = ZeroShotClassifier(torch.nn.Identity(), torch.zeros(2, 4), 1.0, pp.mean, pp.std, pp.input_size)
    norm = clf.preprocess(data.images.float() / 255)
    ref_norm = _open_clip_pixels(_files(folder), spec, normalise=True)
    assert (norm - ref_norm).abs().max().item() <= TOL / min(pp.std) + 1e-5
    # the record names the geometry
    g = geometry_from_cfg(_tag_cfg(spec)[1])
    assert f"resize_mode={g.resize_mode}, interpolation={g.interpolation}" in data.info["preprocess"]


def test_the_specs_cover_squash_bilinear_and_their_mean_std():
    """The parity above means something only if the models differ: squash, bilinear, their own mean/std."""
    got = {s: model_preprocess(s) for s in SPECS}
    assert got["ViT-B-16-SigLIP:webli"].geometry == Geometry("squash", "bicubic")
    assert got["ViT-B-16-SigLIP:webli"].mean == (0.5, 0.5, 0.5)
    assert got["MobileCLIP-S1:datacompdr"].geometry == Geometry("shortest", "bilinear")
    assert got["MobileCLIP-S1:datacompdr"].input_size == (256, 256) == model_input_size("MobileCLIP-S1:datacompdr")
    assert got["MobileCLIP-S1:datacompdr"].std == (1.0, 1.0, 1.0)
    assert got["ViT-B-32:openai"].geometry == got["RN50:openai"].geometry == DEFAULT_GEOMETRY
    assert got["RN50:openai"].mean == open_clip.OPENAI_DATASET_MEAN
    assert model_geometry("ViT-B-32:none") == DEFAULT_GEOMETRY  # ARCH:none: open_clip's defaults
    assert model_preprocess("toy").input_size == (32, 32)


def test_twin_shortest_on_a_squash_model_fails_the_parity(folder):
    spec = "ViT-B-16-SigLIP:webli"
    wrong = load_dataset(f"imagefolder:{folder}", size=224, geometry=Geometry("shortest", "bicubic"))
    assert _max_diff(wrong.images, _open_clip_pixels(_files(folder), spec)) > TOL


def test_twin_bicubic_on_a_bilinear_model_fails_the_parity(folder):
    spec = "MobileCLIP-S1:datacompdr"
    wrong = load_dataset(f"imagefolder:{folder}", size=256, geometry=Geometry("shortest", "bicubic"))
    assert _max_diff(wrong.images, _open_clip_pixels(_files(folder), spec)) > TOL


@pytest.mark.parametrize("name", ["palette.png", "palette_big.png", "rgba.png"])
def test_twin_converting_to_rgb_before_the_resize_fails_on_palette_and_rgba(folder, name):
    """PIL resizes a palette image by nearest neighbour and RGBA premultiplied: the order is visible."""
    path = next(p for p in _files(folder) if p.name == name)
    ref = _open_clip_pixels([path], "ViT-B-32:openai")
    with Image.open(path) as im:
        ours = to_uint8_chw([im], 224)
        converted_first = to_uint8_chw([im.convert("RGB")], 224)
    assert _max_diff(ours, ref) <= TOL
    assert _max_diff(converted_first, ref) > TOL


def test_rgb_and_grey_give_the_same_pixels_in_either_order(folder):
    for name in ("rgb.png", "grey.png"):
        with Image.open(folder / "a" / name) as im:
            assert np.array_equal(np.asarray(eval_geometry(im, 224)), np.asarray(eval_geometry(im.convert("RGB"), 224)))


def test_longest_pads_with_the_fill_colour_like_open_clip(folder):
    """resize_mode longest (no pretrained tag uses it in open_clip 3.3): open_clip's own transform again, and its
    twin: another fill colour differs."""
    files = _files(folder)
    t = open_clip.image_transform(64, is_train=False, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="longest",
                                  fill_color=7)
    ref = torch.stack([t(Image.open(f)) for f in files])
    ours = load_dataset(f"imagefolder:{folder}", size=64, geometry=Geometry("longest", "bicubic", fill_color=7))
    assert _max_diff(ours.images, ref) <= TOL
    other = load_dataset(f"imagefolder:{folder}", size=64, geometry=Geometry("longest", "bicubic", fill_color=200))
    assert _max_diff(other.images, ref) > TOL


def test_load_images_takes_a_classifier_or_a_loaded_clip(folder, toy_clip):
    spec = "ViT-B-16-SigLIP:webli"
    pp = model_preprocess(spec)
    clf = ZeroShotClassifier(torch.nn.Identity(), torch.zeros(2, 4), 1.0, pp.mean, pp.std, pp.input_size,
                             geometry=pp.geometry)
    by_spec = clipguard.load_images(f"imagefolder:{folder}", model=spec)
    assert torch.equal(clipguard.load_images(f"imagefolder:{folder}", model=clf).images, by_spec.images)
    plain = ZeroShotClassifier(torch.nn.Identity(), torch.zeros(2, 4), 1.0, pp.mean, pp.std, pp.input_size)
    assert not torch.equal(clipguard.load_images(f"imagefolder:{folder}", model=plain).images, by_spec.images)
    by_clip = clipguard.load_images("toy", limit=20, model=toy_clip)
    assert torch.equal(by_clip.images, clipguard.load_images("toy", limit=20, size=32).images)
    with pytest.raises(ClipguardError, match="not both"):
        clipguard.load_images("toy", model="toy", size=32)
    with pytest.raises(ClipguardError, match="model spec string"):
        clipguard.load_images("toy", model=object())


def test_the_classifier_from_a_loaded_clip_carries_its_geometry(toy_clip):
    clf = ZeroShotClassifier.from_clip(toy_clip, torch.zeros(2, 64))
    assert clf.geometry == toy_clip.geometry == DEFAULT_GEOMETRY


def test_load_clip_reads_the_tags_preprocess_config(monkeypatch, tmp_path, fresh_cache):
    """load_clip's geometry and mean/std are open_clip's own (``visual.preprocess_cfg`` after ``create_model`` with
    the tag), and model_preprocess (config only) gives the same: the weights download is replaced by an empty file
    and the checkpoint load by nothing, so open_clip builds a random MobileCLIP-S1 with its tag's config."""
    from clipguard.models import loader

    dummy = tmp_path / "weights.bin"
    dummy.write_bytes(b"not weights")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(dummy))
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *a, **k: None)
    spec = "MobileCLIP-S1:datacompdr"
    clip = loader.load_clip(spec, device="cpu", precision="fp32")
    own = clip.model.visual.preprocess_cfg
    assert clip.geometry == geometry_from_cfg(own) == Geometry("shortest", "bilinear")
    assert (clip.mean, clip.std) == (tuple(own["mean"]), tuple(own["std"])) == ((0.0,) * 3, (1.0,) * 3)
    pp = model_preprocess(spec)
    assert (pp.input_size, pp.mean, pp.std, pp.geometry) == (clip.input_size, clip.mean, clip.std, clip.geometry)


def test_hub_config_is_read_from_the_cache(monkeypatch, tmp_path):
    """hf-hub:ORG/NAME: the repo's open_clip_config.json from the hub cache (offline), no weights; not cached: the
    existing one line."""
    import huggingface_hub.constants as hub_constants

    snap = tmp_path / "models--org--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    config = {"model_cfg": {"embed_dim": 8, "vision_cfg": {"image_size": 48}, "text_cfg": {}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash",
                                 "interpolation": "bilinear"}}
    (snap / "open_clip_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    pp = model_preprocess("hf-hub:org/tiny")
    assert pp.input_size == (48, 48) and pp.mean == (0.5, 0.5, 0.5)
    assert pp.geometry == Geometry("squash", "bilinear")
    with pytest.raises(ClipguardError, match="cannot load from the Hugging Face hub"):
        model_preprocess("hf-hub:org/absent")


def test_protocol_names_the_geometry_and_keys_the_prepared_cache(folder, monkeypatch, tmp_path):
    from clipguard.config import from_options
    from clipguard.tasks.configs import PrepareConfig
    from clipguard.tasks.prepare import run_prepare

    squash = Geometry("squash", "bicubic")
    assert protocol_name(224) == "open_clip eval geometry 224x224 (resize_mode=shortest, interpolation=bicubic)"
    assert protocol_name(224, geometry=squash) != protocol_name(224)
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    spec = f"imagefolder:{folder}"
    made = run_prepare(from_options(PrepareConfig, {"dataset": spec, "workers": 0, "model": "ViT-B-16-SigLIP:webli"}),
                       progress=False)
    path = made["prepared"]["path"]
    manifest = json.loads((tmp_path / path / "manifest.json").read_text())
    assert manifest["preprocess"] == protocol_name(224, geometry=squash)
    # a run with the squash model finds the cache, the pixels are the squash ones; a shortest run does not use it
    hit = load_dataset(spec, size=224, geometry=squash, workers=0)
    assert hit.info["prepared"] == path
    assert torch.equal(hit.images, load_dataset(spec, size=224, geometry=squash, use_prepared=False).images)
    assert "prepared" not in load_dataset(spec, size=224, workers=0).info
    # read directly, the cache refuses a model of another geometry (the twin: the same geometry reads)
    with pytest.raises(ClipguardError, match="prepare the set again for this model"):
        load_dataset(f"prepared:{path}", size=224)
    assert len(load_dataset(f"prepared:{path}", size=224, geometry=squash)) == 8
    # a damaged cache names the command that writes it again: the model (its geometry), not a bare --size
    from clipguard.data.prepared import PreparedReader

    assert "--model ViT-B-16-SigLIP:webli" in PreparedReader(path).rewrite() and "--size" not in PreparedReader(
        path).rewrite()
    bare = run_prepare(from_options(PrepareConfig, {"dataset": spec, "workers": 0, "size": 224}), progress=False)
    assert "--size 224" in PreparedReader(bare["prepared"]["path"]).rewrite()  # twin: OpenAI CLIP's geometry


def test_decode_device_refuses_a_geometry_it_cannot_match(folder):
    spec = f"imagefolder:{folder}"
    with pytest.raises(ClipguardError, match="--decode device does not apply.*resize_mode=squash"):
        load_dataset(spec, size=224, decode="device", geometry=Geometry("squash", "bicubic"))
    with pytest.raises(ClipguardError, match="--decode device does not apply.*interpolation=bilinear"):
        load_dataset(spec, size=224, decode="device", geometry=Geometry("shortest", "bilinear"))
    assert len(load_dataset(spec, size=224, decode="device", geometry=DEFAULT_GEOMETRY, workers=0)) == 8  # twin


def test_worker_processes_apply_the_models_geometry(folder):
    """The geometry travels with the reader into DataLoader workers: two workers give the in-process pixels."""
    squash = Geometry("squash", "bilinear")
    spec = f"imagefolder:{folder}"
    here = load_dataset(spec, size=96, geometry=squash, workers=0, use_prepared=False)
    workers = load_dataset(spec, size=96, geometry=squash, mode="stream", workers=2, use_prepared=False)
    assert torch.equal(workers.images.materialize(batch_size=4), here.images)
    assert not torch.equal(here.images, load_dataset(spec, size=96, workers=0, use_prepared=False).images)  # twin


def test_finetune_held_out_check_compares_the_models_own_pixels(folder, tmp_path):
    """check_held_out hashes the evaluation images at the model's geometry: a squash model's training images are
    recognised in its evaluation set (with OpenAI CLIP's geometry the digests would differ and the overlap pass)."""
    from types import SimpleNamespace

    from clipguard.tasks.finetune import check_held_out

    squash = Geometry("squash", "bicubic")
    spec = f"imagefolder:{folder}"
    run = SimpleNamespace(dataset=spec, image_column=None, label_column=None, seed=0, workers=0, streaming=False,
                          preprocess="open_clip")
    cfg = SimpleNamespace(run=run, eval_split="test", eval_limit=None)
    p = SimpleNamespace(data=load_dataset(spec, size=64, geometry=squash, workers=0),
                        clip=SimpleNamespace(geometry=squash))
    with pytest.raises(ClipguardError, match="shares 8 of its 8 images"):
        check_held_out(cfg, p)
    p.clip.geometry = DEFAULT_GEOMETRY  # twin: hashed at another geometry, the same files look like other images
    check_held_out(cfg, p)
