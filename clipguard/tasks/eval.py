"""``clipguard eval`` as a library function: config in, record out."""

from __future__ import annotations

import time

import torch

from clipguard.attacks import integrity as ic
from clipguard.attacks.advset import image_digest, load_adv_set
from clipguard.attacks.surrogates import build_surrogate
from clipguard.attacks.sweep import robust_sweep
from clipguard.config import flat
from clipguard.defenses.adaptive import (
    adjust_entries,
    defense_checks,
    defense_cost,
    defense_record,
    plan_attack,
    undefended_accuracy,
)
from clipguard.distributed import gather_objects, is_main
from clipguard.errors import ClipguardError
from clipguard.models.inference import attack_inputs, predict_logits
from clipguard.records.metrics import at_run_confidence, attack_success_counts, classification_metrics, count, put
from clipguard.records.predictions import image_digests, prediction_table, write_predictions
from clipguard.records.schema import make_record
from clipguard.tasks.configs import EvalConfig, eval_config
from clipguard.tasks.setup import prepare

__all__ = ["EvalConfig", "eval_config", "run_eval"]


@at_run_confidence  # every _ci at --confidence
def run_eval(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Clean zero-shot evaluation (robust too with ``attack``); returns a ``clipguard.result/1`` record."""
    started = time.perf_counter()
    adv = None
    if cfg.adv_set:  # the images the set was made from: loaded at the resolution it was crafted at
        adv = load_adv_set(cfg.adv_set)
    p = prepare(cfg.run, resolution=load_resolution(cfg, adv),  # --compile: warmed up for the attack's passes too
                attack_precision=cfg.attack_precision if cfg.attack else None, defense=cfg.defended)
    if adv is not None:
        _check_matching_adv_set(p, cfg, adv)
    digests = [] if cfg.predictions else None  # taken in the clean pass: a streamed set is read once
    on_batch = (lambda a, b, x: digests.extend(image_digests(x))) if cfg.predictions else None
    logits, timings = predict_logits(p.classifier, p.data.images, batch_size=cfg.run.batch_size,
                                     precision=p.clip.precision, progress=progress, on_batch=on_batch)
    timings = p.timings(timings)  # --compile: compiling happened in prepare, reported apart
    metrics = classification_metrics(logits, p.data.labels)
    extra, task = {}, "zeroshot_classification"
    if cfg.attack:
        task = "robustness" if not cfg.surrogate else "transfer_robustness"
        extra = _attack_section(p, cfg, progress, correct=logits.argmax(1) == p.data.labels)
        metrics["robust"] = extra.pop("robust")
        if len(metrics["robust"]) == 1:  # the one eps's numbers at the top too, with their counts
            for name in ("robust_acc", "attack_success_rate"):
                put(metrics, name, **metrics["robust"][0]["counts"][name])
    if cfg.adv_set:
        task = "adv_set_evaluation"
        extra = _adv_set_section(p, cfg, adv, logits)
        for name, counts in extra.pop("metrics")["counts"].items():  # k / n and counts, beside the clean ones
            put(metrics, name, **counts)
    plan = extra.pop("_plan", None)
    if p.undefended is not None:  # --defense: what it is, how it was attacked, its cost, the undefended clean acc1
        bs, prec = cfg.run.batch_size, p.clip.precision
        extra["defense"] = defense_record(p, plan=plan, cost=defense_cost(p, precision=prec, batch_size=bs),
                                          undefended=undefended_accuracy(p, precision=prec, batch_size=bs),
                                          evaluation="saved adversarial set, as crafted" if cfg.adv_set else None)
    adv_preds = extra.pop("_preds", {})
    if cfg.predictions:
        digests = [d for part in gather_objects(digests) for d in part]  # under torchrun: every rank's, in order
        if is_main():
            write_predictions(cfg.predictions, prediction_table(digests, p.data.labels, logits.argmax(1), adv_preds,
                                                                  p.prompts.classnames))
        extra["predictions"] = {"path": str(cfg.predictions), "rows": len(p.data)}
    return make_record(task, clip=p.clip, started=started,
                       dataset=p.data, prompts=p.prompts, metrics=metrics, timings=timings,
                       text_embeddings=p.text.to_record(), adapter=cfg.run.adapter, adapters=p.adapters,
                       config=_recorded(cfg), **extra)


def _recorded(cfg: EvalConfig) -> dict:
    """The config a record keeps: a run with no attack keeps no attack settings (they were not used)."""
    unused = ("attack", *cfg.ATTACK_ONLY) if not cfg.attack else ()
    return {k: v for k, v in flat(cfg).items() if k not in unused}


def _attack_section(p, cfg: EvalConfig, progress: bool, correct) -> dict:
    base, eps_list = cfg.attack_settings(), list(cfg.eps)
    surrogate, resolution = None, load_resolution(cfg)
    if cfg.surrogate:  # crafted on the dataset's own images (native), which the target resizes itself
        surrogate = build_surrogate(cfg.surrogate, p, trust_remote_code=cfg.run.trust_remote_code)
    plan = None
    if p.undefended is not None:  # --defense: through the whole defense (adaptive) or not (defenses.adaptive)
        plan = plan_attack(p, cfg.defended, base, aa_version_given=cfg.aa_version is not None)
        base, surrogate = plan.attack, plan.craft_on
    entries, checks, preds = robust_sweep(p, base, eps_list, batch_size=cfg.run.batch_size, resolution=resolution,
                                   precision=cfg.attack_precision, surrogate=surrogate, sanity=cfg.sanity,
                                   progress=progress, correct=correct)
    if plan is not None:
        adjust_entries(entries, plan)
        checks = defense_checks(p, plan, checks, resolution=resolution, batch_size=cfg.run.batch_size)
    warnings = []
    if cfg.attack_precision != "fp32":
        warnings.append(f"attack ran in {cfg.attack_precision}: rounding weakens small-eps gradients, "
                        "robust accuracy may be overestimated")
    attack = {**base.to_record(len(p.prompts.classnames)), "eps": [e.to_record() for e in eps_list],
              "accounting": "robustbench: only clean-correct images are attacked; robust_acc over all images",
              "resolution": resolution,
              "precision": cfg.attack_precision, "surrogate": cfg.surrogate}
    return {"robust": entries, "attack": attack, "checks": checks, "warnings": warnings, "_preds": preds,
            "checks_passed": all(c["passed"] for c in checks), "_plan": plan}


def load_resolution(cfg: EvalConfig, adv=None) -> str:
    """How images are loaded: at the model's input size ("model", open_clip's eval geometry) or at their own
    ("native"): a transfer surrogate sees the dataset's own images; a saved set decides for itself."""
    if adv is not None:
        return (adv.manifest.get("attack") or {}).get("resolution", "model")
    return "native" if cfg.surrogate else cfg.resolution


