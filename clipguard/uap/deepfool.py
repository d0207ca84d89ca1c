"""DeepFool for one image (Moosavi-Dezfooli et al. 2016) and the universal-perturbation loop built on it
(Moosavi-Dezfooli et al. 2017, "Universal adversarial perturbations", Algorithm 1).

DeepFool linearises the classifier at the current point and takes the smallest step, in the threat
model's norm, that crosses the nearest linearised boundary among the top-k candidate classes; it repeats
until the prediction changes. With ``f`` the logit gap and ``w`` its gradient:
L2: ``r = |f| / ||w||_2^2 * w``; L-inf (the dual-norm form): ``r = |f| / ||w||_1 * sign(w)``.
"""

from __future__ import annotations

import torch
from torch import nn

from clipguard.specs import Norm
from clipguard.uap.core import FitContext, hits, perturb, predict, project, universal_attack

TINY = 1e-4  # added to |f| so a step lands just past the boundary, not on it


def _step(f: torch.Tensor, w: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The minimal step that moves a linear function with value ``f`` (< 0) and gradient ``w`` to 0."""
    f = f.abs() + TINY
    if norm is Norm.LINF:
        return f / w.abs().sum().clamp_min(1e-12) * w.sign()
    return f / w.pow(2).sum().clamp_min(1e-12) * w


def _dual(w: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per row of ``w`` (K, ...): the dual norm that measures distance to a linear boundary."""
    flat = w.flatten(1)
    return flat.abs().sum(1) if norm is Norm.LINF else flat.norm(p=2, dim=1)


def deepfool(model: nn.Module, x: torch.Tensor, reference: int, norm: Norm, *, target: int | None = None,
             steps: int = 10, overshoot: float = 0.02, candidates: int = 10) -> torch.Tensor:
    """The DeepFool perturbation of one image.

    Args:
        model: [0, 1] pixels -> (N, C) logits.
        x: the current point, [0, 1] pixels.
        reference: the class to move away from (untargeted); ignored when ``target`` is given.
        target: move until the prediction is this class instead.

    Shape:
        x: (1, 3, H, W); returns r of the same shape, ``(1 + overshoot) * sum of steps`` (zeros when
        ``x`` is already fooled).
    """
    norm = Norm(norm)
    r_tot = torch.zeros_like(x)
    classes = None
    k = 2 if target is not None else max(candidates, 2)  # copies of x: one gradient row per class
    for _ in range(steps):
        xp = (x + (1 + overshoot) * r_tot).clamp(0, 1)
        xs = xp.expand(k, -1, -1, -1).clone().requires_grad_(True)
        logits = model(xs)
        l0 = logits[0].detach()
        pred = int(l0.argmax())
        if (target is None and pred != reference) or (target is not None and pred == target):
            break
        if target is not None:  # cross the boundary between the current class and the target
            classes = torch.tensor([pred, target], device=x.device)
        elif classes is None:  # the reference plus the top others, fixed at the first step as in the paper
            others = [c for c in l0.argsort(descending=True).tolist() if c != reference]
            classes = torch.tensor([reference] + others[:k - 1], device=x.device)
        (g,) = torch.autograd.grad(logits[torch.arange(classes.numel()), classes].sum(), xs)
        g = g[:classes.numel()]
        w = g[1:] - g[:1]  # gradients of the gaps (candidate - current class)
        f = l0[classes[1:]] - l0[classes[0]]  # gaps, negative while not crossed
        best = int((f.abs() / _dual(w, norm).clamp_min(1e-12)).argmin())
        r_tot = r_tot + _step(f[best], w[best:best + 1], norm)
    return ((1 + overshoot) * r_tot).detach()


def deepfool_uap_epoch(ctx: FitContext, v: torch.Tensor, epoch: int) -> tuple[torch.Tensor, float]:
    """One pass of Algorithm 1: for each image still not fooled under ``x + v``, add its DeepFool step
    to ``v`` and project back onto the eps-ball. Returns v and the fooling rate on the whole fitting set.

    Images are visited in shuffled chunks of ``batch_size``; one batched pass per chunk finds the images
    ``v`` already fools, which are skipped (the paper checks each image against the latest ``v``; the
    difference is the few updates made within one chunk).
    """
    cfg, n = ctx.cfg, ctx.images.shape[0]
    target = cfg.target_class
    order = torch.randperm(n, generator=ctx.generator)
    hit = seen = 0
    for i in range(0, n, cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        dev_idx = idx.to(ctx.reference.device)
        x, ref, keep = ctx.inputs(ctx.images[idx]), ctx.reference[dev_idx], ctx.counted[dev_idx]
        with torch.no_grad():
            done = hits(ctx.model(perturb(x, v)).argmax(1), ref, target)
        hit += int((done & keep).sum())
        seen += int(keep.sum())
        for j in (~done & keep).nonzero().flatten().tolist():
            r = deepfool(ctx.model, perturb(x[j:j + 1], v), int(ref[j]), cfg.norm, target=target,
                         steps=cfg.deepfool_steps, overshoot=cfg.overshoot, candidates=cfg.candidates)
            v = project(v + r, cfg.norm, cfg.eps.value)
        ctx.advance(len(idx), fooling=hit / max(seen, 1), epoch=epoch + 1)
    (adv,) = predict(ctx.model, ctx.images, ctx.inputs, universal_attack(v), batch_size=cfg.batch_size)
    rate = (hits(adv, ctx.reference, target) & ctx.counted).sum().item() / max(int(ctx.counted.sum()), 1)
    return v, rate
