"""``clipguard cache ls|rm``: the text-embedding store."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Inspect or clear the cached text embeddings ($CLIPGUARD_CACHE/text).",
                  no_args_is_help=True)


@app.command("ls")
def ls(json_out: Annotated[bool, typer.Option("--json", help="Print entries as JSON.")] = False) -> None:
    """List cached text-embedding entries."""
    import json

    from rich.console import Console
    from rich.table import Table

    from clipguard.models.text_embeddings import list_entries, text_dir

    entries = list_entries()
    if json_out:
        typer.echo(json.dumps(entries, indent=2))
        return
    t = Table(title=f"{text_dir()} ({len(entries)} entries)")
    for col in ("key", "model", "classes", "templates", "KiB", "created"):
        t.add_column(col)
    for e in entries:
        t.add_row(e["key"][:12], e.get("model", "?"), str(e.get("n_classes")), str(len(e.get("templates", []))),
                  f"{e['bytes'] / 1024:.1f}", e.get("created", ""))
    Console().print(t)


@app.command("rm")
def rm(keys: Annotated[list[str] | None, typer.Argument(help="Key prefixes to remove.")] = None,
       all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False) -> None:
    """Remove cached entries by key prefix, or all with --all."""
    from clipguard.errors import ClipguardError
    from clipguard.models.text_embeddings import remove_entries

    if not keys and not all_:
        raise ClipguardError("cache rm: name key prefixes (see `clipguard cache ls`) or pass --all")
    n = remove_entries(None if all_ else keys)
    typer.echo(f"removed {n} entr{'y' if n == 1 else 'ies'}")
