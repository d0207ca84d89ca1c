"""The paper-named suites on the papers' own protocol (issue 26 item 10), and `--preprocess tecoa`: TeCoA's
Resize(256) + CenterCrop(224) geometry, checked bit for bit against torchvision's own transform."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize, ToTensor

from clipguard.catalogue import catalogue
from clipguard.data import images
from clipguard.data.registry import load_dataset
from clipguard.errors import ClipguardError
from clipguard.tasks.bench import load_suite, typed
from clipguard.tasks.configs import EvalConfig

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
NATIVE_SETS = {"cifar10", "cifar100", "stl10"}  # FARE's and TeCoA's code: ToTensor() only, resized in the model
# TeCoA's finetuning.py, verbatim in effect: what every non-CIFAR set goes through before ToTensor()
TECOA_TRANSFORM = Compose([Resize(256), CenterCrop(224), ToTensor()])


# --- --preprocess tecoa against torchvision ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> Path:
    """An image folder of the cases a geometry can get wrong: odd sizes (up and down), grey, palette, RGBA with
    varying alpha, and a JPEG. Class folders a/ and b/ under test/, as torchvision's ImageFolder reads them."""
    root = tmp_path_factory.mktemp("odd") / "test"
    rng = np.random.default_rng(0)

    def noise(h, w, c):  # smooth + noisy, so every interpolation choice shows in the pixels
        y, x = np.mgrid[0:h, 0:w]
        base = (x * 255 / w + y * 128 / h)[..., None] + rng.normal(0, 40, (h, w, c))
        return np.clip(base, 0, 255).astype(np.uint8)

    made = {
        "a/1_rgb_odd.png": Image.fromarray(noise(257, 301, 3)),  # downscaled, landscape, odd sides
        "a/2_grey.png": Image.fromarray(noise(333, 199, 1)[..., 0], "L"),  # portrait
        "a/3_palette.png": Image.fromarray(noise(481, 640, 3)).quantize(64),  # mode P
        "b/4_rgba.png": Image.fromarray(noise(97, 150, 4), "RGBA"),  # upscaled; alpha varies
        "b/5_photo.jpg": Image.fromarray(noise(300, 451, 3)),
    }
    for rel, im in made.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel)
    assert Image.open(root / "a/3_palette.png").mode == "P"
    return root


def _torchvision_tecoa(root: Path) -> tuple[torch.Tensor, list[int]]:
    """What TeCoA's loader hands its model: uint8 again (ToTensor divides by 255; rounding undoes it exactly)."""
    ds = ImageFolder(str(root), transform=TECOA_TRANSFORM)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return (x * 255).round().to(torch.uint8), [ds[i][1] for i in range(len(ds))]


def _mismatched(root: Path, **load) -> list[int]:
    """Positions where clipguard's images (a whole folder, through the reader + worker path) differ from
    TeCoA's torchvision transform; the labels must line up first."""
    want, labels = _torchvision_tecoa(root)
    got = load_dataset(f"imagefolder:{root.parent}", split="test", size=224, workers=0, use_prepared=False, **load)
    assert got.labels.tolist() == labels
    return [i for i in range(len(want)) if not torch.equal(got.images[i], want[i])]


def test_tecoa_geometry_is_torchvisions_transform_bit_for_bit(odd_images):
    ds = load_dataset(f"imagefolder:{odd_images.parent}", split="test", size=224, workers=0, preprocess="tecoa")
    assert ds.info["preprocess"].startswith("TeCoA geometry 224x224: torchvision Resize(256) bilinear")
    assert _mismatched(odd_images, preprocess="tecoa") == []


def test_twin_the_comparison_sees_another_geometry(odd_images):
    """The check can fail: open_clip's bicubic geometry (the default) is not TeCoA's on any of these images."""
    assert _mismatched(odd_images) == [0, 1, 2, 3, 4]


def _differs(geometry, root: Path) -> list[str]:
    """The images (opened in their own mode, as a reader that does not convert them hands them over) on which
    ``geometry`` differs from TeCoA's transform of the RGB image its torchvision loaders produce."""
    out = []
    for f in sorted(root.rglob("*.*")):
        with Image.open(f) as im:
            want = (TECOA_TRANSFORM(im.convert("RGB")) * 255).round().to(torch.uint8)
            got = torch.from_numpy(np.array(geometry(im, 224))).permute(2, 0, 1)
        if not torch.equal(got, want):
            out.append(f.stem)
    return out


def test_tecoa_geometry_converts_to_rgb_first_for_any_mode(odd_images):
    assert _differs(images.tecoa_geometry, odd_images) == []


def test_twin_palette_and_alpha_cases_catch_resizing_before_rgb(odd_images):
    """The palette and RGBA images are there for a reason: resizing before the RGB conversion (PIL resizes a palette
    image by nearest neighbour and RGBA with premultiplied alpha) breaks exactly those two."""

    def resized_first(img, size):
        return CenterCrop(224)(Resize(256, interpolation=InterpolationMode.BILINEAR)(img)).convert("RGB")

    assert _differs(resized_first, odd_images) == ["3_palette", "4_rgba"]


def test_tecoa_side_keeps_the_256_to_224_ratio():
    assert images.tecoa_side(224) == 256 and images.tecoa_side(336) == 384 and images.tecoa_side(32) == 37


@pytest.mark.parametrize("load, says", [
    ({"size": None}, "--resolution native"),
    ({"size": (32, 32), "decode": "device"}, "--decode device"),
    ({"size": (32, 32), "streaming": True}, "--streaming"),
    ({"size": (32, 40)}, "32x40"),
])
def test_tecoa_is_refused_where_it_cannot_be_applied(load, says):
    with pytest.raises(ClipguardError) as e:
        load_dataset("toy", limit=10, preprocess="tecoa", **load)
    assert says in str(e.value) and "--preprocess" in str(e.value) and "\n" not in str(e.value)


