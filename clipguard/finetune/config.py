"""FinetuneConfig: every option of a robust fine-tuning run, typed, with units; plus its hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

from clipguard.errors import ClipguardError, check_positive
from clipguard.run_options import RUN_FIELDS, SPEED_ONLY, RunOptions, flat, split_run


def _train_run() -> RunOptions:
    return RunOptions(split="train", batch_size=128)


@dataclass
class FinetuneConfig:
    # --- what to train on: model, dataset, split (train), limit, seed, prompts, device, precision, batch size
    # (images per optimizer step). The seed also seeds init, data order, training attacks and the final
    # evaluation; precision is the autocast of training and clean passes (auto = bf16 on a capable GPU).
    run: RunOptions = field(default_factory=_train_run)
    # --- what trains
    method: str = "lora"  # lora | vpt | full (finetune.methods)
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator: scale = lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the LoRA path; only MLP (nn.Linear) targets honour it: peft merges
    # LoRA into nn.MultiheadAttention weights each forward, so a non-zero value there is refused
    lora_targets: list[str] | None = None  # module names / suffixes; None = the visual attention modules
    vpt_tokens: int = 10  # VPT prompt tokens inserted after the class token
    # --- objective and training adversary
    objective: str = "tecoa"  # tecoa | ce | fare | noise (finetune.objectives)
    sigma: float | None = None  # noise objective: Gaussian noise std, [0, 1] pixel units (Cohen et al.: 0.12-1.0)
    train_attack: str = "pgd"  # pgd (against the model being trained) | transfer (from --surrogate)
    surrogate: str | None = None  # transfer: toy-cnn, clip:ARCH:TAG, hub:OWNER/REPO:ENTRY or a TorchScript file
    eps: str = "1/255"  # L-inf radius of the training (and final robust evaluation) attack, [0, 1] pixel units
    alpha: str | None = None  # training PGD step size, [0, 1] pixel units; None = eps (TeCoA's setting)
    steps: int = 2  # training PGD iterations per batch
    # --- optimisation
    epochs: int = 1  # passes over the training split
    max_steps: int | None = None  # optimizer steps in all, instead of --epochs (FARE: 20,000 steps of 128)
    lr: float | None = None  # AdamW peak learning rate; None = the method's default (for pretrained CLIP)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (0: do not pull weights towards zero)
    warmup: float = 0.05  # share of all steps with a linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    # --- checkpoints and output
    run_dir: str = "runs/finetune"  # run directory: adapter + manifest, checkpoint, record.json
    save_every: int = 50  # optimizer steps between checkpoints; 0 = only at the end
    resume: str | None = None  # continue the run whose checkpoint is in this directory
    # --- final evaluation on a held-out split (PGD, same eps)
    eval_split: str = "test"  # held-out split
    eval_limit: int | None = None  # images of the held-out split; None = all
    eval_steps: int = 10  # PGD iterations of the final robust evaluation
    eval_batch_size: int = 256  # images per evaluation batch (as `clipguard eval`)
    eval_base: bool = False  # also evaluate the base model, for the before/after comparison


# Fields that do not change the training trajectory: a resumed run may change them freely.
UNHASHED = frozenset({"run_dir", "resume", "save_every", "device", "workers", "data_mode", "eval_split",
                      "eval_limit", "eval_steps", "eval_batch_size", "eval_base", *SPEED_ONLY})


def finetune_config(**opts) -> FinetuneConfig:
    """A FinetuneConfig from flat keyword options (a suite cell, a script): RunOptions fields go to ``run``."""
    run, rest = split_run(opts)
    return FinetuneConfig(run=RunOptions(**{**vars(_train_run()), **run}), **rest)


# Fields added after runs already existed: hashed only when set, so a run from before them still resumes.
LATER_FIELDS = {"max_steps": None, "sigma": None, "streaming": False}


def hashed_fields(cfg: FinetuneConfig) -> dict:
    """The config as one flat dict without the fields that do not change the training trajectory."""
    return {k: v for k, v in flat(cfg).items()
            if k not in UNHASHED and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def config_hash(cfg: FinetuneConfig) -> str:
    """sha256 of the fields that shape training (everything but output, checkpointing and evaluation)."""
    return hashlib.sha256(json.dumps(hashed_fields(cfg), sort_keys=True).encode()).hexdigest()


def config_diff(old: dict, new: dict) -> list[str]:
    """``["lr 0.01 -> 0.02", ...]`` for the hashed fields that differ."""
    keys = [k for k in (*RUN_FIELDS, *(f.name for f in fields(FinetuneConfig))) if k not in UNHASHED and k != "run"]
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def validate(cfg: FinetuneConfig) -> None:
    """Check every option before anything slow is loaded; one ClipguardError naming the bad option."""
    from clipguard.finetune.adversary import TRAIN_ATTACKS
    from clipguard.finetune.methods import METHODS
    from clipguard.finetune.objectives import OBJECTIVES
    from clipguard.specs import parse_eps

    METHODS.check(cfg.method)
    OBJECTIVES.check(cfg.objective)
    TRAIN_ATTACKS.check(cfg.train_attack)
    cfg.run.check()
    if cfg.run.adapter:
        raise ClipguardError("finetune trains a new adapter on the base model: --adapter is not an input here "
                             "(evaluate an adapter with `clipguard eval --adapter DIR`)")
    parse_eps(cfg.eps)
    if cfg.alpha is not None:
        parse_eps(cfg.alpha, name="--alpha", allow_zero=False)
    positive = {"--vpt-tokens": cfg.vpt_tokens, "--lora-r": cfg.lora_r, "--steps": cfg.steps,
                "--epochs": cfg.epochs, "--max-steps": cfg.max_steps, "--eval-steps": cfg.eval_steps,
                "--eval-batch-size": cfg.eval_batch_size, "--eval-limit": cfg.eval_limit}
    for name, v in positive.items():
        check_positive(name, v)
    if cfg.lr is not None and not cfg.lr > 0:
        raise ClipguardError(f"--lr {cfg.lr} must be a positive learning rate (e.g. 1e-4)")
    checks = [("--lora-dropout", cfg.lora_dropout, 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
              ("--warmup", cfg.warmup, 0 <= cfg.warmup < 1, "a share of all steps in [0, 1)"),
              ("--weight-decay", cfg.weight_decay, cfg.weight_decay >= 0, ">= 0"),
              ("--grad-clip", cfg.grad_clip, cfg.grad_clip >= 0, ">= 0 (0 = no clipping)"),
              ("--save-every", cfg.save_every, cfg.save_every >= 0, ">= 0 steps (0 = only at the end)")]
    for name, v, ok, what in checks:
        if not ok:
            raise ClipguardError(f"{name} {v} must be {what}")
    if cfg.method == "lora" and cfg.lora_dropout and not cfg.lora_targets:  # default targets: attention modules
        raise ClipguardError("LoRA on nn.MultiheadAttention merges its weights each forward, so dropout never "
                             "applies: use --lora-dropout 0 (or --lora-targets c_fc,c_proj, where it does)")
    if cfg.method == "lora" and cfg.run.compile and not cfg.lora_targets:  # default targets: attention modules
        from clipguard.finetune.methods import LORA_MHA_NO_COMPILE

        raise ClipguardError(LORA_MHA_NO_COMPILE)
    if cfg.run.precision == "fp16":
        raise ClipguardError("--precision fp16 needs loss scaling, which finetune does not do: use bf16 or fp32")
    if cfg.train_attack == "transfer" and not cfg.surrogate:
        raise ClipguardError("--train-attack transfer needs --surrogate (e.g. clip:toy@seed1 or toy-cnn)")
    if cfg.train_attack != "transfer" and cfg.surrogate:
        raise ClipguardError(f"--surrogate is used only with --train-attack transfer (not {cfg.train_attack})")
    if cfg.objective == "noise" and not (cfg.sigma or 0) > 0:
        raise ClipguardError("--objective noise needs --sigma S > 0: the noise std in [0, 1] pixel units (e.g. 0.25)")
    if cfg.objective != "noise" and cfg.sigma is not None:
        raise ClipguardError(f"--sigma is used only with --objective noise (not {cfg.objective})")
