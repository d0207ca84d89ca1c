"""The cached text-embedding store shared by every command.

Key = sha256 of (model fingerprint, open_clip version, class names, templates, precision, and the tokenizer when it
is not open_clip's own: see :func:`text_key`). Each entry is
one file, ``<cache>/text/<key>.safetensors``, holding the embeddings and its manifest (JSON in the safetensors
metadata), written atomically: a crash leaves no entry or a whole one, and two processes building the same
key both succeed and leave one valid entry. The model fingerprint names the weights themselves (a file digest,
or for a pretrained tag / hf-hub model the digest or hub revision of the file open_clip loaded: see
``models.loader``), so new weights under an old name never reuse stale embeddings. Cache root:
``$CLIPGUARD_CACHE``, else ``~/.cache/clipguard``. A second run of any command does zero text-tower passes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors import torch as safetensors_torch  # called through the module: tests make its save_file crash

from clipguard.fsutil import atomic_write, cache_root

TEXT_PRECISION = "fp32"  # class embeddings are computed once, so always at full precision
MANIFEST_KEY = "clipguard.manifest"  # the safetensors metadata entry holding an entry's manifest (JSON)


def text_dir() -> Path:
    return cache_root() / "text"


# open_clip's own BPE tokenizer adds nothing the key lacks: its vocabulary ships with open_clip (whose version is in
# the key) and its context length is the model's positional-embedding length, fixed by the weights the fingerprint
# names. Leaving it out keeps every key made before tokenizers were named (caches, records) valid.
KEYLESS_TOKENIZER = "open_clip:SimpleTokenizer@"


def text_key(fingerprint: str, classnames: list[str], templates: list[str], tokenizer: str = "") -> str:
    """The store's key. ``tokenizer`` is ``LoadedClip.tokenizer_name`` (``hf:timm/ViT-B-16-SigLIP@64``): a Hugging
    Face tokenizer and its context length are part of the key; "" or open_clip's SimpleTokenizer add nothing."""
    # Lazy: `clipguard cache ls|rm` import this module and load no model; open_clip would add ~2 s to them.
    import open_clip

    payload = {"model": fingerprint, "open_clip": open_clip.__version__, "classnames": classnames,
               "templates": templates, "precision": TEXT_PRECISION}
    if tokenizer and not tokenizer.startswith(KEYLESS_TOKENIZER):
        payload["tokenizer"] = tokenizer
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class TextEmbeddings:
    embeddings: torch.Tensor  # (C, D) fp32, L2-normalised, on CPU
    key: str
    cache: str  # "hit" | "miss"

    def to_record(self) -> dict:
        return {"key": self.key, "cache": self.cache}


@torch.no_grad()
def compute_text_embeddings(clip, classnames: list[str], templates: list[str], batch_size: int = 256):
    """Zero-shot class embeddings: per class, mean of normalised template embeddings, renormalised
    (the CLIP paper's prompt ensemble, as CLIP_benchmark does it)."""
    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(texts), batch_size):
        tokens = clip.tokenizer(texts[i:i + batch_size]).to(clip.device)
        feats.append(F.normalize(clip.model.encode_text(tokens).float(), dim=-1))
    per_class = torch.cat(feats).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(per_class, dim=-1).cpu()


def _read_entry(path: Path, *, tensor: bool = True) -> tuple[dict, torch.Tensor | None]:
    """(manifest, embeddings) of one entry; raises on a damaged file or one without a manifest."""
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads((f.metadata() or {})[MANIFEST_KEY])
        emb = f.get_tensor("embeddings") if tensor else None
    return manifest, emb


def get_text_embeddings(clip, classnames: list[str], templates: list[str]) -> TextEmbeddings:
    """Class embeddings for ``clip`` from the store, computing and storing them on a miss."""
    key = text_key(clip.fingerprint, classnames, templates, getattr(clip, "tokenizer_name", ""))
    path = text_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            manifest, emb = _read_entry(path)
            if manifest.get("key") == key and emb.shape[0] == len(classnames):
                return TextEmbeddings(emb, key, "hit")
        except Exception:  # a damaged entry, or one of the old two-file layout, is rebuilt, never trusted
            pass
    emb = compute_text_embeddings(clip, classnames, templates)
    manifest = {"key": key, "model": clip.spec.text, "fingerprint": clip.fingerprint,
                "tokenizer": getattr(clip, "tokenizer_name", ""), "n_classes": len(classnames),
                "classnames": classnames, "templates": templates, "precision": TEXT_PRECISION,
                "dim": emb.shape[1], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # One file holds tensor and manifest, moved into place in one step: no reader ever sees one without the other.
    atomic_write(path, lambda tmp: safetensors_torch.save_file({"embeddings": emb.contiguous()}, tmp,
                                             metadata={MANIFEST_KEY: json.dumps(manifest)}))
    (text_dir() / f"{key}.json").unlink(missing_ok=True)  # the manifest of the old layout, now inside the entry
    return TextEmbeddings(emb, key, "miss")


def list_entries() -> list[dict]:
    """Manifests of all stored entries, newest first, each with its size in bytes.

    An entry of the old two-file layout (``<key>.json`` beside a tensor without a manifest) is listed from its
    JSON with ``"legacy": true``; the next run that needs it rebuilds it in the one-file layout.
    """
    out = []
    for st in sorted(text_dir().glob("*.safetensors")):
        try:
            info = _read_entry(st, tensor=False)[0]
        except Exception:
            try:
                info = {**json.loads(st.with_suffix(".json").read_text()), "legacy": True}
            except (OSError, json.JSONDecodeError):
                continue  # damaged, or a tensor whose manifest never landed (old layout): not an entry
        try:
            info["bytes"] = st.stat().st_size
        except OSError:  # removed meanwhile
            continue
        out.append(info)
    return sorted(out, key=lambda d: d.get("created", ""), reverse=True)


def remove_entries(keys: list[str] | None) -> int:
    """Remove entries whose key starts with one of ``keys`` (all entries when ``keys`` is None), with any
    ``<key>.json`` of the old two-file layout."""
    d = text_dir()
    found = {p.stem for p in d.glob("*.safetensors")} | {p.stem for p in d.glob("*.json")}
    n = 0
    for k in sorted(found):
        if keys is None or any(k.startswith(p) for p in keys):
            (d / f"{k}.safetensors").unlink(missing_ok=True)
            (d / f"{k}.json").unlink(missing_ok=True)
            n += 1
    return n
