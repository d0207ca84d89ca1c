"""The streaming data path and its sources, built from small generated fixtures: each source (HF Arrow saved to
disk, wds tar shards, an ImageNet-layout folder, a prepared cache) gives exactly the predictions of the in-memory
path (the images decoded here with PIL, stacked, classified), streamed by worker processes or not."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipguard.run_options import RunOptions

pytestmark = pytest.mark.usefixtures("one_thread")

WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark: ImageNet indices 0, 1, 2
N = 48


def _pictures(n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """Toy test images at mixed sizes around 40x30 (upscaled, with noise), labels in 0..2."""
    from clipguard.data.toy import toy_split

    images, labels = toy_split("test")
    rng = np.random.default_rng(seed)
    keep = [i for i in range(len(labels)) if int(labels[i]) < 3][:n]
    out = []
    for k, i in enumerate(keep):
        w, h = 36 + (k % 4) * 3, 28 + (k % 3) * 4
        im = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
        a = np.asarray(im).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
        out.append(Image.fromarray(a.clip(0, 255).astype(np.uint8)))
    return out, [int(labels[i]) for i in keep]


@pytest.fixture(scope="module")
def world(tmp_path_factory, write_shards):
    """The same 48 images as an ImageNet-layout folder (JPEG), an HF dataset saved to disk, wds shards (2 tars,
    CLIP_benchmark's layout) and the reference: the images decoded here, in each source's order."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    pics, labels = _pictures(N, 0)
    folder = root / "imagenet" / "val"
    files = []
    for k, (im, y) in enumerate(zip(pics, labels, strict=True)):
        d = folder / WNIDS[y]
        d.mkdir(parents=True, exist_ok=True)
        files.append(d / f"ILSVRC2012_val_{k:08d}.JPEG")
        im.save(files[-1], quality=90)
    decoded = [Image.open(f).convert("RGB") for f in files]  # what every source holds: these exact JPEG decodes
    order = sorted(range(N), key=lambda k: str(files[k]))  # a folder lists class by class, files sorted

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    datasets.Dataset.from_dict({"image": decoded, "label": labels}, features=feats).save_to_disk(str(root / "arrow"))

    write_shards(root / "wds_toyset" / "test", decoded, labels)
    (root / "wds_toyset" / "classnames.txt").write_text("a\nb\nc\n")
    (root / "wds_toyset" / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}\n")
    return {"root": root, "decoded": decoded, "labels": labels, "folder_order": order}


def _reference_logits(images: list[Image.Image], clf) -> torch.Tensor:
    """The in-memory path, independently: PIL decode -> open_clip eval geometry -> one stacked tensor."""
    from clipguard.data.images import to_uint8_chw
    from clipguard.models.inference import predict_logits

    return predict_logits(clf, to_uint8_chw(images, clf.input_size), progress=False)[0]


def _run(dataset: str, **kw):
    from clipguard.models.inference import predict_logits
    from clipguard.tasks.setup import prepare

    p = prepare(RunOptions(model="toy", dataset=dataset, device="cpu", precision="fp32", batch_size=16, **kw))
    return p, predict_logits(p.classifier, p.data.images, batch_size=16, progress=False)[0]


@pytest.mark.parametrize("source", ["imagefolder", "hf", "wds"])
def test_each_source_streams_exactly_the_in_memory_predictions(world, source):
    root = world["root"]
    spec = {"imagefolder": f"imagefolder:{root / 'imagenet'}", "hf": f"hf:{root / 'arrow'}",
            "wds": f"wds:{root / 'wds_toyset'}"}[source]
    order = world["folder_order"] if source == "imagefolder" else list(range(N))
    split = "val" if source == "imagefolder" else "test" if source == "wds" else "train"
    streamed, logits = _run(spec, split=split, data_mode="stream", workers=2)
    assert streamed.data.streamed and streamed.data.images.workers == 2
    ref = _reference_logits([world["decoded"][k] for k in order], streamed.classifier)
    assert torch.equal(logits.argmax(1), ref.argmax(1)) and torch.allclose(logits, ref, atol=1e-5)
    assert streamed.data.labels.tolist() == [world["labels"][k] for k in order]
    memory, logits_mem = _run(spec, split=split, data_mode="memory", workers=0)
    assert not memory.data.streamed and torch.equal(logits_mem, logits)


def test_wds_reads_the_samples_webdataset_reads(world):
    """Our offset index gives the same samples, in the same order, as the webdataset package itself."""
    import webdataset as wds

    from clipguard.data.registry import SOURCES
    from clipguard.specs import parse_dataset_spec

    pattern = str(world["root"] / "wds_toyset" / "test" / "{0..1}.tar")
    theirs = list(wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("png", "cls"))
    ours = SOURCES.get("wds")(parse_dataset_spec(f"wds:{pattern}"), "test")
    assert ours.labels.tolist() == [int(y) for _, y in theirs] and ours.classnames == ["a", "b", "c"]
    for i, (im, _) in enumerate(theirs):
        assert np.array_equal(np.asarray(ours.reader.open(i)), np.asarray(im.convert("RGB")))
    assert ours.templates == ["a photo of a {c}.", "{c}"]


def test_imagenet_layout_is_labelled_by_wnid_and_named_by_clip(world):
    from clipguard.data.registry import load_dataset

    ds = load_dataset(f"imagefolder:{world['root'] / 'imagenet'}", split="val", size=32)
    assert ds.classnames == ["tench", "goldfish", "great white shark"] and ds.info["layout"] == "imagenet"
    assert len(ds.templates) == 80  # CLIP's ImageNet templates serve --templates openai on any ImageNet subset


def test_imagenet_val_with_a_label_file(tmp_path, world):
    """ImageNet val as distributed: a flat folder + Kaggle's LOC_val_solution.csv (wnid first): global indices."""
    from clipguard.data.registry import load_dataset

    val = tmp_path / "val"
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for k in range(6):
        world["decoded"][k].save(val / f"ILSVRC2012_val_{k:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{k:08d},{WNIDS[world['labels'][k]]} 1 2 3 4")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(f"imagefolder:{tmp_path}", split="val", size=32)
    assert ds.labels.tolist() == world["labels"][:6] and ds.name == "imagenet1k" and len(ds.classnames) == 1000


def test_auto_mode_holds_small_sets_and_streams_large_ones():
    from clipguard.data.stream import MEMORY_BYTES, choose_mode

    assert choose_mode("auto", MEMORY_BYTES) == "memory" and choose_mode("auto", MEMORY_BYTES + 1) == "stream"
    assert choose_mode("memory", 10**12) == "memory" and choose_mode("stream", 1) == "stream"


def _many_files(root: Path, n: int) -> Path:
    pics, labels = _pictures(24, 1)
    for k in range(n):
        d = root / f"class{labels[k % 24]}"
        d.mkdir(parents=True, exist_ok=True)
        pics[k % 24].save(d / f"{k:05d}.png")
    return root


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """5,000 small files: past the 256 open-file limit many times over."""
    return _many_files(tmp_path_factory.mktemp("big") / "folder", 5000)


def _clipguard(args, env=None, limit_files: int | None = None, **kw):
    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files))

    return subprocess.Popen([sys.executable, "-m", "clipguard.cli.app", *map(str, args)], env=env,
                            preexec_fn=lower_limit if limit_files else None, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_5000_files_load_under_a_256_open_file_limit(big_folder, tmp_path):
    for mode in ("memory", "stream"):
        p = _clipguard(["eval", "--model", "toy", "--dataset", f"imagefolder:{big_folder}", "--device", "cpu",
                        "--data-mode", mode, "--workers", "2", "--json"], limit_files=256)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out)["data"]["n"] == 5000


