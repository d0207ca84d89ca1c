"""Result records (``clipguard.result/1``): one JSON per run, with full provenance, written atomically.

Clean zero-shot fields match CLIP_benchmark's (``dataset, model, pretrained, task, metrics{acc1, acc5,
mean_per_class_recall}``) so its tools read our records.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

from clipguard.distributed import describe
from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write_json, save_fallback, take_held_failures
from clipguard.records.intervals import INTERVAL_METHOD, confidence
from clipguard.version import __version__

SCHEMA = "clipguard.result/1"


def environment(device=None, precision: str | None = None) -> dict:
    """Versions, device and precision of this run."""
    # Lazy: `clipguard report` and `gate` import this module (through records.rows) and load no model; torch and
    # open_clip would add ~4 s to them.
    import open_clip
    import torch

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
           "clipguard": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
           "cpu_threads": torch.get_num_threads(), "precision": precision}
    for mod in ("torchattacks", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # optional at record time; missing is recorded as None
            env[mod] = None
    if device is not None:
        env["device"] = str(device)
        env["device_name"] = (torch.cuda.get_device_name(device) if str(device).startswith("cuda")
                              else _cpu_name())
    env["cpu_count"] = os.cpu_count()
    env["distributed"] = describe()  # world_size: how many processes (torchrun ranks) made this record
    return env


def _cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_record(task: str, *, clip, dataset, prompts, metrics: dict, timings: dict, started: float | None = None,
                **extra) -> dict:
    """Assemble a record. ``clip`` is a LoadedClip, ``dataset`` an ImageSet, ``prompts`` a PromptSet; ``started``
    (``time.perf_counter()`` when the task began) gives ``timings.total_s``, the whole run beside its parts."""
    if started is not None:
        timings = {**timings, "total_s": round(time.perf_counter() - started, 3)}
    rec = {
        "schema": SCHEMA,
        "task": task,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": dataset.name,
        "model": clip.info["arch"],
        "pretrained": clip.info["pretrained"],
        "model_spec": clip.spec.text,
        "weights_digest": clip.fingerprint,
        "tokenizer": getattr(clip, "tokenizer_name", "") or None,  # hf:timm/ViT-B-16-SigLIP@64: its context length too
        "logit_bias": _logit_bias(clip.model),  # added to every logit (SigLIP); None: the model has none (CLIP)
        "data": dataset.to_record(),
        "prompts": prompts.to_record(),
        "metrics": metrics,
        "timings": timings,
    }
    rec.update(extra)
    rec.setdefault("intervals", {"method": INTERVAL_METHOD, "confidence": confidence()})  # the level of every _ci
    rec["environment"] = environment(clip.device, clip.precision)
    return rec


def _logit_bias(model) -> float | None:
    """The model's logit bias as the classifier adds it (``models.classifier.model_logit_bias``; records sit below
    models, so the attribute is read here too)."""
    bias = getattr(model, "logit_bias", None)
    return None if bias is None else float(bias)


def write_record(path: str | Path, record: dict) -> Path:
    """Write ``record`` to ``path`` atomically.

    Raises:
        ClipguardError: a product of this run could not be written (held by ``fsutil.writing_output``): the record
            then goes to a fallback file, not to ``path``, so a suite does not count the run as done.
    """
    held = take_held_failures()  # cli.output.emit takes them first: this is the library's (a bench cell's) path
    if held:
        saved = save_fallback(json.dumps({**record, "output_errors": held}, indent=2) + "\n", "record")
        where = f"the record was saved to {str(saved)!r}" if saved else "the record could not be saved anywhere"
        raise ClipguardError("; ".join(held) + f"; {where}, not to {str(path)!r}")
    return atomic_write_json(path, record)
