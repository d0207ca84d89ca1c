"""The attack contract and the attack registry over torchattacks: ``ATTACKS`` / ``build_attack(model, config)``.

The one attack contract (torchattacks' own shape): an :data:`Attack` takes images in [0, 1] and their
labels and returns adversarial images in [0, 1] of the same shape. Every attack gets a [0, 1] -> (N, C)
logits module (the :class:`~clipguard.models.classifier.ZeroShotClassifier` unchanged, a surrogate, or a
training objective seen as logits), so eps and alpha are always in [0, 1] pixel units. Evaluation
(``attacks.runner``), the fine-tuning adversary (``finetune.adversary``) and a fitted UAP
(``attacks.uap.fit.universal_attack``) all hand out this contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.registry import Registry
from clipguard.specs import Eps, parse_eps

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x in [0,1], labels) -> x_adv in [0,1]


@dataclass(frozen=True)
class AttackConfig:
    """One white-box attack setting. L-inf threat model, [0, 1] pixel units throughout."""

    name: str = "pgd"  # a name in ATTACKS
    eps: Eps = parse_eps("8/255")  # L-inf radius, [0, 1] pixel units
    alpha: Eps | None = None  # PGD step size, [0, 1] pixel units; None = eps / 4
    steps: int = 10  # iterations (PGD, APGD)
    restarts: int = 1  # random restarts (PGD, APGD); a sample counts as broken if any restart breaks it
    seed: int = 0  # seeds random starts

    @property
    def alpha_value(self) -> float:
        return self.alpha.value if self.alpha is not None else self.eps.value / 4

    def with_eps(self, eps: Eps) -> AttackConfig:
        return AttackConfig(self.name, eps, self.alpha, self.steps, self.restarts, self.seed)

    def to_record(self) -> dict:
        alpha = self.alpha.to_record() if self.alpha else {"text": "eps/4", "value": self.alpha_value}
        return {"name": self.name, "norm": "linf", "eps": self.eps.to_record(), "alpha": alpha,
                "steps": self.steps, "restarts": self.restarts, "seed": self.seed}


ATTACKS: Registry[Callable[[nn.Module, AttackConfig], Attack]] = Registry("--attack")
_RESTARTABLE = {"pgd"}  # wrapped in build_attack; APGD restarts internally


@ATTACKS.register("fgsm")
def _fgsm(model: nn.Module, cfg: AttackConfig) -> Attack:
    import torchattacks

    return torchattacks.FGSM(model, eps=cfg.eps.value)


@ATTACKS.register("pgd")
def _pgd(model: nn.Module, cfg: AttackConfig) -> Attack:
    import torchattacks

    return torchattacks.PGD(model, eps=cfg.eps.value, alpha=cfg.alpha_value, steps=cfg.steps, random_start=True)


@ATTACKS.register("apgd")
def _apgd(model: nn.Module, cfg: AttackConfig) -> Attack:
    import torchattacks

    # APGD reseeds itself on every call, so restarts go through its own n_restarts (each from a new point).
    return torchattacks.APGD(model, norm="Linf", eps=cfg.eps.value, steps=cfg.steps, n_restarts=cfg.restarts,
                             seed=cfg.seed, loss="ce")


@ATTACKS.register("autoattack")
def _autoattack(model: nn.Module, cfg: AttackConfig) -> Attack:
    import torchattacks

    n_classes = int(model.text_embeddings.shape[0])
    return torchattacks.AutoAttack(model, norm="Linf", eps=cfg.eps.value, version="standard",
                                   n_classes=n_classes, seed=cfg.seed)


def list_attacks() -> list[str]:
    return ATTACKS.names()


def check_attack(cfg: AttackConfig) -> None:
    """A known attack name and at least one step and one restart, as one-line ClipguardErrors."""
    ATTACKS.check(cfg.name)
    for name, value in (("--steps", cfg.steps), ("--restarts", cfg.restarts)):
        if value < 1:
            raise ClipguardError(f"{name} {value} must be at least 1")


def build_attack(model: nn.Module, cfg: AttackConfig) -> Attack:
    """An ``(x, y) -> x_adv`` function for ``cfg`` against ``model`` (a [0,1] -> logits classifier).

    With ``restarts > 1`` (PGD here, APGD internally) each restart starts from a new random point and a sample
    keeps the first adversarial example that fools the model (worst case over restarts).
    """
    check_attack(cfg)
    attack = ATTACKS.get(cfg.name)(model, cfg)
    if cfg.restarts == 1 or cfg.name not in _RESTARTABLE:
        return attack

    def restarted(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        best = attack(x, y)
        for _ in range(cfg.restarts - 1):
            with torch.no_grad():
                alive = model(best).argmax(1) == y  # not yet fooled
            if not alive.any():
                break
            best[alive] = attack(x[alive], y[alive])
        return best

    return restarted