def test_twin_the_same_loads_work_with_open_clip():
    assert load_dataset("toy", limit=10, size=None).images.shape[-2:] == (32, 32)
    assert load_dataset("toy", limit=10, size=(32, 40)).images.shape[-2:] == (32, 40)


def test_unknown_preprocess_is_one_line():
    with pytest.raises(ClipguardError, match=r"--preprocess 'bicubic' is unknown: choose from open_clip, tecoa"):
        load_dataset("toy", limit=10, size=32, preprocess="bicubic")


def test_geometries_are_the_options_choices():
    from clipguard.run_options import PREPROCESSES

    assert set(images.GEOMETRIES) == set(PREPROCESSES)


# --- recorded, hashed and cached like --resolution --------------------------------------------------------------


def test_eval_records_the_geometry_and_hashes_it_only_when_set():
    from clipguard.tasks.eval import eval_config, run_eval

    tecoa = run_eval(eval_config(model="toy", dataset="toy", limit=10, device="cpu", preprocess="tecoa"),
                     progress=False)
    plain = run_eval(eval_config(model="toy", dataset="toy", limit=10, device="cpu"), progress=False)
    assert tecoa["data"]["preprocess"].startswith("TeCoA geometry 32x32")
    assert plain["data"]["preprocess"] == "open_clip eval geometry 32x32 (resize_mode=shortest, interpolation=bicubic)"
    assert tecoa["config"]["preprocess"] == "tecoa" and "preprocess" not in plain["config"]  # old hashes stay


def test_prepared_cache_is_keyed_and_checked_by_geometry(odd_images, monkeypatch, tmp_path):
    from clipguard.config import from_options
    from clipguard.tasks.configs import PrepareConfig
    from clipguard.tasks.prepare import run_prepare

    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    spec = f"imagefolder:{odd_images.parent}"
    made = {p: run_prepare(from_options(PrepareConfig, {"dataset": spec, "workers": 0, "preprocess": p, "size": 224}),
                           progress=False)["prepared"] for p in ("open_clip", "tecoa")}
    assert made["open_clip"]["key"] != made["tecoa"]["key"]
    tecoa_cache = made["tecoa"]["path"]
    # a run finds the cache of its own geometry, and the pixels are TeCoA's
    ds = load_dataset(spec, split="test", size=224, workers=0, preprocess="tecoa")
    assert ds.info["prepared"] == tecoa_cache
    assert torch.equal(ds.images, _torchvision_tecoa(odd_images)[0])
    # reading the cache directly: its geometry must be the one the run names (the twin: the matching name works)
    with pytest.raises(ClipguardError, match="use --preprocess tecoa"):
        load_dataset(f"prepared:{tecoa_cache}", size=224)
    assert len(load_dataset(f"prepared:{tecoa_cache}", size=224, preprocess="tecoa")) == 5
    with pytest.raises(ClipguardError, match="use --preprocess open_clip"):
        load_dataset(f"prepared:{made['open_clip']['path']}", size=224, preprocess="tecoa")


# --- the suites --------------------------------------------------------------------------------------------------


def _cells(name: str) -> list[dict]:
    _, cells = load_suite(BENCH / name)
    for c in cells:  # every cell parses and passes its checks
        typed(EvalConfig, {k: v for k, v in c.items() if k not in ("id", "kind")}, c["id"])
    return cells


@pytest.mark.parametrize("suite", ["fare-protocol.toml", "zs-robust.toml"])
def test_fare_suites_perturb_cifar_and_stl_at_their_own_size(suite):
    """FARE's fork: CIFAR-10/100 and STL-10 at 32 / 96 px, resized inside the model; the rest at the model's size
    through open_clip's geometry (clean cells too: the fork's clean run loads them the same way)."""
    for c in _cells(suite):
        want = "native" if c["dataset"] in NATIVE_SETS else "model"
        assert c.get("resolution", "model") == want, c["id"]
        assert "preprocess" not in c, c["id"]
        if "attack" in c:
            assert (c["attack"], c["aa_version"], c["aa_attacks"], c["eps"], c["limit"]) == (
                "autoattack", "custom", "apgd-ce,apgd-t", "2/255,4/255", 1000)


def test_tecoa_suite_follows_tecoas_code():
    cells = _cells("tecoa-protocol.toml")
    assert {c["dataset"] for c in cells} == {n for n, e in catalogue().items() if "tecoa" in e.suites}
    for c in cells:
        # eps = --test_eps/255, step = --test_stepsize/255 (an int: 1/255), the paper's PGD-100, whole test split
        assert (c["attack"], c["norm"], c["eps"], c["alpha"], c["steps"]) == ("pgd", "linf", "1/255", "1/255", 100)
        assert "limit" not in c and c["split"] == "test"
        if c["dataset"] in NATIVE_SETS:  # ToTensor() only, upsampled in clip_img_preprocessing
            assert c["resolution"] == "native" and "preprocess" not in c, c["id"]
        else:  # Resize(256) + CenterCrop(224), bilinear
            assert c.get("resolution", "model") == "model" and c["preprocess"] == "tecoa", c["id"]


def test_suite_files_describe_what_they_run():
    fare = (BENCH / "fare-protocol.toml").read_text()
    assert "10,000-image shuffle buffer" in fare and "the loader's first 1,000 images" not in fare
    tecoa = (BENCH / "tecoa-protocol.toml").read_text()
    assert "Resize(256)" in tecoa and "1/1020" not in tecoa
