"""Robust fine-tuning of the image tower: one flat loop (:func:`train`), read top to bottom.

The loop draws the next batch from a seeded order, hands it to :func:`train_step` (a fresh adversarial batch:
model in eval mode, gradients to the images only; the objective's loss at it; gradients summed over the ranks,
clipped; one AdamW step and one step of the warm-up + cosine schedule), and writes an atomic checkpoint every
``save_every`` steps. bf16 autocast on GPU. Building the model/optimizer (:func:`setup`) and restoring a checkpoint
(:func:`restore`) are helpers; the final evaluation belongs to :mod:`clipguard.tasks.finetune`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipguard.attacks.surrogates import build_surrogate
from clipguard.config import flat
from clipguard.distributed import all_reduce_sum_, barrier, gather_objects, is_main, rank, world_size
from clipguard.distributed import start as start_ranks
from clipguard.errors import ClipguardError
from clipguard.finetune.adversary import Adversary, build_train_attack
from clipguard.finetune.checkpoint import TrainState, capture_rng, restore_rng
from clipguard.finetune.config import FinetuneConfig, config_hash, hashed_fields
from clipguard.finetune.methods import METHODS, trainable_state
from clipguard.finetune.objectives import OBJECTIVES, Guide, Objective
from clipguard.models import adapters  # called as adapters.save_adapter: tests spy on it
from clipguard.models.classifier import WARMUP_IMAGES, ZeroShotClassifier, compile_failed
from clipguard.models.inference import attack_inputs, autocast_for
from clipguard.progress import progress_bar

log = logging.getLogger(__name__)


def cosine_schedule(total: int, warmup: int):
    """lr multiplier for LambdaLR: linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


@dataclass
class Setup:
    """Everything the loop uses, built once by :func:`setup`."""

    model: nn.Module  # ZeroShotClassifier around the tower that trains
    visual: nn.Module  # what trains (LoRA / VPT / full tower, or the prompt learner), saved as the adapter
    frozen: nn.Module  # the untouched base classifier: FARE's f0
    params: list[nn.Parameter]  # the trainable tensors
    objective: Objective  # bound to the config's options
    adversary: Adversary  # (x, y, ref) -> x_adv
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    lr: float
    total: int  # optimizer steps in the whole run
    steps_per_epoch: int
    resolution: str  # where the training perturbation lives
    autocast: Callable[[], AbstractContextManager]  # () -> the precision context of a forward pass


def setup(cfg: FinetuneConfig, p) -> Setup:
    """The trainable model, adversary, optimizer and schedule for ``cfg`` on prepared base model + data ``p``."""
    method, objective = METHODS.get(cfg.method), OBJECTIVES.get(cfg.objective).bind(cfg)
    clip = p.clip
    torch.manual_seed(cfg.run.seed)  # adapter init, random starts and dropout all follow the seed
    if objective.check is not None:  # e.g. tga: a ViT tower, refused in one line before anything trains
        objective.check(clip.model.visual)
    visual = method.build(clip.model.visual, cfg).to(clip.device)
    model = ZeroShotClassifier.from_clip(clip, p.text.embeddings, visual=visual)
    if method.classifier is not None:  # --method prompt: the class text embeddings train, the tower stays frozen
        model = method.classifier(p, cfg).to(clip.device)
        visual = model.prompt_learner  # what trains: checkpointed and saved as the adapter
    params = [q for q in model.parameters() if q.requires_grad]
    surrogate = None
    if cfg.train_attack == "transfer":
        surrogate = build_surrogate(cfg.surrogate, p, trust_remote_code=cfg.run.trust_remote_code)

    def autocast():  # bf16 autocast where the loader chose it (a capable GPU); a no-op context in fp32
        return autocast_for(clip.device, clip.precision)

    eps = cfg.eps
    alpha = cfg.alpha or eps  # TeCoA: step = eps, from a random start
    adversary = build_train_attack(cfg.train_attack, model, objective, surrogate=surrogate, eps=eps, alpha=alpha,
                                   steps=cfg.steps, autocast=autocast)
    steps_per_epoch = math.ceil(len(p.data) / (cfg.run.batch_size * world_size()))  # a step: batch x ranks
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total, int(cfg.warmup * total)))
    # PGD perturbs at the model's input size, as TeCoA/FARE do; a transfer surrogate (e.g. a CIFAR ResNet)
    # sees the dataset's own size, as in `eval --surrogate`; the classifier resizes either way.
    resolution = "native" if surrogate is not None else "model"
    return Setup(model, visual, p.classifier, params, objective, adversary, opt, sched, lr, total, steps_per_epoch,
                 resolution, autocast)


