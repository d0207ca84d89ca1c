"""Pictures of a universal perturbation: ``v`` itself (scaled to be visible) and a grid of clean vs
perturbed images captioned with their predicted classes (red where the UAP changed the prediction)."""

from __future__ import annotations

from pathlib import Path

import torch

from clipguard.report.plots import pyplot

GRID_COLUMNS = 4  # image pairs per row of the grid


def uap_pictures(v: torch.Tensor, clean: torch.Tensor, adv: torch.Tensor, clean_pred: torch.Tensor,
                 adv_pred: torch.Tensor, labels: torch.Tensor, classnames: list[str], out_dir) -> list[str]:
    """Write ``uap_perturbation.png`` and ``uap_grid.png`` into ``out_dir``; returns their paths.

    Shape:
        v: (1, 3, H, W) signed, [0, 1] pixel units; clean, adv: (n, 3, H, W) in [0, 1] on the CPU.
    """
    plt = pyplot()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = max(float(v.abs().max()), 1e-12)
    fig, ax = plt.subplots(figsize=(3.4, 3.6))
    ax.imshow((v[0] / (2 * scale) + 0.5).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(f"UAP x{0.5 / scale:.0f} (max |v| = {scale * 255:.1f}/255)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    paths = [out / "uap_perturbation.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    # At most GRID_COLUMNS pairs a row (720 px at 100 dpi): eight pairs side by side were 1,400 px, wider than a
    # report page; more images wrap onto further (clean, UAP) row pairs.
    n = clean.shape[0]
    cols = max(1, min(n, GRID_COLUMNS))
    pairs = -(-n // cols)
    fig, axes = plt.subplots(2 * pairs, cols, figsize=(1.7 * cols + 0.4, 2.3 * 2 * pairs), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")  # the last row pair may have empty places
    for i in range(n):
        changed = int(adv_pred[i]) != int(clean_pred[i])
        rows = ((clean[i], f"true: {classnames[int(labels[i])]}\nclean: {classnames[int(clean_pred[i])]}", "black"),
                (adv[i], f"UAP: {classnames[int(adv_pred[i])]}", "red" if changed else "black"))
        for row, (img, title, colour) in enumerate(rows):
            ax = axes[2 * (i // cols) + row, i % cols]
            ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=8, color=colour)
    fig.suptitle("upper: clean prediction | lower: with the UAP (red = changed)", fontsize=9)
    fig.tight_layout()
    paths.append(out / "uap_grid.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return [str(p) for p in paths]