def test_the_open_file_limit_does_bite(big_folder):
    """The twin: holding every file open at once (what failed before) does fail under the same limit."""
    code = ("import sys, pathlib\nfrom PIL import Image\n"
            f"ims = [Image.open(f) for f in sorted(pathlib.Path({str(big_folder)!r}).rglob('*.png'))]\n")
    p = subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_NOFILE, (256, 256)), stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Too many open files" in err


def _cache_files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.glob("*.npy"))}


def test_prepare_killed_halfway_resumes_to_the_same_cache(big_folder, tmp_path):
    args = ["prepare", "--model", "toy", "--dataset", f"imagefolder:{big_folder}", "--split", "train",
            "--workers", "1", "--batch-size", "64", "--json"]
    env_a = {**os.environ, "CLIPGUARD_CACHE": str(tmp_path / "a")}
    p = _clipguard(args, env=env_a, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "a").glob("prepared/*/shard-00001.npy")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # kill -9, workers included
    p.communicate()
    (killed,) = list((tmp_path / "a").glob("prepared/*"))
    assert not (killed / "manifest.json").exists() and len(list(killed.glob("shard-*.npy"))) < 5
    again = _clipguard(args, env=env_a)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert json.loads(out)["prepared"]["shards_written"] < 5  # finished shards were kept
    fresh = _clipguard(args, env={**os.environ, "CLIPGUARD_CACHE": str(tmp_path / "b")})
    assert fresh.communicate(timeout=300)[0] and fresh.returncode == 0
    (whole,) = list((tmp_path / "b").glob("prepared/*"))
    assert killed.name == whole.name and _cache_files(killed) == _cache_files(whole)


