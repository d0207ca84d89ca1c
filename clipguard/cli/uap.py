"""``clipguard uap fit|eval``: universal adversarial perturbations (one delta that fools most images)."""

from __future__ import annotations

from typing import Annotated

import typer

from clipguard.cli import options as o
from clipguard.cli.output import artefact_path, check_outputs, checks_line, emit
from clipguard.run_options import RunOptions

app = typer.Typer(help="Universal adversarial perturbations: fit one image-agnostic delta on a split, then "
                       "measure its fooling rate on any model. eps in [0, 1] pixel units, 8/255 accepted.",
                  no_args_is_help=True)

PngOpt = Annotated[str | None, typer.Option(help="Write the perturbation (scaled to be visible) and a grid of "
                                            "clean vs perturbed images with their predictions to this folder.",
                                            rich_help_panel=o.OUTPUT)]


@app.command("fit")
@o.run_options(split="train", batch_size=128, exclude=("precision",), help={"split": "Dataset split to fit on."})
def fit(
    run: RunOptions,
    uap: Annotated[str | None, typer.Option(help="UAP file to write (.safetensors), for `uap eval --uap`.",
                                            rich_help_panel=o.OUTPUT)] = None,
    eps: Annotated[str, typer.Option(help="Radius of the UAP in [0, 1] pixel units, 8/255 accepted (max |v| "
                                     "for linf, ||v||_2 for l2).", rich_help_panel=o.ATTACK)] = "10/255",
    norm: Annotated[str, typer.Option(help="Threat model: linf or l2.", rich_help_panel=o.ATTACK)] = "linf",
    method: Annotated[str, typer.Option(help="sgd (projected sign-gradient ascent over mini-batches, fast) or "
                                        "deepfool (Moosavi-Dezfooli et al. 2017).", rich_help_panel=o.ATTACK)] = "sgd",
    target_fooling: Annotated[float, typer.Option(help="Stop once the fitting-set fooling rate reaches this "
                                                  "share.", rich_help_panel=o.ATTACK)] = 0.8,
    epochs: Annotated[int, typer.Option(help="At most this many passes over the fitting set.",
                                        rich_help_panel=o.ATTACK)] = 10,
    step: Annotated[str | None, typer.Option(help="sgd step per batch in [0, 1] pixel units (default eps/10).",
                                             rich_help_panel=o.ATTACK)] = None,
    target_class: Annotated[str | None, typer.Option(help="Targeted UAP: success = the prediction becomes this "
                                                     "class name.", rich_help_panel=o.ATTACK)] = None,
    resolution: o.ResolutionOpt = "model",
    png: PngOpt = None,
    out: o.OutOpt = None,
    record: o.RecordOpt = None,
    json_out: o.JsonOpt = False,
) -> None:
    """Fit a universal adversarial perturbation (eps in [0, 1] pixel units) and save it (runs in fp32)."""
    from clipguard.tasks.uap import UAPFitConfig, run_uap_fit, uap_config

    uap, out = artefact_path(uap, out, record, option="--uap")
    cfg = UAPFitConfig(uap=uap, run=run, eps=eps, norm=norm, method=method, target_fooling=target_fooling,
                       epochs=epochs, step=step, target_class=target_class, resolution=resolution, png=png)
    uap_config(cfg)  # validate eps, norm, method, ... before loading anything
    check_outputs({"--uap": uap, "--out": out}, {"--png": png})
    emit(run_uap_fit(cfg, progress=not json_out), out=out, as_json=json_out, table=uap_table)


@app.command("eval")
@o.run_options(exclude=("precision",))
def eval_(
    run: RunOptions,
    uap: Annotated[str, typer.Option(help="UAP file from `clipguard uap fit`.", rich_help_panel=o.ATTACK)],
    allow_fit_split: Annotated[bool, typer.Option(help="Allow evaluating on the split the UAP was fitted on (not a "
                                                  "held-out fooling rate; the record says so).",
                                                  rich_help_panel=o.ATTACK)] = False,
    png: PngOpt = None,
    out: o.OutOpt = None,
    json_out: o.JsonOpt = False,
) -> None:
    """Fooling rate and accuracy with/without a UAP on any model (another model gives the transfer number)."""
    from clipguard.tasks.uap import UAPEvalConfig, run_uap_eval

    cfg = UAPEvalConfig(uap=uap, run=run.check(), png=png, allow_fit_split=allow_fit_split)
    check_outputs({"--out": out}, {"--png": png})
    emit(run_uap_eval(cfg, progress=not json_out), out=out, as_json=json_out, table=uap_table)


def uap_table(rec: dict):
    from rich.table import Table

    a, m, u = rec["attack"], rec["metrics"], rec["uap"]
    what = "fitted on" if rec["task"] == "uap_fit" else ("transfer to" if u.get("transfer") else "evaluated on")
    t = Table(title=f"UAP {a['method']} {a['norm']} eps={a['eps']['text']} {what} {rec['model_spec']}, "
                    f"{rec['data']['spec']} {rec['data']['split']} (n={rec['data']['n']}) -> {u['path']}")
    cols = {"fooling rate": m["fooling_rate"], "clean acc": m["acc1"], "perturbed acc": m["perturbed_acc"],
            "attack success": m["attack_success_rate"]}
    if "targeted_success_rate" in m:
        cols[f"targeted ({a.get('target_class_name')})"] = m["targeted_success_rate"]
    if "random_fooling_rate" in m:
        cols["random sign fooling"] = m["random_fooling_rate"]
    for col in [*cols, "img/s"]:
        t.add_column(col, justify="right")
    t.add_row(*(f"{x:.4f}" for x in cols.values()), f"{rec['timings']['images_per_s']:,.1f}")
    from rich.console import Group

    return Group(t, checks_line(rec))
