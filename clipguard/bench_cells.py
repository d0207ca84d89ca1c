"""Bench cell kinds that chain library calls: a UAP cell (fit, then evaluate on the held-out split) and a
fine-tune cell (train an adapter into OUT/adapters/<cell>, whose record holds the final clean + robust numbers)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from clipguard.errors import ClipguardError

UAP_EVAL_PREFIX = "eval_"  # cell keys eval_split / eval_limit / eval_batch_size go to `uap eval`


def _split(opts: dict, cls, prefix: str = "") -> dict:
    names = {f.name for f in fields(cls)}
    return {k[len(prefix):]: v for k, v in opts.items() if k.startswith(prefix) and k[len(prefix):] in names}


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
    fit_cfg = UAPFitConfig(**{**_split(opts, UAPFitConfig), "out": str(path), "split": opts.get("split", "train")})
    fit = run_uap_fit(fit_cfg, progress=progress)
    shared = {k: v for k, v in opts.items() if k in ("model", "dataset", "seed", "prompts", "templates", "device",
                                                     "adapter")}
    ev = run_uap_eval(UAPEvalConfig(**{**shared, "split": "test", **_split(opts, UAPEvalConfig, UAP_EVAL_PREFIX),
                                       "uap": str(path), "png": str(png)}), progress=progress)
    ev["uap_fit"] = {"metrics": fit["metrics"], "timings": fit["timings"]}
    return ev


def finetune_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.finetune.config import FinetuneConfig
    from clipguard.finetune.loop import run_finetune

    cid = opts["_cell"]
    names = {f.name for f in fields(FinetuneConfig)}
    clean = {k: v for k, v in opts.items() if not k.startswith("_")}
    unknown = sorted(set(clean) - names)
    if unknown:
        raise ClipguardError(f"suite cell {cid!r}: option(s) {', '.join(unknown)} unknown for a finetune cell")
    import json
    import time

    from clipguard.finetune.config import config_hash

    out = out_dir / "adapters" / cid
    cfg = FinetuneConfig(**{**clean, "out": str(out)})
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
