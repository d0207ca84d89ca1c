"""SigLIP as open_clip builds it (issue 22, item 2): the logit bias in the classifier's logits, each model's own
tokenizer and context length, text-embedding keys that name them, and the offline missing-tokenizer error.

Everything is offline: a tiny SigLIP-style open_clip config (``CustomTextCLIP`` with ``init_logit_bias``, no causal
mask, last-token pooling) registered through open_clip's own ``add_model_config``, with a Hugging Face tokenizer the
test writes itself (its ``hf_tokenizer_name`` is that folder), random weights (``ARCH:none``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipguard.errors import ClipguardError
from clipguard.models.classifier import ZeroShotClassifier, model_logit_bias
from clipguard.models.loader import load_clip
from clipguard.models.text_embeddings import compute_text_embeddings, get_text_embeddings, text_key
from clipguard.models.tokenizers import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "clipguard-test-siglip"
BIAS = -10.0  # open_clip's SigLIP configs' init_logit_bias
CONTEXT = 12
CLASSES = ["red circle", "blue square", "green star", "pink heart"]
TEMPLATE = "a photo of a {c}."
REPO = Path(__file__).resolve().parents[1]


def write_tokenizer(folder: Path, extra: str = "") -> int:
    """A tiny CLIP BPE tokenizer (single characters, no merges) saved by transformers; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,'-" + extra)
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    raw = folder / "raw"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt")).save_pretrained(folder)
    return len(vocab)


def siglip_config(tokenizer: str, vocab_size: int) -> dict:
    return {"embed_dim": 32, "init_logit_bias": BIAS, "custom_text": True,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
            "text_cfg": {"context_length": CONTEXT, "vocab_size": vocab_size, "hf_tokenizer_name": tokenizer,
                         "width": 32, "heads": 2, "layers": 1, "no_causal_mask": True, "pool_type": "last",
                         "proj_bias": True}}


