"""``clipguard eval``: zero-shot accuracy of a CLIP model on a dataset; robust accuracy with --attack."""

from __future__ import annotations

from clipguard.cli import options as o
from clipguard.cli.output import checks_line, emit, model_label
from clipguard.tasks.configs import EvalConfig


@o.command(EvalConfig)
def eval_command(cfg: EvalConfig, out: o.OutOpt = None, json_out: o.JsonOpt = False,
                 strict: o.StrictOpt = False) -> None:
    """Zero-shot accuracy of MODEL on DATASET; with --attack, robust accuracy too (eps in [0,1] pixels)."""
    from clipguard.tasks.eval import run_eval

    emit(run_eval(cfg, progress=not json_out), out=out, as_json=json_out, table=eval_table, strict=strict)


def with_ci(metrics: dict, name: str) -> str:
    """``0.4800 [0.337, 0.626] ±0.144``: a metric, its interval and the interval's half-width (what more images
    would shrink); records from before intervals: the value alone."""
    ci = metrics.get(f"{name}_ci")
    return f"{metrics[name]:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}] ±{(ci[1] - ci[0]) / 2:.3f}" if ci else "")


def level(rec: dict) -> str:
    """The record's interval level as a column header says it: ``95% CI`` (records before --confidence: 95 %)."""
    return f"{(rec.get('intervals') or {}).get('confidence', 0.95):.0%} CI"


def eval_table(rec: dict):
    from rich.console import Group
    from rich.table import Table

    t = Table(title=f"{model_label(rec)} on {rec['data']['spec']} ({rec['data']['split']}, n={rec['data']['n']})")
    for col in (f"acc1 [{level(rec)}] ±half", "acc5", "mean per-class recall", "img/s", "text emb."):
        t.add_column(col, justify="right")
    m = rec["metrics"]
    t.add_row(with_ci(m, "acc1"), "—" if m["acc5"] is None else f"{m['acc5']:.4f}", f"{m['mean_per_class_recall']:.4f}",
              f"{rec['timings']['images_per_s']:,.1f}", rec["text_embeddings"]["cache"])
    if "robust" in m:
        r = Table(title=f"robust accuracy ({rec['attack']['name']}, {rec['attack']['resolution']} resolution"
                        + (f", transfer from {rec['attack']['surrogate']}" if rec["attack"].get("surrogate") else "")
                        + ")")
        cols = ["eps", f"robust acc [{level(rec)}] ±half", "attack success", "img/s"]
        transfer = "surrogate_robust_acc" in m["robust"][0]
        cols += ["surrogate clean", "surrogate adv"] if transfer else []
        for col in cols:
            r.add_column(col, justify="right")
        for e in m["robust"]:
            row = [e["eps"], with_ci(e, "robust_acc"), f"{e['attack_success_rate']:.4f}", f"{e['images_per_s']:,.1f}"]
            row += [f"{e['surrogate_clean_acc']:.4f}", f"{e['surrogate_robust_acc']:.4f}"] if transfer else []
            r.add_row(*row)
        return Group(t, r, checks_line(rec))
    if "robust_acc" in m:
        t.add_section()
        t.add_row("robust", f"{m['robust_acc']:.4f}", "attack success", f"{m['attack_success_rate']:.4f}", "")
    return t
