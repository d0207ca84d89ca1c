"""The attack contract and the attack registry over torchattacks: ``ATTACKS`` / ``build_attack(model, config)``.

The one attack contract (torchattacks' own shape): an :data:`Attack` takes images in [0, 1] and their
labels and returns adversarial images in [0, 1] of the same shape. Every attack gets a [0, 1] -> (N, C)
logits module (the :class:`~clipguard.models.classifier.ZeroShotClassifier` unchanged, a surrogate, or a
training objective seen as logits), so eps and alpha are always in [0, 1] pixel units. Evaluation
(``attacks.runner``), the fine-tuning adversary (``finetune.adversary``) and a fitted UAP
(``uap.fit.universal_attack``) all hand out this contract.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version

import pyautoattack
import torch
import torchattacks
from pyautoattack import AutoAttack
from pyautoattack import checks as aa_checks
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.registry import Registry
from clipguard.specs import Eps, Norm, parse_eps, parse_norm

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x in [0,1], labels) -> x_adv in [0,1]


AA_VERSIONS = ("standard", "plus", "rand", "custom")  # the reference AutoAttack's versions
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")  # what --aa-attacks may list (custom)
_TARGETED = ("apgd-t", "fab-t", "apgd-dlr")  # need >= 4 classes (targeted DLR loss uses the 3rd/4th logit)
AA_ITERATIONS = 100  # APGD / FAB iterations in every reference version; Square: 5,000 queries


@dataclass(frozen=True)
class AttackConfig:
    """One white-box attack setting, [0, 1] pixel units throughout. Which fields an attack uses is in
    :data:`USES`; :meth:`to_record` writes exactly those."""

    name: str = "pgd"  # a name in ATTACKS
    eps: Eps = parse_eps("8/255")  # radius, [0, 1] pixel units (linf: per pixel; l2: per image)
    alpha: Eps | None = None  # PGD step size, [0, 1] pixel units; None = eps / 4
    steps: int = 10  # iterations (PGD, APGD)
    restarts: int = 1  # random restarts (PGD, APGD); a sample counts as broken if any restart breaks it
    seed: int = 0  # seeds random starts
    norm: Norm = Norm.LINF  # linf | l2 (a string is parsed)
    aa_version: str = "standard"  # AutoAttack: standard | plus | rand | custom
    aa_attacks: tuple[str, ...] | None = None  # AutoAttack custom: which of AA_ATTACKS run, in order

    def __post_init__(self):
        object.__setattr__(self, "norm", parse_norm(self.norm))  # "linf" and Norm.LINF both work

    @property
    def alpha_value(self) -> float:
        return self.alpha.value if self.alpha is not None else self.eps.value / 4

    def with_eps(self, eps: Eps) -> AttackConfig:
        return replace(self, eps=eps)

    def to_record(self, n_classes: int | None = None) -> dict:
        """The parameters this attack uses, and nothing else (alpha is per eps: it is in each robust entry)."""
        rec = {"name": self.name, "norm": self.norm, "eps": self.eps.to_record(), "seed": self.seed}
        if self.name == "autoattack":
            rec.update(library="pyautoattack", library_version=_version(pyautoattack), version=self.aa_version,
                       attacks=list(aa_attacks_run(self, n_classes)), iterations=AA_ITERATIONS)
            if n_classes is not None:
                rec["n_target_classes"] = min(9, n_classes - 1)
            return rec
        rec.update(library="torchattacks", library_version=torchattacks.__version__)
        if "steps" in USES[self.name]:
            rec["steps"] = self.steps
        if "restarts" in USES[self.name]:
            rec["restarts"] = self.restarts
        return rec


def _version(module) -> str | None:
    try:
        return version(module.__name__)
    except PackageNotFoundError:
        return getattr(module, "__version__", None)


# The options each attack reads: anything else a user sets is refused (one line, exit 2).
USES: dict[str, frozenset[str]] = {
    "fgsm": frozenset({"eps", "norm"}),
    "pgd": frozenset({"eps", "norm", "alpha", "steps", "restarts"}),
    "apgd": frozenset({"eps", "norm", "steps", "restarts"}),
    "autoattack": frozenset({"eps", "norm", "aa_version", "aa_attacks"}),
}
DEFAULT_STEPS = {"pgd": 10, "apgd": 100}  # APGD: the reference's 100 iterations


def aa_attacks_run(cfg: AttackConfig, n_classes: int | None) -> tuple[str, ...]:
    """The AutoAttack parts that run: the version's list (or --aa-attacks for custom), without the targeted
    ones on sets with fewer than 4 classes (as FARE's CLIP_benchmark fork does)."""
    named = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "plus": ("apgd-ce", "apgd-dlr", "fab", "square",
             "apgd-t", "fab-t"), "rand": ("apgd-ce", "apgd-dlr")}
    attacks = tuple(cfg.aa_attacks or ()) if cfg.aa_version == "custom" else named[cfg.aa_version]
    if n_classes is not None and n_classes < 4:
        attacks = tuple(a for a in attacks if a not in _TARGETED)
    return attacks


ATTACKS: Registry[Callable[[nn.Module, AttackConfig], Attack]] = Registry("--attack")
_RESTARTABLE = {"pgd"}  # wrapped in build_attack; APGD restarts internally


@ATTACKS.register("fgsm")
def _fgsm(model: nn.Module, cfg: AttackConfig) -> Attack:
    if cfg.norm == "l2":  # the fast gradient method in L2: one step of size eps along g / ||g||_2
        return torchattacks.PGDL2(model, eps=cfg.eps.value, alpha=cfg.eps.value, steps=1, random_start=False)
    return torchattacks.FGSM(model, eps=cfg.eps.value)


