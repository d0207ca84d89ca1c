"""What every command does with its record: write it (--out, atomically), print it (--json) or a table."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def emit(record: dict, *, out: Path | None, as_json: bool, table, strict: bool = False) -> None:
    """Write the record (atomically) and print either its JSON or a human table (under torchrun: rank 0 only,
    every rank holds the same record). With ``strict``, a failed integrity check then exits 1 (one line on stderr
    naming the checks): rank 0 alone, so torchrun does not stop it before the record is written.

    The record is never lost to a write failure: when ``--out`` cannot be written, or a product of the run
    (adversarial set, predictions) could not be, the record goes to a fallback file (``fsutil.save_fallback``:
    the current folder, else the system temp folder), is printed, and then one line names what failed and where
    the record is (exit 2)."""
    from rich.console import Console

    from clipguard.distributed import is_main
    from clipguard.errors import ClipguardError
    from clipguard.fsutil import describe_os_error, save_fallback, take_held_failures
    from clipguard.records.rows import failed_checks

    if not is_main():
        return
    failures, saved = take_held_failures(), None
    if failures:
        record = {**record, "output_errors": failures}  # the saved record says what its run failed to write
    if out is not None:
        from clipguard.records.schema import write_record

        try:
            saved = write_record(out, record)
        except OSError as e:
            failures.insert(0, f"--out {str(out)!r}: the record could not be written ({describe_os_error(e)})")
            record = {**record, "output_errors": failures}
    if failures and saved is None:
        saved = save_fallback(json.dumps(record, indent=2) + "\n", "record")
    if as_json or (failures and saved is None):  # the last place the record survives: stdout
        typer.echo(json.dumps(record, indent=2))
    else:
        console = Console()
        console.print(table(record))
        if saved is not None:
            console.print(f"record written to {saved}")
    if failures:
        where = f"the record was saved to {str(saved)!r}" if saved is not None else \
            "no fallback file could be written either: the record is printed above"
        raise ClipguardError("; ".join(failures) + f"; {where}")
    failed = failed_checks(record)
    if strict and failed:
        typer.echo(f"--strict: {len(failed)} integrity check(s) failed ({', '.join(failed)}); exit 1", err=True)
        raise typer.Exit(1)


def model_label(rec: dict) -> str:
    """How a table title names the model: its spec, and the adapter it carries."""
    adapter = rec.get("adapter") or (rec.get("source") or {}).get("adapter")
    return rec["model_spec"] + (f" + adapter {adapter}" if adapter else "")


def checks_line(rec: dict) -> str:
    """One line on a record's integrity checks."""
    from clipguard.records.rows import failed_checks

    skipped = [c["name"] for c in rec.get("checks") or [] if c.get("skipped")]  # passed None: neither way
    failed = [f for f in failed_checks(rec) if f not in skipped]
    parts = [f"{what}: {', '.join(names)}" for what, names in (("FAILED checks", failed),
                                                               ("integrity checks skipped", skipped)) if names]
    return "; ".join(parts) or "all integrity checks passed"
