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
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from clipguard.errors import ClipguardError
from clipguard.fsutil import read_toml
from clipguard.records.schema import write_record
from clipguard.registry import Registry
from clipguard.run_options import RUN_FIELDS, RunOptions

log = logging.getLogger(__name__)
META_KEYS = ("id", "kind", "label")
UAP_EVAL_PREFIX = "eval_"  # uap cells: eval_split, eval_limit, ... override the options of `uap eval`

# Each kind: (options, out_dir, progress) -> record. This module imports no torch at module level.
CELL_KINDS: Registry[Callable[[dict, Path, bool], dict]] = Registry("cell kind")
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
          "list[str]": (list,)}


def _field_types(cls) -> dict[str, str]:
    """The flat option names of a task config (its RunOptions fields inlined) and their declared types."""
    kinds = {f.name: str(f.type) for f in fields(RunOptions)}
    kinds.update({f.name: str(f.type) for f in fields(cls) if f.name != "run"})
    return kinds


def typed(factory, cls, opts: dict, cell: str):
    """``factory(**opts)`` after checking every option is a field of ``cls`` (or of its RunOptions) with a value of
    its declared type, so a slip in a suite file is a one-line error naming the cell, not a traceback in a run."""
    kinds = _field_types(cls)
    unknown = sorted(set(opts) - set(kinds))
    if unknown:
        raise ClipguardError(f"suite cell {cell!r}: option(s) {', '.join(unknown)} unknown here")
    for key, value in opts.items():
        allowed = tuple(t for part in kinds[key].split("|") for t in _TYPES.get(part.strip(), (object,)))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ClipguardError(f"suite cell {cell!r}: {key} = {value!r} should be {kinds[key]}")
    return factory(**opts)


@CELL_KINDS.register("eval")
def eval_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.tasks.eval import EvalConfig, eval_config, run_eval

    cfg = typed(eval_config, EvalConfig, {k: v for k, v in opts.items() if not k.startswith("_")}, opts["_cell"])
    return run_eval(cfg, progress=progress)


@CELL_KINDS.register("uap")
def uap_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    """Fit on the cell's split (default train), then evaluate on ``eval_split`` (default test) with every other
    model and data option of the cell (columns, limit, prompts, adapter...); ``eval_<option>`` overrides one."""
    from clipguard.tasks.uap import (
        UAPEvalConfig,
        UAPFitConfig,
        run_uap_eval,
        run_uap_fit,
        uap_eval_config,
        uap_fit_config,
    )

    cid = opts["_cell"]
    own = {k: v for k, v in opts.items() if not k.startswith("_")}
    evals = {k[len(UAP_EVAL_PREFIX):]: v for k, v in own.items() if k.startswith(UAP_EVAL_PREFIX)}
    fit_opts = {k: v for k, v in own.items() if not k.startswith(UAP_EVAL_PREFIX)}
    path = out_dir / "uaps" / f"{cid}.safetensors"
    fit = run_uap_fit(typed(uap_fit_config, UAPFitConfig, {**fit_opts, "uap": str(path)}, cid), progress=progress)
    shared = {k: v for k, v in fit_opts.items() if k in RUN_FIELDS and k != "split"}
    ev_opts = {**shared, "split": "test", **evals, "uap": str(path), "png": str(out_dir / "uap_png" / cid)}
    ev = run_uap_eval(typed(uap_eval_config, UAPEvalConfig, ev_opts, cid), progress=progress)
    ev["uap_fit"] = {"metrics": fit["metrics"], "timings": fit["timings"]}
    return ev


@CELL_KINDS.register("finetune")
def finetune_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    from clipguard.finetune.config import FinetuneConfig, config_hash, finetune_config
    from clipguard.tasks.finetune import run_finetune

    cid = opts["_cell"]
    out = out_dir / "adapters" / cid
    cfg = typed(finetune_config, FinetuneConfig, {**{k: v for k, v in opts.items() if not k.startswith("_")},
                                                  "run_dir": str(out)}, cid)
    summary = out / "checkpoint.json"
    if summary.exists():
        try:
            same = json.loads(summary.read_text()).get("config_hash") == config_hash(cfg)
        except (OSError, json.JSONDecodeError):
            same = False
        if same:  # an interrupted cell continues where its last checkpoint left it
            cfg.resume = str(out)
        else:  # the cell's options changed: keep the old run beside, never delete work
            out.rename(out.with_name(f"{cid}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    return run_finetune(cfg, progress=progress)


@CELL_KINDS.register("certify")
def certify_cell(opts: dict, out_dir: Path, progress: bool) -> dict:
    """Randomized-smoothing certification (``clipguard certify``); ``adapter = "@cellid"`` certifies a finetune cell's
    adapter (e.g. one trained with ``objective = "noise"``)."""
    from clipguard.tasks.certify import CertifyConfig, certify_config, run_certify

    cfg = typed(certify_config, CertifyConfig, {k: v for k, v in opts.items() if not k.startswith("_")}, opts["_cell"])
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
            rec = CELL_KINDS.get(cell["kind"])({**opts, "_cell": cid}, out_dir, False)
            rec["bench"] = {"suite": suite["name"], "cell": cid, "label": cell.get("label"), "config_hash": h}
            write_record(rpath, rec)
            summary.append({"cell": cid, "kind": cell["kind"], "status": "ran",
                            "seconds": round(time.perf_counter() - t0, 2), "record": str(rpath)})
            advance(1, cell=cid)
    return summary
