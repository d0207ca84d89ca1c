"""Pictures of what an attack did: clean image, perturbation (scaled to be visible), adversarial image."""

from __future__ import annotations

from pathlib import Path

import torch

from clipguard.models.inference import to_pixels
from clipguard.report.plots import pyplot


def adversarial_grid(p, run, out_dir, n: int = 8) -> list[str]:
    """One PNG per example (the first ``n``), each captioned with the predicted classes. Returns paths."""
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = p.prompts.classnames
    adv = run.adv_images
    paths = []
    for i in range(min(n, adv.shape[0])):
        clean = to_pixels(p.data.images[i:i + 1], torch.device("cpu"))
        if tuple(clean.shape[-2:]) != tuple(adv.shape[-2:]):
            clean = p.classifier.resize(clean.to(p.clip.device)).cpu()
        delta = adv[i:i + 1].float() - clean
        scale = max(float(delta.abs().max()), 1e-12)
        panels = [(clean[0], f"clean: {names[int(run.clean_pred[i])]}"),
                  (delta[0] / (2 * scale) + 0.5, f"perturbation x{0.5 / scale:.0f}"),
                  (adv[i].float(), f"adversarial: {names[int(run.adv_pred[i])]}")]
        fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
        for ax, (img, title) in zip(axes, panels, strict=True):
            ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"true: {names[int(p.data.labels[i])]}", fontsize=10)
        fig.tight_layout()
        path = out / f"adv_{i:03d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths
