"""Damaged sources through the real CLI: a shard that is not a tar or is cut short, an Arrow file cut short or
overwritten, a prepared cache missing a shard, an image that does not decode. Each is exit 2 and one line naming
the file and what to do, whether the set is read in this process (``--data-mode memory --workers 0``) or by
DataLoader worker processes (``--data-mode stream --workers 2``); the intact twins of the same files read fine.
Also: ImageNet-layout folders of wnids outside ImageNet-1k (named by ``--prompts``)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

N = 12
MODES = {"memory": ("--data-mode", "memory", "--workers", "0"),  # decoded in this process
         "stream": ("--data-mode", "stream", "--workers", "2")}  # decoded by DataLoader worker processes
PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def world(tmp_path_factory, write_shards):
    """12 toy test images (PNG) as CLIP_benchmark shards of cifar10 (2 tars), an HF dataset saved to disk and a
    class folder of JPEGs."""
    import datasets

    from clipguard.data.toy import TOY_CLASSNAMES, toy_split

    root = tmp_path_factory.mktemp("bad")
    images, labels = toy_split("test")
    pics = [Image.fromarray(images[i].permute(1, 2, 0).numpy()) for i in range(N)]
    ys = [int(labels[i]) for i in range(N)]
    write_shards(root / "wds_vtab-cifar10" / "test", pics, ys)  # CLIP_benchmark's folder name: its repo is known
    (root / "wds_vtab-cifar10" / "classnames.txt").write_text("\n".join(TOY_CLASSNAMES) + "\n")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(TOY_CLASSNAMES))})
    datasets.Dataset.from_dict({"image": pics, "label": ys}, features=feats).save_to_disk(str(root / "arrow"))
    for k, (im, y) in enumerate(zip(pics, ys, strict=True)):
        d = root / "folder" / "test" / f"{y:02d}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{k:03d}.jpg", quality=95)
    return root


def _copy(world: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world / name, tmp_path / name))


def _overwrite_image(path: Path, nth: int) -> None:
    """Overwrite the start of the ``nth`` PNG inside ``path`` (a tar or an Arrow file): the container still
    reads, that image does not decode."""
    data = bytearray(path.read_bytes())
    at = [m.start() for m in re.finditer(re.escape(PNG), bytes(data))][nth]
    data[at:at + 60] = b"x" * 60
    path.write_bytes(bytes(data))


def _eval(cli, spec: str, mode: str, *extra: str):
    split = "train" if spec.startswith("hf:") else "test"
    return cli("eval", "--model", "toy", "--dataset", spec, "--split", split, "--device", "cpu", "--json",
               *MODES[mode], *extra)


def _one_line(code: int, err: str, *words: str) -> str:
    """The CLI's user error: exit 2, one line (no traceback), holding every one of ``words``."""
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err.strip()


# --- wds shards ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_intact_shards_read(world, cli, mode):
    """The twin of every shard case below: the same shards, untouched, evaluate."""
    code, out, err = _eval(cli, f"wds:{world / 'wds_vtab-cifar10'}", mode)
    assert code == 0 and json.loads(out)["data"]["n"] == N, err


@pytest.mark.parametrize("mode", MODES)
def test_a_shard_of_garbage_bytes_is_one_line(world, tmp_path, cli, mode):
    d = _copy(world, "wds_vtab-cifar10", tmp_path)
    (d / "test" / "1.tar").write_bytes(b"not a tar at all " * 100)
    code, _, err = _eval(cli, f"wds:{d}", mode)
    _one_line(code, err, str(d / "test" / "1.tar"), "not a readable uncompressed tar",
              f"hf download clip-benchmark/wds_vtab-cifar10 test/1.tar --repo-type dataset "
              f"--local-dir {d}")


@pytest.mark.parametrize(("cut", "mode"), [("mid-image", "memory"), ("mid-image", "stream"),
                                           ("between-members", "memory"), ("between-members", "stream")])
def test_a_shard_cut_short_is_one_line(world, tmp_path, cli, cut, mode):
    """A real shard cut inside an image, or exactly between two members: there tarfile would stop silently and
    the samples after the cut would vanish from the set."""
    d = _copy(world, "wds_vtab-cifar10", tmp_path)
    shard = d / "test" / "0.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    m = members[len(members) // 2]
    at = m.offset_data + m.size // 2 if cut == "mid-image" else m.offset  # m.offset: where m's header starts
    shard.write_bytes(shard.read_bytes()[:at])
    code, _, err = _eval(cli, f"wds:{d}", mode)
    _one_line(code, err, str(shard), "download it again")


def test_a_shard_missing_only_its_record_padding_still_reads(world, tmp_path, cli):
    """The end-of-archive check is not stricter than tar: zero padding cut after the end block is no damage."""
    d = _copy(world, "wds_vtab-cifar10", tmp_path)
    shard = d / "test" / "0.tar"
    with tarfile.open(shard) as tar:
        end = tar.getmembers()[-1]
        end = end.offset_data + -(-end.size // 512) * 512
    shard.write_bytes(shard.read_bytes()[:end + 2 * 512])  # the two end-of-archive blocks, no record padding
    code, out, err = _eval(cli, f"wds:{d}", "memory")
    assert code == 0 and json.loads(out)["data"]["n"] == N, err


@pytest.mark.parametrize("mode", MODES)
def test_an_image_in_a_shard_that_does_not_decode_names_the_shard(world, tmp_path, cli, mode):
    d = _copy(world, "wds_vtab-cifar10", tmp_path)
    _overwrite_image(d / "test" / "1.tar", 2)
    code, _, err = _eval(cli, f"wds:{d}", mode)
    line = _one_line(code, err, "cannot read an image", str(d / "test" / "1.tar"), "download it again")
    assert "object at 0x" not in line and "DataLoader" not in line


# --- Hugging Face Arrow --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("damage", "mode"), [("cut", "memory"), ("cut", "stream"), ("garbage", "memory"),
                                              ("garbage", "stream")])
def test_a_damaged_arrow_file_is_one_line(world, tmp_path, cli, damage, mode):
    d = _copy(world, "arrow", tmp_path)
    (arrow,) = d.glob("*.arrow")
    data = arrow.read_bytes()
    arrow.write_bytes(data[:len(data) // 2] if damage == "cut" else b"garbage" * 1000)
    code, _, err = _eval(cli, f"hf:{d}", mode)
    line = _one_line(code, err, str(arrow), "save_to_disk")
    assert "hub" not in line  # not the old "cannot load from the Hugging Face hub; offline?"


@pytest.mark.parametrize("mode", MODES)
def test_an_image_in_an_arrow_file_that_does_not_decode_names_the_file_and_row(world, tmp_path, cli, mode):
    d = _copy(world, "arrow", tmp_path)
    (arrow,) = d.glob("*.arrow")
    code, out, err = _eval(cli, f"hf:{d}", mode)
    assert code == 0 and json.loads(out)["data"]["n"] == N, err  # the twin: intact, it reads
    _overwrite_image(arrow, 3)
    code, _, err = _eval(cli, f"hf:{d}", mode)
    _one_line(code, err, "row 3", str(arrow), "damaged")


# --- image folders ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_broken_file_in_a_folder_is_named_in_workers_too(world, tmp_path, cli, mode):
    """A worker's error used to reach the user as its first line, "Caught ... in DataLoader worker process 0"."""
    d = _copy(world, "folder", tmp_path)
    victim = sorted(d.rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:40])
    code, _, err = _eval(cli, f"imagefolder:{d}", mode)
    _one_line(code, err, "cannot read an image", str(victim), "replace or delete the file")


def test_a_broken_jpeg_decoded_on_the_device_is_named(world, tmp_path, cli):
    """--decode device: the workers only read bytes; the file the device's decoder and PIL both refuse is named."""
    d = _copy(world, "folder", tmp_path)
    victim = sorted(d.rglob("*.jpg"))[7]
    victim.write_bytes(victim.read_bytes()[:40])
    code, _, err = _eval(cli, f"imagefolder:{d}", "stream", "--decode", "device")
    _one_line(code, err, "cannot read an image", str(victim))


def test_a_broken_file_at_native_size_is_named(world, tmp_path):
    """The native path (each image at its own size, decoded in this process) names the file as well."""
    from clipguard.data.registry import load_dataset
    from clipguard.errors import ClipguardError

    d = _copy(world, "folder", tmp_path)
    assert len(load_dataset(f"imagefolder:{d}", size=None)) == N
    victim = sorted(d.rglob("*.jpg"))[0]
    victim.write_bytes(b"")
    with pytest.raises(ClipguardError, match=re.escape(str(victim))):
        load_dataset(f"imagefolder:{d}", size=None)


# --- the prepared cache ---------------------------------------------------------------------------------------


@pytest.fixture
def prepared(world, tmp_path, monkeypatch, cli):
    """A prepared cache of the HF set in two shards (8 images a shard here, so that 12 make two)."""
    import clipguard.data.prepared as prep

    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prep, "SHARD", 8)
    spec = f"hf:{world / 'arrow'}"
    code, out, err = cli("prepare", "--model", "toy", "--dataset", spec, "--split", "train", "--workers", "0",
                         "--json")
    assert code == 0, err
    path = Path(json.loads(out)["prepared"]["path"])
    assert sorted(f.name for f in path.glob("shard-*")) == ["shard-00000.npy", "shard-00001.npy"]
    return spec, path


