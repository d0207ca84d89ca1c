"""``clipguard compare``: two runs of the same images, paired image by image (exact McNemar, Holm)."""

from __future__ import annotations

from clipguard.cli import options as o
from clipguard.cli.output import emit
from clipguard.tasks.configs import CompareConfig


@o.command(CompareConfig)
def compare_command(cfg: CompareConfig, out: o.OutOpt = None, json_out: o.JsonOpt = False,
                    strict: o.StrictOpt = False) -> None:
    """Per dataset and metric: A, B, B - A with its interval, exact McNemar p, Holm-adjusted p, significant.
    --strict: exit 1 when a compared record failed an integrity check."""
    from clipguard.tasks.compare import run_compare

    emit(run_compare(cfg), out=out, as_json=json_out, table=compare_table, strict=strict)


def _acc(v: float, ci: list[float]) -> str:
    return f"{v:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def compare_table(res: dict):
    from rich.console import Group
    from rich.table import Table

    conf, rows = res["difference"]["confidence"], res["comparisons"]
    pairs = list(dict.fromkeys((r["a_label"], r["b_label"]) for r in rows))
    t = Table(title=f"B - A, paired: exact McNemar, Holm-adjusted over {len(rows)}, alpha={res['level']:g}")
    cols = ["dataset", "metric", *(["A", "B"] if len(pairs) > 1 else []), f"A [{conf:.0%} CI]", f"B [{conf:.0%} CI]",
            f"B - A [{conf:.0%} CI]", "only A/B", "p (Holm)", "signif."]
    for col in cols:
        t.add_column(col, justify="left" if col in ("dataset", "metric", "A", "B") else "right")
    for r in rows:
        d, ci = r["difference"], r["difference_ci"]
        t.add_row(str(r["dataset"] or "-"), r["metric"], *([r["a_label"], r["b_label"]] if len(pairs) > 1 else []),
                  _acc(r["a"], r["a_ci"]), _acc(r["b"], r["b_ci"]), f"{d:+.4f} [{ci[0]:+.3f}, {ci[1]:+.3f}]",
                  f"{r['only_a']}/{r['only_b']}", f"{r['p_holm']:.3g}", "yes" if r["significant"] else "no")
    lines = [f"A = {a}, B = {b}" for a, b in pairs] if len(pairs) == 1 else []
    lines += [t, f"test: {res['test']}; raw p-values in --json", f"B - A interval: {res['difference']['method']}, "
                 f"{res['difference']['n_resamples']} resamples, seed {res['difference']['seed']}"]
    lines += [f"not compared ({n['a']} vs {n['b']}): {n['metric']} measured by one run only"
              for n in res["not_compared"]]
    lines += [f"FAILED integrity check of a compared run: {c['name']}" for c in res["checks"] if not c["passed"]]
    return Group(*lines)
