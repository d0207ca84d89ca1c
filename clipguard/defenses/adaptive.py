"""How a defended classifier is attacked and what its record says (Carlini et al. 2019's checklist; Tramer et al.
2020, "On Adaptive Attacks to Adversarial Example Defenses").

``adaptive`` (the default): the attack's target is the whole defended pipeline. Its gradients go through every step
of the defense (TTC builds its inner steps with ``create_graph``: unrolled, no BPDA, as no step is
non-differentiable; sign() and thresholds have zero derivative almost everywhere, their true derivative). A
randomized defense is attacked with EOT (Athalye et al. 2018): PGD / FGSM / APGD see :class:`EOT`, the defended
classifier's softmax averaged over ``--defense-eot`` draws (default :data:`DEFAULT_EOT`); AutoAttack runs its
version ``rand`` (APGD-CE and APGD-DLR, 20 draws per gradient) unless ``--aa-version`` says otherwise.

``non-adaptive``: crafted on the undefended classifier; the defended one classifies the result (the TTC paper's
protocol). Its robust accuracy is an upper bound; the record says ``defense.evaluation: non-adaptive``, its
``adaptive_attack`` check fails, and the report marks the number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from clipguard.attacks import integrity as ic
from clipguard.attacks.registry import AttackConfig
from clipguard.attacks.runner import run_attack
from clipguard.models.inference import attack_inputs, predict_logits
from clipguard.records.metrics import accuracy_counts, put
from clipguard.specs import parse_eps

DEFAULT_EOT = 4  # draws per gradient for a randomized defense (toy: 1 draw 0.46, 4 draws 0.35 robust, PGD-10 4/255)
COST_IMAGES = 256  # images timed with and without the defense (cost per image)
CHECK_IMAGES = 64  # images of the randomness check and of the eps-0 / determinism checks on the undefended part


class EOT(nn.Module):
    """Expectation over transformation: log of the defended classifier's softmax averaged over ``n`` draws (the
    expected classifier), so cross-entropy on it is -log E[p_y]; gradients flow through every draw."""

    def __init__(self, model: nn.Module, n: int):
        super().__init__()
        self.model, self.n = model, int(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return self.model(x)
        logp = torch.stack([torch.log_softmax(self.model(x).float(), dim=1) for _ in range(self.n)])
        return torch.logsumexp(logp, dim=0) - math.log(self.n)


@dataclass
class AttackPlan:
    """What attacks the defended classifier: ``attack`` crafted on ``craft_on`` (None: the defended classifier
    itself), then the defended classifier classifies the result."""

    mode: str  # adaptive | non-adaptive
    attack: AttackConfig
    craft_on: nn.Module | None
    eot: int  # draws per gradient through the EOT wrapper (1: none)
    notes: list[str] = field(default_factory=list)

    def to_record(self) -> dict:
        return {"evaluation": self.mode, "eot_samples": self.eot, "attack_version": self.attack.aa_version
                if self.attack.name == "autoattack" else None, "notes": self.notes}


def plan_attack(p, options, base: AttackConfig, *, aa_version_given: bool) -> AttackPlan:
    """The attack on ``p.classifier`` (a defense over ``p.undefended``) under ``options.defense_attack``."""
    defense = p.classifier
    if options.defense_attack == "non-adaptive":
        return AttackPlan("non-adaptive", base, p.undefended, 1, [
            "crafted on the undefended classifier, classified by the defended one (the paper's protocol): robust "
            "accuracy is an upper bound (Tramer et al. 2020)"])
    randomized = getattr(defense, "randomized", False)
    notes = ["gradients through every step of the defense (unrolled with create_graph; no BPDA: no step is "
             "non-differentiable)"]
    if base.name == "autoattack":
        eot = options.defense_eot or 1
        if randomized and not aa_version_given:
            base = replace(base, aa_version="rand")
            notes.append("randomized defense: AutoAttack version rand (APGD-CE, APGD-DLR, EOT over 20 draws)")
    else:
        eot = options.defense_eot or (DEFAULT_EOT if randomized else 1)
        if randomized:
            notes.append(f"randomized defense: EOT over {eot} draws per gradient (the mean softmax)")
    return AttackPlan("adaptive", base, EOT(defense, eot) if eot > 1 else None, eot, notes)


def adjust_entries(entries: list[dict], plan: AttackPlan) -> None:
    """Robust entries of a defended run: crafted on the undefended classifier, its own numbers on the same images
    are ``undefended_clean_acc`` / ``undefended_adv_acc``; the EOT wrapper's are dropped (it is the defense)."""
    for e in entries:
        for old, new in (("surrogate_clean_acc", "undefended_clean_acc"), ("surrogate_robust_acc",
                                                                           "undefended_adv_acc")):
            for d in (e, e.get("counts", {})):
                for suffix in ("", "_ci"):
                    if old + suffix in d:
                        value = d.pop(old + suffix)
                        if plan.mode == "non-adaptive":
                            d[new + suffix] = value
        e["defense_evaluation"] = plan.mode


