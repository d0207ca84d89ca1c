"""``clipguard attack``: craft adversarial examples for a split and save them as a reusable set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipguard.cli import options as o
from clipguard.cli.output import artefact_path, check_outputs, emit
from clipguard.run_options import RunOptions


@o.run_options(batch_size=128)
@o.attack_options(attack="pgd", help={"eps": "Radius in [0, 1] pixel units (8/255 or 0.0314); one value."})
def attack_command(
    run: RunOptions,
    attack_opts: dict,
    adv_set: Annotated[str | None, typer.Option(help="Adversarial set to write (.safetensors), for `eval "
                                                "--adv-set`.", rich_help_panel=o.OUTPUT)] = None,
    quantize: Annotated[bool, typer.Option(help="Store uint8 pixels (k/255), clipped to stay within eps.",
                                           rich_help_panel=o.OUTPUT)] = False,
    png: o.PngOpt = None,
    out: o.OutOpt = None,
    record: o.RecordOpt = None,
    json_out: o.JsonOpt = False,
) -> None:
    """Craft adversarial examples (eps in [0, 1] pixel units) and save them for `eval --adv-set`."""
    from clipguard.errors import ClipguardError
    from clipguard.tasks.attack import run_craft
    from clipguard.tasks.eval import EvalConfig, attack_config

    adv_set, out = artefact_path(adv_set, out, record, option="--adv-set")
    if "," in attack_opts["eps"]:
        raise ClipguardError(f"--eps {attack_opts['eps']!r}: attack crafts one set, give one eps (sweeps are for "
                             "`eval`)")
    cfg = EvalConfig(run=run.check(), **attack_opts)
    attack_config(cfg)
    check_outputs({"--adv-set": adv_set, "--out": out}, {"--png": png})
    rec = run_craft(cfg, adv_set, quantize=quantize, png_dir=png, progress=not json_out)
    emit(rec, out=Path(out) if out else None, as_json=json_out, table=attack_table)


def attack_table(rec: dict):
    from rich.table import Table

    a, m = rec["attack"], rec["metrics"]
    t = Table(title=f"{a['name']} eps={a['eps']['text']} on {rec['model_spec']}"
                    + (f" (crafted on {a['surrogate']})" if a.get("surrogate") else "")
                    + f" -> {rec['adv_set']['path']}")
    for col in ("n", "clean acc", "robust acc", "attack success", "img/s"):
        t.add_column(col, justify="right")
    t.add_row(str(rec["data"]["n"]), f"{m['acc1']:.4f}", f"{m['robust_acc']:.4f}", f"{m['attack_success_rate']:.4f}",
              f"{rec['timings']['images_per_s']:,.1f}")
    return t
