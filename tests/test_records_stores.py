"""What stored things are keyed by: model fingerprints (text-embedding store, adapters) and saved
adversarial sets (uint8 quantisation within eps, the clean images' digest)."""

import hashlib
import os
import shutil

import pytest
import torch

from clipguard.attacks.advset import image_digest, quantize
from clipguard.errors import ClipguardError
from clipguard.models import loader
from clipguard.models.loader import hf_cache_location, weights_fingerprint
from clipguard.models.text_embeddings import text_key
from clipguard.models.toy import toy_weights_path

# ------------------------------------------------------------------------------ model fingerprints


def _hub_file(root, repo: str, commit: str, content: bytes, name: str = "open_clip_pytorch_model.bin"):
    """A file laid out as huggingface_hub caches it: snapshots/<commit>/<name> -> ../../blobs/<sha256>."""
    d = root / f"models--{repo.replace('/', '--')}"
    sha = hashlib.sha256(content).hexdigest()
    (d / "blobs").mkdir(parents=True, exist_ok=True)
    (d / "blobs" / sha).write_bytes(content)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    link = snap / name
    link.symlink_to(os.path.join("..", "..", "blobs", sha))
    return link, sha


def test_hf_cache_location(tmp_path):
    link, _ = _hub_file(tmp_path / "hub", "timm/vit_base_patch32_clip_224.openai", "c" * 40, b"w")
    assert hf_cache_location(link) == ("timm/vit_base_patch32_clip_224.openai", "c" * 40)
    assert hf_cache_location(tmp_path / "clip" / "ViT-B-32.pt") is None
    assert hf_cache_location("/x/models--a--b/snapshots") is None  # no commit, no file


def test_pretrained_tag_fingerprint_follows_the_weights_not_the_name(tmp_path):
    """The old fingerprint of a tag was the tag alone: new weights under the same name reused stale text
    embeddings. The hub blob name is the content's sha256, so no hashing is needed."""
    hub, digests = tmp_path / "hub", tmp_path / "digests.json"
    repo = "timm/vit_base_patch32_clip_224.openai"
    v1, sha1 = _hub_file(hub, repo, "1" * 40, b"weights v1")
    v2, sha2 = _hub_file(hub, repo, "2" * 40, b"weights v2")
    same, _ = _hub_file(hub, repo, "3" * 40, b"weights v1")  # a later commit that left the weights alone
    f1 = weights_fingerprint("ViT-B-32:openai", v1, digest_cache=digests)
    assert f1 == f"ViT-B-32:openai@sha256:{sha1}"
    assert weights_fingerprint("ViT-B-32:openai", v2, digest_cache=digests) == f"ViT-B-32:openai@sha256:{sha2}"
    assert weights_fingerprint("ViT-B-32:openai", same, digest_cache=digests) == f1
    assert not digests.exists()  # read off the blob name, nothing hashed
    names, tpl = ["cat", "dog"], ["a photo of a {c}."]
    assert text_key(f1, names, tpl) != text_key(weights_fingerprint("ViT-B-32:openai", v2, digest_cache=digests),
                                                names, tpl)


def test_a_file_outside_the_hub_cache_is_hashed_once(tmp_path, monkeypatch):
    """open_clip's URL downloads (~/.cache/clip/<file>) and hub caches without symlinks: content digest,
    remembered by (path, size, mtime)."""
    w, digests = tmp_path / "clip" / "ViT-B-32.pt", tmp_path / "digests.json"
    w.parent.mkdir()
    w.write_bytes(b"weights v1")
    hashed = []
    real = loader.file_digest
    monkeypatch.setattr(loader, "file_digest", lambda p: hashed.append(p) or real(p))
    f1 = weights_fingerprint("ViT-B-32:openai", w, digest_cache=digests)
    assert f1 == "ViT-B-32:openai@sha256:" + hashlib.sha256(b"weights v1").hexdigest()
    assert weights_fingerprint("ViT-B-32:openai", w, digest_cache=digests) == f1 and len(hashed) == 1
    w.write_bytes(b"weights v2, replaced in place")
    f2 = weights_fingerprint("ViT-B-32:openai", w, digest_cache=digests)
    assert f2 != f1 and len(hashed) == 2
    hub_copy = tmp_path / "hub" / "models--org--repo" / "snapshots" / ("a" * 40) / "open_clip_model.safetensors"
    hub_copy.parent.mkdir(parents=True)
    shutil.copy(w, hub_copy)  # a hub cache without symlinks (Windows): no blob name to read
    assert weights_fingerprint("ViT-B-32:openai", hub_copy, digest_cache=digests) == f2


def test_hub_model_fingerprint_is_its_revision(tmp_path):
    hub = tmp_path / "hub"
    a, _ = _hub_file(hub, "org/clip", "a" * 40, b"w", "open_clip_model.safetensors")
    b, _ = _hub_file(hub, "org/clip", "b" * 40, b"w", "open_clip_model.safetensors")
    fa = weights_fingerprint("hf-hub:org/clip", a, hub=True)
    assert fa == "hf-hub:org/clip@rev:" + "a" * 40  # the revision pins the config too, not only the weights
    assert weights_fingerprint("hf-hub:org/clip", b, hub=True) != fa


