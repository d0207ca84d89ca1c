"""Robust accuracy for ``clipguard eval --attack``: an eps sweep with integrity checks per number."""

from __future__ import annotations

from dataclasses import replace

import torch

from clipguard.attacks import integrity as ic
from clipguard.attacks.registry import USES, AttackConfig
from clipguard.attacks.runner import run_attack
from clipguard.models.inference import attack_inputs
from clipguard.records.metrics import accuracy_counts, attack_success_counts, count, put, ratio
from clipguard.specs import parse_eps

EPS0_IMAGES = 64  # images of the eps = 0 check
PRECISION_IMAGES = 256  # images of the bf16-vs-fp32 check of a robust number not attacked in fp32


def robust_entry(run, labels: torch.Tensor, cfg: AttackConfig) -> dict:
    """Robust accuracy, RobustBench's way (share of ALL images that are clean-correct and stay correct under the
    attack, so robust <= clean), and attack success rate (share of the attacked, clean-correct images flipped);
    each as k / n of integers, with its ``counts``."""
    hit, n = run.attacked, len(labels)
    entry = {"attack": cfg.name, "eps": cfg.eps.text, "eps_value": cfg.eps.value}
    put(entry, "robust_acc", count(run.robust), n)
    put(entry, "clean_acc", *accuracy_counts(run.clean_pred, labels))
    entry["attacked"] = count(hit)
    put(entry, "attack_success_rate", *attack_success_counts(labels[hit], run.clean_pred[hit], run.adv_pred[hit]))
    entry["images_per_s"] = run.timings["images_per_s"]
    entry["wall_s"] = run.timings.get("wall_s")  # this eps's attack alone; timings.total_s is the whole command
    if "alpha" in USES[cfg.name]:
        entry["alpha"] = cfg.alpha.text if cfg.alpha else f"{cfg.eps.value / 4:.6g} (eps/4)"
        entry["alpha_value"] = cfg.alpha_value
    if run.source_clean_pred is not None:
        put(entry, "surrogate_clean_acc", *accuracy_counts(run.source_clean_pred, labels))
        put(entry, "surrogate_robust_acc", *accuracy_counts(run.source_adv_pred, labels))
    entry["counts"] = entry.pop("counts")  # after the numbers, so a printed entry reads metrics first
    return entry


def robust_share(run) -> float:
    """Robust accuracy of one run as k / n of integers (the number the checks compare)."""
    return ratio(count(run.robust), len(run.robust))


def robust_sweep(p, base: AttackConfig, eps_list, *, batch_size: int, resolution: str, precision: str,
                 surrogate=None, sanity: bool = False, progress: bool = True,
                 correct: torch.Tensor | None = None,
                 precision_images: int = PRECISION_IMAGES) -> tuple[list[dict], list[dict], dict]:
    """Run ``base`` at every eps on the clean-correct images (``correct``: the record's clean pass); returns
    (robust entries, integrity checks, {eps text: (N,) adversarial predictions, "robust@" + eps text: (N,) bool, the
    runner's own per-image robust verdict (the one robust_acc counts; under a randomized defense it is not derivable
    from one clean and one adversarial prediction)}). An attack not run in fp32
    (``precision`` bf16 / fp16) is checked against fp32 on the first ``precision_images`` images at every eps
    (:func:`precision_checks`)."""
    images, labels = p.data.images, p.data.labels
    kw = dict(batch_size=batch_size, resolution=resolution, precision=precision, progress=progress,
              craft_on=surrogate, correct=correct)
    entries, checks, preds = [], [], {}
    for eps in eps_list:
        cfg = base.with_eps(eps)
        run = run_attack(p.classifier, images, labels, cfg, **kw)
        entries.append(robust_entry(run, labels, cfg))
        preds[eps.text] = run.adv_pred
        preds[f"robust@{eps.text}"] = run.robust
        for c in ic.cheap_checks(run, eps.value, base.norm):
            checks.append({**c, "eps": eps.text})
    # eps = 0 through the same runner (attack path, masks, adversarial pass) must reproduce the clean predictions
    # exactly, image by image (on the first EPS0_IMAGES). build_attack returns x itself at eps 0 (the only point of
    # a radius-0 ball), so a mismatch here is the runner's or the model's, never a library's 0/0.
    head = slice(0, min(len(labels), batch_size, EPS0_IMAGES))
    zero_cfg = base.with_eps(parse_eps("0"))
    zero = run_attack(p.classifier, images[head], labels[head], zero_cfg, **{**kw, "progress": False})
    checks.append(ic.eps0_check(zero.adv_pred, zero.clean_pred))
    checks.append(ic.deterministic_check(p.classifier, attack_inputs(p.classifier, images[head], resolution)))
    if precision != "fp32":
        checks += precision_checks(p, base, eps_list, kw, images=precision_images)
    if sanity:
        checks += sanity_checks(p, base, eps_list, entries, kw)
    return entries, checks, preds


def precision_checks(p, base: AttackConfig, eps_list, kw: dict, *, images: int = PRECISION_IMAGES) -> list[dict]:
    """At every eps: the attack in ``kw["precision"]`` (bf16) and in fp32 on the same first ``images`` images,
    same seed and batches, only the precision differs; their robust accuracies must agree within 0.5 points."""
    low, n = kw["precision"], min(len(p.data.labels), images)
    head = slice(0, n)
    correct = kw["correct"][head] if kw["correct"] is not None else None
    x, y = p.data.images[head], p.data.labels[head]
    out = []
    for eps in eps_list:
        cfg = base.with_eps(eps)
        acc = {prec: robust_share(run_attack(p.classifier, x, y, cfg, **{**kw, "precision": prec, "progress": False,
                                                                        "correct": correct}))
               for prec in (low, "fp32")}
        out.append({**ic.precision_check(acc[low], acc["fp32"], low, n), "eps": eps.text})
    return out


def sanity_checks(p, base: AttackConfig, eps_list, entries: list[dict], kw: dict) -> list[dict]:
    """Costly checks: monotone sweep, PGD vs FGSM, doubled steps, 5 restarts vs 1 (at the largest eps)."""
    images, labels = p.data.images, p.data.labels
    kw = {**kw, "progress": False}
    curve = sorted(((e["eps"], e["eps_value"], e["robust_acc"]) for e in entries), key=lambda t: t[1])
    out = [ic.monotone_check([(t, a) for t, _, a in curve])] if len(curve) > 1 else []
    top = max(eps_list, key=lambda e: e.value)
    acc = next(e["robust_acc"] for e in entries if e["eps"] == top.text)

    def robust(c: AttackConfig) -> float:
        return robust_share(run_attack(p.classifier, images, labels, c, **kw))

    if base.name != "fgsm":
        fgsm = robust(AttackConfig("fgsm", top, seed=base.seed, norm=base.norm))
        out.append(ic.stronger_check("stronger_than_fgsm", acc, fgsm, f"{base.name} robust acc <= FGSM's"))
    if base.name in ("pgd", "apgd"):
        doubled = replace(base, eps=top, steps=base.steps * 2)
        out.append(ic.converged_check(acc, robust(doubled)))
        five = replace(base, eps=top, restarts=5)
        r5 = robust(five)
        out.append(ic.restarts_check(acc, r5))
    for c in out:
        c["eps"] = top.text
    return out
