"""``clipguard report``: Markdown / self-contained HTML / CSV from a folder of records. Aggregates only."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write_text
from clipguard.records.rows import (
    attack_name,
    checks_summary,
    dataset_order,
    load_records,
    rows,
    zero_shot_readings,
)
from clipguard.report import certify as certify_report
from clipguard.report import html as html_report
from clipguard.report import plots
from clipguard.report.files import link, refuse_foreign, resolve_picture
from clipguard.report.leaderboard import LEADERBOARD_NOTE, leaderboard_tables
from clipguard.report.significance import AVERAGE_RESAMPLES, NOT_TESTED, average, mark_against, reading

ZS_NOTE = ("One row per model, one column per dataset, as the FARE and TeCoA papers report; the average is over "
           "the row's datasets and is printed only when the row has all of them (else —). ±: half the width of the "
           "number's interval (exact Clopper-Pearson at the record's level; for an average, a bootstrap over images "
           f"resampled within each dataset, scipy, {AVERAGE_RESAMPLES} resamples, seed 0, 95 %).")
# CLIP_benchmark's leading columns, then ours; columns added later go last, so older readers keep their places
CSV_COLUMNS = ["dataset", "model", "pretrained", "task", "acc1", "acc5", "mean_per_class_recall", "attack", "eps",
               "robust_acc", "attack_success_rate", "adapter", "cell", "fooling_rate", "perturbed_acc"]
UAP_HEADER = ["model", "dataset", "task", "eps", "fooling rate", "clean acc1", "perturbed acc"]


def _col(r: dict) -> str:
    """A robust column: attack with its steps (PGD-5 and PGD-10 are different threats), the norm when it is not
    L-inf, eps, the surrogate of a transfer attack, and a defense's non-adaptive reading."""
    norm = "L2 " if r.get("norm") == "l2" else ""
    src = f" from {r['surrogate']}" if r.get("surrogate") else ""
    weak = " (non-adaptive)" if r.get("defense_evaluation") == "non-adaptive" else ""  # NON_ADAPTIVE_NOTE
    return f"{attack_name(r)} {norm}{r['eps']}{src}{weak}"


def _key(r: dict) -> tuple:
    """What a report row is about: (model label, dataset, image set). Numbers of different datasets, or of different
    images of one dataset (another --limit, split or seed), never share a row."""
    return r["label"], r.get("dataset"), r.get("images")


def _is_robust(r: dict) -> bool:
    return r["metric"] == "robust_acc" and r["attack"] != "uap" and (r["eps_value"] or 0) > 0


def reference_table(rs: list[dict]) -> tuple[list[str], list[list], list[str]]:
    """Rows: (model, dataset, image set) in first-seen order; columns: clean acc1, then robust acc per column
    (:func:`_col`). Values as recorded. A model label shows its image set when one (model, dataset) has several.

    Each cell is one record's number: where records repeat a cell (a suite's eval beside a fine-tune's own
    check-up, a run made twice), an evaluation's comes before a fine-tune check-up's, then the first by file name;
    the third element names each left-out number that differs from the one shown."""
    cells, cols, dropped = {}, [], []
    for r in sorted(rs, key=lambda r: r.get("task") == "finetune"):  # evaluations first, then fine-tune check-ups
        if r["metric"] == "acc1":
            c = "clean acc1"
        elif _is_robust(r):
            c = _col(r)
            if c not in cols:
                cols.append(c)
        else:
            continue
        if (_key(r), c) in cells:
            shown, path = cells[(_key(r), c)]
            if path != r["path"] and float(shown) != r["value"]:  # the same number again loses nothing
                dropped.append(f"{c} of {_name(_key(r))}: {r['value']:.4f} in {r['path']} (shown: {float(shown):.4f} "
                               f"from {path})")
            continue
        cells[(_key(r), c)] = (reading(r), r["path"])
    keys = list(dict.fromkeys(_key(r) for r in rs if r["metric"] in ("acc1", "robust_acc")))
    sets = Counter((lab, ds) for lab, ds, _ in keys)
    header = ["model", "dataset", "clean acc1", *cols]
    body = [[f"{lab} [{imgs}]" if sets[(lab, ds)] > 1 else lab, ds,
             *[cells.get(((lab, ds, imgs), c), (None,))[0] for c in ["clean acc1", *cols]]] for lab, ds, imgs in keys]
    return header, body, dropped