def adversarial_loss(s: Setup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One step's per-image training loss: a fresh adversary against the weights as they are now, crafted in eval
    mode (no dropout; FARE's reference embedding from the frozen base), then the objective in train mode."""
    s.model.eval()
    ref = None
    if s.objective.reference:
        with torch.no_grad(), s.autocast():
            ref = s.frozen.visual(s.frozen.preprocess(x)).float()
    if s.objective.guide:  # PMG-AFT / TGA-ZSR: the clean images and the frozen original classifier
        ref = Guide(x, s.frozen)
    x_adv = s.adversary(x, y, ref)
    s.model.train()
    with s.autocast():
        return s.objective.loss(s.model, x_adv, y, ref)


def compile_trainable(s: Setup, shape: tuple[int, ...], device: torch.device, mode: str = "default") -> float:
    """``--compile``: torch.compile the trainable classifier in place (parameters, adapter and checkpoints are the
    same objects) and warm up the passes a step takes on one mid-grey batch (the adversary's forward + input
    gradient in eval mode, the objective's forward + backward in train mode; shapes dynamic), so no timed step
    compiles. Random state, buffers and gradients are put back: the run draws what an eager run draws.
    Returns the seconds it took (the summary's ``compile_s``, outside images/s)."""
    t0 = time.perf_counter()
    buffers = {k: b.clone() for k, b in s.model.named_buffers()}
    # dynamic=True: the adversary perturbs tensors it makes itself (no batch dimension to mark), so a static first
    # graph would recompile at the first real batch, inside the timed loop
    s.model.compile(mode=None if mode == "default" else mode, dynamic=True)
    # fork_rng: the warm-up's random starts (and any dropout) are drawn from a copy of the RNG state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            x = torch.full((WARMUP_IMAGES, *shape), 0.5, device=device)
            y = torch.zeros(WARMUP_IMAGES, dtype=torch.long, device=device)
            adversarial_loss(s, x, y).mean().backward()
        except Exception as e:
            raise compile_failed(e) from None
        finally:
            for q in s.params:
                q.grad = None
            with torch.no_grad():
                for k, b in s.model.named_buffers():
                    b.copy_(buffers[k])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round(time.perf_counter() - t0, 3)


def restore(cfg: FinetuneConfig, s: Setup, data_gen: torch.Generator) -> tuple[int, int, int, torch.Tensor, float,
                                                                             dict | None]:
    """Load ``cfg.resume``'s checkpoint into ``s`` and the data generator; returns (step, epoch, position, order,
    loss, history) exactly where the checkpoint left off."""
    st = TrainState.from_disk(cfg.resume)
    if st.config_hash != config_hash(cfg):
        raise ClipguardError(f"--resume {cfg.resume!r}: {st.config_hash[:12]} != {config_hash(cfg)[:12]} "
                             "(config changed)")
    named = dict(s.visual.named_parameters())
    for k, v in st.trainable.items():
        named[k].data.copy_(v)
    s.opt.load_state_dict(st.optimizer)
    s.sched.load_state_dict(st.scheduler)
    # (checkpoint.check_resume has refused another number of processes before anything loaded)
    rng = st.rng["ranks"][rank()] if world_size() > 1 else st.rng  # each rank's own random stream
    restore_rng(rng, data_gen)  # after every setup step that draws random numbers
    log.info("resumed %s at step %d/%d (epoch %d)", cfg.resume, st.step, s.total, st.epoch + 1)
    return st.step, st.epoch, st.position, st.order, st.loss, st.history


def train(cfg: FinetuneConfig, p, *, progress: bool = True) -> dict:
    """Robustly fine-tune ``p``'s image tower on ``p``'s data; writes the adapter + manifest and checkpoints into
    ``cfg.run_dir`` and returns the training summary (steps, images/s, losses) for the record.

    ``p`` is the prepared base model and training data (:func:`clipguard.tasks.setup.prepare`).

    Raises:
        ClipguardError: a resume with a changed config, or a non-finite loss (the last good checkpoint is kept).
    """
    s = setup(cfg, p)
    out, bs, dev = Path(cfg.run_dir), cfg.run.batch_size, p.clip.device
    compile_s = None
    if cfg.run.compile:  # before anything draws from the seeded streams, and before the clock starts
        shape = (3, *p.clip.input_size) if s.resolution == "model" else tuple(p.data.images.shape[1:])
        compile_s = compile_trainable(s, shape, dev, cfg.run.compile_mode)
    labels, n, ranks = p.data.labels, len(p.data), world_size()
    start_ranks()  # from here an error on one rank is printed by that rank
    if ranks > 1:  # same initial weights on every rank (setup's seed); random starts differ from here on
        torch.manual_seed(cfg.run.seed * 1_000_003 + rank())

    # ---- where we are: a fresh start, or exactly where the checkpoint left off
    data_gen = torch.Generator().manual_seed(cfg.run.seed)  # data order; its state is checkpointed
    step, epoch, position, loss, last_saved = 0, 0, 0, float("nan"), None
    order = torch.randperm(n, generator=data_gen)
    before = NEW_RUN  # what earlier sessions of this run did
    if cfg.resume:
        step, epoch, position, order, loss, history = restore(cfg, s, data_gen)
        last_saved = step
        before = history if history is not None else None  # None: a checkpoint from before histories were kept

    # ---- the loop: one train_step per batch; a new order each epoch; a checkpoint every save_every steps
    start_step, losses, seen, t0 = step, [], 0, time.perf_counter()
    batches = epoch_batches(p.data, order, position, bs)
    whole = bs * ranks  # images per step; an epoch's last step takes what is left, so the bar ends at its total
    left = sum(min(whole, n - (k % s.steps_per_epoch) * whole) for k in range(step, s.total))
    with progress_bar(left, f"finetune {cfg.method}/{cfg.objective}",
                      enabled=progress) as advance:
        while step < s.total:
            idx, batch, whole = next(batches)
            try:
                loss = train_step(s, batch, labels[idx].to(dev), whole, cfg.grad_clip)
            except NonFiniteLoss as e:  # raised before the step: the weights on disk are the last good ones
                kept = f"the last good checkpoint (step {last_saved}) is kept in {out}" if last_saved is not None \
                    else "no checkpoint was saved yet"
                raise ClipguardError(f"{e} at step {step + 1}/{s.total}: stopped; {kept}; try a lower --lr") from None
            step, position = step + 1, position + 1
            if position == s.steps_per_epoch:  # epoch done: the next order comes from the same generator
                epoch, position = epoch + 1, 0
                order = torch.randperm(n, generator=data_gen)
                batches = epoch_batches(p.data, order, 0, bs)
                log.info("epoch %d done, loss %.4f", epoch, loss)
            losses.append(loss)
            seen += whole
            advance(whole, loss=loss, lr=f"{s.sched.get_last_lr()[0]:.2e}")
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(cfg, s, data_gen, step, epoch, position, order, loss,
                                _history(before, seen, time.perf_counter() - t0, losses))
                last_saved = step
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    s.model.eval()
    total = _history(before, seen, wall, losses)
    save_checkpoint(cfg, s, data_gen, step, epoch, position, order, loss, total)  # a finished run resumes to evaluate
    save_final_adapter(cfg, s, p.clip, steps=step)
    whole_run = total or _history(NEW_RUN, seen, wall, losses)  # an old checkpoint's run: this session's part
    return {"steps": step, "world_size": ranks, "global_batch_size": bs * ranks, "total_steps": s.total,
            "epochs": cfg.epochs, "max_steps": cfg.max_steps,
            "data_mode": "stream" if p.data.streamed else "memory",
            "resumed_from_step": start_step if cfg.resume else None,
            # the whole training, over every session of the run (a resume adds its own part; resuming a finished
            # run only evaluates it again); "this_session" is what this process did
            "images": whole_run["images"], "wall_s": round(whole_run["wall_s"], 3),
            "images_per_s": round(whole_run["images"] / whole_run["wall_s"], 2) if whole_run["wall_s"] else None,
            "history": "whole run" if total is not None else "this session only (resumed from an older checkpoint)",
            "this_session": {"images": seen, "wall_s": round(wall, 3)} if cfg.resume else None,
            "compile_s": compile_s, "lr": s.lr,
            "trainable_params": sum(q.numel() for q in s.params),
            "loss_first10": _mean(whole_run["losses_first"]), "loss_last10": _mean(whole_run["losses_last"]),
            "method_deviations": list(METHODS.get(cfg.method).deviations),  # where the method differs from its paper
            "objective_options": {k: getattr(cfg, k) for k in s.objective.options},  # e.g. pmg's weights
            "objective_deviations": list(s.objective.deviations)}  # where the objective differs from its paper


NEW_RUN = {"images": 0, "wall_s": 0.0, "losses_first": [], "losses_last": []}  # a run's history before its first step


def _history(before: dict | None, seen: int, wall: float, losses: list[float]) -> dict | None:
    """The run's training so far: the earlier sessions' (``before``) and this one's; None when the earlier part is
    unknown (a checkpoint from before histories were kept)."""
    if before is None:
        return None
    first = (list(before["losses_first"]) + losses)[:10]
    last = (list(before["losses_last"]) + losses)[-10:]
    return {"images": int(before["images"]) + seen, "wall_s": float(before["wall_s"]) + wall, "losses_first": first,
            "losses_last": last}


def save_checkpoint(cfg: FinetuneConfig, s: Setup, data_gen: torch.Generator, step: int, epoch: int, position: int,
                    order: torch.Tensor, loss: float, history: dict | None = None) -> None:
    """Where the loop is, atomically into ``cfg.run_dir``: weights, optimizer, schedule and random state; under
    torchrun every rank's random state (a collective: every rank calls this), written once by rank 0."""
    rng = capture_rng(data_gen)
    if world_size() > 1:
        rng = {**rng, "ranks": gather_objects(rng)}
    if is_main():
        TrainState(step, epoch, position, order.clone(), {k: v.cpu() for k, v in trainable_state(s.visual).items()},
                   s.opt.state_dict(), s.sched.state_dict(), rng, hashed_fields(cfg), config_hash(cfg), loss,
                   world_size(), history).to_disk(Path(cfg.run_dir))


def save_final_adapter(cfg: FinetuneConfig, s: Setup, clip, *, steps: int) -> None:
    """The trained adapter into ``cfg.run_dir``, manifest last (a directory with a manifest is complete)."""
    info = {"objective": cfg.objective, "train_attack": cfg.train_attack, "config_hash": config_hash(cfg),
            "steps": steps, "config": {k: v for k, v in flat(cfg).items() if k != "resume"}}
    if is_main():
        adapters.save_adapter(Path(cfg.run_dir), s.visual, method=cfg.method, clip=clip, info=info)
    barrier()  # the adapter is on disk before any rank evaluates it


class NonFiniteLoss(ClipguardError):
    """A step's loss was NaN or inf (:func:`train` adds the step and which checkpoint is kept)."""


def train_step(s: Setup, batch: torch.Tensor | None, y: torch.Tensor, whole: int, grad_clip: float) -> float:
    """One optimizer step: a fresh adversarial batch against the weights as they are now -> its loss -> the gradients
    summed over the ranks (torchrun) -> clipped -> AdamW step -> schedule step. Returns the step's loss.

    ``batch`` (uint8) and ``y`` (on the model's device) are this rank's share of a step of ``whole`` images; under
    torchrun the last step's share can be empty (``y`` empty, ``batch`` None when streamed).

    Raises:
        NonFiniteLoss: before the optimizer steps, so no weight (nor a checkpoint) takes a NaN.
    """
    ranks = world_size()
    if len(y):
        per_image = adversarial_loss(s, attack_inputs(s.model, batch, s.resolution), y)
        # Under torchrun each rank's loss is its share of the whole batch's mean; the gradients are summed over the
        # ranks below (one all-reduce), so every rank takes the whole batch's step.
        loss = per_image.mean() if ranks == 1 else per_image.sum() / whole
        loss.backward()
        loss_value = loss.item()
    else:  # this rank's share of a last, tiny batch is empty: it adds nothing to the sum
        s.model.train()
        loss_value = 0.0
    if ranks > 1:  # not the DDP wrapper: the adversary's own backward passes must not synchronise
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in s.params]
        summed = torch.tensor([loss_value])
        all_reduce_sum_([*grads, summed])
        for q, g in zip(s.params, grads, strict=True):
            q.grad = g
        loss_value = float(summed)
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"training loss became {loss_value}")
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(s.params, grad_clip)
    s.opt.step()
    s.sched.step()
    s.opt.zero_grad(set_to_none=True)
    return loss_value


def epoch_batches(data, order: torch.Tensor, position: int, bs: int):
    """(indices, uint8 batch, images in the whole step) for this epoch's ``order`` from step ``position`` on: indexed
    in memory, or decoded ahead by a streamed set's workers in exactly this order (so a resumed run sees the same
    batches). Under torchrun a step takes ``bs x world_size`` images of the order and each rank its share (an
    even split: shares differ by at most one image, and only the last step's can be empty)."""
    whole, ranks = bs * world_size(), world_size()
    steps = [order[a:a + whole] for a in range(position * whole, len(order), whole)]
    ranges = [torch.tensor_split(g, ranks)[rank()] for g in steps]
    if not data.streamed:
        for idx, g in zip(ranges, steps, strict=True):
            yield idx, data.images[idx], len(g)
        return
    nonempty = [r.tolist() for r in ranges if len(r)]
    loader = iter(data.images.decoded(nonempty, pin_memory=torch.cuda.is_available())) if nonempty else iter(())
    for idx, g in zip(ranges, steps, strict=True):
        yield idx, (next(loader) if len(idx) else None), len(g)


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None
