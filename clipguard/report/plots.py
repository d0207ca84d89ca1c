"""Report plots (matplotlib, PNG): robust accuracy vs eps, clean vs robust scatter. Values come from rows."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed); the one place that sets it up.

    Imported here, when a picture is drawn, not at module level: choosing Agg is global (it would switch a notebook
    that merely imports a task module off its inline backend), and pyplot costs ~0.3 s a report without plots skips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def eps_series(rows: list[dict]) -> dict[tuple, dict[float, float]]:
    """Robust accuracy by eps value per (model label, dataset, attack, surrogate), for series with two or more
    eps values. Values are copied from rows; datasets never share a series."""
    series = defaultdict(dict)
    for r in rows:
        if r["metric"] == "robust_acc" and r["eps_value"] is not None:
            series[(r["label"], r.get("dataset"), r["attack"], r.get("surrogate"))][r["eps_value"]] = r["value"]
    return {k: v for k, v in series.items() if len(v) >= 2}


def series_name(key: tuple) -> str:
    """Legend text for an ``eps_series`` key: ``label (dataset, attack[ from surrogate])``."""
    label, dataset, attack, surrogate = key
    ctx = ", ".join(str(x) for x in (dataset, attack) if x is not None)
    return f"{label} ({ctx}" + (f" from {surrogate}" if surrogate else "") + ")"


def eps_curves(rows: list[dict], out: Path) -> Path | None:
    """Robust accuracy vs eps (x 255) for each (model, dataset, attack) with at least two eps values."""
    series = {series_name(k): v for k, v in eps_series(rows).items()}
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot([x * 255 for x in xs], [pts[x] for x in xs], marker="o", label=key)
    ax.set_xlabel("eps (L-inf, x/255 pixel units)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def clean_vs_robust(points: list[tuple[str, float, float]], title: str, out: Path) -> Path | None:
    """Scatter of (label, clean acc1, robust acc) points."""
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    for name, clean, robust in points:
        ax.scatter([clean], [robust], s=40)
        ax.annotate(name, (clean, robust), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("clean acc1")
    ax.set_ylabel(f"robust acc ({title})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
