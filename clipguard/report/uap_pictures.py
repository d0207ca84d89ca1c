"""Pictures of a universal perturbation: ``v`` itself (scaled to be visible) and a grid of clean vs
perturbed images captioned with their predicted classes (red where the UAP changed the prediction)."""

from __future__ import annotations

from pathlib import Path

import torch

from clipguard.report.plots import pyplot


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

    n = clean.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.7 * n + 0.4, 4.6), squeeze=False)
    for i in range(n):
        changed = int(adv_pred[i]) != int(clean_pred[i])
        rows = ((clean[i], f"true: {classnames[int(labels[i])]}\nclean: {classnames[int(clean_pred[i])]}", "black"),
                (adv[i], f"UAP: {classnames[int(adv_pred[i])]}", "red" if changed else "black"))
        for row, (img, title, colour) in enumerate(rows):
            ax = axes[row, i]
            ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=8, color=colour)
            ax.axis("off")
    fig.suptitle("top: clean prediction | bottom: with the UAP (red = changed)", fontsize=9)
    fig.tight_layout()
    paths.append(out / "uap_grid.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return [str(p) for p in paths]