def test_create_model_notes_the_weights_file_it_loaded():
    from clipguard.models.toy import TOY_MODEL_NAME, register_toy_config

    register_toy_config()
    path = toy_weights_path("seed0")
    _, weights = loader.create_model_noting_weights(TOY_MODEL_NAME, pretrained=str(path))
    assert weights == str(path)


def test_a_pretrained_tag_loads_with_its_weights_digest(tmp_path, monkeypatch):
    """End to end through load_clip, offline: a pretrained tag whose open_clip config names a local file."""
    import open_clip

    from clipguard.models.loader import load_clip
    from clipguard.models.toy import TOY_MODEL_NAME, register_toy_config

    register_toy_config()
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    link, sha = _hub_file(tmp_path / "hub", "org/toy", "f" * 40, toy_weights_path("seed0").read_bytes(),
                          "open_clip_model.safetensors")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TOY_MODEL_NAME, {"fake": {"file": str(link)}})
    clip = load_clip(f"{TOY_MODEL_NAME}:fake", device="cpu", precision="fp32")
    assert clip.fingerprint == f"{TOY_MODEL_NAME}:fake@sha256:{sha}"
    assert clip.info["weights_file"] == str(link)
    plain = tmp_path / "seed1.safetensors"
    shutil.copy(toy_weights_path("seed1"), plain)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TOY_MODEL_NAME, {"fake": {"file": str(plain)}})
    other = load_clip(f"{TOY_MODEL_NAME}:fake", device="cpu", precision="fp32")  # same name, other weights
    assert other.fingerprint == f"{TOY_MODEL_NAME}:fake@" + loader.file_digest(plain)
    assert (tmp_path / "cache" / "weights-digests.json").is_file()


# ------------------------------------------------------------------------------ adversarial sets


def _boundary_case(n: int = 6, size: int = 24, eps: float = 8 / 255, seed: int = 0):
    """Float clean images between uint8 levels (a resized image) and an attack output on the eps boundary."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64).float()
    sign = torch.randint(0, 2, clean.shape, generator=g).float() * 2 - 1
    adv = (clean + sign * eps).clamp(0, 1)
    return clean, adv


def test_quantize_stays_within_eps_of_the_float_clean_image():
    eps = 8 / 255
    clean, adv = _boundary_case(eps=eps)
    # The old way: clip around the clean image rounded to uint8 first. Its ball is off-centre by up to half
    # a level, so the stored set exceeds eps around what the attack actually perturbed (up to 8.5/255).
    rounded = torch.round(clean * 255).to(torch.uint8)
    old = quantize(adv, rounded, eps)
    assert (old.double() / 255 - clean.double()).abs().max() > eps + 1e-3
    q = quantize(adv, clean, eps)
    assert q.dtype == torch.uint8 and q.shape == adv.shape
    assert (q.double() / 255 - clean.double()).abs().max() <= eps + 1e-6
    assert (q.double() / 255 - clean.double()).abs().max() > eps - 1 / 255  # it does use the ball


def test_quantize_picks_the_nearest_allowed_level():
    eps = 3 / 255
    clean, adv = _boundary_case(n=1, size=6, eps=eps, seed=1)
    adv = (adv + torch.randn(adv.shape, generator=torch.Generator().manual_seed(2)) * 0.01).clamp(0, 1)
    q = quantize(adv, clean, eps)
    levels = torch.arange(256, dtype=torch.float64)
    for c, a, got in zip(clean.flatten().double(), adv.flatten().double(), q.flatten().tolist(), strict=True):
        allowed = levels[(levels / 255 - c).abs() <= eps + 1e-9]
        assert got == int(allowed[(allowed - a * 255).abs().argmin()])


def test_quantize_with_uint8_clean_uses_the_whole_ball():
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    adv = (clean.float() / 255 + 8 / 255 * (torch.randint(0, 2, clean.shape, generator=g) * 2 - 1)).clamp(0, 1)
    q = quantize(adv, clean, 8 / 255)
    diff = (q.int() - clean.int()).abs()
    assert diff.max() == 8 and torch.equal(q, torch.round(adv * 255).to(torch.uint8))


def test_quantize_refuses_an_eps_below_half_a_level_off_the_lattice():
    clean = torch.full((1, 3, 2, 2), 100.5 / 255)
    with pytest.raises(ClipguardError, match="eps"):
        quantize(clean, clean, 0.2 / 255)
    assert quantize(clean, clean, 0.5 / 255).max() in (100, 101)


def test_image_digest_names_the_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 16, 16), generator=g, dtype=torch.uint8)
    d = image_digest(x)
    assert d.startswith("sha256:") and image_digest(x.clone()) == d
    y = x.clone()
    y[3, 1, 7, 9] ^= 1
    assert image_digest(y) != d
    assert image_digest(x.reshape(5, 3, 8, 32)) != d  # same bytes, other shape
    assert image_digest(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)) == d  # layout does not matter
    with pytest.raises(ValueError, match="uint8"):
        image_digest(x.float())


def test_an_existing_output_file_is_replaced_not_refused(tmp_path, cli):
    """A second run with the same --out / --predictions overwrites the files (atomically), as users expect."""
    out, preds = tmp_path / "r.json", tmp_path / "p.csv"
    for _ in range(2):
        code, _, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "20", "--device", "cpu",
                           "--out", out, "--predictions", preds, "--json")
        assert code == 0, err
    assert len(preds.read_text().splitlines()) == 21
