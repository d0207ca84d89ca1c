"""``clipguard report``: Markdown / self-contained HTML / CSV from a folder of records. Aggregates only."""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections import Counter, defaultdict
from pathlib import Path

from clipguard.catalogue import catalogue
from clipguard.fsutil import atomic_write_text
from clipguard.records.rows import checks_summary, load_records, rows, zero_shot_readings
from clipguard.report import certify as certify_report
from clipguard.report import plots

ZS_NOTE = ("One row per model, one column per dataset, as the FARE and TeCoA papers report; the average is over "
           "the row's datasets and is printed only when the row has all of them (else —).")
CSV_COLUMNS = ["dataset", "model", "pretrained", "task", "acc1", "acc5", "mean_per_class_recall", "attack", "eps",
               "robust_acc", "attack_success_rate", "adapter", "cell"]


def _col(r: dict) -> str:
    src = f" from {r['surrogate']}" if r.get("surrogate") else ""
    return f"{r['attack']} {r['eps']}{src}"


def _key(r: dict) -> tuple:
    """What a report row is about: (model label, dataset). Numbers of different datasets never share a row."""
    return r["label"], r.get("dataset")


def _is_robust(r: dict) -> bool:
    return r["metric"] == "robust_acc" and r["attack"] != "uap" and (r["eps_value"] or 0) > 0


def reference_table(rs: list[dict]) -> tuple[list[str], list[list]]:
    """Rows: (model, dataset) pairs in first-seen order; columns: clean acc1, then robust acc per
    (attack, eps[, surrogate]). Values as recorded."""
    clean, robust, cols = {}, defaultdict(dict), []
    for r in rs:
        if r["metric"] == "acc1":
            clean.setdefault(_key(r), r["value"])
        elif _is_robust(r):
            c = _col(r)
            robust[_key(r)][c] = r["value"]
            if c not in cols:
                cols.append(c)
    keys = list(dict.fromkeys(_key(r) for r in rs if r["metric"] in ("acc1", "robust_acc")))
    header = ["model", "dataset", "clean acc1", *cols]
    body = [[lab, ds, clean.get((lab, ds)), *[robust[(lab, ds)].get(c) for c in cols]] for lab, ds in keys]
    return header, body


def _dataset_order(names) -> list[str]:
    """Catalogue order (the papers' order, ImageNet first) for catalogue names, then the rest as first seen."""
    names, known = list(dict.fromkeys(names)), list(catalogue())
    return sorted(names, key=lambda d: known.index(d) if d in known else len(known) + names.index(d))


def zero_shot_tables(rs: list[dict]) -> list[dict]:
    """FARE's and TeCoA's layout, when the rows span two or more datasets: one table per reading (clean, then each
    threat), one row per model label, one column per dataset with a value in that table, and the row's average.

    The average is printed only for a complete row: a missing cell shows as "—" and makes the row's average
    "—" too, so no model is averaged over fewer datasets than another. Values are copied from the rows.
    """
    readings = {k: v for k, v in zero_shot_readings(rs).items() if v}
    datasets = _dataset_order(ds for cells in readings.values() for _, ds in cells)
    if len(datasets) < 2:
        return []
    labels = list(dict.fromkeys(r["label"] for r in rs))
    tables = []
    for title, cells in readings.items():
        cols = [d for d in datasets if any(ds == d for _, ds in cells)]
        body = []
        for lab in (lab for lab in labels if any(k[0] == lab for k in cells)):
            vals = [cells.get((lab, d)) for d in cols]
            body.append([lab, *vals, None if None in vals else sum(vals) / len(vals)])
        tables.append({"title": title, "header": ["model", *cols, "average"], "body": body})
    return tables


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _md_table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


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
    label, dataset = key
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
        entries = m.get("robust") or [None]
        for e in entries:
            w.writerow({**base, **({"attack": e["attack"], "eps": e["eps"], "robust_acc": e["robust_acc"],
                                    "attack_success_rate": e["attack_success_rate"]} if e else {})})
    return buf.getvalue()


