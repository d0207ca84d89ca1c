"""``clipguard eval`` as a library function: config in, record out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from clipguard.models.inference import predict_logits
from clipguard.records.metrics import accuracy, attack_success_rate, classification_metrics
from clipguard.records.schema import make_record
from clipguard.run_options import RunOptions, flat, split_run
from clipguard.tasks.prepare import prepare


@dataclass
class EvalConfig:
    run: RunOptions = field(default_factory=RunOptions)  # model, dataset, split, limit, prompts, device, ...
    attack: str | None = None  # fgsm | pgd | apgd | autoattack; None = clean only
    eps: str = "8/255"  # L-inf radius in [0, 1] pixel units; a comma list gives a sweep
    alpha: str | None = None  # PGD step, [0, 1] pixel units; None = eps/4
    steps: int = 10
    restarts: int = 1
    resolution: str = "model"  # where the perturbation lives: model input size or the dataset's native size
    attack_precision: str = "fp32"  # bf16 weakens small-eps gradients: allowed, with a warning in the record
    surrogate: str | None = None  # transfer attack: craft on this model, evaluate the target
    sanity: bool = False  # run the costly sanity checks too
    adv_set: str | None = None  # evaluate on a saved adversarial set instead of attacking


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
    p = prepare(cfg.run)
    adv = _load_matching_adv_set(p, cfg) if cfg.adv_set else None
    logits, timings = predict_logits(p.classifier, p.data.images, batch_size=cfg.run.batch_size,
                                     precision=p.clip.precision, progress=progress)
    metrics = classification_metrics(logits, p.data.labels)
    extra, task = {}, "zeroshot_classification"
    if cfg.attack:
        task = "robustness" if not cfg.surrogate else "transfer_robustness"
        extra = _attack_section(p, cfg, progress)
        metrics["robust"] = extra.pop("robust")
        if len(metrics["robust"]) == 1:
            metrics["robust_acc"] = metrics["robust"][0]["robust_acc"]
            metrics["attack_success_rate"] = metrics["robust"][0]["attack_success_rate"]
    if cfg.adv_set:
        task = "adv_set_evaluation"
        extra = _adv_set_section(p, cfg, adv, logits)
        metrics.update(extra.pop("metrics"))
    return make_record(task, clip=p.clip, dataset=p.data, prompts=p.prompts, metrics=metrics, timings=timings,
                       text_embeddings=p.text.to_record(), adapter=cfg.run.adapter, config=flat(cfg), **extra)


def attack_config(cfg) -> tuple:
    """(base AttackConfig, eps list) from CLI strings, validated; shared by eval and attack."""
    from clipguard.attacks.registry import AttackConfig, check_attack
    from clipguard.models.inference import check_resolution
    from clipguard.specs import parse_eps, parse_eps_list

    base = AttackConfig(cfg.attack, steps=cfg.steps, restarts=cfg.restarts, seed=cfg.run.seed)
    check_attack(base)
    eps_list = parse_eps_list(cfg.eps)
    alpha = parse_eps(cfg.alpha, name="--alpha", allow_zero=False) if cfg.alpha else None
    check_resolution(cfg.resolution)
    if cfg.surrogate:
        from clipguard.attacks.surrogates import check_surrogate_spec

        check_surrogate_spec(cfg.surrogate)
    return replace(base, eps=eps_list[0], alpha=alpha), eps_list


def _attack_section(p, cfg: EvalConfig, progress: bool) -> dict:
    from clipguard.attacks.sweep import robust_sweep

    base, eps_list = attack_config(cfg)
    surrogate, resolution = None, cfg.resolution
    if cfg.surrogate:
        from clipguard.attacks.surrogates import build_surrogate

        surrogate = build_surrogate(cfg.surrogate, p)
        resolution = "native"  # the surrogate sees the dataset's images at their own size
    entries, checks = robust_sweep(p, base, eps_list, batch_size=cfg.run.batch_size, resolution=resolution,
                                   precision=cfg.attack_precision, surrogate=surrogate, sanity=cfg.sanity,
                                   progress=progress)
    warnings = []
    if cfg.attack_precision != "fp32":
        warnings.append(f"attack ran in {cfg.attack_precision}: rounding weakens small-eps gradients, "
                        "robust accuracy may be overestimated")
    attack = {**base.to_record(), "eps": [e.to_record() for e in eps_list], "resolution": resolution,
              "precision": cfg.attack_precision, "surrogate": cfg.surrogate}
    return {"robust": entries, "attack": attack, "checks": checks, "warnings": warnings,
            "checks_passed": all(c["passed"] for c in checks)}


def _load_matching_adv_set(p, cfg: EvalConfig):
    """The saved set, refused (one line) unless it was made for exactly this run's images."""
    from clipguard.attacks.advset import load_adv_set
    from clipguard.errors import ClipguardError

    adv = load_adv_set(cfg.adv_set)
    src = adv.manifest.get("data", {})
    if adv.labels.shape[0] != len(p.data) or not adv.labels.equal(p.data.labels):
        raise ClipguardError(
            f"--adv-set {cfg.adv_set!r} holds {adv.labels.shape[0]} images made for {src.get('spec')} "
            f"{src.get('split')} (limit {src.get('limit')}), but this run has {len(p.data)} images of "
            f"{p.data.spec} {p.data.split}: use the same --dataset/--split/--limit/--seed"
        )
    return adv


def _adv_set_section(p, cfg: EvalConfig, adv, clean_logits) -> dict:

    # The same classifier, batching and precision as the clean pass, so both predictions compare like for like.
    logits = predict_logits(p.classifier, adv.images, batch_size=cfg.run.batch_size, precision=p.clip.precision,
                            progress=False)[0]
    labels, adv_pred = p.data.labels, logits.argmax(1)
    return {"metrics": {"robust_acc": accuracy(adv_pred, labels),
                        "attack_success_rate": attack_success_rate(labels, clean_logits.argmax(1), adv_pred)},
            "adv_set": {"path": str(cfg.adv_set),
                        **{k: adv.manifest.get(k) for k in ("attack", "source", "quantized")}}}
