"""Is a difference between two records' numbers more than chance? Paired, from the per-image predictions both runs
wrote (``--predictions``): the exact McNemar test on the images one run gets right and the other wrong. Used by the
gate's ``significant = true`` rules and the report's marks against ``--baseline``. Nothing is recomputed but the
test: the numbers compared are the records' own, and the paired accuracies are checked to equal them.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipguard.errors import ClipguardError
from clipguard.records.paired import compare_metric, correctness, eps_value, pair, predictions_path, read_predictions

PAIRED_METRICS = ("acc1", "robust_acc")  # what per-image predictions can pair (clean, and robust at each eps)
NOT_TESTED = "no predictions: not tested"
KEYS = ("metric", "dataset", "attack", "norm", "surrogate")


def _record(path: str) -> dict:
    rec = json.loads(Path(path).read_text())
    rec["_path"] = path
    return rec


def counterpart(row: dict, others: list[dict]) -> dict | None:
    """The row of ``others`` that measured what ``row`` did (metric, dataset, attack, norm, surrogate, eps): the one
    with the same model label when there are several, else the only one; None when there is none or no single one."""
    same = [o for o in others if all(o.get(k) == row.get(k) for k in KEYS) and o.get("check") is None
            and (o.get("eps_value") is None) == (row.get("eps_value") is None)
            and (row.get("eps_value") is None or abs(o["eps_value"] - row["eps_value"]) < 1e-9)]
    if len(same) > 1:
        same = [o for o in same if o.get("label") == row.get("label")] or same
    return same[0] if len(same) == 1 else None


def paired_test(row: dict, base: dict, *, confidence: float = 0.95, n_resamples: int = 2000) -> dict | None:
    """The paired comparison of ``row`` (B) against ``base`` (A) from their records' predictions files: the
    :func:`clipguard.records.paired.compare_metric` dict, or None when either record has no predictions.

    Raises:
        ClipguardError: the predictions do not hold the same images, or do not reproduce the records' numbers.
    """
    if row["metric"] not in PAIRED_METRICS or not row.get("path") or not base.get("path"):
        return None
    recs = [_record(r["path"]) for r in (base, row)]
    paths = [predictions_path(r) for r in recs]
    if any(p is None or not p.is_file() for p in paths):
        return None
    tables = [read_predictions(p) for p in paths]
    ia, ib = pair(*tables, base["path"], row["path"])
    vectors = []
    for t, r, idx in zip(tables, (base, row), (ia, ib), strict=True):
        c = correctness(t)
        key = "acc1" if r["metric"] == "acc1" else next(
            (k for k in c if eps_value(k) is not None and abs(eps_value(k) - r["eps_value"]) < 1e-9), None)
        if key is None:
            return None
        vectors.append(c[key][idx])
        if abs(float(vectors[-1].mean()) - r["value"]) > 1e-9:
            raise ClipguardError(f"the predictions of {r['path']!r} give {r['metric']} {vectors[-1].mean():.4f}, "
                                 f"the record says {r['value']:.4f}: the predictions file belongs to another run")
    return compare_metric(*vectors, confidence=confidence, n_resamples=n_resamples)


class Reading(float):
    """A number a report prints: the record's value (it compares and computes as that float), its interval
    (``ci``), the row it came from and a significance mark; ``report.html.fmt`` prints ``0.6000 ±0.031*``."""

    ci: list[float] | None
    row: dict | None
    mark: str

    def __new__(cls, value: float, ci: list[float] | None = None, row: dict | None = None) -> Reading:
        obj = super().__new__(cls, value)
        obj.ci, obj.row, obj.mark = ci, row, ""
        return obj


def reading(row: dict) -> Reading:
    return Reading(row["value"], row.get("ci"), row)


AVERAGE_RESAMPLES = 2000  # the report's bootstrap of averages over datasets (seed 0)


def average(values: list[Reading]) -> Reading:
    """The mean of a row's per-dataset readings with a bootstrap interval over images, each dataset resampled
    within itself (:func:`clipguard.records.stats.bootstrap_average`, from the records' counts: the mean of a
    resample does not depend on which images are right, only how many); no interval when a reading has no counts."""
    from clipguard.records.stats import bootstrap_average, from_counts  # lazy: scipy only when a report averages

    mean = sum(values) / len(values)
    counts = [(v.row or {}).get("counts") if isinstance(v, Reading) else None for v in values]
    if any(not c or not c.get("n") for c in counts):
        return Reading(mean)
    boot = bootstrap_average([from_counts(c["k"], c["n"]) for c in counts], n_resamples=AVERAGE_RESAMPLES)
    return Reading(mean, boot["ci"])


def mark_against(baseline: str, body: list[list], *, level: float = 0.05) -> list[dict]:
    """Mark each reading of ``body`` (rows ``[label, dataset, Reading, ...]``) that differs significantly from the
    ``baseline`` label's reading of the same dataset and column: exact McNemar on the two records' predictions,
    Holm-adjusted over every test of the table; ``*`` significant, ``?`` no predictions: not tested. Returns one
    dict per comparison (label, dataset, column index, p, p_holm, significant or note)."""
    from clipguard.records.stats import holm  # lazy: scipy only when a report is marked

    base = {row[1]: row for row in body if row[0] == baseline}
    tests = []
    for row in body:
        if row[0] == baseline or row[1] not in base:
            continue
        for j, (cell, ref) in enumerate(zip(row[2:], base[row[1]][2:], strict=True), start=2):
            if not isinstance(cell, Reading) or not isinstance(ref, Reading) or cell.row is None or ref.row is None:
                continue
            t = paired_test(cell.row, ref.row, confidence=1 - level)
            if t is None:
                cell.mark = "?"
                tests.append({"label": row[0], "dataset": row[1], "column": j, "note": NOT_TESTED})
            else:
                tests.append({"label": row[0], "dataset": row[1], "column": j, "p": t["p"], "difference":
                              t["difference"], "_cell": cell})
    tested = [t for t in tests if "p" in t]
    for t, p in zip(tested, holm([t["p"] for t in tested]), strict=True):
        t["p_holm"], t["significant"] = p, p < level
        t.pop("_cell").mark = "*" if p < level else ""
    return tests
