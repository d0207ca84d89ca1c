"""Read result records from a folder and flatten them into rows that reports and gates aggregate.

A row is one number with its context: ``{"metric", "value", "model", "adapter", "label", "dataset",
"attack", "norm", "eps", "eps_value", "surrogate", "cell", "task", "path", "check", "images"}``, and for a metric the
record holds an interval of, ``"ci"`` (``[lo, hi]``, None in records from before intervals) and clean and robust rows
their ``"counts"`` (``{"k", "n"}``). Nothing is recomputed here:
every value is copied from a record. Integrity checks are rows too (metric ``checks_passed``, value 1.0 or 0.0): one
per record with checks (``check`` None: all of them passed) and one per check (``check`` = its name), so a gate can
fail a build on them.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipguard.catalogue import catalogue
from clipguard.errors import ClipguardError
from clipguard.records.schema import SCHEMA
from clipguard.specs import parse_eps

CLEAN_METRICS = ("acc1", "acc5", "mean_per_class_recall")
ROBUST_METRICS = ("robust_acc", "attack_success_rate")
UAP_METRICS = ("fooling_rate", "perturbed_acc", "attack_success_rate")


def load_records(folder: str | Path) -> list[dict]:
    """All ``clipguard.result/1`` records under ``folder`` (recursively; a record file: that one), each with
    ``_path`` set, sorted."""
    out = []
    for path in [Path(folder)] if Path(folder).is_file() else sorted(Path(folder).rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
            rec["_path"] = str(path)
            out.append(rec)
    return out


def label(rec: dict) -> str:
    """How a model appears in tables: the bench cell's model label, else spec (+ adapter folder name)."""
    bench = rec.get("bench") or {}
    if bench.get("label"):
        return bench["label"]
    adapter, defense = rec.get("adapter"), (rec.get("defense") or {}).get("name")
    return (rec.get("model_spec", "?") + (f" + {Path(adapter).name}" if adapter else "")
            + (f" + {defense}" if defense else ""))  # a defended run is another model: never merged with the bare one


def _context(rec: dict) -> dict:
    bench = rec.get("bench") or {}
    attack = rec.get("attack") or {}
    return {"model": rec.get("model_spec"), "adapter": rec.get("adapter"), "label": label(rec),
            "dataset": rec.get("dataset"), "task": rec.get("task"), "cell": bench.get("cell"),
            "surrogate": attack.get("surrogate"), "norm": attack.get("norm"), "steps": attack.get("steps"),
            "path": rec.get("_path"), "check": None, "images": image_set(rec),
            "defense": (rec.get("defense") or {}).get("name"),
            "defense_evaluation": (rec.get("defense") or {}).get("evaluation")}


def image_set(rec: dict) -> str:
    """Which images a record's numbers are over, in words: ``test n=1000``, ``test n=50 (limit, seed 0)``; numbers
    over different image sets never share a report row."""
    d = rec.get("data") or {}
    sel = f" (limit, seed {d.get('seed', 0)})" if d.get("limit") else ""
    return f"{d.get('split', '?')} n={d.get('n', '?')}{sel}"


def _eps_value(text) -> float | None:
    try:
        return None if text is None else parse_eps(str(text), name="eps").value
    except ClipguardError:  # a check's eps that is not a pixel-unit value (none today): no eps filter matches it
        return None


def check_rows(rec: dict, ctx: dict) -> list[dict]:
    """The record's integrity checks as rows: ``checks_passed`` of the whole record, then one per check (by name,
    at its eps). A record that ran no checks (a clean-only eval: ``checks_passed`` true over none) still says so."""
    checks = rec.get("checks") or []
    if "checks_passed" not in rec and not checks:
        return []
    failed = failed_checks(rec)
    out = [{**ctx, "metric": "checks_passed", "value": float(not failed), "failed": failed,
            "attack": None, "eps": None, "eps_value": None}]
    for c in checks:
        out.append({**ctx, "metric": "checks_passed", "value": float(bool(c.get("passed"))), "check": c.get("name"),
                    "attack": None, "eps": c.get("eps"), "eps_value": _eps_value(c.get("eps"))})
    return out