def passed_text(c: dict) -> str:
    """``3/4``, or ``0/0 (2 skipped)`` for a record whose checks were skipped (neither passed nor failed)."""
    return f"{c['passed']}/{c['total']}" + (f" ({c['skipped']} skipped)" if c.get("skipped") else "")


def dropped_note(dropped: list[str]) -> str:
    return (f"{len(dropped)} number(s) repeat a cell with another value and are not shown (one record per cell: "
            "an evaluation before a fine-tune's check-up, then the first by file name): " + "; ".join(dropped[:5])
            + (" ..." if len(dropped) > 5 else "") + ".")


def zero_shot_tables(rs: list[dict]) -> list[dict]:
    """FARE's and TeCoA's layout, when the rows span two or more datasets: one table per reading (clean, then each
    threat), one row per model label, one column per dataset with a value in that table, and the row's average.

    The average is printed only for a complete row: a missing cell shows as "—" and makes the row's average
    "—" too, so no model is averaged over fewer datasets than another. Values are copied from the rows.
    """
    readings = {k: v for k, v in zero_shot_readings(rs, value=reading).items() if v}
    datasets = dataset_order(ds for cells in readings.values() for _, ds in cells)
    if len(datasets) < 2:
        return []
    labels = list(dict.fromkeys(r["label"] for r in rs))
    tables = []
    for title, cells in readings.items():
        cols = [d for d in datasets if any(ds == d for _, ds in cells)]
        body = []
        for lab in (lab for lab in labels if any(k[0] == lab for k in cells)):
            vals = [cells.get((lab, d)) for d in cols]
            body.append([lab, *vals, None if None in vals else average(vals)])
        tables.append({"title": title, "header": ["model", *cols, "average"], "body": body})
    return tables


