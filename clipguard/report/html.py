"""The self-contained HTML report: the Markdown report's sections, pictures embedded as data URIs."""

from __future__ import annotations

import base64
import html
from pathlib import Path

# Pictures and wide tables shrink or scroll inside the 60em column, never the page (a UAP grid is 720 px wide, a
# zero-shot table of 20 datasets wider than any screen).
STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;border:1px solid #ccc}"
         "img{max-width:100%;height:auto}table{display:block;max-width:100%;overflow-x:auto;border-collapse:collapse}")


def fmt(v) -> str:
    """A cell: ``—`` for none, a number to 4 places, with ``±half-width`` of its interval and its significance mark
    when it carries them (``report.significance.Reading``)."""
    if v is None:
        return "—"
    if not isinstance(v, float):
        return str(v)
    ci = getattr(v, "ci", None)
    return f"{v:.4f}" + (f" ±{(ci[1] - ci[0]) / 2:.3f}" if ci else "") + getattr(v, "mark", "")


def table(header, body) -> str:
    cell = "".join
    return "<table><tr>" + cell(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" + cell(
        "<tr>" + cell(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in body) + "</table>"


def _img(p: Path) -> str:
    return f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'


def _check_item(c: dict) -> str:
    failed = "; failed: " + html.escape(", ".join(c["failed"])) if c["failed"] else ""
    skipped = f", {c['skipped']} skipped" if c.get("skipped") else ""
    return (f"<li>{html.escape(str(c['label']))} ({html.escape(str(c['task']))}): "
            f"{c['passed']}/{c['total']} passed{skipped}{failed}</li>")


def page(*, n: int, main: tuple, zs: list[dict], zs_note: str, uap: tuple, plots: list[Path],
         uap_pictures: list[Path], checks: list[dict], notes: tuple[str, ...] = (), board: list[dict] = (),
         board_note: str = "", certify: dict | None = None) -> str:
    """The whole page: clean and robust accuracy, zero-shot tables, the leaderboard, universal perturbations (table
    and pictures), certified robustness (``report.certify.parts``), plots, integrity checks. ``main`` and ``uap``
    are (header, body), ``notes`` paragraphs under the main table (the intervals, the significance marks); pictures
    that no longer exist are left out."""
    cell = "".join
    body = f"<h2>Clean and robust accuracy</h2>{table(*main)}" + cell(f"<p>{html.escape(n)}</p>" for n in notes)
    if zs:
        body += f"<h2>Zero-shot robustness</h2><p>{html.escape(zs_note)}</p>" + cell(
            f"<h3>{html.escape(t['title'])}</h3>" + table(t["header"], t["body"]) for t in zs)
    if board:
        body += f"<h2>Leaderboard</h2><p>{html.escape(board_note)}</p>" + cell(
            f"<h3>{html.escape(t['title'])}</h3>" + table(t["header"], t["body"]) for t in board)
    if uap[1]:
        body += "<h2>Universal perturbations</h2>" + table(*uap) + cell(_img(p) for p in uap_pictures if p.exists())
    if certify:
        body += (f"<h2>{html.escape(certify['title'])}</h2><p>{html.escape(certify['note'])}</p>"
                 + table(certify["header"], certify["body"])
                 + (_img(certify["png"]) if certify["png"].exists() else ""))
    body += "<h2>Plots</h2>" + cell(_img(p) for p in plots if p.exists())
    body += "<h2>Integrity checks</h2><ul>" + cell(_check_item(c) for c in checks) + "</ul>"
    return ("<!doctype html><html><head><meta charset='utf-8'><meta name='generator' content='clipguard report'>"
            f"<title>clipguard report</title><style>{STYLE}</style></head><body><h1>clipguard report</h1>"
            f"<p>{n} records.</p>{body}</body></html>\n")
