"""Attack registry over torchattacks: ``list_attacks()`` / ``build_attack(name, model, config)``.

Every attack gets the :class:`~clipguard.models.classifier.ZeroShotClassifier` unchanged ([0, 1] pixels
in, (N, C) logits out), so eps and alpha are always in [0, 1] pixel units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.specs import Eps, parse_eps, suggest

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x in [0,1], labels) -> x_adv


@dataclass(frozen=True)
class AttackConfig:
    """One white-box attack setting. L-inf threat model, [0, 1] pixel units throughout."""

    name: str = "pgd"  # a key of list_attacks()
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


def _fgsm(model: nn.Module, cfg: AttackConfig) -> AttackFn:
    import torchattacks

    return torchattacks.FGSM(model, eps=cfg.eps.value)


def _pgd(model: nn.Module, cfg: AttackConfig) -> AttackFn:
    import torchattacks

    return torchattacks.PGD(model, eps=cfg.eps.value, alpha=cfg.alpha_value, steps=cfg.steps, random_start=True)


def _apgd(model: nn.Module, cfg: AttackConfig) -> AttackFn:
    import torchattacks

    # APGD reseeds itself on every call, so restarts go through its own n_restarts (each from a new point).
    return torchattacks.APGD(model, norm="Linf", eps=cfg.eps.value, steps=cfg.steps, n_restarts=cfg.restarts,
                             seed=cfg.seed, loss="ce")


def _autoattack(model: nn.Module, cfg: AttackConfig) -> AttackFn:
    import torchattacks

    n_classes = int(model.text_embeddings.shape[0])
    return torchattacks.AutoAttack(model, norm="Linf", eps=cfg.eps.value, version="standard",
                                   n_classes=n_classes, seed=cfg.seed)


_ATTACKS: dict[str, Callable[[nn.Module, AttackConfig], AttackFn]] = {
    "fgsm": _fgsm, "pgd": _pgd, "apgd": _apgd, "autoattack": _autoattack,
}
_RESTARTABLE = {"pgd"}  # wrapped below; APGD restarts internally


def list_attacks() -> list[str]:
    return list(_ATTACKS)


def check_attack(cfg: AttackConfig) -> None:
    """A known attack name and at least one step and one restart, as one-line ClipguardErrors."""
    if cfg.name not in _ATTACKS:
        close = suggest(cfg.name, list(_ATTACKS))
        hint = f" (did you mean {close}?)" if close else ""
        raise ClipguardError(f"--attack {cfg.name!r} is unknown{hint}: choose from {', '.join(_ATTACKS)}")
    for name, value in (("--steps", cfg.steps), ("--restarts", cfg.restarts)):
        if value < 1:
            raise ClipguardError(f"{name} {value} must be at least 1")


def build_attack(model: nn.Module, cfg: AttackConfig) -> AttackFn:
    """An ``(x, y) -> x_adv`` function for ``cfg`` against ``model`` (a [0,1] -> logits classifier).

    With ``restarts > 1`` (PGD here, APGD internally) each restart starts from a new random point and a sample
    keeps the first adversarial example that fools the model (worst case over restarts).
    """
    check_attack(cfg)
    attack = _ATTACKS[cfg.name](model, cfg)
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