def _md_table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(html_report.fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def uap_table(rs: list[dict]) -> tuple[list[str], list[list]]:
    """One row per UAP record (fit or evaluation): its fooling rate, clean and perturbed accuracy, as recorded."""
    by_record: dict = {}
    for r in rs:
        if str(r.get("task") or "").startswith("uap") and r["metric"] in ("fooling_rate", "acc1", "perturbed_acc"):
            row = by_record.setdefault(r["path"], {"label": r["label"], "dataset": r["dataset"], "task": r["task"]})
            row[r["metric"]] = reading(r)
            row["eps"] = row.get("eps") or r["eps"]  # the acc1 row carries no eps
    body = [[v["label"], v["dataset"], v["task"], v.get("eps"), v.get("fooling_rate"), v.get("acc1"),
             v.get("perturbed_acc")] for v in by_record.values()]
    return UAP_HEADER, body


def uap_pictures(records: list[dict]) -> list[Path]:
    """The pictures UAP records name (at most 4), found wherever the report runs (:func:`files.resolve_picture`)."""
    found = (resolve_picture(p, rec.get("_path")) for rec in records if str(rec.get("task", "")).startswith("uap")
             for p in rec.get("pngs", []))
    return [p for p in found if p is not None][:4]


def _scatter_points(rs: list[dict]) -> tuple[str, list]:
    """(column, [(name, clean acc1, robust acc)]) for the most common robust column; clean and robust values
    are paired per (model, dataset), and a point is named ``label (dataset)``."""
    counts = Counter(_col(r) for r in rs if _is_robust(r))
    if not counts:
        return "", []
    col = counts.most_common(1)[0][0]
    clean = {_key(r): r["value"] for r in reversed(rs) if r["metric"] == "acc1"}
    pts = [(_name(_key(r)), clean[_key(r)], r["value"]) for r in rs
           if _is_robust(r) and _col(r) == col and _key(r) in clean]
    return col, pts


def _name(key: tuple) -> str:
    label, dataset = key[:2]
    return label if dataset is None else f"{label} ({dataset})"


def csv_text(records: list[dict]) -> str:
    """One line per (record, attack/eps) in CLIP_benchmark's leading column layout."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for rec in records:
        m = rec.get("metrics") or {}
        base = {"dataset": rec.get("dataset"), "model": rec.get("model"), "pretrained": rec.get("pretrained"),
                "task": rec.get("task"), "acc1": m.get("acc1", m.get("clean_acc")), "acc5": m.get("acc5"),
                "mean_per_class_recall": m.get("mean_per_class_recall"), "adapter": rec.get("adapter"),
                "cell": (rec.get("bench") or {}).get("cell")}
        if str(rec.get("task", "")).startswith("uap"):  # one line: the perturbation's numbers at its eps
            eps = ((rec.get("attack") or {}).get("eps") or {}).get("text")
            w.writerow({**base, "attack": "uap", "eps": eps, "attack_success_rate": m.get("attack_success_rate"),
                        "fooling_rate": m.get("fooling_rate"), "perturbed_acc": m.get("perturbed_acc")})
            continue
        entries = m.get("robust") or [None]
        for e in entries:
            w.writerow({**base, **({"attack": e["attack"], "eps": e["eps"], "robust_acc": e["robust_acc"],
                                    "attack_success_rate": e["attack_success_rate"]} if e else {})})
    return buf.getvalue()


def build_report(folder, out_md=None, *, html_out=None, csv_out=None, force: bool = False,
                 baseline: str | None = None) -> dict:
    """Write the report; returns what it contains (table, plots, checks) for the CLI and tests.

    ``out_md`` defaults to ``folder/report.md``. An existing output file that clipguard report did not write is
    refused (one line, before anything is written) unless ``force``. Links and embedded pictures resolve against
    the records and the report file, not the current folder. With ``baseline`` (a model label), each number of
    the main table that differs significantly from that model's on the same dataset is marked (paired, from the
    records' predictions: :func:`report.significance.mark_against`)."""
    out_md = Path(folder) / "report.md" if out_md is None else Path(out_md)
    refuse_foreign({"--out": out_md, "--html": html_out, "--csv": csv_out}, force)
    records = load_records(folder)
    rs = rows(records)
    assets = out_md.parent / (out_md.stem + "_files")
    assets.mkdir(parents=True, exist_ok=True)
    header, body, dropped = reference_table(rs)
    if baseline is not None and baseline not in {row[0] for row in body}:
        raise ClipguardError(f"--baseline {baseline!r} is not a model of these records; they are "
                             f"{', '.join(dict.fromkeys(str(row[0]) for row in body))}")
    marks = mark_against(baseline, body) if baseline is not None else []
    col, pts = _scatter_points(rs)
    pngs = [p for p in (plots.eps_curves(rs, assets / "robust_vs_eps.png"),
                        plots.clean_vs_robust(pts, col, assets / "clean_vs_robust.png")) if p]
    uap_pngs = uap_pictures(records)
    checks = checks_summary(records)
    uap = uap_table(rs)
    zs = zero_shot_tables(rs)
    board = leaderboard_tables(records, rs)
    md = [f"# clipguard report\n\n{len(records)} records from `{folder}`.\n", "## Clean and robust accuracy\n",
          _md_table(header, body), "", INTERVAL_NOTE, ""]
    if dropped:
        md += [dropped_note(dropped), ""]
    if any(r.get("defense_evaluation") == "non-adaptive" for r in rs):
        md += [NON_ADAPTIVE_NOTE, ""]
    if baseline is not None:
        md += [significance_note(baseline, marks), ""]
    if zs:
        md += ["## Zero-shot robustness\n", ZS_NOTE, ""]
        md += [x for t in zs for x in (f"### {t['title']}\n", _md_table(t["header"], t["body"]), "")]
    if board:
        md += ["## Leaderboard\n", LEADERBOARD_NOTE, ""]
        md += [x for t in board for x in (f"### {t['title']}\n", _md_table(t["header"], t["body"]), "")]
    if uap[1]:
        md += ["## Universal perturbations\n", _md_table(*uap), ""]
        md += [f"![{p.stem}]({link(p, out_md)})" for p in uap_pngs] + ([""] if uap_pngs else [])
    cert = certify_report.parts(records, assets)
    md += certify_report.markdown(cert, assets) if cert else []
    md += ["## Plots\n"] + [f"![{p.stem}]({link(p, out_md)})" for p in pngs]
    n_fail, n_skip = sum(len(c["failed"]) for c in checks), sum(c["skipped"] for c in checks)
    md += ["", "## Integrity checks\n", f"{sum(c['passed'] for c in checks)} of {sum(c['total'] for c in checks)} "
           f"checks passed" + (f"; {n_fail} failed" if n_fail else "") + (f"; {n_skip} skipped" if n_skip else "")
           + ".", "",
           _md_table(["model", "task", "cell", "passed", "failed"],
                     [[c["label"], c["task"], c["cell"], passed_text(c), ", ".join(c["failed"]) or "—"]
                      for c in checks])]
    atomic_write_text(out_md, "\n".join(md) + "\n")
    if html_out:
        atomic_write_text(html_out, html_report.page(n=len(records), main=(header, body), zs=zs, zs_note=ZS_NOTE,
                                                     board=board, board_note=LEADERBOARD_NOTE,
                                                     uap=uap, plots=pngs, uap_pictures=uap_pngs, checks=checks,
                                                     certify=cert,
                                                     notes=(INTERVAL_NOTE,
                                                            *([dropped_note(dropped)] if dropped else []),
                                                            *([significance_note(baseline, marks)]
                                                                             if baseline is not None else []),
                                                            *([NON_ADAPTIVE_NOTE] if any(
                                                                r.get("defense_evaluation") == "non-adaptive"
                                                                for r in rs) else []))))
    if csv_out:
        atomic_write_text(csv_out, csv_text(records))
    return {"records": len(records), "out": out_md, "header": header, "body": body, "plots": [str(p) for p in pngs],
            "uap_pictures": [str(p) for p in uap_pngs], "checks": checks, "uap_table": uap, "zero_shot": zs,
            "leaderboard": board, "certify": cert, "dropped": dropped,
            "uap": [r for r in rs if r["metric"] == "fooling_rate"], "significance": marks}


NON_ADAPTIVE_NOTE = ("(non-adaptive): crafted on the undefended classifier and classified by the defended one (the "
                     "defense paper's protocol), not attacked through the defense: an upper bound on its robust "
                     "accuracy (Tramer et al. 2020). The adaptive number is the defense's.")
INTERVAL_NOTE = "±: half the width of the number's exact (Clopper-Pearson) interval, at the level its record names."


def significance_note(baseline: str, marks: list[dict]) -> str:
    """The legend of the marks against ``baseline``: what was tested, how, and what was not."""
    tested = [m for m in marks if "p" in m]
    untested = len(marks) - len(tested)
    return (f"Against `{baseline}` (same dataset, same column): `*` marks a significant difference (exact McNemar "
            f"on the per-image predictions, Holm-adjusted over {len(tested)} tests, alpha 0.05); "
            f"{sum(m['significant'] for m in tested)} of {len(tested)} significant."
            + (f" `?`: {NOT_TESTED} ({untested} numbers: run eval with --predictions)." if untested else ""))
