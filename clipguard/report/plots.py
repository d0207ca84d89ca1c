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
    """Scatter of (label, clean acc1, robust acc) points, each named where its label overlaps no other."""
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    colours = [ax.scatter([clean], [robust], s=40).get_facecolor()[0] for _, clean, robust in points]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("clean acc1")
    ax.set_ylabel(f"robust acc ({title})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()  # before the labels: they are placed in the final pixel layout
    place_labels(ax, points, colours=colours)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# Places a label may take around its point (offsets in points, nearest first): models of one suite often sit close
# together (the same clean accuracy, robust numbers a point apart), where one fixed offset stacks their names.
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
OFFSETS = [(dx * r, dy * r) for r in (4, 10, 18, 28, 40, 54, 70) for dx, dy in _DIRECTIONS]
MARKER_PX = 5  # half the side of the box a marker (s=40) occupies, in pixels


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax, points: list[tuple[str, float, float]], fontsize: int = 7, colours=None) -> list:
    """Name each (name, x, y) point with a text that overlaps no other label, no marker and stays inside the axes:
    the nearest free place in ``OFFSETS``; if none is free, the place that overlaps least. A label set apart from
    its point gets a leader line; each label takes its marker's colour (``colours``), so a crowd stays readable.
    Returns the texts (in ``points`` order)."""
    from matplotlib.transforms import Bbox  # matplotlib only when a picture is drawn (see pyplot)

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [Bbox.from_extents(x - MARKER_PX, y - MARKER_PX, x + MARKER_PX, y + MARKER_PX)
             for x, y in ax.transData.transform([(px, py) for _, px, py in points])]
    texts = []
    for i, (name, x, y) in enumerate(points):
        colour = "black" if colours is None else colours[i]
        best = None
        for dx, dy in OFFSETS:
            t = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=colour,
                            ha="left" if dx > 0 else "right" if dx < 0 else "center",
                            va="bottom" if dy > 0 else "top" if dy < 0 else "center")
            box = t.get_window_extent(renderer)
            outside = box.width * box.height - _overlap(box, frame)
            cost = sum(_overlap(box, b) for b in taken) + outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, box, (dx, dy))
            else:
                t.remove()
            if cost == 0:
                break
        _, t, box, (dx, dy) = best
        if max(abs(dx), abs(dy)) > OFFSETS[0][0]:  # set apart from its point: a leader line says whose name it is
            t.remove()
            t = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=colour,
                            ha=t.get_ha(), va=t.get_va(), arrowprops={"arrowstyle": "-", "lw": 0.6, "color": colour,
                                                                       "shrinkA": 0, "shrinkB": 3})
        taken.append(box)
        texts.append(t)
    return texts
