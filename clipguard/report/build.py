"""``clipguard report``: Markdown / self-contained HTML / CSV from a folder of records. Aggregates only."""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections import Counter, defaultdict
from pathlib import Path

from clipguard.fsutil import atomic_write_text
from clipguard.records.rows import checks_summary, load_records, rows
from clipguard.report import plots

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
    md = [f"# clipguard report\n\n{len(records)} records from `{folder}`.\n", "## Clean and robust accuracy\n",
          _md_table(header, body), ""]
    if uap_rows:
        md += ["## Universal perturbations\n", _md_table(["model", "dataset", "eps", "fooling rate"],
                                                          [[r["label"], r["dataset"], r["eps"], r["value"]]
                                                           for r in uap_rows]), ""]
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
        atomic_write_text(html_out, _html(header, body, pngs + [Path(p) for p in uap_pngs[:4]], checks, len(records)))
    if csv_out:
        atomic_write_text(csv_out, csv_text(records))
    return {"records": len(records), "header": header, "body": body, "plots": [str(p) for p in pngs],
            "checks": checks, "uap": uap_rows}


def _html(header, body, pngs, checks, n) -> str:
    cell = "".join
    table = "<table><tr>" + cell(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + cell(
        "<tr>" + cell(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in body) + "</table>"
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
