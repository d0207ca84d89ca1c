"""``clipguard prepare``: decode a dataset once into model-resolution uint8 shards every command reads."""

from __future__ import annotations

from clipguard.cli import options as o
from clipguard.cli.output import emit
from clipguard.tasks.configs import PrepareConfig


@o.command(PrepareConfig)
def prepare_command(cfg: PrepareConfig, out: o.OutOpt = None, json_out: o.JsonOpt = False,
                    strict: o.StrictOpt = False) -> None:
    """Decode and preprocess DATASET once (the model's own open_clip eval geometry at its input size) into a
    content-keyed, memory-mapped uint8 cache; later commands with the same dataset options read it at memory
    speed. A killed run resumes at its first missing shard."""
    from clipguard.tasks.prepare import run_prepare

    emit(run_prepare(cfg, progress=not json_out), out=out, as_json=json_out, table=prepare_table, strict=strict)


def prepare_table(rec: dict):
    from rich.console import Group
    from rich.table import Table

    if rec["prepared"] is None:
        return rec["note"]
    p, d = rec["prepared"], rec["data"]
    t = Table(title=f"prepared {d['spec']} ({d['split']}, n={d['n']}) at {d['resolution'][0]}x{d['resolution'][1]}")
    for col in ("cache", "shards written", "MiB", "wall s", "decode img/s"):
        t.add_column(col, justify="right")
    t.add_row(p["path"], str(p["shards_written"]), f"{p['bytes'] / 2**20:,.1f}", f"{rec['timings']['wall_s']:.1f}",
              f"{rec['timings'].get('decode_img_s') or 0:,.0f}")
    return Group(t, f"use it as --dataset prepared:{p['path']} (or keep the same --dataset options: it is found)")
