"""SGD-UAP: projected gradient ascent on one perturbation ``v`` over mini-batches (Shafahi et al. 2020,
"Universal Adversarial Training"; the SGD-UAP family).

Untargeted: ascend the cross-entropy away from each image's clean prediction, clipped per image at
``ce_clip`` so images that are already fooled stop pulling ``v`` and the step goes to the rest.
Targeted: descend the cross-entropy towards the target class. L-inf steps are ``step * sign(g)``, L2
steps ``step * g / ||g||_2``; after each step ``v`` is projected back onto the eps-ball.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard.distributed import all_reduce_sum_, rank, world_size
from clipguard.specs import Norm
from clipguard.uap.core import FitContext, hits, perturb, project


def sgd_epoch(ctx: FitContext, v: torch.Tensor, epoch: int) -> tuple[torch.Tensor, float]:
    """One pass of projected gradient ascent; returns v and the running fooling rate of the pass.

    Under torchrun a step's batch is ``batch_size`` images per rank (``batch_size x world_size`` in all, cut from
    the one seeded order every rank draws alike); each rank's loss is its share of the whole batch's mean, so the
    all-reduced gradient is the whole batch's, and every rank takes the same step on the same ``v``."""
    cfg, n, ranks = ctx.cfg, ctx.images.shape[0], world_size()
    target, eps, step = cfg.target_class, cfg.eps.value, cfg.step_value
    order = torch.randperm(n, generator=ctx.generator)
    hit = seen = 0
    whole = cfg.batch_size * ranks
    for i in range(0, n, whole):
        batch = order[i:i + whole]
        idx = batch[rank() * cfg.batch_size:(rank() + 1) * cfg.batch_size]
        x, ref = ctx.inputs(ctx.images[idx]), ctx.reference[idx.to(ctx.reference.device)]
        keep = ctx.counted[idx.to(ctx.counted.device)]
        v = v.detach().requires_grad_(True)
        logits = ctx.model(perturb(x, v))
        if target is None:  # ascend clipped CE away from the clean prediction
            losses = F.cross_entropy(logits, ref, reduction="none").clamp(max=cfg.ce_clip)
        else:  # descend CE towards the target class
            losses = -F.cross_entropy(logits, torch.full_like(ref, target), reduction="none")
        loss = losses.mean() if ranks == 1 else losses.sum() / len(batch)
        (g,) = torch.autograd.grad(loss, v)
        all_reduce_sum_([g])
        with torch.no_grad():
            d = g.sign() if cfg.norm is Norm.LINF else g / g.flatten().norm(p=2).clamp_min(1e-12)
            v = project(v + step * d, cfg.norm, eps)
        hit += int((hits(logits.argmax(1), ref, target) & keep).sum())
        seen += int(keep.sum())
        ctx.advance(len(idx), fooling=hit / max(seen, 1), epoch=epoch + 1)
    counts = torch.tensor([hit, seen], dtype=torch.float64)
    all_reduce_sum_([counts])  # the stopping rule sees every rank's images, so every rank stops together
    return v.detach(), float(counts[0] / counts[1].clamp_min(1))
