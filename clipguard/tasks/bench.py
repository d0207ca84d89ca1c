"""``clipguard bench run``: a suite (TOML) of cells, one record per cell, skipped when already done.

A suite file::

    [suite]
    name = "toy"
    [defaults]            # applied to every cell (a cell's own keys win)
    model = "toy"
    dataset = "toy"
    [[cell]]
    id = "base"           # record goes to OUT/records/base.json
    kind = "eval"         # eval | uap | finetune | certify (see CELL_KINDS)
    label = "toy CLIP"    # how the model appears in the report table
    attack = "pgd"
    eps = "0,4/255,8/255"

Cell kinds (the registry ``CELL_KINDS``): ``eval`` (one `clipguard eval`), ``uap`` (fit on the cell's split,
default train, then evaluate on ``eval_split``, default test: the evaluation keeps every model and data option
of the cell, ``eval_*`` keys override it) and ``finetune`` (train an adapter into OUT/adapters/<cell>, whose
record holds the final clean + robust numbers). ``adapter = "@cellid"`` points an eval at the adapter a
finetune cell wrote. A cell whose record exists with
the same config hash (its options plus the hashes of the cells it depends on) is skipped, so an
interrupted run resumes where it stopped.

Executors (``tasks.executors``): ``local`` runs the cells in this process in file order; ``ray`` and ``slurm``
ship each cell as one task (a :class:`CellTask` run by :func:`run_cell` on a worker) in dependency waves: every
cell whose ``@`` dependency is done or absent first, in parallel, then the cells that need them. The records are
the same whoever ran them; ``bench.executor`` says which did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from clipguard.config import from_options, option_fields
from clipguard.errors import ClipguardError
from clipguard.fsutil import read_toml
from clipguard.records.schema import write_record
from clipguard.registry import Registry
from clipguard.run_options import RunOptions
from clipguard.tasks.cells import CellsFailed, CellTask, dependency_waves, done, record_path, summary_row

log = logging.getLogger(__name__)
META_KEYS = ("id", "kind", "label")
UAP_EVAL_PREFIX = "eval_"  # uap cells: eval_split, eval_limit, ... override the options of `uap eval`

# Each kind: (options, out_dir, progress) -> record. This module imports no torch at module level.
CELL_KINDS: Registry[Callable[[dict, Path, bool], dict]] = Registry("cell kind")


def typed(cls, opts: dict, cell: str):
    """A ``cls`` config from a cell's options: an unknown option or a value of the wrong type is a one-line error
    naming the cell (the fields' own declarations say what is allowed: :func:`clipguard.config.from_options`)."""
    return from_options(cls, opts, where=f"suite cell {cell!r}")


@CELL_KINDS.register("eval")
def eval_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.tasks.eval import EvalConfig, run_eval

    cfg = typed(EvalConfig, {k: v for k, v in opts.items() if not k.startswith("_")}, opts["_cell"])
    return run_eval(cfg, progress=progress)


@CELL_KINDS.register("uap")
def uap_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    """Fit on the cell's split (default train), then evaluate on ``eval_split`` (default test) with every other
    model and data option of the cell (columns, limit, prompts, adapter...); ``eval_<option>`` overrides one."""
    from clipguard.tasks.uap import UAPEvalConfig, UAPFitConfig, run_uap_eval, run_uap_fit

    cid = opts["_cell"]
    own = {k: v for k, v in opts.items() if not k.startswith("_")}
    evals = {k[len(UAP_EVAL_PREFIX):]: v for k, v in own.items() if k.startswith(UAP_EVAL_PREFIX)}
    fit_opts = {k: v for k, v in own.items() if not k.startswith(UAP_EVAL_PREFIX)}
    path = out_dir / "uaps" / f"{cid}.safetensors"
    fit = run_uap_fit(typed(UAPFitConfig, {**fit_opts, "uap": str(path)}, cid), progress=progress)
    run_fields = {f.name for f in option_fields(RunOptions)}
    shared = {k: v for k, v in fit_opts.items() if k in run_fields and k != "split"}
    ev_opts = {**shared, "split": "test", **evals, "uap": str(path), "png": str(out_dir / "uap_png" / cid)}
    ev = run_uap_eval(typed(UAPEvalConfig, ev_opts, cid), progress=progress)
    ev["uap_fit"] = {"metrics": fit["metrics"], "timings": fit["timings"]}
    return ev


@CELL_KINDS.register("finetune")
def finetune_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.finetune.config import FinetuneConfig, config_hash
    from clipguard.tasks.finetune import run_finetune

    cid = opts["_cell"]
    out = out_dir / "adapters" / cid
    cfg = typed(FinetuneConfig, {**{k: v for k, v in opts.items() if not k.startswith("_")}, "run_dir": str(out)},
                cid)
    summary = out / "checkpoint.json"
    if summary.exists():
        try:
            same = json.loads(summary.read_text()).get("config_hash") == config_hash(cfg)
        except (OSError, json.JSONDecodeError):
            same = False
        if same:  # an interrupted cell continues where its last checkpoint left it
            cfg = replace(cfg, resume=str(out))
        else:  # the cell's options changed: keep the old run beside, never delete work
            out.rename(out.with_name(f"{cid}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    return run_finetune(cfg, progress=progress)


@CELL_KINDS.register("certify")
def certify_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    """Randomized-smoothing certification (``clipguard certify``); ``adapter = "@cellid"`` certifies a finetune cell's
    adapter (e.g. one trained with ``objective = "noise"``)."""
    from clipguard.tasks.certify import CertifyConfig, run_certify

    cfg = typed(CertifyConfig, {k: v for k, v in opts.items() if not k.startswith("_")}, opts["_cell"])
    return run_certify(cfg, progress=progress)


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
        CELL_KINDS.check(kind, f"suite {p.name}: cell {cid!r} kind")
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


def run_cell(task: CellTask) -> dict:
    """Run one cell and write its record atomically to OUT/records/<cell>.json; returns its summary row.

    A cell whose record is already done is skipped (a requeued array task, a second driver), so running a task
    twice costs nothing. A cell killed mid-run left no record and runs again (finetune cells from their last
    checkpoint).
    """
    out_dir = Path(task.out_dir)
    rpath = record_path(out_dir, task.id)
    if done(rpath, task.config_hash):
        return summary_row(task, "skipped")
    if task.threads:
        import torch

        torch.set_num_threads(task.threads)
    opts = {k: v for k, v in task.cell.items() if k not in META_KEYS}
    if task.dependency:
        opts["adapter"] = str(out_dir / "adapters" / task.dependency)
    t0 = time.perf_counter()
    rec = CELL_KINDS.get(task.cell["kind"])({**opts, "_cell": task.id}, out_dir, False)
    rec["bench"] = {"suite": task.suite, "cell": task.id, "label": task.cell.get("label"),
                    "config_hash": task.config_hash, "executor": task.executor}
    write_record(rpath, rec)
    return summary_row(task, "ran", round(time.perf_counter() - t0, 2))


def run_suite(path, out_dir, *, only: list[str] | None = None, progress: bool = True,
              executor: str = "local", options=None) -> list[dict]:
    """Run every cell not already done; returns [{cell, kind, status, seconds, record, executor}].

    Args:
        path: the suite TOML.
        out_dir: OUT; records go to OUT/records/<cell>.json.
        only: run only these cell ids (the others are "not selected").
        progress: a Rich progress bar of cells on stderr.
        executor: ``local`` (this process, file order), ``ray`` or ``slurm`` (one task per cell, in dependency
            waves; see ``tasks.executors``).
        options: ``executors.RayOptions`` / ``executors.SlurmOptions`` (None = their defaults).

    Raises:
        CellsFailed: a ray or slurm cell failed (the local executor raises the cell's own error, at once).
    """
    from clipguard.progress import progress_bar
    from clipguard.tasks.executors import EXECUTORS

    make = EXECUTORS.get(executor, "--executor")
    suite, cells = load_suite(path)
    out_dir = Path(out_dir) if executor == "local" else Path(out_dir).resolve()  # workers may start elsewhere
    hashes, rows, todo = {}, {}, []
    for cell in cells:  # the hash chain: a cell's hash covers the hashes of the cells it depends on
        hashes[cell["id"]] = h = config_hash(cell, hashes)
        task = CellTask(suite["name"], cell, h, str(out_dir), executor)
        if only and cell["id"] not in only:
            rows[task.id] = summary_row(task, "not selected")
        elif done(record_path(out_dir, task.id), h):
            rows[task.id] = summary_row(task, "skipped")
        else:
            todo.append(task)
    with progress_bar(len(cells), f"suite {suite['name']} ({executor})", enabled=progress, unit="cell") as advance:
        advance(len(rows))

        def finished(row: dict) -> None:
            rows[row["cell"]] = row
            advance(1, cell=row["cell"])

        if todo:
            with make(options, run=run_cell, out_dir=out_dir, suite=suite["name"], quiet=not progress) as ex:
                waves = [todo] if ex.in_order else dependency_waves(todo)
                for wave in waves:
                    blocked = [t for t in wave if rows.get(t.dependency, {}).get("status") in ("failed", "blocked")]
                    for t in blocked:
                        finished(summary_row(t, "blocked", error=f"needs @{t.dependency}, which did not finish"))
                    ex.run_wave([replace(t, threads=ex.threads) for t in wave if t not in blocked], finished)
    summary = [rows[c["id"]] for c in cells]
    if any(s["status"] == "failed" for s in summary):
        raise CellsFailed(summary)
    return summary
