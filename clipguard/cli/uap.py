"""``clipguard uap fit|eval``: universal adversarial perturbations (one delta that fools most images)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipguard.cli import common as c

app = typer.Typer(help="Universal adversarial perturbations: fit one image-agnostic delta on a split, then "
                       "measure its fooling rate on any model. eps in [0, 1] pixel units, 8/255 accepted.",
                  no_args_is_help=True)

PngOpt = Annotated[str | None, typer.Option(help="Write the perturbation (scaled to be visible) and a grid of "
                                            "clean vs perturbed images with their predictions to this folder.")]


@app.command("fit")
def fit(
    out: Annotated[str, typer.Option("--out", "-o", help="UAP file to write (.safetensors).")],
    model: c.ModelOpt = "toy",
    dataset: c.DatasetOpt = "toy",
    split: Annotated[str, typer.Option(help="Dataset split to fit on.")] = "train",
    limit: c.LimitOpt = None,
    seed: c.SeedOpt = 0,
    prompts: c.PromptsOpt = None,
    templates: c.TemplatesOpt = "seed",
    batch_size: c.BatchOpt = 128,
    device: c.DeviceOpt = "auto",
    adapter: c.AdapterOpt = None,
    image_column: c.ImageColOpt = None,
    label_column: c.LabelColOpt = None,
    eps: Annotated[str, typer.Option(help="Radius of the UAP in [0, 1] pixel units, 8/255 accepted (max |v| "
                                     "for linf, ||v||_2 for l2).")] = "10/255",
    norm: Annotated[str, typer.Option(help="Threat model: linf or l2.")] = "linf",
    method: Annotated[str, typer.Option(help="sgd (projected sign-gradient ascent over mini-batches, fast) or "
                                        "deepfool (Moosavi-Dezfooli et al. 2017).")] = "sgd",
    target_fooling: Annotated[float, typer.Option(help="Stop once the fitting-set fooling rate reaches this "
                                                  "share.")] = 0.8,
    epochs: Annotated[int, typer.Option(help="At most this many passes over the fitting set.")] = 10,
    step: Annotated[str | None, typer.Option(help="sgd step per batch in [0, 1] pixel units (default eps/10).")] = None,
    target_class: Annotated[str | None, typer.Option(help="Targeted UAP: success = the prediction becomes this "
                                                     "class name.")] = None,
    resolution: c.ResolutionOpt = "model",
    png: PngOpt = None,
    record: Annotated[str | None, typer.Option(help="Also write the JSON record to this file.")] = None,
    json_out: c.JsonOpt = False,
) -> None:
    """Fit a universal adversarial perturbation (eps in [0, 1] pixel units) and save it."""
    c.check_positive("--limit", limit)
    c.check_positive("--batch-size", batch_size)
    from clipguard.uap_run import UAPFitConfig, run_uap_fit, uap_config

    cfg = UAPFitConfig(out=out, model=model, dataset=dataset, split=split, limit=limit, seed=seed, prompts=prompts,
                       templates=templates, device=device, image_column=image_column, label_column=label_column,
                       adapter=adapter, eps=eps, norm=norm, method=method, target_fooling=target_fooling,
                       epochs=epochs, batch_size=batch_size, step=step, target_class=target_class,
                       resolution=resolution, png=png)
    uap_config(cfg)  # validate eps, norm, method, ... before loading anything
    rec = run_uap_fit(cfg, progress=not json_out)
    c.emit(rec, out=Path(record) if record else None, as_json=json_out, table=uap_table)


@app.command("eval")
def eval_(
    uap: Annotated[str, typer.Option(help="UAP file from `clipguard uap fit`.")],
    model: c.ModelOpt = "toy",
    dataset: c.DatasetOpt = "toy",
    split: c.SplitOpt = "test",
    limit: c.LimitOpt = None,
    seed: c.SeedOpt = 0,
    prompts: c.PromptsOpt = None,
    templates: c.TemplatesOpt = "seed",
    batch_size: c.BatchOpt = 256,
    device: c.DeviceOpt = "auto",
    adapter: c.AdapterOpt = None,
    image_column: c.ImageColOpt = None,
    label_column: c.LabelColOpt = None,
    png: PngOpt = None,
    out: c.OutOpt = None,
    json_out: c.JsonOpt = False,
) -> None:
    """Fooling rate and accuracy with/without a UAP on any model (another model gives the transfer number)."""
    c.check_positive("--limit", limit)
    c.check_positive("--batch-size", batch_size)
    from clipguard.uap_run import UAPEvalConfig, run_uap_eval

    cfg = UAPEvalConfig(uap=uap, model=model, dataset=dataset, split=split, limit=limit, seed=seed, prompts=prompts,
                        templates=templates, batch_size=batch_size, device=device, image_column=image_column,
                        label_column=label_column, adapter=adapter, png=png)
    rec = run_uap_eval(cfg, progress=not json_out)
    c.emit(rec, out=out, as_json=json_out, table=uap_table)


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
    failed = [ch["name"] for ch in rec.get("checks", []) if not ch["passed"]]
    from rich.console import Group

    return Group(t, "all integrity checks passed" if not failed else "FAILED checks: " + ", ".join(failed))