def register(folder: Path, name: str, cfg: dict) -> None:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)  # registered by file name, like clipguard's toy config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip-tokenizer")
    return folder, write_tokenizer(folder)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory, tokenizer_dir):
    folder, vocab = tokenizer_dir
    register(tmp_path_factory.mktemp("siglip-config"), NAME, siglip_config(str(folder), vocab))
    return load_clip(f"{NAME}:none", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def classifiers(siglip):
    """The classifier clipguard builds, and its twin that ignores the bias (everything else shared)."""
    emb = compute_text_embeddings(siglip, CLASSES, [TEMPLATE])
    clf = ZeroShotClassifier.from_clip(siglip, emb).eval()
    twin = ZeroShotClassifier(clf.visual, clf.text_embeddings, clf.logit_scale, siglip.mean, siglip.std,
                              siglip.input_size).eval()
    return clf, twin


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def open_clip_forward(clip, x: torch.Tensor):
    """open_clip's own ``model(image, text)`` on the same pixels (normalised as its preprocess does) and prompts."""
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    return clip.model((x - mean) / std, clip.tokenizer([TEMPLATE.replace("{c}", c) for c in CLASSES]))


def test_the_model_is_siglip_style_with_its_own_tokenizer(siglip, tokenizer_dir):
    from transformers import AutoTokenizer

    assert isinstance(siglip.model, open_clip.CustomTextCLIP) and siglip.model.logit_bias.item() == BIAS
    assert siglip.tokenizer_name.startswith(f"hf:{tokenizer_dir[0]}@{CONTEXT} sha256=")
    tokens = siglip.tokenizer(["a photo of a red circle, a long caption cut at the context length"])
    ref = AutoTokenizer.from_pretrained(str(tokenizer_dir[0]))(
        ["a photo of a red circle, a long caption cut at the context length"], padding="max_length",
        truncation=True, max_length=CONTEXT)["input_ids"]
    assert tokens.shape == (1, CONTEXT) and tokens.tolist() == ref  # the model's own tokenizer, not open_clip's BPE
    assert load_tokenizer("ViT-B-32", "ViT-B-32")[1] == "open_clip:SimpleTokenizer@77"  # twin: a CLIP's own
    assert load_tokenizer("clipguard-toy", "toy")[1] == "open_clip:SimpleTokenizer@16"


def test_logits_and_attack_loss_are_open_clips_own(siglip, classifiers):
    """(b) clipguard's logits, cross-entropy and its input gradient (what every attack differentiates) equal those
    computed from open_clip's ``model(image, text)`` outputs: image/text features, logit_scale.exp(), logit_bias."""
    clf, twin = classifiers
    x, y = pixels(6), torch.tensor([0, 1, 2, 3, 1, 0])
    img, txt, scale, bias = open_clip_forward(siglip, x)
    ref_logits = scale * img @ txt.T + bias
    assert torch.allclose(clf(x), ref_logits, atol=1e-4)
    assert not torch.allclose(twin(x), ref_logits, atol=1.0)  # twin: dropping the bias is caught

    xa = x.clone().requires_grad_(True)
    loss = F.cross_entropy(clf(xa), y)
    (grad,) = torch.autograd.grad(loss, xa)
    xr = x.clone().requires_grad_(True)
    img, txt, scale, bias = open_clip_forward(siglip, xr)
    ref_loss = F.cross_entropy(scale * img @ txt.T + bias, y)
    (ref_grad,) = torch.autograd.grad(ref_loss, xr)
    assert torch.allclose(loss, ref_loss, atol=1e-5) and torch.allclose(grad, ref_grad, atol=1e-6, rtol=1e-4)
    assert grad.abs().max() > 1e-4  # the comparison is of real gradients, not of two zeros


def test_the_bias_moves_siglips_sigmoid_loss_but_not_the_softmax_cross_entropy(siglip, classifiers):
    """(a) The bias is in the logits (exactly BIAS apart from the twin that ignores it) and changes SigLIP's own
    loss, the pairwise sigmoid cross-entropy (open_clip's ``SigLipLoss``). A softmax cross-entropy, as the attacks and
    TeCoA use, is shift-invariant: the same one bias on every class leaves it (and its gradient) unchanged."""
    clf, twin = classifiers
    x = pixels(len(CLASSES), seed=1)  # image i is paired with class i, as SigLipLoss pairs image i with text i
    logits, plain = clf(x), twin(x)
    assert torch.allclose(logits - plain, torch.full_like(logits, BIAS), atol=1e-4)

    signs = 2 * torch.eye(len(CLASSES)) - 1

    def sigmoid_loss(z):
        return -F.logsigmoid(signs * z).sum() / z.shape[0]

    ref = open_clip.loss.SigLipLoss()(*open_clip_forward(siglip, x))
    assert torch.allclose(sigmoid_loss(logits), ref, atol=1e-4)
    assert not torch.allclose(sigmoid_loss(plain), ref, atol=1e-2)  # twin: the bias-less loss is not the model's

    y = torch.arange(len(CLASSES))
    assert torch.allclose(F.cross_entropy(logits, y), F.cross_entropy(plain, y), atol=1e-5)


def test_argmax_is_unchanged_and_only_a_scalar_bias_is_taken(siglip, classifiers):
    """(c) One bias on every class keeps every prediction; a per-class bias (which could move them) is refused."""
    clf, twin = classifiers
    x = pixels(32, seed=2)
    assert torch.equal(clf(x).argmax(1), twin(x).argmax(1))
    assert model_logit_bias(siglip.model) == BIAS and model_logit_bias(torch.nn.Linear(1, 1)) is None
    per_class = torch.nn.Module()
    per_class.logit_bias = torch.nn.Parameter(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    with pytest.raises(ClipguardError, match=r"shape \(4,\).*scalar"):
        model_logit_bias(per_class)


def test_text_key_names_the_tokenizer_and_keeps_the_toys(siglip, toy_clip, fresh_cache):
    """(d) A Hugging Face tokenizer and its context length are part of the key; the toy's (open_clip's BPE) key is the
    one committed records were made with."""
    fp, names, tpl = "sha256:abc", ["a", "b"], ["{c}"]
    keys = {text_key(fp, names, tpl, t) for t in ("", "hf:timm/ViT-B-16-SigLIP@64", "hf:timm/ViT-B-16-SigLIP@32",
                                                  "hf:timm/ViT-B-16-SigLIP2@64")}
    assert len(keys) == 4
    assert text_key(fp, names, tpl, "open_clip:SimpleTokenizer@77") == text_key(fp, names, tpl)

    e = get_text_embeddings(siglip, CLASSES, [TEMPLATE])
    assert e.key == text_key(siglip.fingerprint, CLASSES, [TEMPLATE], siglip.tokenizer_name)
    assert e.key != text_key(siglip.fingerprint, CLASSES, [TEMPLATE])

    from clipguard.data.prompts import load_prompts

    committed = json.loads((REPO / "benchmarks/results/bench-toy-cpu/lora-ce.json").read_text())
    if committed["environment"]["open_clip"] != open_clip.__version__:
        pytest.skip("the committed toy record was made with another open_clip (its version is in the key)")
    prompts = load_prompts("toy", templates=committed["prompts"]["templates"])
    assert committed["weights_digest"] == toy_clip.fingerprint and toy_clip.tokenizer_name.startswith("open_clip:")
    key = get_text_embeddings(toy_clip, prompts.classnames, prompts.templates).key
    assert key == committed["text_embeddings"]["key"]
    assert text_key(toy_clip.fingerprint, prompts.classnames, prompts.templates, "hf:other@16") != key  # twin


def test_a_tokenizer_changed_under_the_same_name_changes_its_name_and_key(tmp_path):
    """A hub tokenizer can change under its repo name (a new revision in the cache) and a folder can be saved again:
    the name carries a digest of what was loaded, so the text-embedding key changes with it and a stale cached
    embedding is not served. Loading the same files twice names them alike (the digest is not a random id)."""
    import shutil

    from open_clip.tokenizer import HFTokenizer

    from clipguard.models.tokenizers import tokenizer_name

    folder = tmp_path / "tok"
    write_tokenizer(folder)
    first, again = (tokenizer_name(HFTokenizer(str(folder), context_length=9)) for _ in range(2))
    shutil.rmtree(folder)
    write_tokenizer(folder, extra="!")  # one more token, same folder, same name
    changed = tokenizer_name(HFTokenizer(str(folder), context_length=9))
    assert first == again and first.startswith(f"hf:{folder}@9 sha256=")
    assert changed != first and changed.split(" sha256=")[0] == first.split(" sha256=")[0]
    fp, names, tpl = "sha256:abc", ["a", "b"], ["{c}"]
    assert text_key(fp, names, tpl, changed) != text_key(fp, names, tpl, first)


def test_an_hf_hub_model_gets_the_tokenizer_its_config_names(tmp_path, monkeypatch, tokenizer_dir):
    """An hf-hub model's tokenizer and context length come from its open_clip_config.json (read from the hub cache)."""
    import huggingface_hub.constants as hub_constants

    folder, vocab = tokenizer_dir
    snap = tmp_path / "hub" / "models--someone--tiny-siglip"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    cfg = siglip_config(str(folder), vocab)
    cfg["text_cfg"]["context_length"] = 9
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (snap / "snapshots" / ("0" * 40) / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tok, name = load_tokenizer("hf-hub:someone/tiny-siglip", "hf-hub:someone/tiny-siglip")
    assert name.startswith(f"hf:{folder}@9 sha256=") and tok(["a red circle"]).shape == (1, 9)


def test_offline_missing_tokenizer_is_one_line_naming_where_before_any_weights(cli, tmp_path, monkeypatch):
    """(e) ViT-B-16-SigLIP needs timm/ViT-B-16-SigLIP's tokenizer from the hub: offline with an empty cache, one line
    (exit 2) naming the repo and the cache folder its files belong in; no model is built first."""
    import huggingface_hub.constants as hub_constants

    empty = tmp_path / "hf" / "hub"
    empty.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def no_weights(*a, **k):
        raise AssertionError("a model was built before the tokenizer was found")

    monkeypatch.setattr(open_clip, "create_model", no_weights)
    code, _, err = cli("eval", "--model", "ViT-B-16-SigLIP:none", "--dataset", "toy", "--limit", "4",
                       "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "timm/ViT-B-16-SigLIP" in lines[0] and str(empty / "models--timm--ViT-B-16-SigLIP") in lines[0]
    assert "offline" in lines[0] and "hf download timm/ViT-B-16-SigLIP" in lines[0]


def test_an_unreadable_tokenizer_folder_is_one_line_naming_it(tmp_path, tokenizer_dir):
    """A config naming a local tokenizer folder without a tokenizer in it: one line naming the folder."""
    empty = tmp_path / "no-tokenizer-here"
    empty.mkdir()
    register(tmp_path, f"{NAME}-broken", siglip_config(str(empty), tokenizer_dir[1]))
    with pytest.raises(ClipguardError, match="tokenizer folder") as e:
        load_clip(f"{NAME}-broken:none", device="cpu", precision="fp32")
    assert str(empty) in str(e.value) and "\n" not in str(e.value)


def test_records_name_the_tokenizer_and_the_bias(cli, siglip, tokenizer_dir, fresh_cache):
    """(3) A run's record names the tokenizer (with its context length) and the logit bias it applied."""
    code, out, err = cli("eval", "--model", f"{NAME}:none", "--dataset", "toy", "--limit", "10", "--device", "cpu",
                         "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["tokenizer"] == siglip.tokenizer_name and rec["logit_bias"] == BIAS
    assert rec["tokenizer"].startswith(f"hf:{tokenizer_dir[0]}@{CONTEXT} sha256=")
    code, out, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "10", "--device", "cpu", "--json")
    rec = json.loads(out)  # twin: CLIP has no bias, and open_clip's own tokenizer
    assert code == 0 and rec["tokenizer"] == "open_clip:SimpleTokenizer@16" and rec["logit_bias"] is None
