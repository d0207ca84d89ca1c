"""The leaderboard: defenses ranked on one protocol, with what each cost.

One table per threat (as the zero-shot tables: one column per dataset, the average with its bootstrap interval),
the rows ranked by that average, beside each model's clean average, its training cost and its evaluation cost:

- training: the wall-clock time of every fine-tune behind the model, times the processes that ran it, as the
  records state it (``finetune.train.wall_s`` x ``world_size``), in GPU-hours or CPU-hours by the device the
  fine-tune ran on. A model is linked to its fine-tunes through the adapters its evaluation records name
  (``adapter`` and ``base_adapter``), and a fine-tune to the ones under it (a prompt adapter on a TeCoA tower
  costs both trainings).
- evaluation: milliseconds per image of a clean forward of the model as evaluated (a test-time defense's
  counterattack included): ``defense.cost.ms_per_image`` for a defended record, else the clean pass's
  ``timings.images_per_s``; the fastest of the model's records (load on the machine only adds time).

Nothing here recomputes an accuracy: the values are the records'.
"""

from __future__ import annotations

from pathlib import Path

from clipguard.records.rows import dataset_order, zero_shot_readings
from clipguard.records.rows import label as record_label
from clipguard.report.significance import average, reading

LEADERBOARD_NOTE = (
    "One table per threat (evaluations only: a fine-tune's own check-up is not among them); rows ranked by the "
    "average robust accuracy over the datasets (equal averages share a rank; "
    "a row missing a dataset has no average and no rank). ±: the interval's half-width (datasets: exact "
    "Clopper-Pearson; average: bootstrap over images, as in the zero-shot tables). Training: wall-clock time of the "
    "fine-tunes behind the model (a prompt on a fine-tuned tower counts both) x the processes that ran them, in "
    "GPU-hours or CPU-hours as recorded; — for none. Eval ms/img: a clean forward of the model as evaluated (a "
    "test-time defense's counterattack included), the fastest of the model's records (other load only adds time), on "
    "the device named. Clean average: the clean accuracy of the same records as the threat's numbers.")


def _adapter_key(path) -> tuple[str, ...] | None:
    """An adapter folder as the last two parts of its path (``adapters/<cell>``): a suite's records name the same
    folder relative or absolute depending on the executor."""
    return tuple(Path(str(path)).parts[-2:]) if path else None


def _config(rec: dict) -> dict:
    return (rec.get("finetune") or {}).get("config") or rec.get("config") or {}


def _device(rec: dict) -> tuple[str, str]:
    """(GPU | CPU, the device's name) of the machine a record was made on."""
    env = rec.get("environment") or {}
    kind = "GPU" if str(env.get("device") or "").startswith("cuda") else "CPU"
    return kind, str(env.get("device_name") or env.get("device") or "?")


def _trainings(records: list[dict]) -> dict[tuple, dict]:
    """Fine-tune records by the adapter folder they wrote."""
    out = {}
    for rec in records:
        ft = rec.get("finetune") or {}
        key = _adapter_key(ft.get("adapter"))
        if rec.get("task") == "finetune" and key and (ft.get("train") or {}).get("wall_s") is not None:
            out[key] = rec
    return out


def training_cost(adapters: list, trainings: dict[tuple, dict]) -> dict | None:
    """``{"hours", "unit", "devices", "runs"}`` for the fine-tunes that made ``adapters`` and those under them, or
    None when no adapter is a recorded fine-tune (the base model, a model trained elsewhere)."""
    seen, todo, hours, devices = set(), [_adapter_key(a) for a in adapters if a], 0.0, set()
    while todo:
        key = todo.pop()
        if key in seen or key not in trainings:
            continue
        seen.add(key)
        rec = trainings[key]
        train = rec["finetune"]["train"]
        hours += train["wall_s"] * (train.get("world_size") or 1) / 3600
        devices.add(_device(rec))
        todo.append(_adapter_key(_config(rec).get("base_adapter")))
    if not seen:
        return None
    units = {kind for kind, _ in devices}
    return {"hours": hours, "unit": "GPU-h" if units == {"GPU"} else "CPU-h" if units == {"CPU"} else "h",
            "devices": sorted(name for _, name in devices), "runs": len(seen)}


