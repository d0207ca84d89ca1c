"""Each model's own tokenizer, found before its weights load, and named.

``open_clip.get_tokenizer(name)`` picks what open_clip itself uses for a model: its config's ``hf_tokenizer_name``
(SigLIP, SigLIP2 and others: a Hugging Face tokenizer through transformers, read from the hub cache) with its
``tokenizer_kwargs``, and its ``context_length`` (64 for SigLIP, 77 for OpenAI CLIP, 16 for the toy); otherwise
open_clip's BPE ``SimpleTokenizer``, whose vocabulary ships in the wheel. :func:`tokenizer_name` names the result
for records and the text-embedding key: ``open_clip:SimpleTokenizer@77``, ``hf:timm/ViT-B-16-SigLIP@64 sha256=...``
(the digest of the loaded tokenizer's content).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants as hub_constants
import open_clip
from open_clip.tokenizer import HFTokenizer

from clipguard.errors import ClipguardError
from clipguard.hub import ensure_reachable_or_offline

# What `hf download` needs to fetch for a tokenizer: tokenizer.json, tokenizer_config.json, special_tokens_map.json
# (*.json), a sentencepiece model (spiece.model, tokenizer.model) or BPE vocabulary and merges (*.txt); no weights.
HF_TOKENIZER_FILES = ("*.json", "*.model", "*.txt")


def hf_tokenizer_id(source: str) -> str | None:
    """The Hugging Face tokenizer a registered open_clip config names (``text_cfg.hf_tokenizer_name``): a hub repo
    id or a local folder; None when it names none (or its config cannot be read: an uncached ``hf-hub:...``)."""
    try:
        cfg = open_clip.get_model_config(source) or {}  # hf-hub: its open_clip_config.json, from the hub cache
    except Exception:  # an hf-hub config open_clip cannot fetch (FileNotFoundError, hub errors): get_tokenizer says
        cfg = {}
    return cfg.get("text_cfg", {}).get("hf_tokenizer_name") or None


def tokenizer_name(tokenizer) -> str:
    """``hf:<repo or folder>@<context length> sha256=<16 hex>`` for a Hugging Face tokenizer, else
    ``open_clip:<class>@<context length>``.

    A Hugging Face tokenizer is read by name from the hub cache (or a folder), and its files can change under that
    name (a new hub revision, a folder saved again): the digest of what was loaded keeps cached text embeddings of
    the old tokenizer from being served for the new one."""
    ctx = getattr(tokenizer, "context_length", None)
    if isinstance(tokenizer, HFTokenizer):
        return f"hf:{tokenizer.tokenizer.name_or_path}@{ctx} sha256={hf_tokenizer_digest(tokenizer.tokenizer)[:16]}"
    return f"open_clip:{type(tokenizer).__name__}@{ctx}"


def hf_tokenizer_digest(tok) -> str:
    """sha256 of a loaded transformers tokenizer's content: its whole serialised pipeline where it has one (a fast
    tokenizer: vocabulary, merges, normaliser, pre-tokeniser, post-processor), else its vocabulary; with its class,
    special tokens and truncation/padding sides either way."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    extra = json.dumps([type(tok).__name__, sorted(map(str, tok.all_special_tokens)),
                        getattr(tok, "padding_side", None), getattr(tok, "truncation_side", None)])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def hf_cache_dir(repo: str) -> Path:
    """Where the hub cache keeps ``repo`` (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), as huggingface_hub lays it out."""
    return Path(hub_constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def tokenizer_error(model_text: str, source: str, e: Exception) -> ClipguardError:
    """One line: which tokenizer could not be loaded, and which files to place where."""
    why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if os.path.isdir(source):
        return ClipguardError(f"--model {model_text!r}: the tokenizer folder {source!r} cannot be read ({why}); it "
                              "needs a Hugging Face tokenizer there (tokenizer_config.json and its vocabulary files)")
    fetch = f"`hf download {source} " + " ".join(f"--include '{p}'" for p in HF_TOKENIZER_FILES) + "`"
    where = (f"its files belong in {str(hf_cache_dir(source))!r} (the hub cache: $HF_HUB_CACHE, else $HF_HOME/hub): "
             f"run {fetch} on a machine with network and copy that folder here, or point HF_HOME at a cache with it")
    if hub_constants.HF_HUB_OFFLINE:
        return ClipguardError(f"--model {model_text!r} needs the tokenizer {source!r} from the Hugging Face hub, "
                              f"which is offline, and it is not in the cache; {where}")
    return ClipguardError(f"--model {model_text!r}: cannot get its tokenizer {source!r} from the Hugging Face hub "
                          f"({why}); {where}")


def load_tokenizer(source: str, model_text: str) -> tuple[Callable, str]:
    """The model's own tokenizer and its :func:`tokenizer_name`.

    Args:
        source: the name open_clip resolves the tokenizer from: a registered architecture (``ViT-B-16-SigLIP``,
            ``clipguard-toy``) or ``hf-hub:ORG/NAME`` (whose ``open_clip_config.json`` must be in the cache).
        model_text: the model spec as typed, for the error.

    Raises:
        ClipguardError: the tokenizer cannot be loaded (offline and not cached: which files to place where;
            transformers missing).
    """
    hf_id = hf_tokenizer_id(source)
    if hf_id and not os.path.isdir(hf_id):
        ensure_reachable_or_offline()  # unreachable hub: offline mode, so a missing file fails at once, no retries
    try:
        tokenizer = open_clip.get_tokenizer(source)
    except ImportError as e:
        raise ClipguardError(f"--model {model_text!r}: its tokenizer {hf_id or source!r} needs the transformers "
                             f"package ({e}); pip install transformers") from None
    except Exception as e:  # transformers and huggingface_hub raise OSError, ValueError, HTTP errors ...
        raise tokenizer_error(model_text, hf_id or source.removeprefix("hf-hub:"), e) from None
    return tokenizer, tokenizer_name(tokenizer)
