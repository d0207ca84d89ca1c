"""``clipguard bench run``: a suite (TOML) of cells, one record per cell, skipped when already done.

A suite file::

    [suite]
    name = "toy"
    [defaults]            # applied to every cell (a cell's own keys win)
    model = "toy"
    dataset = "toy"
    [[cell]]
    id = "base"           # record goes to OUT/records/base.json
    kind = "eval"         # eval | uap | finetune (see CELL_KINDS)
    label = "toy CLIP"    # how the model appears in the report table
    attack = "pgd"
    eps = "0,4/255,8/255"

``adapter = "@cellid"`` points an eval at the adapter a finetune cell wrote. A cell whose record exists with
the same config hash (its options plus the hashes of the cells it depends on) is skipped, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from clipguard.bench_cells import eval_cell, finetune_cell, uap_cell
from clipguard.errors import ClipguardError
from clipguard.fsutil import read_toml
from clipguard.results import write_record

log = logging.getLogger(__name__)
META_KEYS = ("id", "kind", "label")


# Each kind: (options, out_dir, progress) -> record. bench_cells imports no torch at module level.
CELL_KINDS: dict[str, Callable[[dict, Path, bool], dict]] = {
    "eval": eval_cell, "uap": uap_cell, "finetune": finetune_cell,
}


def load_suite(path) -> tuple[dict, list[dict]]:
    """(suite table, cells with defaults merged); validates ids, kinds and @references."""
    p = Path(path)
    data = read_toml(p, "suite", " (see benchmarks/*.toml)")
    defaults, cells, seen = data.get("defaults", {}), [], set()
    for raw in data.get("cell", []):
        cell = {**defaults, **raw}
        cid, kind = cell.get("id"), cell.get("kind", "eval")
        if not cid or cid in seen:
            raise ClipguardError(f"suite {p.name}: every cell needs a unique id (got {cid!r})")
        if kind not in CELL_KINDS:
            raise ClipguardError(f"suite {p.name}: cell {cid!r} kind {kind!r} is unknown: {', '.join(CELL_KINDS)}")
        ref = str(cell.get("adapter") or "")
        if ref.startswith("@") and ref[1:] not in seen:
            raise ClipguardError(f"suite {p.name}: cell {cid!r} uses {ref} before that cell is defined")
        seen.add(cid)
        cells.append({**cell, "kind": kind})
    if not cells:
        raise ClipguardError(f"suite {str(p)!r} has no [[cell]] entries")
    return {"name": p.stem, **data.get("suite", {}), "path": str(p)}, cells


def config_hash(cell: dict, dep_hashes: dict[str, str]) -> str:
    opts = {k: v for k, v in cell.items() if k != "label"}
    ref = str(cell.get("adapter") or "")
    if ref.startswith("@"):
        opts["adapter_hash"] = dep_hashes[ref[1:]]
    return hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:16]


def record_path(out_dir: Path, cell_id: str) -> Path:
    return out_dir / "records" / f"{cell_id}.json"


def _done(path: Path, h: str) -> bool:
    try:
        return json.loads(path.read_text()).get("bench", {}).get("config_hash") == h
    except (OSError, json.JSONDecodeError):
        return False


def run_suite(path, out_dir, *, only: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Run every cell not already done; returns [{cell, kind, status, seconds, record}]."""
    from clipguard.progress import progress_bar

    suite, cells = load_suite(path)
    out_dir = Path(out_dir)
    hashes, summary = {}, []
    with progress_bar(len(cells), f"suite {suite['name']}", enabled=progress, unit="cell") as advance:
        for cell in cells:
            cid = cell["id"]
            hashes[cid] = h = config_hash(cell, hashes)
            rpath = record_path(out_dir, cid)
            if (only and cid not in only) or _done(rpath, h):
                status = "not selected" if only and cid not in only else "skipped"
                summary.append({"cell": cid, "kind": cell["kind"], "status": status, "seconds": 0.0,
                                "record": str(rpath)})
                advance(1, cell=cid)
                continue
            opts = {k: v for k, v in cell.items() if k not in META_KEYS}
            if str(opts.get("adapter") or "").startswith("@"):
                opts["adapter"] = str(out_dir / "adapters" / opts["adapter"][1:])
            t0 = time.perf_counter()
            rec = CELL_KINDS[cell["kind"]]({**opts, "_cell": cid}, out_dir, False)
            rec["bench"] = {"suite": suite["name"], "cell": cid, "label": cell.get("label"), "config_hash": h}
            write_record(rpath, rec)
            summary.append({"cell": cid, "kind": cell["kind"], "status": "ran",
                            "seconds": round(time.perf_counter() - t0, 2), "record": str(rpath)})
            advance(1, cell=cid)
    return summary