def defense_checks(p, plan: AttackPlan, checks: list[dict], *, resolution: str, batch_size: int) -> list[dict]:
    """The integrity checks of a defended run: Carlini et al.'s first item (an adaptive attack), EOT for a
    randomized defense, and AutoAttack's dynamic-defense flag read against the plan. For a randomized defense the
    deterministic-forward and eps-0 checks run on the undefended classifier (the defense draws anew on every pass),
    and its randomness is measured: the share of predictions that change between two defended passes."""
    defense, n = p.classifier, min(len(p.data.labels), CHECK_IMAGES)
    out = []
    for c in checks:
        if c["name"] == "aa_dynamic" and plan.mode == "adaptive":  # AutoAttack's warning, answered by unrolling
            c = {**ic.check("aa_dynamic", c["value"], True, "AutoAttack saw a dynamic defense; attacked adaptively "
                            "(gradients through its unrolled steps)"), "eps": c.get("eps")}
        if getattr(defense, "randomized", False) and c["name"] in ("deterministic_forward", "eps0_equals_clean"):
            continue
        out.append(c)
    adaptive = plan.mode == "adaptive"
    out.append(ic.check("adaptive_attack", plan.mode, adaptive,
                        "attacks go through the whole defended pipeline" if adaptive else
                        "non-adaptive: the attack never saw the defense; robust accuracy is an upper bound"))
    if not getattr(defense, "randomized", False):
        return out
    head = slice(0, n)
    images, labels = p.data.images[head], p.data.labels[head]
    zero = run_attack(p.undefended, images, labels, plan.attack.with_eps(parse_eps("0")), batch_size=batch_size,
                      resolution=resolution, progress=False)
    out.append(ic.eps0_check(zero.adv_pred, zero.clean_pred))
    x = attack_inputs(p.undefended, images, resolution)
    out.append(ic.deterministic_check(p.undefended, x))
    with torch.no_grad():
        changed = float((defense(x).argmax(1) != defense(x).argmax(1)).float().mean())
    if not adaptive:  # the undefended classifier was attacked: nothing to average over (adaptive_attack failed)
        return out
    handled = plan.eot > 1 or plan.attack.aa_version == "rand"
    out.append(ic.check("randomized_defense_eot", {"predictions_changed": round(changed, 4), "eot": plan.eot,
                                                   "aa_version": plan.attack.aa_version
                                                   if plan.attack.name == "autoattack" else None},
                        handled, "the defense draws randomness on every pass: an adaptive attack must average over "
                                 "it (EOT: --defense-eot N > 1, or AutoAttack --aa-version rand)"))
    return out


def defense_cost(p, *, precision: str, batch_size: int, images: int = COST_IMAGES) -> dict:
    """Milliseconds per image of a clean forward with and without the defense, measured on the first ``images``
    images (one untimed warm-up batch first), and their ratio."""
    head = slice(0, min(len(p.data.labels), images))
    x = p.data.images[head]
    predict_logits(p.classifier, x[:2], batch_size=batch_size, precision=precision, progress=False)  # warm-up
    ms = {}
    for name, clf in (("defended", p.classifier), ("undefended", p.undefended)):
        _, t = predict_logits(clf, x, batch_size=batch_size, precision=precision, progress=False)
        ms[name] = 1000 * t["wall_s"] / max(x.shape[0], 1)
    return {"ms_per_image": round(ms["defended"], 4), "undefended_ms_per_image": round(ms["undefended"], 4),
            "overhead": round(ms["defended"] / max(ms["undefended"], 1e-12), 2), "images": int(x.shape[0]),
            "device": str(p.clip.device), "precision": precision, "measured": "clean forward passes, batch "
                                                                              f"{batch_size}"}


def undefended_accuracy(p, *, precision: str, batch_size: int) -> dict:
    """Clean top-1 accuracy of the undefended classifier on the run's images (k / n with its interval)."""
    logits, _ = predict_logits(p.undefended, p.data.images, batch_size=batch_size, precision=precision,
                               progress=False)
    return put({}, "acc1", *accuracy_counts(logits.argmax(1), p.data.labels))


def defense_record(p, *, plan: AttackPlan | None, cost: dict, undefended: dict | None = None,
                   evaluation: str | None = None) -> dict:
    """The record's ``defense`` section: the defense and its options, how it was attacked, what it costs, and
    (eval) the undefended classifier's clean accuracy beside the defended one's ``metrics.acc1``."""
    rec = {**p.classifier.to_record(), "cost": cost}
    rec.update(plan.to_record() if plan is not None else {"evaluation": evaluation or "clean only (no attack)"})
    if undefended is not None:
        rec["undefended"] = undefended
    return rec
