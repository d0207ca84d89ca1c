"""``clipguard certify``: certified L2 robustness of the zero-shot classifier under randomized smoothing."""

from __future__ import annotations

from typing import Annotated

import typer

from clipguard.cli import options as o
from clipguard.cli.output import check_outputs, checks_line, emit
from clipguard.run_options import RunOptions

SMOOTHING, CHECK = "Smoothing", "Integrity check"


@o.run_options(exclude=("batch_size",))
def certify_command(
    run: RunOptions,
    sigma: Annotated[float, typer.Option(help="Noise std in [0, 1] pixel units at the model's input size (Cohen et "
                                         "al.: 0.12, 0.25, 0.5, 1.0).", rich_help_panel=SMOOTHING)] = 0.25,
    n0: Annotated[int, typer.Option("--n0", help="Selection samples per image.", rich_help_panel=SMOOTHING)] = 100,
    n: Annotated[int, typer.Option("--n", help="Estimation samples per image (Cohen et al.: 100000).",
                                   rich_help_panel=SMOOTHING)] = 100_000,
    alpha: Annotated[float, typer.Option(help="Failure probability of each certificate.",
                                         rich_help_panel=SMOOTHING)] = 0.001,
    noise_batch: Annotated[int, typer.Option(help="Noisy samples per forward pass (halved on GPU out-of-memory).",
                                             rich_help_panel=o.PERF)] = 1000,
    radii: Annotated[str, typer.Option(help="Certified-accuracy grid: comma list of L2 radii in [0, 1] pixel units.",
                                       rich_help_panel=SMOOTHING)] = "0,0.25,0.5,0.75,1,1.25,1.5,1.75,2",
    check_images: Annotated[int, typer.Option(help="Images attacked (SmoothAdv L2 PGD) by the integrity check and "
                                              "for the empirical curve.", rich_help_panel=CHECK)] = 10,
    check_steps: Annotated[int, typer.Option(help="PGD iterations of the check attack.", rich_help_panel=CHECK)] = 20,
    check_samples: Annotated[int, typer.Option(help="Noise samples per PGD step.", rich_help_panel=CHECK)] = 16,
    check_n: Annotated[int, typer.Option(help="Noise samples re-estimating the smoothed classifier at an attacked "
                                         "image.", rich_help_panel=CHECK)] = 1000,
    out: o.OutOpt = None,
    json_out: o.JsonOpt = False,
) -> None:
    """Certified L2 accuracy of the Gaussian-smoothed classifier (Cohen et al.'s CERTIFY; radii in [0,1] pixels)."""
    from clipguard.tasks.certify import CertifyConfig, run_certify, validate_certify

    cfg = CertifyConfig(run=run, sigma=sigma, n0=n0, n=n, alpha=alpha, noise_batch=noise_batch, radii=radii,
                        check_images=check_images, check_steps=check_steps, check_samples=check_samples,
                        check_n=check_n)
    validate_certify(cfg)  # fail fast, before anything loads
    check_outputs({"--out": out})
    emit(run_certify(cfg, progress=not json_out), out=out, as_json=json_out, table=certify_table)


def certify_table(rec: dict):
    from rich.console import Group
    from rich.table import Table

    s, m, t = rec["smoothing"], rec["metrics"], rec["timings"]
    title = (f"{rec['model_spec']} on {rec['data']['spec']} ({rec['data']['split']}, n={rec['data']['n']}): "
             f"sigma={s['sigma']}, {s['n']:,} samples, alpha={s['alpha']}")
    table = Table(title=title)
    for col in ("radius (L2)", "certified acc", "empirical acc (SmoothAdv)"):
        table.add_column(col, justify="right")
    empirical = {e["radius"]: e["robust_acc"] for e in rec["empirical_l2"]["curve"]}
    for e in m["certified"]:
        table.add_row(f"{e['radius']:g}", f"{e['certified_acc']:.4f}", f"{empirical[e['radius']]:.4f}")
    summary = (f"base acc1 {m['acc1']:.4f}  smoothed acc1 {m['smoothed_acc1']:.4f}  abstain {m['abstain_rate']:.4f}  "
               f"{t['samples_per_s']:,.0f} samples/s  {t['wall_s']:.1f} s  (empirical on the first "
               f"{rec['empirical_l2']['images']} images)")
    return Group(table, summary, checks_line(rec))
