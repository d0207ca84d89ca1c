"""``clipguard cache ls|rm``: the text-embedding store."""

from __future__ import annotations

import typer

from clipguard.cli import options as o
from clipguard.cli.options import Command
from clipguard.tasks.configs import CacheLsConfig, CacheRmConfig

app = typer.Typer(help="Inspect or clear the cached text embeddings ($CLIPGUARD_CACHE/text).",
                  no_args_is_help=True)


@app.command("ls", cls=Command)
@o.command(CacheLsConfig)
def ls(cfg: CacheLsConfig, json_out: o.JsonOpt = False) -> None:
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


@app.command("rm", cls=Command)
@o.command(CacheRmConfig)
def rm(cfg: CacheRmConfig) -> None:
    """Remove cached entries by key prefix, or all with --all."""
    from clipguard.models.text_embeddings import remove_entries

    n = remove_entries(None if cfg.all else cfg.keys)
    typer.echo(f"removed {n} entr{'y' if n == 1 else 'ies'}")
