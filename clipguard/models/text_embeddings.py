"""The cached text-embedding store shared by every command.

Key = sha256 of (model fingerprint, open_clip version, class names, templates, precision). Each entry is
``<cache>/text/<key>.safetensors`` plus ``<key>.json`` (a manifest), both written atomically, so two
processes building the same key both succeed and leave one valid entry. Cache root: ``$CLIPGUARD_CACHE``,
else ``~/.cache/clipguard``. A second run of any command does zero text-tower passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipguard.fsutil import atomic_write, atomic_write_json

TEXT_PRECISION = "fp32"  # class embeddings are computed once, so always at full precision


def cache_root() -> Path:
    return Path(os.environ.get("CLIPGUARD_CACHE") or Path.home() / ".cache" / "clipguard")


def text_dir() -> Path:
    return cache_root() / "text"


def text_key(fingerprint: str, classnames: list[str], templates: list[str]) -> str:
    import open_clip

    payload = json.dumps({"model": fingerprint, "open_clip": open_clip.__version__, "classnames": classnames,
                          "templates": templates, "precision": TEXT_PRECISION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


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


def get_text_embeddings(clip, classnames: list[str], templates: list[str]) -> TextEmbeddings:
    """Class embeddings for ``clip`` from the store, computing and storing them on a miss."""
    from safetensors.torch import load_file, save_file

    key = text_key(clip.fingerprint, classnames, templates)
    path = text_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            return TextEmbeddings(load_file(str(path))["embeddings"], key, "hit")
        except Exception:  # a damaged entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    emb = compute_text_embeddings(clip, classnames, templates)
    atomic_write(path, lambda tmp: save_file({"embeddings": emb.contiguous()}, tmp))
    atomic_write_json(text_dir() / f"{key}.json", {
        "key": key, "model": clip.spec.text, "fingerprint": clip.fingerprint, "n_classes": len(classnames),
        "classnames": classnames, "templates": templates, "precision": TEXT_PRECISION,
        "dim": emb.shape[1], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return TextEmbeddings(emb, key, "miss")


def list_entries() -> list[dict]:
    """Manifests of all stored entries, newest first, each with its size in bytes."""
    out = []
    for m in sorted(text_dir().glob("*.json")):
        try:
            info = json.loads(m.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        st = m.with_suffix(".safetensors")
        info["bytes"] = st.stat().st_size if st.exists() else 0
        out.append(info)
    return sorted(out, key=lambda d: d.get("created", ""), reverse=True)


def remove_entries(keys: list[str] | None) -> int:
    """Remove entries whose key starts with one of ``keys`` (all entries when ``keys`` is None)."""
    n = 0
    for m in text_dir().glob("*.json"):
        k = m.stem
        if keys is None or any(k.startswith(p) for p in keys):
            m.unlink(missing_ok=True)
            m.with_suffix(".safetensors").unlink(missing_ok=True)
            n += 1
    return n