@pytest.mark.parametrize("mode", MODES)
def test_a_prepared_cache_missing_a_shard_says_how_to_write_it_again(prepared, cli, mode):
    spec, path = prepared
    code, out, err = _eval(cli, f"prepared:{path}", mode)
    assert code == 0, err
    before = json.loads(out)["metrics"]
    (path / "shard-00001.npy").unlink()
    for dataset in (f"prepared:{path}", spec):  # typed, and found by the source's key
        code, _, err = _eval(cli, dataset, mode)
        line = _one_line(code, err, str(path), "shard-00001.npy", "clipguard prepare")
    command = shlex.split(re.search(r"`clipguard (prepare [^`]*)`", line).group(1))
    code, out, err = cli(*command, "--workers", "0", "--json")  # the command the line gives repairs the cache
    assert code == 0 and json.loads(out)["prepared"]["shards_written"] == 1, err
    code, out, err = _eval(cli, f"prepared:{path}", mode)
    assert code == 0 and json.loads(out)["metrics"] == before, err


@pytest.mark.parametrize("mode", MODES)
def test_a_truncated_prepared_shard_is_one_line(prepared, cli, mode):
    _, path = prepared
    shard = path / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:1000])
    code, _, err = _eval(cli, f"prepared:{path}", mode)
    _one_line(code, err, str(shard), "damaged", "delete it", "clipguard prepare")


# --- ImageNet layout outside ImageNet-1k ------------------------------------------------------------------------


def _wnid_folder(root: Path, classes: dict[str, int]) -> Path:
    """Class folders named by wnid, each holding the toy test images of one toy class (3 each)."""
    from clipguard.data.toy import toy_split

    images, labels = toy_split("test")
    for wnid, toy_class in reversed(classes.items()):  # made out of order: the order must come from sorting
        d = root / "val" / wnid
        d.mkdir(parents=True)
        for k in [i for i in range(len(labels)) if int(labels[i]) == toy_class][:3]:
            Image.fromarray(images[k].permute(1, 2, 0).numpy()).save(d / f"{k:04d}.png")
    return root


def test_imagenet21k_wnids_load_with_prompts_in_sorted_folder_order(tmp_path, cli):
    from clipguard.data.registry import load_dataset
    from clipguard.data.toy import TOY_CLASSNAMES

    # organism and benthos: ImageNet-21k classes, not in ImageNet-1k; each folder holds one toy class's images
    root = _wnid_folder(tmp_path / "in21k", {"n00004475": 3, "n00005787": 6})
    ds = load_dataset(f"imagefolder:{root}", split="val", size=32)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.classnames is None and ds.info["layout"] == "wordnet"
    prompts = tmp_path / "p.json"
    names = [TOY_CLASSNAMES[3], TOY_CLASSNAMES[6]]  # the folders' classes, in sorted folder order
    prompts.write_text(json.dumps({"classnames": names, "templates": {"seed": ["a photo of a {c}."]}}))
    args = ("eval", "--model", "toy", "--dataset", f"imagefolder:{root}", "--split", "val", "--device", "cpu")
    code, out, err = cli(*args, "--prompts", prompts, "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"]["acc1"] == 1.0  # the toy model tells these two apart: labels match names
    prompts.write_text(json.dumps({"classnames": names[::-1], "templates": {"seed": ["a photo of a {c}."]}}))
    code, out, _ = cli(*args, "--prompts", prompts, "--json")
    assert code == 0 and json.loads(out)["metrics"]["acc1"] == 0.0  # the twin: names in the wrong order
    code, _, err = cli(*args)
    _one_line(code, err, "--prompts")


def test_imagenet1k_wnids_still_map_to_imagenet_classes(tmp_path):
    from clipguard.data.folder import imagenet_prompts, imagenet_wnids
    from clipguard.data.registry import load_dataset

    root = _wnid_folder(tmp_path / "in1k", {"n01443537": 3, "n01530575": 6})  # goldfish (1), brambling (10)
    ds = load_dataset(f"imagefolder:{root}", split="val", size=32)
    names = imagenet_prompts().classnames
    assert [imagenet_wnids().index(w) for w in ("n01443537", "n01530575")] == [1, 10]
    assert ds.classnames == [names[1], names[10]] and ds.info["layout"] == "imagenet"
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_label_file_naming_a_wnid_outside_imagenet1k_is_one_line(tmp_path):
    from clipguard.data.registry import load_dataset
    from clipguard.errors import ClipguardError

    val = tmp_path / "val"
    val.mkdir()
    Image.new("RGB", (8, 8)).save(val / "a.png")
    (tmp_path / "val.txt").write_text("a.png n00004475\n")
    with pytest.raises(ClipguardError, match="n00004475.*neither an ImageNet-1k wnid"):
        load_dataset(f"imagefolder:{tmp_path}", split="val", size=32)
    (tmp_path / "val.txt").write_text("a.png n01443537\n")  # the twin: a 1k wnid reads
    assert load_dataset(f"imagefolder:{tmp_path}", split="val", size=32).labels.tolist() == [1]
