"""``clipguard certify``: certified L2 robustness of the zero-shot classifier under randomized smoothing."""

from __future__ import annotations

from clipguard.cli import options as o
from clipguard.cli.output import checks_line, emit, model_label
from clipguard.tasks.configs import CertifyConfig


@o.command(CertifyConfig)
def certify_command(cfg: CertifyConfig, out: o.OutOpt = None, json_out: o.JsonOpt = False,
                    strict: o.StrictOpt = False) -> None:
    """Certified L2 accuracy of the Gaussian-smoothed classifier (Cohen et al.'s CERTIFY; radii in [0,1] pixels)."""
    from clipguard.tasks.certify import run_certify

    emit(run_certify(cfg, progress=not json_out), out=out, as_json=json_out, table=certify_table, strict=strict)


def certify_table(rec: dict):
    from rich.console import Group
    from rich.table import Table

    s, m, t = rec["smoothing"], rec["metrics"], rec["timings"]
    title = (f"{model_label(rec)} on {rec['data']['spec']} ({rec['data']['split']}, n={rec['data']['n']}): "
             f"sigma={s['sigma']}, {s['n']:,} samples, alpha={s['alpha']}")
    table = Table(title=title)
    for col in ("radius (L2)", "certified acc", "empirical acc (SmoothAdv)"):
        table.add_column(col, justify="right")
    empirical = {e["radius"]: e["robust_acc"] for e in rec["empirical_l2"]["curve"]}
    for e in m["certified"]:
        emp = empirical.get(e["radius"])  # none with --check-images 0: the check and the curve were skipped
        table.add_row(f"{e['radius']:g}", f"{e['certified_acc']:.4f}", "skipped" if emp is None else f"{emp:.4f}")
    summary = (f"base acc1 {m['acc1']:.4f}  smoothed acc1 {m['smoothed_acc1']:.4f}  abstain {m['abstain_rate']:.4f}  "
               f"{t['samples_per_s']:,.0f} samples/s  {t['wall_s']:.1f} s  " + (
                   f"(SmoothAdv check skipped: {rec['empirical_l2']['skipped']})" if rec["empirical_l2"].get("skipped")
                   else f"(check {t['check_wall_s']:.1f} s; empirical on the first {rec['empirical_l2']['images']} "
                        "images)"))
    return Group(table, summary, checks_line(rec))
