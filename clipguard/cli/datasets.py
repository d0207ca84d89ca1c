"""``clipguard datasets``: the dataset catalogue, with what of each set is on this machine."""

from __future__ import annotations

import typer

from clipguard.cli import options as o
from clipguard.tasks.configs import DatasetsConfig


def catalogue_rows(suite: str | None = None) -> list[dict]:
    """One dict per catalogue entry (optionally only those of ``suite``): the entry, its wds repo, the number of
    templates in its ``openai`` set and its local status."""
    from clipguard.catalogue import catalogue, local_status, wds_repo
    from clipguard.data.prompts import load_prompts
    from clipguard.registry import unknown_choice

    entries = list(catalogue().values())
    if suite is not None:
        tags = sorted({t for e in entries for t in e.suites})
        if suite not in tags:
            raise unknown_choice("--suite", suite, tags)
        entries = [e for e in entries if suite in e.suites]
    return [{**e.to_dict(), "wds_repo": wds_repo(e),
             "n_templates": len(load_prompts(e.name, templates="openai").templates), "local": local_status(e)}
            for e in entries]


def _local_text(status: dict) -> str:
    """``wds (4 shards)``, ``hub cache (4 shards)``, ``hf cache`` (joined), or ``—`` when nothing is local."""
    parts = []
    if status["wds"]["shards"]:
        parts.append(f"wds ({status['wds']['shards']} shards)")
    if status["hub"]["shards"]:
        parts.append(f"hub cache ({status['hub']['shards']} shards)")
    if status["hf"] and status["hf"]["cached"]:
        parts.append("hf cache")
    return ", ".join(parts) or "—"


@o.command(DatasetsConfig)
def datasets_command(cfg: DatasetsConfig, json_out: o.JsonOpt = False) -> None:
    """List the dataset catalogue: source, split, classes, templates, and what is present locally."""
    import json

    from rich.console import Console
    from rich.table import Table

    from clipguard.catalogue import data_root

    rows = catalogue_rows(cfg.suite)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console()
    wide = console.width >= 140  # title and source need room; a narrow terminal gets the columns that fit whole
    t = Table(title=f"clipguard datasets (local copies: {data_root()})"
                    + ("" if wide else "; --json or a wider terminal shows titles and sources"))
    cols = ["name", *(["title"] if wide else []), "classes", "templates", *(["source"] if wide else []), "split",
            "suites", "local"]
    for col in cols:
        t.add_column(col, no_wrap=col in ("name", "source"))
    for r in rows:
        cells = {"name": r["name"], "title": r["title"], "classes": str(r["n_classes"]),
                 "templates": str(r["n_templates"]),
                 "source": f"hf:{r['hf']}\n{r['wds_repo']}" if r["hf"] else r["wds_repo"],
                 "split": r["split"] if not r["hf_split"] else f"{r['split']} (hf: {r['hf_split']})",
                 "suites": ", ".join(r["suites"]), "local": _local_text(r["local"])}
        t.add_row(*(cells[c] for c in cols))
    console.print(t)
