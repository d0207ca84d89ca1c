"""``clipguard uap fit|eval``: universal adversarial perturbations (one delta that fools most images)."""

from __future__ import annotations

import typer

from clipguard.cli import options as o
from clipguard.cli.output import checks_line, emit, model_label
from clipguard.tasks.configs import UAPEvalConfig, UAPFitConfig

app = typer.Typer(help="Universal adversarial perturbations: fit one image-agnostic delta on a split, then "
                       "measure its fooling rate on any model. eps in [0, 1] pixel units, 8/255 accepted.",
                  no_args_is_help=True)


@app.command("fit", cls=o.Command)
@o.command(UAPFitConfig)
def fit(cfg: UAPFitConfig, out: o.OutOpt = None, json_out: o.JsonOpt = False, strict: o.StrictOpt = False) -> None:
    """Fit a universal adversarial perturbation (eps in [0, 1] pixel units) and save it (runs in fp32)."""
    from clipguard.tasks.uap import run_uap_fit

    emit(run_uap_fit(cfg, progress=not json_out), out=out, as_json=json_out, table=uap_table, strict=strict)


@app.command("eval", cls=o.Command)
@o.command(UAPEvalConfig)
def eval_(cfg: UAPEvalConfig, out: o.OutOpt = None, json_out: o.JsonOpt = False,
          strict: o.StrictOpt = False) -> None:
    """Fooling rate and accuracy with/without a UAP on any model (another model gives the transfer number)."""
    from clipguard.tasks.uap import run_uap_eval

    emit(run_uap_eval(cfg, progress=not json_out), out=out, as_json=json_out, table=uap_table, strict=strict)


def uap_table(rec: dict):
    from rich.table import Table

    a, m, u = rec["attack"], rec["metrics"], rec["uap"]
    what = "fitted on" if rec["task"] == "uap_fit" else ("transfer to" if u.get("transfer") else "evaluated on")
    t = Table(title=f"UAP {a['method']} {a['norm']} eps={a['eps']['text']} {what} {model_label(rec)}, "
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