def build_report(folder, out_md, *, html_out=None, csv_out=None) -> dict:
    """Write the report; returns what it contains (table, plots, checks) for the CLI and tests."""
    records = load_records(folder)
    rs = rows(records)
    out_md = Path(out_md)
    assets = out_md.parent / (out_md.stem + "_files")
    assets.mkdir(parents=True, exist_ok=True)
    header, body = reference_table(rs)
    col, pts = _scatter_points(rs)
    pngs = [p for p in (plots.eps_curves(rs, assets / "robust_vs_eps.png"),
                        plots.clean_vs_robust(pts, col, assets / "clean_vs_robust.png")) if p]
    uap_pngs = [p for rec in records if str(rec.get("task", "")).startswith("uap") for p in rec.get("pngs", [])]
    checks = checks_summary(records)
    uap_rows = [r for r in rs if r["metric"] == "fooling_rate"]
    zs = zero_shot_tables(rs)
    md = [f"# clipguard report\n\n{len(records)} records from `{folder}`.\n", "## Clean and robust accuracy\n",
          _md_table(header, body), ""]
    if zs:
        md += ["## Zero-shot robustness\n", ZS_NOTE, ""]
        md += [x for t in zs for x in (f"### {t['title']}\n", _md_table(t["header"], t["body"]), "")]
    if uap_rows:
        md += ["## Universal perturbations\n", _md_table(["model", "dataset", "eps", "fooling rate"],
                                                          [[r["label"], r["dataset"], r["eps"], r["value"]]
                                                           for r in uap_rows]), ""]
    md += certify_report.section(records, assets)
    md += ["## Plots\n"] + [f"![{p.stem}]({assets.name}/{p.name})" for p in pngs]
    md += [f"![uap]({os.path.relpath(Path(p).resolve(), out_md.resolve().parent)})" for p in uap_pngs[:4]]
    n_fail = sum(len(c["failed"]) for c in checks)
    md += ["", "## Integrity checks\n", f"{sum(c['passed'] for c in checks)} of {sum(c['total'] for c in checks)} "
           f"checks passed" + (f"; {n_fail} failed." if n_fail else "."), "",
           _md_table(["model", "task", "cell", "passed", "failed"],
                     [[c["label"], c["task"], c["cell"], f"{c['passed']}/{c['total']}", ", ".join(c["failed"]) or "—"]
                      for c in checks])]
    atomic_write_text(out_md, "\n".join(md) + "\n")
    if html_out:
        atomic_write_text(html_out, _html(header, body, pngs + [Path(p) for p in uap_pngs[:4]], checks, len(records),
                                          zs))
    if csv_out:
        atomic_write_text(csv_out, csv_text(records))
    return {"records": len(records), "header": header, "body": body, "plots": [str(p) for p in pngs],
            "checks": checks, "uap": uap_rows, "zero_shot": zs}


def _html_table(header, body) -> str:
    cell = "".join
    return "<table><tr>" + cell(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" + cell(
        "<tr>" + cell(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in body) + "</table>"


def _html(header, body, pngs, checks, n, zs=()) -> str:
    cell = "".join
    table = _html_table(header, body)
    if zs:
        table += f"<h2>Zero-shot robustness</h2><p>{html.escape(ZS_NOTE)}</p>" + cell(
            f"<h3>{html.escape(t['title'])}</h3>" + _html_table(t["header"], t["body"]) for t in zs)
    imgs = cell(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                for p in pngs if p.exists())
    def check_item(c: dict) -> str:
        failed = "; failed: " + html.escape(", ".join(c["failed"])) if c["failed"] else ""
        return (f"<li>{html.escape(str(c['label']))} ({html.escape(str(c['task']))}): "
                f"{c['passed']}/{c['total']} passed{failed}</li>")

    chk = "<ul>" + cell(check_item(c) for c in checks) + "</ul>"
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;border:1px solid #ccc}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>clipguard report</title><style>{style}</style>"
            f"</head><body><h1>clipguard report</h1><p>{n} records.</p><h2>Clean and robust accuracy</h2>{table}"
            f"<h2>Plots</h2>{imgs}<h2>Integrity checks</h2>{chk}</body></html>\n")
