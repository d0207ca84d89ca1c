"""``clipguard eval``: zero-shot accuracy of a CLIP model on a dataset."""

from __future__ import annotations

from typing import Annotated

import typer

from clipguard.cli import common as c


def eval_command(
    model: c.ModelOpt = "toy",
    dataset: c.DatasetOpt = "toy",
    split: c.SplitOpt = "test",
    limit: c.LimitOpt = None,
    seed: c.SeedOpt = 0,
    prompts: c.PromptsOpt = None,
    templates: c.TemplatesOpt = "seed",
    batch_size: c.BatchOpt = 256,
    device: c.DeviceOpt = "auto",
    precision: c.PrecisionOpt = "auto",
    image_column: c.ImageColOpt = None,
    label_column: c.LabelColOpt = None,
    adapter: c.AdapterOpt = None,
    attack: c.AttackOpt = None,
    eps: c.EpsOpt = "8/255",
    alpha: c.AlphaOpt = None,
    steps: c.StepsOpt = 10,
    restarts: c.RestartsOpt = 1,
    resolution: c.ResolutionOpt = "model",
    attack_precision: c.AttackPrecisionOpt = "fp32",
    surrogate: c.SurrogateOpt = None,
    sanity: Annotated[bool, typer.Option(help="Also run the costly sanity checks (eps sweep monotone, PGD vs "
                                         "FGSM, doubled steps, 5 restarts).")] = False,
    adv_set: Annotated[str | None, typer.Option(help="Evaluate on a saved adversarial set (from `clipguard "
                                                "attack`) instead of attacking.")] = None,
    out: c.OutOpt = None,
    json_out: c.JsonOpt = False,
) -> None:
    """Zero-shot accuracy of MODEL on DATASET; with --attack, robust accuracy too (eps in [0,1] pixels)."""
    c.check_positive("--limit", limit)
    c.check_positive("--batch-size", batch_size)
    from clipguard.eval_run import EvalConfig, run_eval, validate_eval

    cfg = EvalConfig(model=model, dataset=dataset, split=split, limit=limit, seed=seed, prompts=prompts,
                     templates=templates, batch_size=batch_size, device=device, precision=precision,
                     image_column=image_column, label_column=label_column, adapter=adapter, attack=attack,
                     eps=eps, alpha=alpha, steps=steps, restarts=restarts, resolution=resolution,
                     attack_precision=attack_precision, surrogate=surrogate, sanity=sanity, adv_set=adv_set)
    validate_eval(cfg)  # fail fast, before anything loads
    record = run_eval(cfg, progress=not json_out)
    c.emit(record, out=out, as_json=json_out, table=eval_table)


def eval_table(rec: dict):
    from rich.table import Table

    t = Table(title=f"{rec['model_spec']} on {rec['data']['spec']} ({rec['data']['split']}, n={rec['data']['n']})")
    for col in ("acc1", "acc5", "mean per-class recall", "img/s", "text emb."):
        t.add_column(col, justify="right")
    m = rec["metrics"]
    t.add_row(f"{m['acc1']:.4f}", f"{m['acc5']:.4f}", f"{m['mean_per_class_recall']:.4f}",
              f"{rec['timings']['images_per_s']:,.1f}", rec["text_embeddings"]["cache"])
    if "robust" in m:
        r = Table(title=f"robust accuracy ({rec['attack']['name']}, {rec['attack']['resolution']} resolution"
                        + (f", transfer from {rec['attack']['surrogate']}" if rec["attack"].get("surrogate") else "")
                        + ")")
        cols = ["eps", "robust acc", "attack success", "img/s"]
        transfer = "surrogate_robust_acc" in m["robust"][0]
        cols += ["surrogate clean", "surrogate adv"] if transfer else []
        for col in cols:
            r.add_column(col, justify="right")
        for e in m["robust"]:
            row = [e["eps"], f"{e['robust_acc']:.4f}", f"{e['attack_success_rate']:.4f}", f"{e['images_per_s']:,.1f}"]
            row += [f"{e['surrogate_clean_acc']:.4f}", f"{e['surrogate_robust_acc']:.4f}"] if transfer else []
            r.add_row(*row)
        failed = [f"{c['name']}@{c.get('eps', '')}" for c in rec["checks"] if not c["passed"]]
        note = "all integrity checks passed" if not failed else "FAILED checks: " + ", ".join(failed)
        from rich.console import Group

        return Group(t, r, note)
    if "robust_acc" in m:
        t.add_section()
        t.add_row("robust", f"{m['robust_acc']:.4f}", "attack success", f"{m['attack_success_rate']:.4f}", "")
    return t
