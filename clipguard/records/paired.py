"""Two runs on the same images, paired image by image: per-image predictions (``--predictions``) read back, matched
by image digest, and each shared metric (clean acc1, robust accuracy at each eps) compared with the exact McNemar
test and the paired difference's interval (:mod:`clipguard.records.stats`). ``clipguard compare``, the report's
significance marks and the gate's ``significant = true`` rules all pair through here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from clipguard.errors import ClipguardError
from clipguard.records.intervals import interval
from clipguard.records.stats import discordant, mcnemar_p, paired_difference
from clipguard.specs import parse_eps

TEST = "exact McNemar (two-sided binomial test on the discordant pairs, scipy)"
ADV = "adv_pred@"
ROBUST = "robust@"  # the runner's per-image robust verdict, when the file holds it


def read_predictions(path: str | Path) -> dict[str, list]:
    """A ``--predictions`` file (CSV, or Parquet by its suffix) as column -> values; class columns as ints."""
    path = Path(path)
    if not path.is_file():
        raise ClipguardError(f"predictions file {str(path)!r} does not exist: write one with `clipguard eval "
                             "--predictions FILE`")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq  # lazy: pyarrow only when a Parquet file is read

            cols = pq.read_table(path).to_pydict()
        else:
            with path.open(newline="") as f:
                data = list(csv.reader(f))
            cols = {h: [row[i] for row in data[1:]] for i, h in enumerate(data[0])} if data else {}
        missing = [c for c in ("digest", "label", "clean_pred") if c not in cols]
        if missing:
            raise ClipguardError(f"{str(path)!r} is not a clipguard predictions file (no {', '.join(missing)} "
                                 "column): write one with `clipguard eval --predictions FILE`")
        for name in ("label", "clean_pred", *(c for c in cols if c.startswith((ADV, ROBUST)))):
            cols[name] = [int(v) for v in cols[name]]
    except (ValueError, IndexError, OSError) as e:
        raise ClipguardError(f"predictions file {str(path)!r} cannot be read ({e}): write it again with "
                             "`clipguard eval --predictions FILE`") from None
    cols["digest"] = [str(d) for d in cols["digest"]]
    return cols


def predictions_path(rec: dict) -> Path | None:
    """Where a record's per-image predictions are: the path it names, as written (absolute, or relative to where
    the run ran), else beside the record (a folder that was moved). None when the record has none."""
    named = (rec.get("predictions") or {}).get("path")
    if not named:
        return None
    here = Path(rec["_path"]).parent if rec.get("_path") else None
    for p in (Path(named), *((here / named, here / Path(named).name) if here else ())):
        if p.is_file():
            return p
    return Path(named)


def correctness(table: dict[str, list]) -> dict[str, np.ndarray]:
    """Per metric, per image: ``acc1`` (clean prediction right) and ``robust_acc@EPS`` (right before and under the
    attack at EPS: RobustBench's accounting, only clean-correct images can be robust)."""
    y = np.asarray(table["label"])
    clean = np.asarray(table["clean_pred"]) == y
    out = {"acc1": clean}
    for col in table:
        if col.startswith(ADV) and "_name" not in col:
            eps = col[len(ADV):]
            verdict = table.get(f"{ROBUST}{eps}")  # the runner's own (files written before it existed lack it)
            out[f"robust_acc@{eps}"] = (np.asarray(verdict).astype(bool) if verdict is not None
                                        else clean & (np.asarray(table[col]) == y))
    return out


def eps_value(metric: str) -> float | None:
    """The eps of ``robust_acc@EPS`` in [0, 1] pixel units (None for acc1 and for a saved set's ``adv_set``)."""
    if "@" not in metric:
        return None
    try:
        return parse_eps(metric.split("@", 1)[1], name="eps").value
    except ClipguardError:
        return None


def pair(a: dict[str, list], b: dict[str, list], name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of ``a`` and ``b`` that hold the same image (by digest; a repeated image pairs in order).

    Raises:
        ClipguardError: the two hold different images, or the same image under different labels.
    """
    def keyed(t):
        seen: dict[str, int] = {}
        keys = []
        for d in t["digest"]:
            keys.append((d, seen.get(d, 0)))
            seen[d] = seen.get(d, 0) + 1
        return {k: i for i, k in enumerate(keys)}

    ka, kb = keyed(a), keyed(b)
    if ka.keys() != kb.keys():
        only_a, only_b = len(ka.keys() - kb.keys()), len(kb.keys() - ka.keys())
        raise ClipguardError(f"{name_a} ({len(ka)} images) and {name_b} ({len(kb)} images) hold different images "
                             f"({only_a} only in the first, {only_b} only in the second, by image digest): compare "
                             "runs of the same --dataset/--split/--limit/--seed")
    order = sorted(ka)
    ia, ib = np.array([ka[k] for k in order], dtype=int), np.array([kb[k] for k in order], dtype=int)
    if not np.array_equal(np.asarray(a["label"])[ia], np.asarray(b["label"])[ib]):
        raise ClipguardError(f"{name_a} and {name_b} hold the same images under different labels: compare runs of "
                             "the same dataset and label order")
    return ia, ib


def compare_metric(a: np.ndarray, b: np.ndarray, *, confidence: float, seed: int = 0,
                   n_resamples: int | None = None) -> dict:
    """One paired comparison of correctness vectors: both accuracies with their exact intervals, B - A with its
    interval, the discordant counts and the exact McNemar p-value."""
    only_a, only_b = discordant(a, b)
    n, ka, kb = int(a.size), int(a.sum()), int(b.sum())
    kw = {"n_resamples": n_resamples} if n_resamples else {}
    d = paired_difference(a, b, confidence=confidence, seed=seed, **kw)
    return {"n": n, "a": ka / n if n else 0.0, "a_ci": interval(ka, n, confidence), "b": kb / n if n else 0.0,
            "b_ci": interval(kb, n, confidence), "difference": d["difference"], "difference_ci": d["ci"],
            "only_a": only_a, "only_b": only_b, "p": mcnemar_p(only_a, only_b)}


def shared_metrics(ca: dict, cb: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """[(metric of a, metric of b)] the two runs both measured (robust accuracy matched by eps value), and the
    metrics only one of them has."""
    both, used_b = [], set()
    for ma in ca:
        ea = eps_value(ma)
        mb = next((m for m in cb if m not in used_b and (m == ma or (ea is not None and eps_value(m) is not None
                                                                     and abs(eps_value(m) - ea) < 1e-9))), None)
        if mb is not None:
            both.append((ma, mb))
            used_b.add(mb)
    alone = [m for m in ca if m not in {x for x, _ in both}] + [m for m in cb if m not in used_b]
    return both, alone
