"""``clipguard compare`` as a library function: runs on the same images, paired image by image.

Each source is a record (its ``--predictions`` file is read), a folder of records (a suite's run folder), or a
predictions file. Per dataset and per metric both runs measured (clean acc1, robust accuracy at each eps): A, B,
B - A with its paired-bootstrap interval, the exact McNemar p-value, and Holm's adjustment across every comparison
of the call; ``significant`` is Holm's p < ``level``. Two runs: B against A. More (a suite): every run against the
one named ``--baseline``, per dataset.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from clipguard.errors import ClipguardError
from clipguard.records.paired import (
    TEST,
    compare_metric,
    correctness,
    pair,
    predictions_path,
    read_predictions,
    shared_metrics,
)
from clipguard.records.rows import failed_checks, label, load_records
from clipguard.records.schema import SCHEMA
from clipguard.records.stats import DIFFERENCE_METHOD, holm
from clipguard.tasks.configs import CompareConfig, compare_config

__all__ = ["COMPARE_SCHEMA", "CompareConfig", "compare_config", "run_compare"]

COMPARE_SCHEMA = "clipguard.compare/1"
PREDICTION_SUFFIXES = (".csv", ".parquet")


@dataclass
class Run:
    """One run's per-image predictions and what it is: a model label, a dataset, the attack, where it came from."""

    label: str
    dataset: str | None
    attack: str | None
    source: str
    table: dict
    failed: tuple[str, ...] = ()  # the record's failed integrity checks (``name@eps``)


def load_runs(source: str) -> list[Run]:
    """The runs a source names: a record, a folder of records (those with predictions), or a predictions file."""
    path = Path(source)
    if not path.exists():
        raise ClipguardError(f"compare: {source!r} does not exist: give records, run folders or predictions files")
    if path.is_file() and path.suffix in PREDICTION_SUFFIXES:
        return [Run(path.stem, None, None, str(path), read_predictions(path))]
    if path.is_file():
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            rec = None
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            raise ClipguardError(f"compare: {source!r} is not a clipguard record, run folder or predictions file "
                                 "(.csv, .parquet)")
        recs = [{**rec, "_path": str(path)}]
    else:
        recs = load_records(path)
    runs = [_run(rec) for rec in recs if predictions_path(rec) is not None]
    if not runs:
        raise ClipguardError(f"compare: no record in {source!r} has per-image predictions: run eval with "
                             "--predictions FILE (pairing needs them)")
    return runs


def _run(rec: dict) -> Run:
    attack = (rec.get("attack") or {}).get("name") if isinstance(rec.get("attack"), dict) else None
    table = read_predictions(predictions_path(rec))
    check_reproduces(rec, table)
    return Run(label(rec), rec.get("dataset"), attack, rec["_path"], table, tuple(failed_checks(rec)))


def check_reproduces(rec: dict, table: dict) -> None:
    """The predictions must give the record's own counts (clean acc1, robust_acc at each eps): a file from another
    run, or one whose per-image verdicts disagree with the record's accounting, would make every p-value wrong.

    Raises:
        ClipguardError: a count differs (one line naming the record, the metric and both numbers).
    """
    metrics = rec.get("metrics") or {}
    want = {"acc1": (metrics.get("counts") or {}).get("acc1")}
    for entry in metrics.get("robust") or []:
        if isinstance(entry, dict) and entry.get("eps") is not None:
            want[f"robust_acc@{entry['eps']}"] = (entry.get("counts") or {}).get("robust_acc")
    for name, flags in correctness(table).items():
        counts = want.get(name)
        if not counts:
            continue
        k = int(flags.sum())
        if (k, len(flags)) != (counts["k"], counts["n"]):
            raise ClipguardError(f"compare: the predictions of {rec['_path']!r} give {name} {k}/{len(flags)}, the "
                                 f"record says {counts['k']}/{counts['n']}: the file is another run's, or older than "
                                 "its robust@EPS column: write both again with --predictions")


def pairs(runs: list[Run], baseline: str | None) -> list[tuple[Run, Run]]:
    """(A, B) to compare: with ``baseline``, every other run against the baseline run of its dataset; else the
    two runs (B against A), or per dataset the two runs of that dataset."""
    if baseline is not None:
        base = {r.dataset: r for r in runs if r.label == baseline}
        if not base:
            raise ClipguardError(f"--baseline {baseline!r} names no run; the runs are "
                                 f"{', '.join(sorted({r.label for r in runs}))}")
        return [(base[r.dataset], r) for r in runs if r.label != baseline and r.dataset in base]
    if len(runs) == 2:
        return [(runs[0], runs[1])]
    by_dataset: dict = {}
    for r in runs:
        by_dataset.setdefault(r.dataset, []).append(r)
    if len(runs) < 2 or any(len(v) != 2 for v in by_dataset.values()):
        raise ClipguardError(f"compare: {len(runs)} runs ({', '.join(r.label for r in runs)}): name the one the "
                             "others are compared against with --baseline NAME")
    return [(v[0], v[1]) for v in by_dataset.values()]


def run_compare(cfg: CompareConfig, *, progress: bool = False) -> dict:
    """Compare the runs of ``cfg.sources``; returns a ``clipguard.compare/1`` dict (a table, ``--json``, ``--out``).

    Raises:
        ClipguardError: a source without predictions, runs of different images, or more than two runs without
            ``--baseline``.
    """
    runs = [r for s in cfg.sources for r in load_runs(s)]
    confidence = 1 - cfg.level
    rows, alone = [], []
    for a, b in pairs(runs, cfg.baseline):
        ia, ib = pair(a.table, b.table, f"{a.label} ({a.source})", f"{b.label} ({b.source})")
        ca, cb = correctness(a.table), correctness(b.table)
        both, only = shared_metrics(ca, cb)
        alone += [{"a": a.label, "b": b.label, "dataset": a.dataset or b.dataset, "metric": m} for m in only]
        for ma, mb in both:
            cmp = compare_metric(ca[ma][ia], cb[mb][ib], confidence=confidence, seed=cfg.seed,
                                 n_resamples=cfg.n_resamples)
            rows.append({"dataset": a.dataset or b.dataset, "metric": ma, "a_label": a.label, "b_label": b.label,
                         "a_attack": a.attack, "b_attack": b.attack, "a_source": a.source, "b_source": b.source,
                         **cmp})
    for r, p in zip(rows, holm([r["p"] for r in rows]), strict=True):
        r["p_holm"] = p
        r["significant"] = p < cfg.level
    return {"schema": COMPARE_SCHEMA, "task": "compare", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": [str(s) for s in cfg.sources], "baseline": cfg.baseline, "level": cfg.level,
            "test": TEST, "adjustment": f"Holm step-down over all {len(rows)} comparisons",
            "difference": {"of": "B - A (accuracy)", "method": DIFFERENCE_METHOD, "confidence": confidence,
                           "n_resamples": cfg.n_resamples, "seed": cfg.seed},
            "intervals": {"method": "Clopper-Pearson exact (scipy)", "confidence": confidence},
            "comparisons": rows, "not_compared": alone,
            # a compared run's failed integrity checks, so --strict (cli.output.emit) exits 1 on them
            "checks": [{"name": f"{r.label}: {f}", "passed": False} for r in runs for f in r.failed],
            "checks_passed": not any(r.failed for r in runs)}