def _check_matching_adv_set(p, cfg: EvalConfig, adv) -> None:
    """Refuse (one line) a saved set that was not made for exactly this run's images."""
    src = adv.manifest.get("data", {})
    digest = adv.manifest.get("images_digest")
    if digest is None:
        raise ClipguardError(f"--adv-set {str(cfg.adv_set)!r} names no image digest (a clipguard 0.1 set), so it "
                             "cannot be matched to this run's images: craft it again with `clipguard attack`")
    if len(p.data) == adv.labels.shape[0] and digest != image_digest(p.data.images):
        raise ClipguardError(
            f"--adv-set {str(cfg.adv_set)!r} was made from other images than this run's {len(p.data)} images of "
            f"{p.data.spec} {p.data.split} (image digests differ): use the same --dataset/--split/--limit/--seed "
            "and --resolution it was crafted with"
        )
    if adv.labels.shape[0] != len(p.data) or not adv.labels.equal(p.data.labels):
        raise ClipguardError(
            f"--adv-set {str(cfg.adv_set)!r} holds {adv.labels.shape[0]} images made for {src.get('spec')} "
            f"{src.get('split')} (limit {src.get('limit')}), but this run has {len(p.data)} images of "
            f"{p.data.spec} {p.data.split}: use the same --dataset/--split/--limit/--seed"
        )


def _adv_set_section(p, cfg: EvalConfig, adv, clean_logits) -> dict:
    # Scored in the precision the set was crafted in (fp32 unless --attack-precision said otherwise).
    precision = (adv.manifest.get("attack") or {}).get("precision", "fp32")
    logits = predict_logits(p.classifier, adv.images, batch_size=cfg.run.batch_size, precision=precision,
                            progress=False)[0]
    labels, adv_pred, clean_pred = p.data.labels, logits.argmax(1), clean_logits.argmax(1)
    robust = (clean_pred == labels) & (adv_pred == labels)  # RobustBench: only clean-correct images count
    metrics = put({}, "robust_acc", count(robust), len(labels))  # k / n of integers, with counts
    put(metrics, "attack_success_rate", *attack_success_counts(labels, clean_pred, adv_pred))
    made = adv.manifest.get("attack") or {}
    eps = made.get("eps") or {}
    checks = [{**c, "eps": eps.get("text")} for c in ic.saved_set_checks(
        adv.images, clean_rows(p, adv.images), float(eps.get("value", float("nan"))), made.get("norm", "linf"),
        batch_size=cfg.run.batch_size)]  # eps missing: NaN, and the within-eps check fails
    return {"_preds": {"adv_set": adv_pred}, "metrics": metrics, "checks": checks,
            "checks_passed": all(c["passed"] for c in checks),
            "adv_set": {"path": str(cfg.adv_set), "scored_precision": precision,
                        **{k: adv.manifest.get(k) for k in ("attack", "source", "quantized")}}}


def clean_rows(p, adv: torch.Tensor):
    """The clean images a saved set was made from, at the set's size: the loaded images themselves, or (a set at
    the model's input size from images loaded at another) each batch brought there as the attack brought it."""
    if tuple(adv.shape[-2:]) == tuple(p.data.images.shape[-2:]):
        return p.data.images
    return lambda a, b: attack_inputs(p.classifier, p.data.images[a:b], "model").cpu()
