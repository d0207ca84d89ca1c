"""``clipguard finetune``: robust fine-tuning (LoRA, VPT or full) into an adapter every command loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipguard.cli import options as o
from clipguard.cli.output import check_outputs, deprecated, emit
from clipguard.run_options import RunOptions

EVAL = "Final evaluation"


@o.run_options(split="train", batch_size=128, exclude=("adapter",),
               help={"split": "Training split.",
                     "batch_size": "Images per optimizer step, per process under torchrun (a step: this x processes).",
                     "seed": "Seeds init, data order, attacks, --limit and the final evaluation."})
def finetune_command(
    run: RunOptions,
    run_dir: Annotated[str | None, typer.Option(help="Run directory: adapter + manifest, checkpoint, record.json "
                                                "(default: the --resume directory).", rich_help_panel=o.OUTPUT)] = None,
    method: Annotated[str, typer.Option(help="What trains: lora, vpt or full.", rich_help_panel=o.TRAIN)] = "lora",
    objective: Annotated[str, typer.Option(help="tecoa (CE over scaled cosine to class text), ce (plain cosine "
                                           "logits), fare (unsupervised, to the frozen encoder) or noise (tecoa "
                                           "under Gaussian noise of std --sigma, for `certify`).",
                                           rich_help_panel=o.TRAIN)] = "tecoa",
    sigma: Annotated[float | None, typer.Option(help="--objective noise: the noise std in [0, 1] pixel units (Cohen et "
                                                "al.: 0.12, 0.25, 0.5, 1.0; certify with the same --sigma; add --eps "
                                                "0 for their recipe, no adversary).", rich_help_panel=o.TRAIN)] = None,
    train_attack: Annotated[str, typer.Option(help="pgd (against the model being trained) or transfer "
                                              "(from --surrogate).", rich_help_panel=o.ATTACK)] = "pgd",
    surrogate: o.SurrogateOpt = None,
    eps: Annotated[str, typer.Option(help="L-inf radius of training and final robust evaluation, [0, 1] pixel "
                                     "units (1/255 or 0.0039).", rich_help_panel=o.ATTACK)] = "1/255",
    alpha: Annotated[str | None, typer.Option(help="Training PGD step in [0, 1] pixel units (default: eps).",
                                              rich_help_panel=o.ATTACK)] = None,
    steps: Annotated[int, typer.Option(help="Training PGD iterations per batch.", rich_help_panel=o.ATTACK)] = 2,
    epochs: Annotated[int, typer.Option(help="Passes over the training split.", rich_help_panel=o.TRAIN)] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps in all, instead of --epochs (FARE: 20000 "
                                                  "of 128 images).", rich_help_panel=o.TRAIN)] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW peak learning rate (default per method: lora 5e-4, "
                                             "vpt 1e-3, full 1e-5).", rich_help_panel=o.TRAIN)] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel=o.TRAIN)] = 0.0,
    warmup: Annotated[float, typer.Option(help="Share of steps with linear warm-up before cosine decay.",
                                          rich_help_panel=o.TRAIN)] = 0.05,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm (0 = off).", rich_help_panel=o.TRAIN)] = 1.0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel=o.TRAIN)] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / r).", rich_help_panel=o.TRAIN)] = 32,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout (MLP targets only: on the attention modules "
                                                "peft merges LoRA each forward, so dropout never applies).",
                                                rich_help_panel=o.TRAIN)] = 0.0,
    lora_targets: Annotated[str | None, typer.Option(help="Comma list of module names/suffixes for LoRA "
                                                     "(default: the visual attention modules).",
                                                     rich_help_panel=o.TRAIN)] = None,
    vpt_tokens: Annotated[int, typer.Option(help="VPT prompt tokens.", rich_help_panel=o.TRAIN)] = 10,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N optimizer steps (0 = only at the end).",
                                            rich_help_panel=o.OUTPUT)] = 50,
    resume: Annotated[str | None, typer.Option(help="Continue the run in this directory (same options).",
                                               rich_help_panel=o.OUTPUT)] = None,
    eval_split: Annotated[str, typer.Option(help="Held-out split of the final evaluation.",
                                            rich_help_panel=EVAL)] = "test",
    eval_limit: Annotated[int | None, typer.Option(help="Images of the held-out split (default all).",
                                                   rich_help_panel=EVAL)] = None,
    eval_steps: Annotated[int, typer.Option(help="PGD iterations of the final robust evaluation.",
                                            rich_help_panel=EVAL)] = 10,
    eval_batch_size: Annotated[int, typer.Option(help="Images per evaluation batch.", rich_help_panel=EVAL)] = 256,
    eval_base: Annotated[bool, typer.Option(help="Also evaluate the base model for comparison.",
                                            rich_help_panel=EVAL)] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the JSON record to this file (default: "
                                             "RUN_DIR/record.json).", rich_help_panel=o.OUTPUT)] = None,
    json_out: o.JsonOpt = False,
) -> None:
    """Robustly fine-tune the image tower (adversarial training, eps in [0,1] pixels) into an adapter RUN_DIR."""
    from clipguard.errors import ClipguardError
    from clipguard.finetune.config import FinetuneConfig, validate
    from clipguard.tasks.finetune import run_finetune

    if run_dir is None and out is not None and out.suffix != ".json":  # the pre-0.2 meaning of --out
        run_dir, out = deprecated("--out DIR", "--run-dir DIR (--out names the JSON record)", str(out)), None
    run_dir = run_dir or resume
    if not run_dir:
        raise ClipguardError("finetune needs --run-dir DIR (or --resume DIR)")
    targets = [t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None
    cfg = FinetuneConfig(run=run, method=method, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_targets=targets, vpt_tokens=vpt_tokens, objective=objective, sigma=sigma,
                         train_attack=train_attack, surrogate=surrogate, eps=eps, alpha=alpha, steps=steps,
                         epochs=epochs, max_steps=max_steps, lr=lr,
                         weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, run_dir=run_dir,
                         save_every=save_every, resume=resume, eval_split=eval_split, eval_limit=eval_limit,
                         eval_steps=eval_steps, eval_batch_size=eval_batch_size, eval_base=eval_base)
    validate(cfg)  # every option checked before torch or a model loads
    check_outputs({"--out": out}, {"--run-dir": run_dir})
    record = run_finetune(cfg, progress=not json_out)
    emit(record, out=out or Path(run_dir) / "record.json", as_json=json_out, table=finetune_table)


def finetune_table(rec: dict):
    from rich.table import Table

    f, m, tr = rec["finetune"], rec["metrics"], rec["finetune"]["train"]
    t = Table(title=f"{f['method']} + {f['objective']} ({f['train_attack']} eps={f['eps']}) on {rec['model_spec']} "
                    f"-> {f['adapter']}")
    for col in ("", "clean acc1", f"robust acc (PGD-{rec['attack']['steps']}, {f['eps']})", "train img/s", "train s"):
        t.add_column(col, justify="right")
    if "base_metrics" in rec:
        b = rec["base_metrics"]
        t.add_row("base", f"{b['acc1']:.4f}", f"{b['robust_acc']:.4f}", "", "")
    t.add_row(f["method"], f"{m['acc1']:.4f}", f"{m['robust_acc']:.4f}", f"{tr['images_per_s'] or 0:,.1f}",
              f"{tr['wall_s']:.1f}")
    return t
