"""The report's randomized-smoothing section: certified accuracy by L2 radius (a table and a curve beside the
empirical SmoothAdv accuracy of the same smoothed classifier). Values are copied from ``certify`` records."""

from __future__ import annotations

from pathlib import Path

from clipguard.records.rows import label
from clipguard.report.plots import pyplot

TASK = "certified_robustness"


def certify_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("task") == TASK]


def _name(rec: dict) -> str:
    return f"{label(rec)} (sigma={rec['smoothing']['sigma']:g})"


def certified_table(records: list[dict]) -> tuple[list[str], list[list]]:
    """Rows: one per certify record; columns: smoothing settings, clean accuracies, abstain rate, certified accuracy
    at every radius any record has (None where a record's grid lacks it), noise samples/s, checks."""
    recs = certify_records(records)
    radii = sorted({e["radius"] for r in recs for e in r["metrics"]["certified"]})
    header = ["model", "dataset", "sigma", "n", "acc1 (base)", "acc1 (smoothed)", "abstain",
              *[f"r={x:g}" for x in radii], "samples/s", "checks"]
    body = []
    for r in recs:
        m, s, cert = r["metrics"], r["smoothing"], {e["radius"]: e["certified_acc"] for e in r["metrics"]["certified"]}
        body.append([label(r), r.get("dataset"), f"{s['sigma']:g}", f"{s['n']:,}", m["acc1"], m["smoothed_acc1"],
                     m["abstain_rate"], *[cert.get(x) for x in radii], r["timings"]["samples_per_s"],
                     {True: "passed", None: "skipped"}.get(r.get("checks_passed"), "FAILED")])  # None: --check-images 0
    return header, body


def certified_curves(records: list[dict], out: Path) -> Path | None:
    """Left: certified accuracy vs L2 radius on all images of each record. Right: on each record's check sample,
    certified accuracy (solid) beside the empirical SmoothAdv accuracy of the same smoothed classifier (dashed),
    which the certified curve must stay under. One colour per record."""
    recs = certify_records(records)
    if not recs:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.2), sharey=True)
    for r in recs:
        cert, emp = r["metrics"]["certified"], r["empirical_l2"]["curve"]
        (line,) = left.plot([e["radius"] for e in cert], [e["certified_acc"] for e in cert], marker="o", label=_name(r))
        for key, ls in (("certified_acc", "-"), ("robust_acc", "--")):
            right.plot([e["radius"] for e in emp], [e[key] for e in emp], ls=ls, marker=".", color=line.get_color())
    left.set_title("certified accuracy, all images", fontsize=9)
    right.set_title(f"first {recs[0]['empirical_l2']['images']} images: certified (solid), SmoothAdv (dashed)",
                    fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("L2 radius ([0, 1] pixel units, model input size)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    left.set_ylabel("accuracy")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v) -> str:
    """Accuracies and sigma to 4 decimals, samples/s as a whole number, a missing value as a dash."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if v <= 1 else f"{v:,.0f}"
    return str(v)


TITLE = "Certified robustness (randomized smoothing)"
NOTE = ("Certified accuracy: CERTIFY (Cohen et al. 2019) correct and not abstained with certified L2 radius >= r. "
        "Smoothed acc1 = certified accuracy at r = 0.")


def parts(records: list[dict], assets: Path) -> dict | None:
    """The section's table (cells formatted) and curve (written to ``assets``), for the Markdown and the HTML
    report alike; None without certify records."""
    png = certified_curves(records, assets / "certified_vs_radius.png")
    if png is None:
        return None
    header, body = certified_table(records)
    return {"title": TITLE, "note": NOTE, "header": header, "body": [[_fmt(v) for v in row] for row in body],
            "png": png}


def section(records: list[dict], assets: Path) -> list[str]:
    """Markdown lines of the section (none without certify records); the curve goes to ``assets``."""
    p = parts(records, assets)
    return markdown(p, assets) if p else []


def markdown(p: dict, assets: Path) -> list[str]:
    lines = ["| " + " | ".join(p["header"]) + " |", "|" + "---|" * len(p["header"])]
    lines += ["| " + " | ".join(row) + " |" for row in p["body"]]
    png = p["png"]
    return [f"## {p['title']}\n", p["note"] + "\n", *lines, "", f"![{png.stem}]({assets.name}/{png.name})", ""]