def rows(records: list[dict]) -> list[dict]:
    """Flatten records into one row per reported number."""
    out = []
    for rec in records:
        ctx, m = _context(rec), rec.get("metrics") or {}
        task = rec.get("task", "")
        out += check_rows(rec, ctx)
        if task.startswith("uap"):
            eps = ((rec.get("attack") or {}).get("eps")) or {}
            for k in UAP_METRICS:
                if k in m:
                    out.append({**ctx, "metric": k, "value": m[k], "attack": "uap", "eps": eps.get("text"),
                                "eps_value": eps.get("value"), "ci": m.get(f"{k}_ci")})
            if "acc1" in m:
                out.append({**ctx, "metric": "acc1", "value": m["acc1"], "attack": None, "eps": None,
                            "eps_value": None, "ci": m.get("acc1_ci")})
            continue
        for k in CLEAN_METRICS:
            if m.get(k) is not None:  # acc5 is null below 5 classes
                out.append({**ctx, "metric": k, "value": m[k], "attack": None, "eps": None, "eps_value": None,
                            "ci": m.get(f"{k}_ci"), "counts": (m.get("counts") or {}).get(k)})
        for e in m.get("robust", []):
            for k in ROBUST_METRICS:
                if k in e:
                    out.append({**ctx, "metric": k, "value": e[k], "attack": e.get("attack"), "eps": e.get("eps"),
                                "eps_value": e.get("eps_value"), "ci": e.get(f"{k}_ci"),
                                "counts": (e.get("counts") or {}).get(k)})
    return out


NORM_NAMES = {"linf": "Linf", "l2": "L2"}


def threat_name(r: dict) -> str:
    """A robust row's threat as the papers head a table: ``Linf 2/255 (autoattack)``, ``Linf 1/255 (pgd-100)`` (an
    iterative attack's steps: PGD-10 and PGD-100 are different threats), ``... from SURROGATE``."""
    norm = NORM_NAMES.get(r.get("norm"), r.get("norm") or "")
    src = f" from {r['surrogate']}" if r.get("surrogate") else ""
    weak = ", non-adaptive" if r.get("defense_evaluation") == "non-adaptive" else ""  # never the defense's own number
    return f"{norm} {r['eps']} ({attack_name(r)}{src}{weak})".strip()


ITERATIVE = ("pgd", "apgd")  # attacks whose step count the threat name states


def attack_name(r: dict) -> str:
    """A robust row's attack with an iterative attack's steps: ``pgd-10``, ``apgd-100``, ``autoattack``."""
    return r["attack"] + (f"-{r['steps']}" if r.get("steps") and r["attack"] in ITERATIVE else "")


def dataset_order(names) -> list[str]:
    """Catalogue order (the papers' order, ImageNet first) for catalogue names, then the rest alphabetically (records
    are read in file-name order, so first-seen would put ``toy-shift`` before ``toy``)."""
    known = list(catalogue())
    return sorted(dict.fromkeys(names), key=lambda d: (0, known.index(d), "") if d in known else (1, 0, d))


def zero_shot_readings(rs: list[dict], value=lambda r: r["value"]) -> dict[str, dict[tuple[str, str], float]]:
    """The numbers of the zero-shot tables: ``{"clean": {(label, dataset): acc1}, threat_name: {...}, ...}``.

    Clean accuracy comes from an attack-free evaluation of the (model, dataset) when there is one (FARE's clean
    numbers are over the whole test split), else from the clean pass of the first attacked record. Robust
    readings are the robust accuracies at eps > 0, one reading per threat (first record wins). UAP records are
    not zero-shot readings; rows without a dataset are left out. ``value(row)`` is what a reading holds (default:
    the row's value; a report keeps the row's interval with it).
    """
    clean, fallback, robust = {}, {}, {}
    for r in rs:
        if r.get("dataset") is None or str(r.get("task") or "").startswith("uap"):
            continue
        key = (r["label"], r["dataset"])
        if r["metric"] == "acc1":
            (clean if r.get("task") == "zeroshot_classification" else fallback).setdefault(key, value(r))
        elif r["metric"] == "robust_acc" and (r["eps_value"] or 0) > 0:
            robust.setdefault(threat_name(r), {}).setdefault(key, value(r))
    return {"clean": {**fallback, **clean}, **robust}


def failed_checks(rec: dict) -> list[str]:
    """A record's failed integrity checks as ``name@eps``; a record that says ``checks_passed: false`` without
    naming one still counts as failed (``checks_passed``). A skipped check (``passed: null``) did not fail."""
    failed = [f"{c['name']}" + (f"@{c['eps']}" if c.get("eps") else "") for c in rec.get("checks") or []
              if c["passed"] is False]
    return failed or (["checks_passed"] if rec.get("checks_passed") is False else [])


def checks_summary(records: list[dict]) -> list[dict]:
    """Per record: how many integrity checks passed of those that ran, how many were skipped (``passed: null``:
    neither passed nor failed, so not in ``total``), and the names of the failed ones."""
    out = []
    for rec in records:
        checks = rec.get("checks") or []
        if checks:
            ran = [c for c in checks if c["passed"] is not None]
            out.append({"label": label(rec), "task": rec.get("task"), "cell": (rec.get("bench") or {}).get("cell"),
                        "passed": sum(bool(c["passed"]) for c in ran), "total": len(ran),
                        "skipped": len(checks) - len(ran), "failed": failed_checks(rec)})
    return out
