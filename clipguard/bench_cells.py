"""Bench cell kinds: an eval cell (one `clipguard eval`), a UAP cell (fit, then evaluate on the held-out split) and a
fine-tune cell (train an adapter into OUT/adapters/<cell>, whose record holds the final clean + robust numbers)."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

from clipguard.errors import ClipguardError

UAP_EVAL_PREFIX = "eval_"  # cell keys eval_split / eval_limit / eval_batch_size go to `uap eval`
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
          "list[str]": (list,)}


def typed(cls, opts: dict, cell: str):
    """``cls(**opts)`` after checking every option is a field of ``cls`` with a value of its declared type, so
    a slip in a suite file is a one-line error naming the cell, not a traceback deep inside a run."""
    kinds = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(opts) - set(kinds))
    if unknown:
        raise ClipguardError(f"suite cell {cell!r}: option(s) {', '.join(unknown)} unknown here")
    for key, value in opts.items():
        allowed = tuple(t for part in str(kinds[key]).split("|") for t in _TYPES.get(part.strip(), (object,)))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ClipguardError(f"suite cell {cell!r}: {key} = {value!r} should be {kinds[key]}")
    return cls(**opts)


def _split(opts: dict, cls, prefix: str = "") -> dict:
    names = {f.name for f in fields(cls)}
    return {k[len(prefix):]: v for k, v in opts.items() if k.startswith(prefix) and k[len(prefix):] in names}


def eval_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.eval_run import EvalConfig, run_eval

    cfg = typed(EvalConfig, {k: v for k, v in opts.items() if not k.startswith("_")}, opts["_cell"])
    return run_eval(cfg, progress=progress)


def uap_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.uap_run import UAPEvalConfig, UAPFitConfig, run_uap_eval, run_uap_fit

    cid = opts["_cell"]
    fit_keys = {f.name for f in fields(UAPFitConfig)}
    eval_keys = {UAP_EVAL_PREFIX + f.name for f in fields(UAPEvalConfig)}
    unknown = sorted(k for k in opts if not k.startswith("_") and k not in fit_keys and k not in eval_keys)
    if unknown:
        raise ClipguardError(f"suite cell {cid!r}: option(s) {', '.join(unknown)} unknown for a uap cell")
    path = out_dir / "uaps" / f"{cid}.safetensors"
    png = out_dir / "uap_png" / cid
    fit_cfg = typed(UAPFitConfig, {**_split(opts, UAPFitConfig), "out": str(path),
                                   "split": opts.get("split", "train")}, cid)
    fit = run_uap_fit(fit_cfg, progress=progress)
    shared = {k: v for k, v in opts.items() if k in ("model", "dataset", "seed", "prompts", "templates", "device",
                                                     "adapter")}
    ev_cfg = typed(UAPEvalConfig, {**shared, "split": "test", **_split(opts, UAPEvalConfig, UAP_EVAL_PREFIX),
                                   "uap": str(path), "png": str(png)}, cid)
    ev = run_uap_eval(ev_cfg, progress=progress)
    ev["uap_fit"] = {"metrics": fit["metrics"], "timings": fit["timings"]}
    return ev


def finetune_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.finetune.config import FinetuneConfig
    from clipguard.finetune.loop import run_finetune

    cid = opts["_cell"]
    clean = {k: v for k, v in opts.items() if not k.startswith("_")}
    from clipguard.finetune.config import config_hash

    out = out_dir / "adapters" / cid
    cfg = typed(FinetuneConfig, {**clean, "out": str(out)}, cid)
    summary = out / "checkpoint.json"
    if summary.exists():
        try:
            same = json.loads(summary.read_text()).get("config_hash") == config_hash(cfg)
        except (OSError, json.JSONDecodeError):
            same = False
        if same:  # an interrupted cell continues where its last checkpoint left it
            cfg.resume = str(out)
        else:  # the cell's options changed: keep the old run beside, never delete work
            out.rename(out.with_name(f"{cid}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    return run_finetune(cfg, progress=progress)
