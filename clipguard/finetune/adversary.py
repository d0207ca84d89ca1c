"""Training adversaries: ``list_train_attacks()`` / ``build_train_attack(name, ...)``.

A small L-inf PGD on δ in [0, 1] pixel units (random start, sign steps, projection onto the eps-ball and
[0, 1]) that asks autograd for δ's gradient only, so no parameter gradient is ever accumulated while
crafting. ``pgd`` maximises the training objective against the model being trained (fresh every step;
the caller puts the model in eval mode); ``transfer`` maximises a fixed surrogate's cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.errors import ClipguardError

Adversary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, y, ref) -> x_adv


def pgd_linf(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, alpha: float,
             steps: int) -> torch.Tensor:
    """Maximise ``loss_fn(x + δ)`` over ||δ||∞ <= eps with x + δ in [0, 1]; returns detached x + δ.

    Shape:
        x: (N, 3, H, W) in [0, 1] -> same shape.
    """
    if eps == 0:
        return x.detach()
    delta = (torch.rand_like(x) * 2 - 1) * eps  # random start, uses the global (checkpointed) RNG
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x + delta), delta)  # gradient to δ only
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _pgd(clf: nn.Module, objective, surrogate, eps, alpha, steps, autocast) -> Adversary:
    def craft(x, y, ref):
        def loss(xa):
            with autocast():
                return objective.loss(clf, xa, y, ref)
        return pgd_linf(loss, x, eps, alpha, steps)
    return craft


def _transfer(clf: nn.Module, objective, surrogate, eps, alpha, steps, autocast) -> Adversary:
    def craft(x, y, ref):
        def loss(xa):
            with autocast():
                return F.cross_entropy(surrogate(xa).float(), y)
        return pgd_linf(loss, x, eps, alpha, steps)
    return craft


_ATTACKS: dict[str, Callable[..., Adversary]] = {"pgd": _pgd, "transfer": _transfer}


def list_train_attacks() -> list[str]:
    return list(_ATTACKS)


def build_train_attack(name: str, clf: nn.Module, objective, *, surrogate: nn.Module | None, eps: float,
                       alpha: float, steps: int, autocast: Callable[[], AbstractContextManager]) -> Adversary:
    """An ``(x, y, ref) -> x_adv`` function; ``autocast`` makes the precision context of a forward pass."""
    if name not in _ATTACKS:
        raise ClipguardError(f"--train-attack {name!r} is unknown: choose from {', '.join(_ATTACKS)}")
    return _ATTACKS[name](clf, objective, surrogate, eps, alpha, steps, autocast)
