"""``clipguard finetune`` as a library function: config in, record out.

Checks every option and any ``--resume`` before a model loads, trains (:func:`clipguard.finetune.loop.train`),
then evaluates the saved adapter exactly as ``clipguard eval --adapter DIR --attack pgd`` would (the same
library call), so the record's numbers are reproducible from the adapter alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from clipguard.config import flat
from clipguard.data.registry import load_dataset
from clipguard.data.stream import chunks
from clipguard.errors import ClipguardError
from clipguard.finetune.checkpoint import SUMMARY, check_resume
from clipguard.finetune.config import FinetuneConfig, config_hash
from clipguard.finetune.loop import train
from clipguard.records.metrics import at_run_confidence
from clipguard.records.predictions import image_digests
from clipguard.tasks.eval import EvalConfig, run_eval
from clipguard.tasks.setup import prepare


@at_run_confidence  # every _ci of the final evaluation at --confidence
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
    if cfg.resume:
        check_resume(cfg.resume, cfg)  # refuse a changed config before loading anything
    elif (Path(cfg.run_dir) / SUMMARY).exists():  # never overwrite a run by accident
        raise ClipguardError(f"--run-dir {cfg.run_dir!r} already holds a run: continue it with --resume "
                             f"{cfg.run_dir} or choose another --run-dir")
    # PGD perturbs at the model's input size (TeCoA/FARE); a transfer surrogate sees the dataset's own images.
    resolution = "native" if cfg.train_attack == "transfer" else "model"
    # --compile compiles the tower that trains (finetune.loop.compile_trainable), not the frozen base prepare loads
    p = prepare(replace(cfg.run, compile=False, compile_mode="default"), resolution=resolution,
                prompt_base=cfg.method == "prompt")
    check_held_out(cfg, p)
    summary = train(cfg, p, progress=progress)
    return final_record(cfg, summary, progress)


def check_held_out(cfg: FinetuneConfig, p) -> None:
    """Refuse, before training, a final evaluation on images the run trains on. Two different splits of a source
    are different images; the same split (a folder without split folders is one split, ``all``, for any --split)
    is compared by image digest, so two --limit selections of it are caught too."""
    run = cfg.run
    try:  # listed, not decoded (stream): only a same-split evaluation set is read, to hash it
        held = load_dataset(run.dataset, split=cfg.eval_split, limit=cfg.eval_limit, seed=run.seed,
                            image_column=run.image_column, label_column=run.label_column,
                            size=tuple(p.data.images.shape[-2:]), mode="stream", workers=run.workers,
                            streaming=run.streaming, preprocess=run.preprocess, geometry=p.clip.geometry)  # same pixels
    except ClipguardError as e:
        raise ClipguardError(f"--eval-split {cfg.eval_split!r}: {e}") from None
    if held.split != p.data.split:
        return
    trained = {d for _, x in chunks(p.data.images, 1024) for d in image_digests(x)}
    shared = sum(d in trained for _, x in chunks(held.images, 1024) for d in image_digests(x))
    if shared:
        raise ClipguardError(f"--eval-split {cfg.eval_split!r} shares {shared} of its {len(held)} images with the "
                             f"training images ({p.data.spec} {p.data.split}): the final evaluation would not be held "
                             "out; choose another --eval-split (or a dataset with separate split folders)")


def final_record(cfg: FinetuneConfig, train: dict, progress: bool) -> dict:
    """Clean + PGD evaluation of the saved adapter on the held-out split (optionally of the base too)."""
    run = replace(cfg.run, split=cfg.eval_split, limit=cfg.eval_limit, batch_size=cfg.eval_batch_size,
                  adapter=str(cfg.run_dir))
    ecfg = EvalConfig(run=run, attack="pgd", eps=cfg.eps, steps=cfg.eval_steps)
    rec = run_eval(ecfg, progress=progress)
    if cfg.eval_base:
        # the base: the bare model, or for a prompt on --base-adapter's tower that tower itself (as its --adapter)
        base_run = replace(run, adapter=run.base_adapter, base_adapter=None)
        base = run_eval(replace(ecfg, run=base_run), progress=progress)["metrics"]
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
