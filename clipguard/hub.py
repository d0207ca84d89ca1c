"""Is the Hugging Face Hub reachable? Asked once per process, in at most a few seconds, before a hub download.

Without a network, ``huggingface_hub`` and ``datasets`` retry for half a minute and print each retry. When the hub
cannot be reached, :func:`ensure_reachable_or_offline` switches this process to their offline mode instead, so a
dataset or a model already in the local cache still loads, and a missing one fails at once with clipguard's line.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

import huggingface_hub.constants as hub_constants

TRUE = ("1", "ON", "YES", "TRUE")
PROBE_TIMEOUT_S = 3.0


def offline_requested() -> bool:
    return any(os.environ.get(v, "").upper() in TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@lru_cache(maxsize=1)
def ensure_reachable_or_offline() -> bool:
    """True when the hub answers; otherwise offline mode is switched on for this process and False is returned."""
    if offline_requested():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        go_offline()
        return False


def go_offline() -> None:
    """Offline mode for huggingface_hub and datasets in this process (their flags are read when a call is made)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # for what is imported later
    hub_constants.HF_HUB_OFFLINE = True
    try:
        # lazy: datasets costs ~0.7 s to import, and a model download alone does not need it
        import datasets.config as datasets_config
    except ImportError:
        return
    datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
