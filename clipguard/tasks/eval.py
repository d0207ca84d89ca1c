"""``clipguard eval`` as a library function: config in, record out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from clipguard.models.inference import predict_logits
from clipguard.records.metrics import attack_success_rate, classification_metrics
from clipguard.records.predictions import image_digests
from clipguard.records.schema import make_record
from clipguard.run_options import RunOptions, flat, split_run
from clipguard.tasks.setup import prepare


@dataclass
class EvalConfig:
    run: RunOptions = field(default_factory=RunOptions)  # model, dataset, split, limit, prompts, device, ...
    attack: str | None = None  # fgsm | pgd | apgd | autoattack; None = clean only
    eps: str = "8/255"  # radius in [0, 1] pixel units (linf: per pixel, l2: per image); a comma list: a sweep
    norm: str = "linf"  # threat model: linf | l2
    alpha: str | None = None  # PGD step, [0, 1] pixel units; None = eps/4 (PGD only)
    steps: int | None = None  # iterations; None = the attack's default (PGD 10, APGD 100); not for FGSM / AA
    restarts: int | None = None  # random restarts (PGD, APGD); None = 1
    aa_version: str | None = None  # AutoAttack: standard (default) | plus | rand | custom
    aa_attacks: str | None = None  # AutoAttack custom: comma list, e.g. "apgd-ce,apgd-t"
    resolution: str = "model"  # where the perturbation lives: model input size or the dataset's native size
    attack_precision: str = "fp32"  # bf16 weakens small-eps gradients: allowed, with a warning in the record
    surrogate: str | None = None  # transfer attack: craft on this model, evaluate the target
    sanity: bool = False  # run the costly sanity checks too
    adv_set: str | None = None  # evaluate on a saved adversarial set instead of attacking
    predictions: str | None = None  # per-image results to this CSV / .parquet file


def eval_config(**opts) -> EvalConfig:
    """An EvalConfig from flat keyword options (a suite cell, a script): RunOptions fields go to ``run``."""
    run, rest = split_run(opts)
    return EvalConfig(run=RunOptions(**run), **rest)


def validate_eval(cfg: EvalConfig) -> None:
    """Option combinations and attack settings, checked before anything loads (CLI, bench cells, library)."""
    from clipguard.errors import ClipguardError

    cfg.run.check()
    if cfg.attack and cfg.adv_set:
        raise ClipguardError("--attack and --adv-set exclude each other: attack now, or evaluate a saved set")
    if cfg.surrogate and not cfg.attack:
        raise ClipguardError("--surrogate needs --attack (e.g. --attack pgd --surrogate toy-cnn)")
    if cfg.attack:
        attack_config(cfg)


def run_eval(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Clean zero-shot evaluation (robust too with ``attack``); returns a ``clipguard.result/1`` record."""
    validate_eval(cfg)
    adv = None
    if cfg.adv_set:  # the images the set was made from: loaded at the resolution it was crafted at
        from clipguard.attacks.advset import load_adv_set

        adv = load_adv_set(cfg.adv_set)
    p = prepare(cfg.run, resolution=load_resolution(cfg, adv),  # --compile: warmed up for the attack's passes too
                attack_precision=cfg.attack_precision if cfg.attack else None)
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
        if len(metrics["robust"]) == 1:
            metrics["robust_acc"] = metrics["robust"][0]["robust_acc"]
            metrics["attack_success_rate"] = metrics["robust"][0]["attack_success_rate"]
    if cfg.adv_set:
        task = "adv_set_evaluation"
        extra = _adv_set_section(p, cfg, adv, logits)
        metrics.update(extra.pop("metrics"))
    adv_preds = extra.pop("_preds", {})
    if cfg.predictions:
        from clipguard.distributed import gather_objects, is_main
        from clipguard.records.predictions import prediction_table, write_predictions

        digests = [d for part in gather_objects(digests) for d in part]  # under torchrun: every rank's, in order
        if is_main():
            write_predictions(cfg.predictions, prediction_table(digests, p.data.labels, logits.argmax(1), adv_preds))
        extra["predictions"] = {"path": str(cfg.predictions), "rows": len(p.data)}
    return make_record(task, clip=p.clip, dataset=p.data, prompts=p.prompts, metrics=metrics, timings=timings,
                       text_embeddings=p.text.to_record(), adapter=cfg.run.adapter, config=flat(cfg), **extra)


