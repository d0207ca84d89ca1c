"""``clipguard finetune``: robust fine-tuning (LoRA, VPT or full) into an adapter every command loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipguard.cli import options as o
from clipguard.cli.output import emit
from clipguard.finetune.config import FinetuneConfig


@o.command(FinetuneConfig)
def finetune_command(
    cfg: FinetuneConfig,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the JSON record to this file (default: "
                                             "RUN_DIR/record.json).", metavar="FILE",
                                             rich_help_panel=o.OUTPUT)] = None,
    json_out: o.JsonOpt = False,
    strict: o.StrictOpt = False,
) -> None:
    """Robustly fine-tune the image tower (adversarial training, eps in [0,1] pixels) into an adapter RUN_DIR."""
    from clipguard.tasks.finetune import run_finetune

    try:
        record = run_finetune(cfg, progress=not json_out)
    except KeyboardInterrupt:
        if (Path(cfg.run_dir) / "checkpoint.json").exists():
            typer.echo("Interrupted: continue from the last checkpoint with "
                       f"`clipguard finetune --resume {cfg.run_dir}`", err=True)
        raise
    emit(record, out=out or Path(cfg.run_dir) / "record.json", as_json=json_out, table=finetune_table, strict=strict)


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
