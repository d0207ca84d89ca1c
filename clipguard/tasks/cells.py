"""A suite's unit of work, shared by the suite runner (``tasks.bench``) and the executors (``tasks.executors``):
the picklable :class:`CellTask`, where its record goes, the summary row an executor reports, the dependency waves
and the error for cells that failed on a worker.

It sits below both, so the executors never import the runner that picks them: ``bench.run_suite`` hands an executor
the function a worker runs (``bench.run_cell``, which knows the cell kinds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clipguard.errors import ClipguardError


@dataclass(frozen=True)
class CellTask:
    """One suite cell as a unit of work an executor ships to a worker: plain values only, so it pickles."""

    suite: str  # the suite's name, for the record's bench section
    cell: dict  # the cell table, defaults merged (id, kind, label and its options)
    config_hash: str  # its options plus the hashes of the cells it depends on (config_hash)
    out_dir: str  # OUT: records/, adapters/, uaps/ (absolute when a worker may start elsewhere)
    executor: str  # local | ray | slurm, written to the record as bench.executor
    threads: int | None = None  # torch CPU threads on the worker (its share of cores); None = leave as is

    @property
    def id(self) -> str:
        return self.cell["id"]

    @property
    def references(self) -> dict[str, str]:
        """{option: finetune cell id} for each adapter option naming a cell (``adapter = "@cellid"``,
        ``base_adapter = "@cellid"``): the cells whose adapters this one needs."""
        return cell_references(self.cell)

    @property
    def dependencies(self) -> list[str]:
        return list(dict.fromkeys(self.references.values()))


REFERENCE_KEYS = ("adapter", "base_adapter")  # the options that may name a finetune cell's adapter as "@cellid"


def cell_references(cell: dict) -> dict[str, str]:
    """{option: cell id} for the cell's ``@`` references (see :data:`REFERENCE_KEYS`)."""
    refs = {k: str(cell.get(k) or "") for k in REFERENCE_KEYS}
    return {k: v[1:] for k, v in refs.items() if v.startswith("@")}


def record_path(out_dir: Path, cell_id: str) -> Path:
    return out_dir / "records" / f"{cell_id}.json"


def done(path: Path, h: str) -> bool:
    """Whether the record at ``path`` was written by a cell with config hash ``h``."""
    try:
        return json.loads(path.read_text()).get("bench", {}).get("config_hash") == h
    except (OSError, json.JSONDecodeError):
        return False


def summary_row(task: CellTask, status: str, seconds: float = 0.0, **extra) -> dict:
    """One row of run_suite's summary."""
    return {"cell": task.id, "kind": task.cell["kind"], "status": status, "seconds": seconds,
            "record": str(record_path(Path(task.out_dir), task.id)), "executor": task.executor, **extra}


def dependency_waves(tasks: list[CellTask]) -> list[list[CellTask]]:
    """Cells to run, grouped so each cell comes one wave after the cell it depends on (when that one runs too):
    wave 0 = every cell whose dependency is done or absent, then the cells that need wave 0's adapters, ..."""
    depth: dict[str, int] = {}
    for t in tasks:  # load_suite refuses forward references, so a dependency's depth is known already
        depth[t.id] = max((depth[d] + 1 for d in t.dependencies if d in depth), default=0)
    waves: list[list[CellTask]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for t in tasks:
        waves[depth[t.id]].append(t)
    return waves


class CellsFailed(ClipguardError):
    """Cells that failed on a ray or slurm worker (their dependents did not run); ``summary`` has every row."""

    def __init__(self, summary: list[dict]):
        self.summary = summary
        bad = [s for s in summary if s["status"] == "failed"]
        first = bad[0]
        super().__init__(f"suite: {len(bad)} cell(s) failed ({', '.join(s['cell'] for s in bad)}); {first['cell']}: "
                         f"{first['error']} (full error: {first['log']}); rerun to retry, finished cells are kept")