def test_prepared_cache_is_found_and_gives_the_same_predictions(world, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    spec = f"hf:{world['root'] / 'arrow'}"
    _, before = _run(spec, split="train", limit=30, seed=3)
    code, out, err = cli("prepare", "--model", "toy", "--dataset", spec, "--split", "train", "--limit", "30",
                         "--seed", "3", "--workers", "0", "--json")
    assert code == 0, err
    path = json.loads(out)["prepared"]["path"]
    p, after = _run(spec, split="train", limit=30, seed=3)
    assert p.data.info.get("prepared") == path and torch.equal(before, after)
    explicit, direct = _run(f"prepared:{path}", split="train")
    assert torch.equal(direct, before) and explicit.data.labels.equal(p.data.labels)
    _, other = _run(spec, split="train", limit=30, seed=4)  # another selection: another key, not this cache
    assert not torch.equal(other, before)


@pytest.fixture(scope="module")
def toy_train_folder(tmp_path_factory):
    """ROOT/train: 256 toy training images as PNG files in class folders (lossless: the toy pixels exactly), and
    ROOT/test: 20 toy test images, the held-out split of the final evaluation."""
    from clipguard.data.toy import TOY_CLASSNAMES, toy_split

    root = tmp_path_factory.mktemp("toytrain")
    for split, n in (("train", 256), ("test", 20)):
        images, labels = toy_split(split)
        for c, name in enumerate(TOY_CLASSNAMES):  # every class folder, so both splits label alike
            (root / split / f"{c:02d}_{name}").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            d = root / split / f"{int(labels[k]):02d}_{TOY_CLASSNAMES[int(labels[k])]}"
            Image.fromarray(images[k].permute(1, 2, 0).numpy()).save(d / f"{k:04d}.png")
    return root


def test_streaming_finetune_killed_and_resumed_is_bit_identical(toy_train_folder, tmp_path, monkeypatch,
                                                               kill_at_checkpoint):
    """The stream's workers decode ahead in the checkpointed order: a resume sees the same batches; and the
    streamed run equals the in-memory run of the same folder."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from clipguard.finetune.config import finetune_config
    from clipguard.tasks.finetune import run_finetune

    cfg = finetune_config(model="toy", dataset=f"imagefolder:{toy_train_folder}", split="train",
                          epochs=2, batch_size=64, eps="4/255", lr=1e-2, device="cpu", eval_limit=20,
                          eval_batch_size=20, eval_steps=1, save_every=3, data_mode="stream", workers=2,
                          eval_split="test", run_dir=str(tmp_path / "a"))
    rec = run_finetune(cfg, progress=False)
    assert rec["finetune"]["train"]["data_mode"] == "stream"
    b = replace(cfg, run_dir=str(tmp_path / "b"))
    with pytest.raises(kill_at_checkpoint(3)):
        run_finetune(b, progress=False)
    monkeypatch.undo()
    resumed = run_finetune(replace(b, resume=b.run_dir), progress=False)
    assert resumed["finetune"]["train"]["resumed_from_step"] == 3 and resumed["finetune"]["train"]["steps"] == 8
    memory = replace(cfg, run=replace(cfg.run, data_mode="memory", workers=0), run_dir=str(tmp_path / "m"))
    run_finetune(memory, progress=False)
    wa, wb, wm = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("a", "b", "m"))
    assert wa.keys() == wb.keys() == wm.keys()
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wm[k]) for k in wa)
    assert not all(torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa if "lora_B" in k)  # it did train


def test_max_steps_replaces_epochs(toy_train_folder, tmp_path):
    from clipguard.finetune.config import finetune_config
    from clipguard.tasks.finetune import run_finetune

    cfg = finetune_config(model="toy", dataset=f"imagefolder:{toy_train_folder}", split="train", max_steps=5,
                          batch_size=64, eps="4/255", lr=1e-2, device="cpu", eval_limit=20, eval_batch_size=20,
                          eval_steps=1, eval_split="test", run_dir=str(tmp_path / "s"))
    train = run_finetune(cfg, progress=False)["finetune"]["train"]
    assert train["steps"] == train["total_steps"] == 5  # 4 batches an epoch: the fifth step starts epoch 2


def test_hub_streaming_reads_only_the_first_rows(world, tmp_path):
    """--streaming: the first --limit rows of the stream (a local parquet folder stands in for the hub), the same
    pixels as the whole set's first rows; without --limit it is refused."""
    import datasets

    from clipguard.data.registry import load_dataset
    from clipguard.errors import ClipguardError

    src = datasets.load_from_disk(str(world["root"] / "arrow"))
    (tmp_path / "pq").mkdir()
    src.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    streamed = load_dataset(f"hf:{tmp_path / 'pq'}", split="train", limit=7, size=32, streaming=True)
    whole = load_dataset(f"hf:{world['root'] / 'arrow'}", split="train", size=32, mode="memory")
    assert torch.equal(streamed.images, whole.images[:7]) and streamed.labels.equal(whole.labels[:7])
    assert streamed.info["streaming"] == "first 7 rows of the stream"
    with pytest.raises(ClipguardError, match="--limit"):
        load_dataset(f"hf:{tmp_path / 'pq'}", split="train", size=32, streaming=True)


def test_predictions_file_is_the_same_streamed_or_in_memory(world, tmp_path, cli):
    """--predictions takes its per-image digests in the clean pass: a streamed set is not read twice, and the
    file (digests, labels, clean and adversarial predictions) equals the in-memory run's."""
    spec = f"wds:{world['root'] / 'wds_toyset'}"
    files = {}
    for mode, workers in (("stream", "2"), ("memory", "0")):
        files[mode] = tmp_path / f"{mode}.csv"
        code, _, err = cli("eval", "--model", "toy", "--dataset", spec, "--data-mode", mode, "--workers", workers,
                           "--device", "cpu", "--attack", "pgd", "--steps", "2", "--eps", "4/255", "--predictions",
                           files[mode], "--json")
        assert code == 0, err
    rows = files["stream"].read_text().splitlines()
    assert len(rows) == N + 1 and files["stream"].read_text() == files["memory"].read_text()
