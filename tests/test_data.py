import numpy as np
import pytest
import torch

from clipguard.data.base import stratified_indices
from clipguard.data.registry import load_dataset
from clipguard.errors import ClipguardError


def test_stratified_limit_is_seeded_and_proportional():
    labels = np.repeat(np.arange(4), [100, 100, 50, 250])
    a = stratified_indices(labels, 100, seed=0)
    assert np.array_equal(a, stratified_indices(labels, 100, seed=0))
    assert not np.array_equal(a, stratified_indices(labels, 100, seed=1))
    counts = np.bincount(labels[a], minlength=4)
    assert counts.sum() == 100 and np.all(np.abs(counts - np.array([20, 20, 10, 50])) <= 1)
    assert len(set(a.tolist())) == 100


def test_toy_dataset_is_uint8_and_limited():
    ds = load_dataset("toy", split="test", limit=50)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (50, 3, 32, 32)
    assert torch.bincount(ds.labels, minlength=10).tolist() == [5] * 10
    with pytest.raises(ClipguardError, match="positive"):
        load_dataset("toy", limit=-1)
    with pytest.raises(ClipguardError, match="nosplit"):
        load_dataset("toy", split="nosplit")


def _write_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_folder(tmp_path)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.classnames == ["cat", "dog"] and ds.images.shape == (6, 3, 20, 24)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_without_images_names_the_path(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ClipguardError, match=str(tmp_path)):
        load_dataset(f"imagefolder:{tmp_path}")


def test_hf_local_parquet_columns(tmp_path):
    """The hf: path is real `datasets` code; a local parquet copy exercises it offline."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(6)]
    feats = datasets.Features({"picture": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b", "c"])})
    d = datasets.Dataset.from_dict({"picture": imgs, "y": [0, 1, 2, 0, 1, 2]}, features=feats)
    (tmp_path / "data").mkdir()
    d.to_parquet(str(tmp_path / "data" / "test-00000.parquet"))
    ds = load_dataset(f"hf:{tmp_path}", split="test", image_column="picture", label_column="y", limit=3)
    assert ds.images.shape == (3, 3, 8, 8) and ds.classnames == ["a", "b", "c"]
    assert sorted(ds.labels.tolist()) == [0, 1, 2] and ds.to_record()["preprocess"] == "native"
    at_model = load_dataset(f"hf:{tmp_path}", split="test", image_column="picture", label_column="y", size=(16, 16))
    assert at_model.images.shape == (6, 3, 16, 16)
    assert at_model.to_record()["preprocess"] == ("open_clip eval geometry 16x16 "
                                                 "(resize_mode=shortest, interpolation=bicubic)")
    with pytest.raises(ClipguardError, match="nosuchcol"):
        load_dataset(f"hf:{tmp_path}", split="test", image_column="nosuchcol", label_column="y")


def test_hub_unreachable_is_one_clear_line():
    with pytest.raises(ClipguardError) as exc:
        load_dataset("cifar10", split="test", limit=10)
    msg = str(exc.value)
    assert "cifar10" in msg and "imagefolder:PATH" in msg and "\n" not in msg
