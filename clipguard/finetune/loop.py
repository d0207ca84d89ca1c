"""Robust fine-tuning of the image tower: one flat loop, read top to bottom.

Every step: draw the next batch from a seeded order, craft a fresh adversarial batch (model in eval
mode, gradients to δ only), take one AdamW step on the objective at the adversarial images. Warm-up +
cosine schedule, gradient clipping, bf16 autocast on GPU, atomic checkpoints every ``save_every`` steps.
At the end the adapter is saved and evaluated exactly as ``clipguard eval --adapter DIR --attack pgd``
would (same library call), so the record's numbers are reproducible from the adapter alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from clipguard.errors import ClipguardError
from clipguard.finetune.checkpoint import SUMMARY, TrainState, capture_rng, check_resume, restore_rng
from clipguard.finetune.config import FinetuneConfig, config_hash, hashed_fields, validate

log = logging.getLogger(__name__)


def cosine_schedule(total: int, warmup: int):
    """lr multiplier for LambdaLR: linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def run_finetune(cfg: FinetuneConfig, *, progress: bool = True) -> dict:
    """Robustly fine-tune ``cfg.model`` on ``cfg.dataset``; returns a ``clipguard.result/1`` record.

    Writes to ``cfg.out``: the adapter + manifest (``clipguard eval --adapter`` loads it) and
    ``checkpoint.pt`` / ``checkpoint.json`` (``--resume`` continues from them bit-for-bit).

    Raises:
        ClipguardError: a bad option (checked before anything loads), a resume with a changed config,
            or a non-finite loss (the last good checkpoint is kept).

    Example:
        >>> rec = run_finetune(FinetuneConfig(method="lora", eps="4/255", lr=1e-2, epochs=3, out="runs/lora"))
        >>> rec["metrics"]["robust_acc"]
    """
    from clipguard.attacks.robust import attack_inputs
    from clipguard.evaluate import autocast_for
    from clipguard.finetune.adversary import build_train_attack
    from clipguard.finetune.methods import get_method, trainable_state
    from clipguard.finetune.objectives import get_objective
    from clipguard.models.adapters import save_adapter
    from clipguard.models.classifier import ZeroShotClassifier
    from clipguard.prepare import prepare_for
    from clipguard.specs import parse_eps

    validate(cfg)
    out, chash = Path(cfg.out), config_hash(cfg)
    if cfg.resume:
        check_resume(cfg.resume, cfg)  # refuse a changed config before loading anything
    elif (out / SUMMARY).exists():  # never overwrite a run by accident
        raise ClipguardError(f"--out {cfg.out!r} already holds a run: continue it with --resume {cfg.out} "
                             "or choose another --out")
    method, objective = get_method(cfg.method), get_objective(cfg.objective)
    eps = parse_eps(cfg.eps).value
    alpha = parse_eps(cfg.alpha).value if cfg.alpha else eps  # TeCoA: step = eps, from a random start

    # ---- base model, training data, frozen class text embeddings (from the store)
    p = prepare_for(cfg)
    clip, dev = p.clip, p.clip.device
    frozen = p.classifier  # the untouched base model: FARE's f0
    torch.manual_seed(cfg.seed)  # adapter init, random starts and dropout all follow the seed
    visual = method.build(clip.model.visual, cfg).to(dev)
    model = ZeroShotClassifier.from_clip(clip, p.text.embeddings, visual=visual)
    params = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in params)
    surrogate = None
    if cfg.train_attack == "transfer":
        from clipguard.attacks.surrogates import build_surrogate

        surrogate = build_surrogate(cfg.surrogate, p)

    def autocast():  # bf16 autocast where the loader chose it (a capable GPU); a no-op context in fp32
        return autocast_for(dev, clip.precision)

    adversary = build_train_attack(cfg.train_attack, model, objective, surrogate=surrogate, eps=eps, alpha=alpha,
                                   steps=cfg.steps, autocast=autocast)

    # ---- optimizer and schedule over the trainable tensors only
    n, bs = len(p.data), cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total, int(cfg.warmup * total)))

    # ---- where we are: a fresh start, or exactly where the checkpoint left off
    data_gen = torch.Generator().manual_seed(cfg.seed)  # data order; its state is checkpointed
    step, epoch, position, loss_value, last_saved = 0, 0, 0, float("nan"), None
    order = torch.randperm(n, generator=data_gen)
    if cfg.resume:
        st = TrainState.from_disk(cfg.resume)
        if st.config_hash != chash:
            raise ClipguardError(f"--resume {cfg.resume!r}: {st.config_hash[:12]} != {chash[:12]} (config changed)")
        named = dict(visual.named_parameters())
        for k, v in st.trainable.items():
            named[k].data.copy_(v)
        opt.load_state_dict(st.optimizer)
        sched.load_state_dict(st.scheduler)
        restore_rng(st.rng, data_gen)  # after every setup step that draws random numbers
        step, epoch, position, order, loss_value = st.step, st.epoch, st.position, st.order, st.loss
        last_saved = step
        log.info("resumed %s at step %d/%d (epoch %d)", cfg.resume, step, total, epoch + 1)

    def save() -> None:
        TrainState(step, epoch, position, order.clone(), {k: v.cpu() for k, v in trainable_state(visual).items()},
                   opt.state_dict(), sched.state_dict(), capture_rng(data_gen), hashed_fields(cfg), chash,
                   loss_value).to_disk(out)

    # ---- the loop
    from clipguard.progress import progress_bar

    images, labels = p.data.images, p.data.labels
    # PGD perturbs at the model's input size, as TeCoA/FARE do; a transfer surrogate (e.g. a CIFAR ResNet)
    # sees the dataset's own size, as in `eval --surrogate`; the classifier resizes either way.
    resolution = "native" if surrogate is not None else "model"
    start_step, losses, seen, t0 = step, [], 0, time.perf_counter()
    remaining = (cfg.epochs - epoch) * n - position * bs
    with progress_bar(remaining, f"finetune {cfg.method}/{cfg.objective}", enabled=progress) as advance:
        while step < total:
            idx = order[position * bs:(position + 1) * bs]
            x = attack_inputs(model, images[idx], resolution)
            y = labels[idx].to(dev)
            # Craft in eval mode (no dropout): a fresh adversary against the weights as they are now.
            model.eval()
            ref = None
            if objective.reference:
                with torch.no_grad(), autocast():
                    ref = frozen.visual(frozen.preprocess(x)).float()
            x_adv = adversary(x, y, ref)
            model.train()
            with autocast():
                loss = objective.loss(model, x_adv, y, ref)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                kept = f"the last good checkpoint (step {last_saved}) is kept in {out}" if last_saved is not None \
                    else "no checkpoint was saved yet"
                raise ClipguardError(f"training loss became {loss_value} at step {step + 1}/{total}: stopped; "
                                     f"{kept}; try a lower --lr")
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, position = step + 1, position + 1
            if position == steps_per_epoch:  # epoch done: the next order comes from the same generator
                epoch, position = epoch + 1, 0
                order = torch.randperm(n, generator=data_gen)
                log.info("epoch %d/%d done, loss %.4f", epoch, cfg.epochs, loss_value)
            losses.append(loss_value)
            seen += len(y)
            advance(len(y), loss=loss_value, lr=f"{sched.get_last_lr()[0]:.2e}")
            if cfg.save_every and step % cfg.save_every == 0:
                save()
                last_saved = step
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    model.eval()
    save()  # the final state too, so resuming a finished run only re-evaluates

    # ---- the adapter, then the final evaluation through the same call as `clipguard eval --adapter`
    info = {"objective": cfg.objective, "train_attack": cfg.train_attack, "config_hash": chash, "steps": step,
            "config": {k: v for k, v in asdict(cfg).items() if k != "resume"}}
    save_adapter(out, visual, method=cfg.method, clip=clip, info=info)
    train = {"steps": step, "total_steps": total, "epochs": cfg.epochs,
             "resumed_from_step": start_step if cfg.resume else None, "images": seen, "wall_s": round(wall, 3),
             "images_per_s": round(seen / wall, 2) if wall else None, "lr": lr, "trainable_params": n_trainable,
             "loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:])}
    return _final_record(cfg, out, chash, train, progress)


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def _final_record(cfg: FinetuneConfig, out: Path, chash: str, train: dict, progress: bool) -> dict:
    """Clean + PGD evaluation of the saved adapter on the held-out split (optionally of the base too)."""
    from clipguard.eval_run import EvalConfig, run_eval

    ecfg = EvalConfig(model=cfg.model, dataset=cfg.dataset, split=cfg.eval_split, limit=cfg.eval_limit,
                      seed=cfg.seed, prompts=cfg.prompts, templates=cfg.templates, batch_size=cfg.eval_batch_size,
                      device=cfg.device, precision=cfg.precision, adapter=str(out), attack="pgd", eps=cfg.eps,
                      steps=cfg.eval_steps)
    rec = run_eval(ecfg, progress=progress)
    if cfg.eval_base:
        base = run_eval(EvalConfig(**{**asdict(ecfg), "adapter": None}), progress=progress)["metrics"]
        rec["base_metrics"] = {k: base[k] for k in ("acc1", "acc5", "mean_per_class_recall", "robust_acc")}
    rec["task"] = "finetune"
    rec["finetune"] = {"method": cfg.method, "objective": cfg.objective, "train_attack": cfg.train_attack,
                       "surrogate": cfg.surrogate, "eps": cfg.eps, "alpha": cfg.alpha or cfg.eps, "steps": cfg.steps,
                       "config_hash": chash, "config": {k: v for k, v in asdict(cfg).items() if k != "resume"},
                       "adapter": str(out), "train": train}
    return rec
