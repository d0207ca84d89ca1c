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
record holds the final clean + robust numbers). ``adapter = "@cellid"`` (and ``base_adapter = "@cellid"``, the
image-tower adapter under a prompt adapter) points a cell at the adapter a finetune cell wrote. ``dataset = [...]``
makes one cell per dataset (id ``<id>-<dataset>``), and ``[dataset_options.<dataset>]`` tables add options to every
cell of that dataset (a cell's own keys win). A cell whose record exists with
the same config hash (its options plus the hashes of the cells it depends on) is skipped, so an
interrupted run resumes where it stopped. Every cell's configs are built (its options checked) before any cell runs.

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
from dataclasses import dataclass, replace
from pathlib import Path

from clipguard.config import from_options, option_fields
from clipguard.errors import ClipguardError
from clipguard.finetune.config import FinetuneConfig
from clipguard.finetune.config import config_hash as training_hash
from clipguard.fsutil import read_toml
from clipguard.progress import progress_bar
from clipguard.records.schema import write_record
from clipguard.registry import Registry, suggest
from clipguard.run_options import RunOptions
from clipguard.tasks.cells import (
    CellsFailed,
    CellTask,
    cell_references,
    dependency_waves,
    done,
    record_path,
    summary_row,
)
from clipguard.tasks.configs import CertifyConfig, EvalConfig, UAPEvalConfig, UAPFitConfig
from clipguard.tasks.executors import EXECUTORS

log = logging.getLogger(__name__)
META_KEYS = ("id", "kind", "label")
UAP_EVAL_PREFIX = "eval_"  # uap cells: eval_split, eval_limit, ... override the options of `uap eval`


@dataclass(frozen=True)
class CellKind:
    """One kind of suite cell. ``configs`` builds the cell's typed configs from its options (building one parses and
    checks every option and probes its outputs, all under OUT); ``run`` runs them and returns the record.
    :func:`run_suite` builds every cell's configs before any cell runs, and a worker builds them again from the
    same options (:func:`run_cell`), so what was checked is what runs. This module imports no torch at module
    level."""

    configs: Callable[[dict, Path], dict]  # (options with "_cell", OUT) -> {name: Config}
    run: Callable[[dict, Path, bool], dict]  # (those configs, OUT, progress) -> record

    def __call__(self, opts: dict, out_dir: Path, progress: bool) -> dict:
        return self.run(self.configs(opts, out_dir), out_dir, progress)


CELL_KINDS: Registry[CellKind] = Registry("cell kind")


def typed(cls, opts: dict, cell: str):
    """A ``cls`` config from a cell's options: any error in them (an unknown option, a wrong type, a bad value, a
    bad combination) is one line naming the cell (the fields' declarations say what is allowed:
    :func:`clipguard.config.from_options`)."""
    where = f"suite cell {cell!r}"
    try:
        return from_options(cls, opts, where=where)
    except ClipguardError as e:  # a field's parser or the config's check(): they name the option, not the cell
        if str(e).startswith(where):
            raise
        raise ClipguardError(f"{where}: {e}") from None


def _own(opts: dict) -> dict:
    """The cell's options, less the runner's own keys (``_cell``)."""
    return {k: v for k, v in opts.items() if not k.startswith("_")}


def _eval_configs(opts: dict, out_dir: Path) -> dict:
    return {"eval": typed(EvalConfig, _own(opts), opts["_cell"])}


def _eval_run(cfgs: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.tasks.eval import run_eval  # the task modules import torch; the suite driver and its checks don't

    return run_eval(cfgs["eval"], progress=progress)


def _uap_configs(opts: dict, out_dir: Path) -> dict:
    """Fit on the cell's split (default train), then evaluate on ``eval_split`` (default test) with every other
    model and data option of the cell (columns, limit, prompts, adapter...); ``eval_<option>`` overrides one."""
    cid, own = opts["_cell"], _own(opts)
    evals = {k[len(UAP_EVAL_PREFIX):]: v for k, v in own.items() if k.startswith(UAP_EVAL_PREFIX)}
    fit_opts = {k: v for k, v in own.items() if not k.startswith(UAP_EVAL_PREFIX)}
    path = out_dir / "uaps" / f"{cid}.safetensors"  # fit writes it, eval reads it (need not exist yet)
    run_fields = {f.name for f in option_fields(RunOptions)}
    shared = {k: v for k, v in fit_opts.items() if k in run_fields and k != "split"}
    ev_opts = {**shared, "split": "test", **evals, "uap": str(path), "png": str(out_dir / "uap_png" / cid)}
    return {"fit": typed(UAPFitConfig, {**fit_opts, "uap": str(path)}, cid), "eval": typed(UAPEvalConfig, ev_opts, cid)}


def _uap_run(cfgs: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.tasks.uap import run_uap_eval, run_uap_fit  # torch: see _eval_run

    fit = run_uap_fit(cfgs["fit"], progress=progress)
    ev = run_uap_eval(cfgs["eval"], progress=progress)
    ev["uap_fit"] = {"metrics": fit["metrics"], "timings": fit["timings"]}
    return ev


def _finetune_configs(opts: dict, out_dir: Path) -> dict:
    cid = opts["_cell"]
    return {"train": typed(FinetuneConfig, {**_own(opts), "run_dir": str(out_dir / "adapters" / cid)}, cid)}


def _finetune_run(cfgs: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.tasks.finetune import run_finetune  # torch: see _eval_run

    cfg = cfgs["train"]
    out = Path(cfg.run_dir)
    summary = out / "checkpoint.json"
    if summary.exists():
        try:
            same = json.loads(summary.read_text()).get("config_hash") == training_hash(cfg)
        except (OSError, json.JSONDecodeError):
            same = False
        if same:  # an interrupted cell continues where its last checkpoint left it
            cfg = replace(cfg, resume=str(out))
        else:  # the cell's options changed: keep the old run beside, never delete work
            out.rename(out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    return run_finetune(cfg, progress=progress)


def _certify_configs(opts: dict, out_dir: Path) -> dict:
    """Randomized-smoothing certification (``clipguard certify``); ``adapter = "@cellid"`` certifies a finetune cell's
    adapter (e.g. one trained with ``objective = "noise"``)."""
    return {"certify": typed(CertifyConfig, _own(opts), opts["_cell"])}


def _certify_run(cfgs: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.tasks.certify import run_certify  # torch: see _eval_run

    return run_certify(cfgs["certify"], progress=progress)


CELL_KINDS.register("eval", CellKind(_eval_configs, _eval_run))
CELL_KINDS.register("uap", CellKind(_uap_configs, _uap_run))
CELL_KINDS.register("finetune", CellKind(_finetune_configs, _finetune_run))
CELL_KINDS.register("certify", CellKind(_certify_configs, _certify_run))


def load_suite(path) -> tuple[dict, list[dict]]:
    """(suite table, cells with defaults merged); validates ids, kinds and @references."""
    p = Path(path)
    data = read_toml(p, "suite", " (see benchmarks/*.toml)")
    defaults, cells, seen = data.get("defaults", {}), [], set()
    per_dataset = data.get("dataset_options", {})
    if not isinstance(per_dataset, dict) or not all(isinstance(v, dict) for v in per_dataset.values()):
        raise ClipguardError(f"suite {p.name}: [dataset_options.<dataset>] must be tables of options")
    for cell in (c for raw in data.get("cell", []) for c in _expand(raw, defaults, per_dataset, p.name)):
        cid, kind = cell.get("id"), cell.get("kind", "eval")
        if not cid or cid in seen:
            raise ClipguardError(f"suite {p.name}: every cell needs a unique id (got {cid!r})")
        CELL_KINDS.check(kind, f"suite {p.name}: cell {cid!r} kind")
        for key, ref in cell_references(cell).items():
            if ref not in seen:
                raise ClipguardError(f"suite {p.name}: cell {cid!r} uses {key} = \"@{ref}\" before that cell is "
                                     "defined")
        seen.add(cid)
        cells.append({**cell, "kind": kind})
    if not cells:
        raise ClipguardError(f"suite {str(p)!r} has no [[cell]] entries")
    return {"name": p.stem, **data.get("suite", {}), "path": str(p)}, cells


def _expand(raw: dict, defaults: dict, per_dataset: dict, suite: str) -> list[dict]:
    """One ``[[cell]]`` table as cells: ``dataset = ["a", "b"]`` (a list) makes one cell per dataset, with id
    ``<id>-<dataset>``; each cell gets ``[dataset_options.<its dataset>]`` between the defaults and its own keys."""
    datasets = raw.get("dataset", defaults.get("dataset"))
    if not isinstance(datasets, list):
        return [{**defaults, **per_dataset.get(datasets, {}), **raw}]
    if not datasets or not all(isinstance(d, str) for d in datasets):
        raise ClipguardError(f"suite {suite}: cell {raw.get('id')!r}: dataset = [...] must list dataset names")
    return [{**defaults, **per_dataset.get(d, {}), **raw, "dataset": d, "id": f"{raw.get('id')}-{d}"}
            for d in datasets]


def config_hash(cell: dict, dep_hashes: dict[str, str]) -> str:
    opts = {k: v for k, v in cell.items() if k != "label"}
    for key, ref in cell_references(cell).items():  # "adapter_hash" for adapter, as before; base_adapter_hash
        opts[f"{key}_hash"] = dep_hashes[ref]
    return hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:16]


def cell_options(task: CellTask) -> dict:
    """What a cell's kind receives: the cell's options less id, kind and label, each ``"@cell"`` reference
    (``adapter``, ``base_adapter``) resolved to the folder that finetune cell writes (OUT/adapters/<cell>: it need
    not exist yet), and ``_cell`` (the id)."""
    opts = {k: v for k, v in task.cell.items() if k not in META_KEYS}
    for key, ref in task.references.items():
        opts[key] = str(Path(task.out_dir) / "adapters" / ref)
    return {**opts, "_cell": task.id}


def check_cells(tasks: list[CellTask]) -> None:
    """Build every cell's configs before any cell runs (each option parsed and checked, each output probed under
    OUT): a typo in the last cell is a one-line error naming it, not a failure after the first cells' hours."""
    for t in tasks:
        CELL_KINDS.get(t.cell["kind"]).configs(cell_options(t), Path(t.out_dir))


def check_only(only: list[str] | None, cells: list[dict], suite: str) -> None:
    """``--only`` must name cells of the suite: an unknown id is one line naming it and the known ones."""
    ids = [c["id"] for c in cells]
    unknown = [c for c in only or [] if c not in ids]
    if unknown:
        close = [m for c in unknown for m in suggest(c, ids).split(", ") if m]
        hint = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
        raise ClipguardError(f"--only {', '.join(unknown)}: no such cell in suite {suite}{hint}; its cells: "
                             f"{', '.join(ids)}")


def run_cell(task: CellTask) -> dict:
    """Run one cell and write its record atomically to OUT/records/<cell>.json; returns its summary row.

    A cell whose record is already done is skipped (a requeued array task, a second driver), so running a task
    twice costs nothing. A cell killed mid-run left no record and runs again (finetune cells from their last
    checkpoint).
    """
    rpath = record_path(Path(task.out_dir), task.id)
    if done(rpath, task.config_hash):
        return summary_row(task, "skipped")
    if task.threads:
        import torch  # on the worker, about to run the cell: the driver never gets here

        torch.set_num_threads(task.threads)
    t0 = time.perf_counter()
    rec = CELL_KINDS.get(task.cell["kind"])(cell_options(task), Path(task.out_dir), False)
    rec["bench"] = {"suite": task.suite, "cell": task.id, "label": task.cell.get("label"),
                    "config_hash": task.config_hash, "executor": task.executor}
    write_record(rpath, rec)
    return summary_row(task, "ran", round(time.perf_counter() - t0, 2))


def run_suite(path, out_dir, *, only: list[str] | None = None, progress: bool = True,
              executor: str = "local", options=None) -> list[dict]:
    """Run every cell not already done; returns [{cell, kind, status, seconds, record, executor}].

    Every cell's options are checked (:func:`check_cells`) before any cell runs.

    Args:
        path: the suite TOML.
        out_dir: OUT; records go to OUT/records/<cell>.json.
        only: run only these cell ids (the others are "not selected"); an id not in the suite is refused.
        progress: a Rich progress bar on stderr of the cells that run, in seconds per cell.
        executor: ``local`` (this process, file order), ``ray`` or ``slurm`` (one task per cell, in dependency
            waves; see ``tasks.executors``).
        options: ``executors.RayOptions`` / ``executors.SlurmOptions`` (None = their defaults).

    Raises:
        ClipguardError: a cell's options, or ``only``, are wrong (before any cell runs).
        CellsFailed: a ray or slurm cell failed (the local executor raises the cell's own error, at once).
    """
    make = EXECUTORS.get(executor, "--executor")
    suite, cells = load_suite(path)
    check_only(only, cells, Path(path).name)
    out_dir = Path(out_dir) if executor == "local" else Path(out_dir).resolve()  # workers may start elsewhere
    hashes, tasks = {}, []
    for cell in cells:  # the hash chain: a cell's hash covers the hashes of the cells it depends on
        hashes[cell["id"]] = h = config_hash(cell, hashes)
        tasks.append(CellTask(suite["name"], cell, h, str(out_dir), executor))
    check_cells(tasks)  # every cell, selected or not, done or not: the suite file is checked as a whole
    rows, todo = {}, []
    for task in tasks:
        if only and task.id not in only:
            rows[task.id] = summary_row(task, "not selected")
        elif done(record_path(out_dir, task.id), task.config_hash):
            rows[task.id] = summary_row(task, "skipped")
        else:
            todo.append(task)
    # The bar counts only the cells that run (skipped ones take no time), in seconds per cell: cells are few and
    # slow, and a wave's cells finish together, so a windowed cells/s reads 0.0, then thousands.
    title = f"suite {suite['name']} ({executor}): {len(todo)} of {len(cells)} cells to run"
    with progress_bar(len(todo), title, enabled=progress and bool(todo), unit="cell", per_item=True) as advance:

        def finished(row: dict) -> None:
            rows[row["cell"]] = row
            advance(1, cell=row["cell"])

        if todo:
            with make(options, run=run_cell, out_dir=out_dir, suite=suite["name"], quiet=not progress) as ex:
                waves = [todo] if ex.in_order else dependency_waves(todo)
                for wave in waves:
                    blocked = {t.id: bad for t in wave if (bad := [d for d in t.dependencies if rows.get(d, {}).get(
                        "status") in ("failed", "blocked")])}
                    for t in (t for t in wave if t.id in blocked):
                        finished(summary_row(t, "blocked", error=f"needs @{', @'.join(blocked[t.id])}, which did "
                                                                 "not finish"))
                    ex.run_wave([replace(t, threads=ex.threads) for t in wave if t.id not in blocked], finished)
    summary = [rows[c["id"]] for c in cells]
    if any(s["status"] == "failed" for s in summary):
        raise CellsFailed(summary)
    return summary
