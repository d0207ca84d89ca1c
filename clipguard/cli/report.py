"""``clipguard bench run``, ``clipguard report`` and ``clipguard gate``: suites, reports and CI gates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipguard.cli.options import JsonOpt

bench_app = typer.Typer(help="Run benchmark suites (benchmarks/*.toml).", no_args_is_help=True)


RAY, SLURM = "Ray (--executor ray)", "Slurm (--executor slurm)"


@bench_app.command("run")
def bench_run(
    suite: Annotated[Path, typer.Argument(help="Suite TOML, e.g. benchmarks/toy.toml.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for records/ and adapters/.")],
    only: Annotated[list[str] | None, typer.Option(help="Run only these cell ids (repeatable).")] = None,
    executor: Annotated[str, typer.Option(help="Who runs the cells: local (this process, in file order), ray "
                                               "(one Ray task per cell) or slurm (a submitit job array per wave of "
                                               "independent cells).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="A running Ray cluster (auto, HOST:6379, "
                                                         "ray://HOST:10001); default: start one on this machine.",
                                                    rich_help_panel=RAY)] = None,
    cpus_per_cell: Annotated[float, typer.Option(help="CPU cores Ray reserves per cell (fractions allowed); also "
                                                      "the cell's torch threads.", rich_help_panel=RAY)] = 1,
    gpus_per_cell: Annotated[float | None, typer.Option(help="GPUs per cell (0.5: two cells share a GPU); "
                                                             "default: 1 when the cluster has GPUs, else 0.",
                                                        rich_help_panel=RAY)] = None,
    slurm_partition: Annotated[str | None, typer.Option(help="sbatch --partition (default: the cluster's).",
                                                        rich_help_panel=SLURM)] = None,
    slurm_gpus_per_task: Annotated[int, typer.Option(help="GPUs per cell (sbatch --gpus-per-task; 0: CPU only).",
                                                     rich_help_panel=SLURM)] = 1,
    slurm_cpus_per_task: Annotated[int, typer.Option(help="CPU cores per cell (sbatch --cpus-per-task); also "
                                                          "the cell's torch threads.", rich_help_panel=SLURM)] = 1,
    slurm_time: Annotated[int, typer.Option(help="Time limit per cell, in minutes; a timed-out cell is requeued "
                                                 "and resumes (3 times at most).", rich_help_panel=SLURM)] = 240,
    slurm_array_parallelism: Annotated[int | None, typer.Option(help="At most this many cells of a wave running "
                                                                     "at once (default: as Slurm allows).",
                                                                rich_help_panel=SLURM)] = None,
    submitit_cluster: Annotated[str | None, typer.Option(help="submitit's backend: slurm (sbatch; the default), or "
                                                              "local (the job array as processes on this machine: "
                                                              "to try a suite, and in tests).",
                                                         rich_help_panel=SLURM)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run every cell of SUITE whose record is missing or stale; done cells are skipped (resumable)."""
    from rich.console import Console
    from rich.table import Table

    from clipguard.tasks.bench import CellsFailed, run_suite
    from clipguard.tasks.executors import EXECUTORS, RayOptions, SlurmOptions

    EXECUTORS.check(executor)
    _refuse_stray(executor, {"ray": {"--ray-address": ray_address, "--gpus-per-cell": gpus_per_cell},
                             "slurm": {"--slurm-partition": slurm_partition,
                                       "--slurm-array-parallelism": slurm_array_parallelism,
                                       "--submitit-cluster": submitit_cluster}})
    options = {"ray": RayOptions(address=ray_address, cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell),
               "slurm": SlurmOptions(partition=slurm_partition, gpus_per_task=slurm_gpus_per_task,
                                     cpus_per_task=slurm_cpus_per_task, time_min=slurm_time,
                                     array_parallelism=slurm_array_parallelism,
                                     cluster=submitit_cluster or "slurm")}
    failed = None
    try:
        summary = run_suite(suite, out, only=only, progress=not json_out, executor=executor,
                            options=options.get(executor))
    except CellsFailed as e:  # show every cell's row, then the one-line error
        summary, failed = e.summary, e
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        t = Table(title=f"{suite} -> {out} ({executor})")
        for col in ("cell", "kind", "status", "seconds"):
            t.add_column(col)
        for s in summary:
            t.add_row(s["cell"], s["kind"], s["status"], f"{s['seconds']:.1f}")
        Console().print(t)
    if failed:
        raise failed


def _refuse_stray(executor: str, given: dict[str, dict]) -> None:
    """An option of another executor (``--ray-address`` with ``--executor slurm``) is a one-line error, not ignored."""
    from clipguard.errors import ClipguardError

    for owner, options in given.items():
        for name, value in options.items():
            if value is not None and owner != executor:
                raise ClipguardError(f"{name} applies to --executor {owner}, not {executor}")


def report_command(
    records: Annotated[Path, typer.Argument(help="Folder of result records (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Markdown report to write.")] = Path("report.md"),
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report.")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write a CSV (CLIP_benchmark's columns first).")] \
        = None,
    json_out: JsonOpt = False,
) -> None:
    """Tables, robust-vs-eps curves, clean-vs-robust scatter and integrity summary from records (no recompute)."""
    from clipguard.errors import ClipguardError
    from clipguard.report.build import build_report

    if not records.is_dir():
        raise ClipguardError(f"report: {str(records)!r} is not a folder of records")
    info = build_report(records, out, html_out=html, csv_out=csv)
    if not info["records"]:
        raise ClipguardError(f"report: no clipguard.result/1 records under {str(records)!r}")
    if json_out:
        typer.echo(json.dumps({**info, "out": str(out), "html": str(html) if html else None,
                               "csv": str(csv) if csv else None}, indent=2, default=str))
        return
    typer.echo(f"{info['records']} records -> {out}" + (f", {html}" if html else "") + (f", {csv}" if csv else "")
               + f" ({len(info['plots'])} plots)")


def gate_command(
    records: Annotated[Path, typer.Option("--records", help="Folder of result records.")],
    rules: Annotated[Path, typer.Option("--rules", help="TOML with rules = [\"robust_acc(attack=pgd, eps=1/255) "
                                        ">= 0.40\", \"clean_acc1 >= 0.85\"].")],
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML for CI systems.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the outcomes as JSON to this file.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Exit 0 when every rule holds, 1 when any fails (one line each), 2 for a malformed rule."""
    from clipguard.errors import ClipguardError
    from clipguard.fsutil import atomic_write_json, atomic_write_text
    from clipguard.records.rows import load_records, rows
    from clipguard.report.gate import evaluate_rule, junit_xml, load_rules

    parsed = load_rules(rules)
    if not records.is_dir():
        raise ClipguardError(f"--records {str(records)!r} is not a folder")
    rs = rows(load_records(records))
    outcomes = [evaluate_rule(r, rs) for r in parsed]
    if junit:
        atomic_write_text(junit, junit_xml(outcomes))
    failed = sum(not o.passed for o in outcomes)
    summary = {"passed": not failed, "rules": [{"rule": o.rule.text, "passed": o.passed, "message": o.message,
                                                "checked": o.checked} for o in outcomes]}
    if out:
        atomic_write_json(out, summary)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for o in outcomes:
            typer.echo(o.message, err=not o.passed)
        typer.echo(f"gate: {len(outcomes) - failed} of {len(outcomes)} rules hold")
    raise typer.Exit(1 if failed else 0)
