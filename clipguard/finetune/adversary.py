"""Training adversaries: ``TRAIN_ATTACKS`` / ``build_train_attack(name, ...)``.

Both use the PGD of :mod:`clipguard.attacks.registry` (torchattacks: L-inf, random start, sign steps,
projection onto the eps-ball and [0, 1], gradients to the images only), through the common attack
contract ``(x, y) -> x_adv``. ``pgd`` maximises the training objective against the model being trained
(fresh every step; torchattacks runs the model in eval mode while crafting); ``transfer`` maximises a
fixed surrogate's cross-entropy.

PGD maximises a cross-entropy, so the objective is handed to it as logits: per image ``[0, loss_i]``
against class 0, whose cross-entropy is ``softplus(loss_i)``. softplus is increasing, so every sign-gradient
step (and so the whole attack) is the one that ascends the objective itself, whatever the objective (TeCoA's
cross-entropy, FARE's feature distance). An objective may name another loss for its adversary
(``Objective.attack_loss``): PMG-AFT and TGA-ZSR train on the cross-entropy's adversarial examples, as their papers do.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from clipguard.attacks.registry import Attack, AttackConfig, build_attack
from clipguard.registry import Registry
from clipguard.specs import Eps

Adversary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, y, ref) -> x_adv


class ObjectiveLogits(nn.Module):
    """Logits ``[0, loss_i]`` (N, 2) whose cross-entropy against class 0 is ``softplus(loss_i)``: the training
    objective's attack loss of one batch (labels ``y`` and ``ref`` fixed) as a classifier to attack."""

    def __init__(self, clf: nn.Module, objective, y: torch.Tensor, ref: torch.Tensor | None,
                 autocast: Callable[[], AbstractContextManager]):
        super().__init__()
        self.clf, self.objective, self.y, self.ref, self.autocast = clf, objective, y, ref, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = self.objective.attack_loss(self.clf, x, self.y, self.ref).float()
        return torch.stack([torch.zeros_like(loss), loss], dim=1)


def _pgd(clf: nn.Module, objective, surrogate, cfg: AttackConfig, autocast) -> Adversary:
    def craft(x, y, ref):
        target = ObjectiveLogits(clf, objective, y, ref, autocast).train(clf.training)  # torchattacks restores it
        return build_attack(target, cfg)(x, torch.zeros_like(y))
    return craft


def _transfer(clf: nn.Module, objective, surrogate, cfg: AttackConfig, autocast) -> Adversary:
    attack: Attack = build_attack(surrogate, cfg)

    def craft(x, y, ref):
        with autocast():
            return attack(x, y)
    return craft


TRAIN_ATTACKS: Registry[Callable[..., Adversary]] = Registry("--train-attack")
TRAIN_ATTACKS.register("pgd", _pgd)
TRAIN_ATTACKS.register("transfer", _transfer)


def build_train_attack(name: str, clf: nn.Module, objective, *, surrogate: nn.Module | None, eps: Eps,
                       alpha: Eps, steps: int, autocast: Callable[[], AbstractContextManager]) -> Adversary:
    """An ``(x, y, ref) -> x_adv`` function; ``autocast`` makes the precision context of a forward pass.

    eps = 0 returns the clean images (no attack: plain fine-tuning on clean inputs).
    """
    make = TRAIN_ATTACKS.get(name)
    if eps.value == 0:
        return lambda x, y, ref: x.detach()
    return make(clf, objective, surrogate, AttackConfig("pgd", eps, alpha, steps), autocast)
