"""What every command does with its record: write it (--out, atomically), print it (--json) or a table."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def deprecated(old: str, new: str, value):
    """Say once on stderr that ``old`` is a deprecated name (kept for one release); returns ``value``."""
    typer.echo(f"Deprecated: {old} is now {new} (the old form goes in the next release).", err=True)
    return value


def record_path(out: Path | None, record: Path | None) -> Path | None:
    """The record file from ``--out``, or from the deprecated ``--record``."""
    if record is not None:
        from clipguard.errors import ClipguardError

        if out is not None:
            raise ClipguardError("--record is the old name of --out: give only --out")
        return deprecated("--record FILE", "--out FILE", record)
    return out


def artefact_path(artefact: str | None, out: Path | None, record: Path | None, *, option: str,
                  suffix: str = ".safetensors") -> tuple[str, Path | None]:
    """(artefact, record) for commands whose artefact option used to be ``--out``: ``--out X.safetensors``
    without ``option`` still names the artefact for one release (with a deprecation line)."""
    from clipguard.errors import ClipguardError

    if artefact is None and out is not None and str(out).endswith(suffix):
        artefact, out = deprecated(f"--out FILE{suffix}", f"{option} FILE (--out names the JSON record)",
                                   str(out)), None
    if artefact is None:
        raise ClipguardError(f"give {option} FILE{suffix}: where to write the result")
    return artefact, record_path(out, record)


def check_outputs(files: dict[str, object] | None = None, folders: dict[str, object] | None = None) -> None:
    """Every output path writable, checked before anything is computed (``{"--out": path, ...}``)."""
    from clipguard.fsutil import check_writable

    for option, path in (files or {}).items():
        check_writable(path, option)
    for option, path in (folders or {}).items():
        check_writable(path, option, directory=True)


def emit(record: dict, *, out: Path | None, as_json: bool, table) -> None:
    """Write the record (atomically) and print either its JSON or a human table (under torchrun: rank 0 only,
    every rank holds the same record)."""
    from rich.console import Console

    from clipguard.distributed import is_main

    if not is_main():
        return
    if out is not None:
        from clipguard.records.schema import write_record

        write_record(out, record)
    if as_json:
        typer.echo(json.dumps(record, indent=2))
    else:
        console = Console()
        console.print(table(record))
        if out is not None:
            console.print(f"record written to {out}")


def checks_line(rec: dict) -> str:
    """One line on a record's integrity checks."""
    failed = [f"{c['name']}" + (f"@{c['eps']}" if c.get("eps") else "") for c in rec.get("checks", [])
              if not c["passed"]]
    return "all integrity checks passed" if not failed else "FAILED checks: " + ", ".join(failed)
