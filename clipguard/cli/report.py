"""``clipguard bench run``, ``clipguard report`` and ``clipguard gate``: suites, reports and CI gates."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from clipguard.cli import options as o
from clipguard.cli.options import Command
from clipguard.tasks.configs import BenchRunConfig, GateConfig, ReportConfig

bench_app = typer.Typer(help="Run benchmark suites (benchmarks/*.toml).", no_args_is_help=True)


@bench_app.command("run", cls=Command)
@o.command(BenchRunConfig)
def bench_run(cfg: BenchRunConfig, json_out: o.JsonOpt = False, strict: o.StrictOpt = False) -> None:
    """Run every cell of SUITE whose record is missing or stale; done cells are skipped (resumable). Every cell's
    options are checked before any cell runs."""
    from rich.console import Console
    from rich.table import Table

    from clipguard.tasks.bench import CellsFailed, run_suite
    from clipguard.tasks.executors import RayOptions, SlurmOptions

    options = {"ray": RayOptions(address=cfg.ray_address, cpus_per_cell=cfg.cpus_per_cell,
                                 gpus_per_cell=cfg.gpus_per_cell),
               "slurm": SlurmOptions(partition=cfg.slurm_partition, gpus_per_task=cfg.slurm_gpus_per_task,
                                     cpus_per_task=cfg.slurm_cpus_per_task, time_min=cfg.slurm_time,
                                     array_parallelism=cfg.slurm_array_parallelism,
                                     cluster=cfg.submitit_cluster or "slurm")}
    failed = None
    try:
        summary = run_suite(cfg.suite, cfg.out, only=cfg.only, progress=not json_out, executor=cfg.executor,
                            options=options.get(cfg.executor))
    except CellsFailed as e:  # show every cell's row, then the one-line error
        summary, failed = e.summary, e
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        t = Table(title=f"{cfg.suite} -> {cfg.out} ({cfg.executor})")
        for col in ("cell", "kind", "status", "seconds"):
            t.add_column(col)
        for s in summary:
            t.add_row(s["cell"], s["kind"], s["status"], f"{s['seconds']:.1f}")
        Console().print(t)
    if failed:
        raise failed
    if strict:  # every cell's record, run now or skipped as done: a failed check fails the build
        from clipguard.records.rows import failed_checks

        bad = [s["cell"] for s in summary if s["status"] in ("ran", "skipped")
               and failed_checks(json.loads(Path(s["record"]).read_text()))]
        if bad:
            typer.echo(f"--strict: integrity checks failed in cell(s) {', '.join(bad)}; exit 1", err=True)
            raise typer.Exit(1)


@o.command(ReportConfig)
def report_command(cfg: ReportConfig, json_out: o.JsonOpt = False, strict: o.StrictOpt = False) -> None:
    """Tables, robust-vs-eps curves, clean-vs-robust scatter and integrity summary from records (no recompute)."""
    from clipguard.errors import ClipguardError
    from clipguard.report.build import build_report

    records, out, html, csv = cfg.records, cfg.out, cfg.html, cfg.csv
    info = build_report(records, out, html_out=html, csv_out=csv, force=cfg.force, baseline=cfg.baseline)
    if not info["records"]:
        raise ClipguardError(f"report: no clipguard.result/1 records under {str(records)!r}")
    if json_out:
        typer.echo(json.dumps({**info, "out": str(out), "html": str(html) if html else None,
                               "csv": str(csv) if csv else None}, indent=2, default=str))
    else:
        typer.echo(f"{info['records']} records -> {out}" + (f", {html}" if html else "") + (f", {csv}" if csv else "")
                   + f" ({len(info['plots'])} plots)")
    failed = [c for c in info["checks"] if c["failed"]]
    if strict and failed:  # the report is written first: it is where a reader sees which checks failed
        typer.echo(f"--strict: integrity checks failed in {len(failed)} record(s) "
                   f"({', '.join(c['cell'] or c['label'] for c in failed[:5])}); exit 1", err=True)
        raise typer.Exit(1)


@o.command(GateConfig)
def gate_command(cfg: GateConfig, json_out: o.JsonOpt = False, strict: o.StrictOpt = False) -> None:
    """Exit 0 when every rule holds, 1 when any fails (one line each), 2 for a malformed rule."""
    from clipguard.errors import ClipguardError
    from clipguard.fsutil import atomic_write_json, atomic_write_text
    from clipguard.records.rows import load_records, rows
    from clipguard.report.gate import evaluate_rule, junit_xml, load_rules, parse_rule

    junit, out = cfg.junit, cfg.out
    parsed = load_rules(cfg.rules)
    rs = rows(load_records(cfg.records))
    base = rows(load_records(cfg.baseline)) if cfg.baseline is not None else None  # `>= baseline` rules' bar
    if cfg.baseline is not None and not base:
        raise ClipguardError(f"--baseline {str(cfg.baseline)!r} holds no clipguard.result/1 records")
    if strict and any(r["metric"] == "checks_passed" for r in rs):  # --strict: every record's checks, one more rule
        parsed.append(parse_rule("checks_passed == 1"))
    outcomes = [evaluate_rule(r, rs, base) for r in parsed]
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
