"""One preprocessing protocol, applied once at load: open_clip's eval geometry at the model's input size, or native."""

import numpy as np
import pytest
import torch

from clipguard.data.images import eval_geometry, to_uint8_chw
from clipguard.data.registry import load_dataset
from clipguard.errors import ClipguardError

SIZES = [(250, 190), (500, 375), (97, 311), (32, 32)]  # PIL (W, H)


def _random_image(w, h, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _open_clip_uint8(img, size) -> torch.Tensor:
    """open_clip's own eval transform minus the final Normalize, back on the 0..255 scale (int16 (3, H, W))."""
    import open_clip
    from torchvision.transforms import Compose, Normalize

    t = open_clip.image_transform(size, is_train=False)
    assert isinstance(t.transforms[-1], Normalize)
    return (Compose(t.transforms[:-1])(img) * 255).round().to(torch.int16)


def _ours(img, size) -> torch.Tensor:
    return to_uint8_chw([img], size)[0].to(torch.int16)


@pytest.mark.parametrize("size", [224, 336, (224, 288)])
@pytest.mark.parametrize("wh", SIZES)
def test_geometry_matches_open_clip_eval_transform(wh, size):
    img = _random_image(*wh, seed=wh[0] * 1000 + wh[1])
    ref, ours = _open_clip_uint8(img, size), _ours(img, size)
    hw = (size, size) if isinstance(size, int) else size
    assert ours.shape == ref.shape == (3, *hw)
    assert (ours - ref).abs().max().item() <= 1  # within 1/255 per pixel (in practice bit-identical)


def test_geometry_is_the_identity_at_the_input_size():
    img = _random_image(224, 224, seed=1)
    assert np.array_equal(np.asarray(eval_geometry(img, (224, 224))), np.asarray(img))


def _write_folder(root, sizes_by_class, seed=0):
    """root/<class>/<i>.png; smooth gradients + noise, so that geometry differences show."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, sizes in sizes_by_class.items():
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            yy, xx = np.mgrid[0:h, 0:w]
            base = rng.uniform(0, 255, 3) * (xx / w)[..., None] + rng.uniform(0, 255, 3) * (yy / h)[..., None] / 2
            img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")


def test_same_size_non_square_set_is_centre_cropped_not_squashed(tmp_path):
    from PIL import Image

    _write_folder(tmp_path, {"a": [(300, 200)] * 5, "b": [(300, 200)] * 5})
    ds = load_dataset(f"imagefolder:{tmp_path}", size=(224, 224))
    assert ds.images.shape == (10, 3, 224, 224)
    assert ds.to_record()["preprocess"] == ("open_clip eval geometry 224x224 "
                                           "(resize_mode=shortest, interpolation=bicubic)")
    files = sorted(tmp_path.glob("*/*.png"))
    for img, f in zip(ds.images, files, strict=True):
        assert (img.to(torch.int16) - _open_clip_uint8(Image.open(f), 224)).abs().max().item() <= 1
    # The old path (native 300x200 kept, then the classifier's torch bicubic resize of the whole image) squashes.
    native = load_dataset(f"imagefolder:{tmp_path}")
    assert native.images.shape == (10, 3, 200, 300) and native.to_record()["preprocess"] == "native"
    squash = torch.nn.functional.interpolate(native.images.float() / 255, size=(224, 224), mode="bicubic",
                                             align_corners=False).clamp(0, 1)
    assert (squash - ds.images.float() / 255).abs().max().item() > 1 / 255


def test_native_set_of_mixed_sizes_is_one_line_error(tmp_path):
    _write_folder(tmp_path, {"a": [(250, 190), (97, 311)], "b": [(64, 64)]})
    with pytest.raises(ClipguardError) as exc:
        load_dataset(f"imagefolder:{tmp_path}")
    msg = str(exc.value)
    assert "\n" not in msg and "differ in size" in msg and "--resolution model" in msg and str(tmp_path) in msg
    assert load_dataset(f"imagefolder:{tmp_path}", size=64).images.shape == (3, 3, 64, 64)


def test_toy_world_follows_the_protocol():
    native = load_dataset("toy", limit=20)
    same = load_dataset("toy", limit=20, size=(32, 32))
    assert torch.equal(native.images, same.images)  # the toy numbers stay bit-identical at the toy model's size
    assert native.to_record()["preprocess"] == "native"
    assert same.to_record()["preprocess"] == ("open_clip eval geometry 32x32 "
                                             "(resize_mode=shortest, interpolation=bicubic)")
    big = load_dataset("toy", limit=20, size=224)
    assert big.images.shape == (20, 3, 224, 224) and big.to_record()["resolution"] == [224, 224]
    from PIL import Image

    pil = Image.fromarray(native.images[3].permute(1, 2, 0).numpy())
    assert torch.equal(big.images[3].to(torch.int16), _open_clip_uint8(pil, 224))


def test_prepare_loads_data_at_the_models_input_size(tmp_path):
    from clipguard.run_options import RunOptions
    from clipguard.tasks.setup import prepare

    _write_folder(tmp_path, {"a": [(250, 190), (97, 311)], "b": [(64, 64), (40, 30)]})
    run = RunOptions(model="toy", dataset=f"imagefolder:{tmp_path}", device="cpu", precision="fp32")
    p = prepare(run)
    assert tuple(p.data.images.shape) == (4, 3, *p.clip.input_size)
    assert p.data.info["preprocess"] == "open_clip eval geometry 32x32 (resize_mode=shortest, interpolation=bicubic)"
    with pytest.raises(ClipguardError, match="--resolution model"):
        prepare(run, resolution="native")
    with pytest.raises(ClipguardError, match="--resolution 'squash'"):
        prepare(run, resolution="squash")
    toy = prepare(RunOptions(model="toy", dataset="toy", limit=20, device="cpu", precision="fp32"))
    assert tuple(toy.data.images.shape[-2:]) == (32, 32) == toy.clip.input_size


def test_odd_sized_imagefolder_predictions_equal_clip_benchmark(tmp_path, monkeypatch):
    """CLIP_benchmark feeds open_clip's own preprocess (what create_model_and_transforms returns) over a
    torchvision ImageFolder; clipguard loads the folder at the model's input size and feeds [0, 1] pixels."""
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.datasets import ImageFolder

    from clipguard.models.classifier import ZeroShotClassifier
    from clipguard.models.inference import predict_logits
    from clipguard.models.loader import load_clip
    from clipguard.models.text_embeddings import compute_text_embeddings

    def accuracy(output, target, topk=(1,)):  # clip-benchmark 1.6.2 breaks on numpy >= 2.4 (see the parity test)
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]

    monkeypatch.setattr(zc, "accuracy", accuracy)
    sizes = [(250, 190), (97, 311), (500, 375), (64, 64)]
    _write_folder(tmp_path, {"bird": sizes, "fish": sizes[::-1]})
    clip = load_clip("ViT-B-32:none", device="cpu", precision="fp32")
    # One template, two classes: CLIP_benchmark's text side costs ~1 s per class on CPU. With this random-init
    # model these names split the eight images 6 / 2 (so equal top-1 is not trivially "all one class").
    classnames, templates = ["bird", "fish"], ["a photo of a {c}."]

    ds = load_dataset(f"imagefolder:{tmp_path}", size=clip.input_size)
    emb = compute_text_embeddings(clip, classnames, templates)
    ours, _ = predict_logits(ZeroShotClassifier.from_clip(clip, emb), ds.images, batch_size=8, progress=False)

    # What open_clip.create_model_and_transforms hands CLIP_benchmark as its eval preprocess.
    preprocess = image_transform_v2(PreprocessCfg(**clip.model.visual.preprocess_cfg), is_train=False)
    folder = ImageFolder(str(tmp_path), transform=preprocess)
    assert folder.targets == ds.labels.tolist()
    loader = torch.utils.data.DataLoader(folder, batch_size=8)
    weights = zc.zero_shot_classifier(clip.model, clip.tokenizer, classnames, templates, "cpu", amp=False)
    theirs, _ = zc.run_classification(clip.model, weights, loader, "cpu", amp=False)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    scale = clip.model.logit_scale.exp().item()
    assert torch.allclose(ours / scale, theirs.float() / 100.0, atol=1e-4)
    assert len(set(ours.argmax(1).tolist())) > 1, "images must not all get one class, or equality is trivial"
