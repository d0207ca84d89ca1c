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
    t = Table(title=f"clipguard datasets (local copies: {data_root()})")
    t.add_column("name", no_wrap=True)
    for col in ("title", "classes", "templates", "source", "split", "suites", "local"):
        t.add_column(col)
    for r in rows:
        source = f"hf:{r['hf']}\n{r['wds_repo']}" if r["hf"] else r["wds_repo"]
        split = r["split"] if not r["hf_split"] else f"{r['split']} (hf: {r['hf_split']})"
        t.add_row(r["name"], r["title"], str(r["n_classes"]), str(r["n_templates"]), source, split,
                  ", ".join(r["suites"]), _local_text(r["local"]))
    Console().print(t)
