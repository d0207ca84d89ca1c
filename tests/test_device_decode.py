"""``--decode device``: JPEGs decoded by torchvision on the run's device and resized there, against the PIL protocol
itself (``data.images.eval_geometry`` on PIL's decode): every image within ``TOLERANCE["mean_abs"]`` pixel levels,
top-1 predictions agreeing on at least ``TOLERANCE["top1_agreement"]`` of the set. The fixture holds JPEGs of many
sizes, aspect ratios, qualities and chroma subsamplings, a grayscale JPEG and PNGs (which go through PIL all the
same). On this CPU the decoder is libjpeg-turbo; the gpu-marked test runs nvJPEG where a CUDA device is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipguard.data.device_decode import TOLERANCE, decode_batch
from clipguard.data.images import eval_geometry
from clipguard.run_options import RunOptions

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(32, 32), (224, 224), (24, 40)]  # square (torchvision's Resize rule) and not (open_clip's ResizeKeepRatio)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """120 toy test images (all 10 classes) upscaled to 40..400 px a side with noise, saved as JPEG at qualities
    60..95 with 4:4:4, 4:2:2 and 4:2:0 chroma; one grayscale JPEG and three PNGs among them."""
    from clipguard.data.toy import TOY_CLASSNAMES, toy_split

    images, labels = toy_split("test")
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("jpegs") / "set"
    files = []
    for k in range(120):
        h, w = (int(v) for v in rng.integers(40, 401, 2))
        im = Image.fromarray(images[k].permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
        a = np.asarray(im).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
        im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        d = root / "test" / TOY_CLASSNAMES[int(labels[k])]
        d.mkdir(parents=True, exist_ok=True)
        if k % 40 == 7:
            files.append(d / f"{k:04d}.png")
            im.save(files[-1])
        else:
            files.append(d / f"{k:04d}.jpg")
            (im.convert("L") if k == 11 else im).save(files[-1], quality=int(rng.integers(60, 96)),
                                                         subsampling=k % 3)
    return root, files


def _encoded(path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def mean_abs_diff(files, size, device) -> np.ndarray:
    """Per image: mean |decode on ``device`` - PIL protocol| in pixel levels."""
    got, _ = decode_batch([_encoded(f) for f in files], size, torch.device(device))
    out = []
    for f, g in zip(files, got.cpu(), strict=True):
        with Image.open(f) as im:
            ref = torch.from_numpy(np.array(eval_geometry(im, size))).permute(2, 0, 1)
        out.append((g.int() - ref.int()).abs().float().mean().item())
    return np.asarray(out)


@pytest.mark.parametrize("size", SIZES)
def test_cpu_decode_is_within_tolerance_of_the_pil_protocol(jpeg_folder, size):
    _, files = jpeg_folder
    jpegs = [f for f in files if f.suffix == ".jpg"]
    diff = mean_abs_diff(jpegs, size, "cpu")
    assert diff.max() < TOLERANCE["mean_abs"], diff.max()
    # libjpeg-turbo on both sides here: only the resize's rounding differs (measured: mean below 0.05 levels)
    assert diff.mean() < 0.1, diff.mean()


def test_a_wrong_geometry_is_outside_the_tolerance(jpeg_folder, monkeypatch):
    """The twin: resizing without antialiasing (what a naive device path does) is caught by the same check."""
    from torchvision.transforms.v2 import functional as F

    real = F.resize
    monkeypatch.setattr(F, "resize", lambda img, size, **kw: real(img, size, **{**kw, "antialias": False}))
    _, files = jpeg_folder
    diff = mean_abs_diff([f for f in files if f.suffix == ".jpg"], (32, 32), "cpu")
    assert diff.max() > TOLERANCE["mean_abs"], diff.max()


@pytest.mark.gpu
@pytest.mark.parametrize("size", SIZES)
def test_gpu_decode_is_within_tolerance_of_the_pil_protocol(jpeg_folder, size):
    """nvJPEG is another decoder: torchvision's own bound against libjpeg-turbo is a mean below 2 levels."""
    _, files = jpeg_folder
    diff = mean_abs_diff([f for f in files if f.suffix == ".jpg"], size, "cuda")
    assert diff.max() < TOLERANCE["mean_abs"], diff.max()


def _eval(dataset: str, device: str = "cpu", **kw):
    from clipguard.models.inference import predict_logits
    from clipguard.tasks.setup import prepare

    p = prepare(RunOptions(model="toy", dataset=dataset, device=device, precision="fp32", batch_size=32, **kw))
    logits, timings = predict_logits(p.classifier, p.data.images, batch_size=32, progress=False)
    return p, logits.argmax(1), timings


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_predictions_agree_with_the_pil_protocol(jpeg_folder, device):
    root, files = jpeg_folder
    spec = f"imagefolder:{root}"
    ref, pred_pil, _ = _eval(spec, device)
    dev, pred_dev, timings = _eval(spec, device, decode="device", data_mode="stream", workers=2)
    assert dev.data.streamed and dev.data.images.decode_device.type == device
    agreement = (pred_dev == pred_pil).float().mean().item()
    assert agreement >= TOLERANCE["top1_agreement"], agreement
    acc = (pred_pil == ref.data.labels).float().mean().item()
    assert acc > 0.8, acc  # predictions that carry the labels: agreement means something
    n_png = sum(f.suffix == ".png" for f in files)
    assert timings["decoded_by_pil"] == n_png and timings["decoded_on_device"] == len(files) - n_png
    assert "JPEG decoded on" in dev.data.info["preprocess"] and "JPEG" not in ref.data.info["preprocess"]
    # a few images read by index (checks, pictures) are the pixels the batches carry
    first = next(iter(dev.data.images.batches(8)))[1].cpu()
    assert torch.equal(dev.data.images[:8], first)