def attack_config(cfg) -> tuple:
    """(base AttackConfig, eps list) from CLI strings, validated; shared by eval and attack."""
    from clipguard.attacks.registry import ATTACKS, DEFAULT_STEPS, USES, AttackConfig, check_attack
    from clipguard.errors import ClipguardError
    from clipguard.models.inference import check_resolution
    from clipguard.specs import parse_eps, parse_eps_list

    ATTACKS.check(cfg.attack)
    given = {"--alpha": cfg.alpha is not None, "--steps": cfg.steps is not None,
             "--restarts": cfg.restarts is not None, "--aa-version": cfg.aa_version is not None,
             "--aa-attacks": cfg.aa_attacks is not None}
    for option, was_given in given.items():
        if was_given and option[2:].replace("-", "_") not in USES[cfg.attack]:
            uses = ", ".join(f"--{u.replace('_', '-')}" for u in sorted(USES[cfg.attack] - {"eps"}))
            raise ClipguardError(f"{option} is not used by --attack {cfg.attack} (it takes {uses}): leave it out")
    attacks = tuple(a.strip() for a in cfg.aa_attacks.split(",") if a.strip()) if cfg.aa_attacks else None
    steps = cfg.steps if cfg.steps is not None else DEFAULT_STEPS.get(cfg.attack, 1)
    base = AttackConfig(cfg.attack, steps=steps, restarts=cfg.restarts if cfg.restarts is not None else 1,
                        seed=cfg.run.seed, norm=cfg.norm, aa_version=cfg.aa_version or "standard",
                        aa_attacks=attacks)
    check_attack(base)
    eps_list = parse_eps_list(cfg.eps)
    alpha = parse_eps(cfg.alpha, name="--alpha", allow_zero=False) if cfg.alpha else None
    check_resolution(cfg.resolution)
    if cfg.surrogate:
        from clipguard.attacks.surrogates import check_surrogate_spec

        check_surrogate_spec(cfg.surrogate)
    return replace(base, eps=eps_list[0], alpha=alpha), eps_list


def _attack_section(p, cfg: EvalConfig, progress: bool, correct) -> dict:
    from clipguard.attacks.sweep import robust_sweep

    base, eps_list = attack_config(cfg)
    surrogate, resolution = None, load_resolution(cfg)
    if cfg.surrogate:  # crafted on the dataset's own images (native), which the target resizes itself
        from clipguard.attacks.surrogates import build_surrogate

        surrogate = build_surrogate(cfg.surrogate, p)
    entries, checks, preds = robust_sweep(p, base, eps_list, batch_size=cfg.run.batch_size, resolution=resolution,
                                   precision=cfg.attack_precision, surrogate=surrogate, sanity=cfg.sanity,
                                   progress=progress, correct=correct)
    warnings = []
    if cfg.attack_precision != "fp32":
        warnings.append(f"attack ran in {cfg.attack_precision}: rounding weakens small-eps gradients, "
                        "robust accuracy may be overestimated")
    attack = {**base.to_record(len(p.prompts.classnames)), "eps": [e.to_record() for e in eps_list],
              "accounting": "robustbench: only clean-correct images are attacked; robust_acc over all images",
              "resolution": resolution,
              "precision": cfg.attack_precision, "surrogate": cfg.surrogate}
    return {"robust": entries, "attack": attack, "checks": checks, "warnings": warnings, "_preds": preds,
            "checks_passed": all(c["passed"] for c in checks)}


def load_resolution(cfg: EvalConfig, adv=None) -> str:
    """How images are loaded: at the model's input size ("model", open_clip's eval geometry) or at their own
    ("native"): a transfer surrogate sees the dataset's own images; a saved set decides for itself."""
    if adv is not None:
        return (adv.manifest.get("attack") or {}).get("resolution", "model")
    return "native" if cfg.surrogate else cfg.resolution


def _check_matching_adv_set(p, cfg: EvalConfig, adv) -> None:
    """Refuse (one line) a saved set that was not made for exactly this run's images."""
    from clipguard.attacks.advset import image_digest
    from clipguard.errors import ClipguardError

    src = adv.manifest.get("data", {})
    digest = adv.manifest.get("images_digest")  # sets from before digests: matched by labels only
    if digest is not None and len(p.data) == adv.labels.shape[0] and digest != image_digest(p.data.images):
        raise ClipguardError(
            f"--adv-set {cfg.adv_set!r} was made from other images than this run's {len(p.data)} images of "
            f"{p.data.spec} {p.data.split} (image digests differ): use the same --dataset/--split/--limit/--seed "
            "and --resolution it was crafted with"
        )
    if adv.labels.shape[0] != len(p.data) or not adv.labels.equal(p.data.labels):
        raise ClipguardError(
            f"--adv-set {cfg.adv_set!r} holds {adv.labels.shape[0]} images made for {src.get('spec')} "
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
    return {"_preds": {"adv_set": adv_pred}, "metrics": {"robust_acc": robust.float().mean().item(),
                        "attack_success_rate": attack_success_rate(labels, clean_logits.argmax(1), adv_pred)},
            "adv_set": {"path": str(cfg.adv_set), "scored_precision": precision,
                        **{k: adv.manifest.get(k) for k in ("attack", "source", "quantized")}}}