def eval_ms(recs: list[dict]) -> dict | None:
    """``{"ms", "device"}``: the fewest ms per image of a clean forward among ``recs`` (see the module doc): other
    work on the machine only ever adds time, and a toy's clean pass is milliseconds, so the fastest is the cost."""
    ms, devices = [], set()
    for rec in recs:
        cost = (rec.get("defense") or {}).get("cost") or {}
        rate = (rec.get("timings") or {}).get("images_per_s")
        value = cost.get("ms_per_image") if cost.get("ms_per_image") else (1000 / rate if rate else None)
        if value is not None:
            ms.append(float(value))
            devices.add(_device(rec)[1])
    return {"ms": min(ms), "device": ", ".join(sorted(devices))} if ms else None


def _ranks(averages: list[float | None]) -> list[int | None]:
    """Competition ranks (1 + the number of strictly higher averages); None for a row without an average."""
    return [None if a is None else 1 + sum(b is not None and b > a for b in averages) for a in averages]


class Cost(str):
    """A cost cell: prints as text, keeps the number (``value``) for tests and sorting."""

    value: float

    def __new__(cls, text: str, value: float) -> Cost:
        obj = super().__new__(cls, text)
        obj.value = value
        return obj


def _train_cell(cost: dict | None) -> Cost | None:
    if cost is None:
        return None
    return Cost(f"{cost['hours']:.3g} {cost['unit']} ({', '.join(cost['devices'])})", cost["hours"])


def _eval_cell(cost: dict | None) -> Cost | None:
    return None if cost is None else Cost(f"{cost['ms']:.3g} ({cost['device']})", cost["ms"])


def leaderboard_tables(records: list[dict], rs: list[dict]) -> list[dict]:
    """One table per robust threat: ``{"title", "header", "body"}``, rows ``[rank, model, per-dataset Reading...,
    average Reading, clean average Reading, training Cost, eval ms/img Cost]`` sorted by rank (unranked last), for each
    threat that two or more models were evaluated under (fine-tune records' own evaluations left out). Empty when
    there is no such threat (nothing to rank)."""
    rs = [r for r in rs if r.get("task") != "finetune"]  # a fine-tune's own check-up evaluation is not a protocol's
    readings = {k: v for k, v in zero_shot_readings(rs, value=reading).items() if v}
    clean = readings.pop("clean", {})
    readings = {k: v for k, v in readings.items() if len({lab for lab, _ in v}) >= 2}  # something to rank
    if not readings:
        return []
    # each robust number's clean accuracy from its own record (its images); the zero-shot clean reading otherwise
    same_record = {r["path"]: reading(r) for r in rs if r["metric"] == "acc1" and r.get("path")}
    by_label: dict[str, list[dict]] = {}
    for rec in records:
        if rec.get("task") != "finetune" and not str(rec.get("task") or "").startswith("uap"):
            by_label.setdefault(record_label(rec), []).append(rec)
    trainings = _trainings(records)
    costs = {lab: (_train_cell(training_cost([a for r in recs for a in (r.get("adapter"), _config(r).get(
        "base_adapter"))], trainings)), _eval_cell(eval_ms(recs))) for lab, recs in by_label.items()}
    order = list(dict.fromkeys(r["label"] for r in rs))
    tables = []
    for title, cells in readings.items():
        datasets = dataset_order(d for _, d in cells)
        rows = []
        for lab in (lab for lab in order if any(k[0] == lab for k in cells)):
            vals = [cells.get((lab, d)) for d in datasets]
            base = [None if v is None else same_record.get((v.row or {}).get("path"), clean.get((lab, d)))
                    for v, d in zip(vals, datasets, strict=True)]
            avg = None if None in vals else average(vals)
            clean_avg = None if None in base else average(base)
            rows.append([lab, *vals, avg, clean_avg, *costs.get(lab, (None, None))])
        ranks = _ranks([row[len(datasets) + 1] for row in rows])
        body = sorted(([rank, *row] for rank, row in zip(ranks, rows, strict=True)),
                      key=lambda row: (row[0] is None, row[0] or 0))
        tables.append({"title": title, "header": ["rank", "model", *datasets, "average", "clean average", "training",
                                                  "eval ms/img"], "body": body})
    return tables