def test_in_memory_and_wds_sources_decode_on_the_device_too(jpeg_folder, tmp_path):
    import webdataset as wds

    root, files = jpeg_folder
    shards = tmp_path / "wds_jpegs" / "test"
    shards.mkdir(parents=True)
    from clipguard.data.toy import TOY_CLASSNAMES

    with wds.TarWriter(str(shards / "0.tar")) as w:
        for k, f in enumerate(files):
            if f.suffix == ".jpg":
                w.write({"__key__": f"s{k:04d}", "jpg": f.read_bytes(), "cls": TOY_CLASSNAMES.index(f.parent.name)})
    (shards / "nshards.txt").write_text("1\n")
    (shards.parent / "classnames.txt").write_text("\n".join(TOY_CLASSNAMES) + "\n")
    p, pred, timings = _eval(f"wds:{shards.parent}", decode="device", data_mode="memory", workers=0)
    assert not p.data.streamed and timings.get("decoded_on_device") is None  # decoded once, at load
    pil = torch.stack([torch.from_numpy(np.array(eval_geometry(Image.open(f), (32, 32)))).permute(2, 0, 1)
                       for f in files if f.suffix == ".jpg"])
    assert (p.data.images.int() - pil.int()).abs().float().mean() < TOLERANCE["mean_abs"]
    assert (pred == p.data.labels).float().mean() > 0.8


def test_decode_is_hashed_only_when_set():
    from clipguard.config import flat
    from clipguard.tasks.eval import EvalConfig

    assert "decode" not in flat(EvalConfig(run=RunOptions()))  # every older record and config hash is unchanged
    assert flat(EvalConfig(run=RunOptions(decode="device")))["decode"] == "device"


@pytest.mark.parametrize("args, says", [
    (["--decode", "gpu"], "--decode 'gpu' is unknown: choose from pil, device"),
    (["--decode", "device"], "does not apply to --dataset 'toy': the toy images are generated"),
])
def test_bad_decode_options_are_one_line_errors(cli, args, says):
    code, out, err = cli("eval", "--model", "toy", "--dataset", "toy", "--device", "cpu", *args)
    assert code == 2 and says in err and "Traceback" not in err


def test_training_batches_decode_on_the_device_in_the_seeded_order(jpeg_folder):
    """Fine-tuning draws its streamed batches through the same decode: each is the set's pixels at its indices."""
    from clipguard.data.registry import load_dataset
    from clipguard.finetune.loop import epoch_batches

    root, _ = jpeg_folder
    ds = load_dataset(f"imagefolder:{root}", size=32, mode="stream", workers=2, decode="device")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    for idx, x, _ in epoch_batches(ds, order, 0, 32):
        assert torch.equal(x.cpu(), ds.images[idx])


def test_hf_arrow_jpeg_bytes_decode_on_the_device(jpeg_folder, tmp_path):
    """An HF dataset stores each image's encoded bytes: its JPEGs are read undecoded and decoded on the device."""
    import datasets

    from clipguard.data.toy import TOY_CLASSNAMES

    _, files = jpeg_folder
    jpegs = [f for f in files if f.suffix == ".jpg"][:40]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=TOY_CLASSNAMES)})
    rows = {"image": [{"bytes": f.read_bytes(), "path": None} for f in jpegs],
            "label": [TOY_CLASSNAMES.index(f.parent.name) for f in jpegs]}
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "arrow"))
    p, pred, timings = _eval(f"hf:{tmp_path / 'arrow'}", split="train", decode="device", data_mode="stream",
                             workers=0)
    assert timings["decoded_on_device"] == len(jpegs) and timings["decoded_by_pil"] == 0
    ref, pred_pil, _ = _eval(f"hf:{tmp_path / 'arrow'}", split="train")
    assert (pred == pred_pil).float().mean() >= TOLERANCE["top1_agreement"]


@pytest.mark.gpu
def test_batches_copied_ahead_are_the_batches(toy_prepared):
    """copied_ahead (pinned, side-stream copies one batch ahead) hands over exactly the bytes a plain .to() moves,
    in order, and predictions through run_batches are those of the CPU."""
    from clipguard.models.inference import copied_ahead, predict_logits

    images = toy_prepared.data.images
    walk = ((a, images[a:a + 64]) for a in range(0, len(images), 64))
    got = list(copied_ahead(walk, torch.device("cuda")))
    assert [a for a, _ in got] == list(range(0, len(images), 64))
    assert all(x.is_cuda and torch.equal(x.cpu(), images[a:a + 64]) for a, x in got)
    clf = toy_prepared.classifier
    cpu = predict_logits(clf, images, batch_size=64, progress=False)[0]
    gpu = predict_logits(clf.to("cuda"), images, batch_size=64, progress=False)[0]
    clf.to("cpu")
    assert (gpu.argmax(1) == cpu.argmax(1)).float().mean() >= 0.99


def test_a_broken_jpeg_is_a_one_line_error(jpeg_folder, tmp_path, cli):
    """A file with JPEG's magic bytes that neither the device's decoder nor PIL can read: one line, no traceback."""
    import shutil

    root, files = jpeg_folder
    shutil.copytree(root, tmp_path / "set")
    victim = next(tmp_path.glob("set/test/*/*.jpg"))
    victim.write_bytes(victim.read_bytes()[:40])
    code, _, err = cli("eval", "--model", "toy", "--dataset", f"imagefolder:{tmp_path / 'set'}", "--device", "cpu",
                       "--decode", "device", "--data-mode", "stream", "--workers", "0")
    assert code == 2 and "cannot read an image" in err and "Traceback" not in err, err