@ATTACKS.register("pgd")
def _pgd(model: nn.Module, cfg: AttackConfig) -> Attack:
    kind = torchattacks.PGDL2 if cfg.norm == "l2" else torchattacks.PGD
    return kind(model, eps=cfg.eps.value, alpha=cfg.alpha_value, steps=cfg.steps, random_start=True)


@ATTACKS.register("apgd")
def _apgd(model: nn.Module, cfg: AttackConfig) -> Attack:
    # APGD reseeds itself on every call, so restarts go through its own n_restarts (each from a new point).
    return torchattacks.APGD(model, norm="L2" if cfg.norm == "l2" else "Linf", eps=cfg.eps.value, steps=cfg.steps,
                             n_restarts=cfg.restarts, seed=cfg.seed, loss="ce")


@ATTACKS.register("autoattack")
def _autoattack(model: nn.Module, cfg: AttackConfig) -> Attack:
    """Croce & Hein's reference AutoAttack (the code RobustBench runs), at the version's own settings."""
    built: dict = {}

    def setup(n_classes: int):
        # custom = the named parts at the standard version's settings (1 restart, 100 iterations); below 4
        # classes a version keeps its settings and loses its targeted parts. The record says which ran.
        aa = AutoAttack(model, norm="L2" if cfg.norm == "l2" else "Linf", eps=cfg.eps.value, seed=cfg.seed,
                        device=next(model.parameters()).device,
                        version="standard" if cfg.aa_version == "custom" else cfg.aa_version)
        aa.attacks_to_run = list(aa_attacks_run(cfg, n_classes))
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = max(1, min(9, n_classes - 1))
        aa.verbose = False
        logging.getLogger("auto-attack").setLevel(logging.ERROR)
        return aa

    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if "aa" not in built:  # the class count from the model itself (a surrogate has no text embeddings)
            with torch.no_grad():
                built["aa"] = setup(int(model(x[:1]).shape[1]))
        aa = built["aa"]
        if not aa.attacks_to_run:
            return x
        with aa_flags_caught(attack.flags):  # AutoAttack's own warnings become integrity checks (attacks.integrity)
            return aa.run_standard_evaluation(x, y, batch_size=x.shape[0])[0]

    attack.flags = set()  # names of AA_FLAGS raised on any batch
    return attack


# AutoAttack's own flags (pyautoattack.checks): a phrase of its warning -> the flag's name in the record
AA_FLAGS = {"randomized defense": "randomized", "zero gradient": "zero_gradients",
            "Square Attack has decreased": "square_beats_white_box", "dynamic defense": "dynamic",
            "probability distribution": "probabilities", "target classes": "target_classes",
            "not possible to use": "target_classes"}


@contextmanager
def aa_flags_caught(flags: set):
    """Collect the names of the AA_FLAGS that AutoAttack's checks warn about while the block runs (its logger is
    silenced otherwise). Its dynamic-defense check counts calls in a module-level dict it never resets, so one
    dynamic defense would flag every later run in the process: the counts are zeroed first."""
    log = logging.getLogger("auto-attack")

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            flags.update(name for phrase, name in AA_FLAGS.items() if phrase in msg)

    for k in aa_checks.funcs:
        aa_checks.funcs[k] = 0
    handler, level, propagate = Catch(logging.WARNING), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        yield flags
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def list_attacks() -> list[str]:
    return ATTACKS.names()


def check_attack(cfg: AttackConfig) -> None:
    """A known attack, norm and AutoAttack version, at least one step and one restart; one-line errors."""
    ATTACKS.check(cfg.name)
    parse_norm(cfg.norm)
    for name, value in (("--steps", cfg.steps), ("--restarts", cfg.restarts)):
        if value < 1:
            raise ClipguardError(f"{name} {value} must be at least 1")
    if cfg.name == "autoattack":
        if cfg.aa_version not in AA_VERSIONS:
            raise ClipguardError(f"--aa-version {cfg.aa_version!r} is unknown: choose from {', '.join(AA_VERSIONS)}")
        if cfg.aa_version == "custom" and not cfg.aa_attacks:
            raise ClipguardError(f"--aa-version custom needs --aa-attacks, a comma list of {', '.join(AA_ATTACKS)}")
        if cfg.aa_attacks and cfg.aa_version != "custom":
            raise ClipguardError(f"--aa-attacks is for --aa-version custom; {cfg.aa_version} runs its own list")
        bad = [a for a in cfg.aa_attacks or () if a not in AA_ATTACKS]
        if bad:
            raise ClipguardError(f"--aa-attacks {bad[0]!r} is unknown: choose from {', '.join(AA_ATTACKS)}")


def build_attack(model: nn.Module, cfg: AttackConfig) -> Attack:
    """An ``(x, y) -> x_adv`` function for ``cfg`` against ``model`` (a [0,1] -> logits classifier).

    With ``restarts > 1`` (PGD here, APGD internally) each restart starts from a new random point and a sample
    keeps the first adversarial example that fools the model (worst case over restarts).

    At eps 0 every attack, whatever its norm, restarts or version, returns ``x`` unchanged: a radius-0 ball holds
    only ``x``, and the libraries are not safe there (torchattacks' PGDL2, so L2 PGD and FGSM, projects with
    ``eps / ||x_adv - x||_2`` = 0 / 0 = NaN; AutoAttack would run every part on every image, none ever fooled).
    """
    check_attack(cfg)
    if cfg.eps.value == 0:
        return _unchanged
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


def _unchanged(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The attack at eps 0: the input itself (a copy, detached, as every attack returns)."""
    return x.detach().clone()
