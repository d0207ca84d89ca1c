"""``clipguard finetune`` as a library function: config in, record out.

Checks every option and any ``--resume`` before a model loads, trains (:func:`clipguard.finetune.loop.train`),
then evaluates the saved adapter exactly as ``clipguard eval --adapter DIR --attack pgd`` would (the same
library call), so the record's numbers are reproducible from the adapter alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from clipguard.config import flat
from clipguard.errors import ClipguardError
from clipguard.finetune.checkpoint import SUMMARY, check_resume
from clipguard.finetune.config import FinetuneConfig, config_hash


def run_finetune(cfg: FinetuneConfig, *, progress: bool = True) -> dict:
    """Robustly fine-tune ``cfg.run.model`` on ``cfg.run.dataset``; returns a ``clipguard.result/1`` record.

    Writes to ``cfg.run_dir``: the adapter + manifest (``clipguard eval --adapter`` loads it) and
    ``checkpoint.pt`` / ``checkpoint.json`` (``--resume`` continues from them bit-for-bit).

    Raises:
        ClipguardError: a bad option (checked before anything loads), a resume with a changed config,
            or a non-finite loss (the last good checkpoint is kept).

    Example:
        >>> rec = run_finetune(finetune_config(method="lora", eps="4/255", lr=1e-2, epochs=3, run_dir="runs/lora"))
        >>> rec["metrics"]["robust_acc"]
    """
    from clipguard.finetune.loop import train
    from clipguard.tasks.setup import prepare

    if cfg.resume:
        check_resume(cfg.resume, cfg)  # refuse a changed config before loading anything
    elif (Path(cfg.run_dir) / SUMMARY).exists():  # never overwrite a run by accident
        raise ClipguardError(f"--run-dir {cfg.run_dir!r} already holds a run: continue it with --resume "
                             f"{cfg.run_dir} or choose another --run-dir")
    # PGD perturbs at the model's input size (TeCoA/FARE); a transfer surrogate sees the dataset's own images.
    resolution = "native" if cfg.train_attack == "transfer" else "model"
    # --compile compiles the tower that trains (finetune.loop.compile_trainable), not the frozen base prepare loads
    summary = train(cfg, prepare(replace(cfg.run, compile=False, compile_mode="default"), resolution=resolution),
                    progress=progress)
    return final_record(cfg, summary, progress)


def final_record(cfg: FinetuneConfig, train: dict, progress: bool) -> dict:
    """Clean + PGD evaluation of the saved adapter on the held-out split (optionally of the base too)."""
    from clipguard.tasks.eval import EvalConfig, run_eval

    run = replace(cfg.run, split=cfg.eval_split, limit=cfg.eval_limit, batch_size=cfg.eval_batch_size,
                  adapter=str(cfg.run_dir))
    ecfg = EvalConfig(run=run, attack="pgd", eps=cfg.eps, steps=cfg.eval_steps)
    rec = run_eval(ecfg, progress=progress)
    if cfg.eval_base:
        base = run_eval(replace(ecfg, run=replace(run, adapter=None)), progress=progress)["metrics"]
        rec["base_metrics"] = {k: base[k] for k in ("acc1", "acc5", "mean_per_class_recall", "robust_acc")}
    rec["task"] = "finetune"
    rec["finetune"] = {"method": cfg.method, "objective": cfg.objective, "sigma": cfg.sigma,
                       "train_attack": cfg.train_attack,
                       "surrogate": cfg.surrogate, "eps": cfg.eps.text, "alpha": (cfg.alpha or cfg.eps).text,
                       "steps": cfg.steps,
                       "config_hash": config_hash(cfg),
                       "config": {k: v for k, v in flat(cfg).items() if k != "resume"},
                       "adapter": str(cfg.run_dir), "train": train}
    return rec
