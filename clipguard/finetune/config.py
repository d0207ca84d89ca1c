"""FinetuneConfig: every option of a robust fine-tuning run, typed, with units; plus its hash.

Each field declares its option once (:mod:`clipguard.config`); ``trains=False`` marks the fields a resumed run may
change (output, checkpointing, final evaluation, speed), which the training hash leaves out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from clipguard.config import (
    ATTACK,
    EVALUATION,
    OUTPUT,
    TRAIN,
    Config,
    comma_list,
    flat,
    from_options,
    in_range,
    option,
    output_dir,
    pixel_units,
)
from clipguard.config import option_fields as _option_fields
from clipguard.config import positive as _positive
from clipguard.errors import ClipguardError
from clipguard.run_options import RunOptions
from clipguard.specs import Eps, check_linf_eps


def _train_run() -> RunOptions:
    return RunOptions(split="train", batch_size=128)


def _run_dir(value, name: str) -> str:
    return str(output_dir(value, name))  # probed for writing before any work


_run_dir.probes = True


@dataclass(frozen=True)
class FinetuneConfig(Config):
    EXCLUDE = ("adapter",)  # finetune trains a new adapter on the base model
    HELP = {"split": "Training split.",
            "batch_size": "Images per optimizer step, per process under torchrun (a step: this x processes).",
            "seed": "Seeds init, data order, attacks, --limit and the final evaluation.",
            "precision": "Autocast of training and clean passes: auto (bf16 on capable GPUs, else fp32), fp32 or "
                         "bf16."}

    # --- what to train on: model, dataset, split (train), limit, seed, prompts, device, precision, batch size
    run: RunOptions = field(default_factory=_train_run)
    run_dir: str | None = option(None, panel=OUTPUT, metavar="DIR", trains=False, parse=_run_dir,
                                 help="Run directory: adapter + manifest, checkpoint, record.json (default: the "
                                      "--resume directory).")
    # --- what trains
    method: str = option("lora", panel=TRAIN, metavar="NAME",
                         help="What trains: lora, vpt, full (the image tower) or prompt (APT's text context).")
    lora_r: int = option(8, panel=TRAIN, parse=_positive, help="LoRA rank.")
    lora_alpha: int = option(32, panel=TRAIN, help="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = option(0.0, panel=TRAIN, parse=in_range(0, 1, "in [0, 1)"),
                                 help="LoRA dropout (MLP targets only: on the attention modules peft merges LoRA each "
                                      "forward, so dropout never applies).")
    lora_targets: list[str] | None = option(None, panel=TRAIN, metavar="LIST",
                                            parse=lambda v, n: list(comma_list(v, n)),
                                            help="Comma list of module names/suffixes for LoRA (default: the visual "
                                                 "attention modules).")
    vpt_tokens: int = option(10, panel=TRAIN, parse=_positive, help="VPT prompt tokens.")
    prompt_tokens: int = option(16, panel=TRAIN, parse=_positive, omit_at_default=True,
                                help="--method prompt: learnable text context tokens M (APT: 16; its 'one word' is 1).")
    prompt_class_specific: bool = option(False, panel=TRAIN, omit_at_default=True,
                                         help="--method prompt: one context per class (APT's CSC) instead of one "
                                              "unified context (UC) for all.")
    prompt_init: str | None = option(None, panel=TRAIN, metavar="WORDS", omit_at_default=True,
                                     help="--method prompt: words whose embeddings start the context (e.g. 'a photo of "
                                          "a'; sets the token count); default random N(0, 0.02²), as APT's code.")
    # --- objective and training adversary
    objective: str = option("tecoa", panel=TRAIN, metavar="NAME",
                            help="tecoa (CE over scaled cosine to class text), ce (plain cosine logits), fare "
                                 "(unsupervised, to the frozen encoder) or noise (tecoa under Gaussian noise of std "
                                 "--sigma, for `certify`), pmg (PMG-AFT) or tga (TGA-ZSR, ViT towers).")
    pmg_general_weight: float = option(1.0, panel=TRAIN, parse=in_range(0, None, ">= 0"), omit_at_default=True,
                                       help="--objective pmg: weight of KL(frozen pre-trained model || model) on the "
                                            "adversarial images (PMG-AFT's code: 1).")
    pmg_clean_weight: float = option(1.0, panel=TRAIN, parse=in_range(0, None, ">= 0"), omit_at_default=True,
                                     help="--objective pmg: weight of KL(model on clean || model on adversarial) "
                                          "(PMG-AFT's code: 1).")
    tga_refine_weight: float = option(0.08, panel=TRAIN, parse=in_range(0, None, ">= 0"), omit_at_default=True,
                                      help="--objective tga: weight of the attention-refinement term (TGA-ZSR's "
                                           "alpha: 0.08).")
    tga_constraint_weight: float = option(0.05, panel=TRAIN, parse=in_range(0, None, ">= 0"), omit_at_default=True,
                                          help="--objective tga: weight of the attention-constraint term (TGA-ZSR's "
                                               "beta: 0.05).")
    sigma: float | None = option(None, panel=TRAIN, omit_at_default=True,
                                 help="--objective noise: the noise std in [0, 1] pixel units (Cohen et al.: 0.12, "
                                      "0.25, 0.5, 1.0; certify with the same --sigma; add --eps 0 for their recipe, no "
                                      "adversary).")
    train_attack: str = option("pgd", panel=ATTACK, metavar="NAME",
                               help="pgd (against the model being trained) or transfer (from --surrogate).")
    surrogate: str | None = option(None, panel=ATTACK, metavar="SPEC",
                                   help="Transfer attack: craft on toy-cnn, clip:ARCH:TAG, clip:toy@seed1, "
                                        "hub:OWNER/REPO:ENTRY or a TorchScript file.")
    eps: Eps = option("1/255", panel=ATTACK, parse=pixel_units(), metavar="EPS",
                      help="L-inf radius of training and final robust evaluation, [0, 1] pixel units (1/255 or "
                           "0.0039).")
    alpha: Eps | None = option(None, panel=ATTACK, parse=pixel_units(allow_zero=False), metavar="EPS",
                               help="Training PGD step in [0, 1] pixel units (default: eps).")
    steps: int = option(2, panel=ATTACK, parse=_positive, help="Training PGD iterations per batch.")
    # --- optimisation
    epochs: int = option(1, panel=TRAIN, parse=_positive, help="Passes over the training split.")
    max_steps: int | None = option(None, panel=TRAIN, parse=_positive, omit_at_default=True,
                                   help="Optimizer steps in all, instead of --epochs (FARE: 20000 of 128 images).")
    lr: float | None = option(None, panel=TRAIN, parse=in_range(0, None, "a positive learning rate (e.g. 1e-4)",
                                                           lo_open=True),
                              help="AdamW peak learning rate (default per method: lora 5e-4, vpt 1e-3, full 1e-5).")
    weight_decay: float = option(0.0, panel=TRAIN, parse=in_range(0, None, ">= 0"), help="AdamW weight decay.")
    warmup: float = option(0.05, panel=TRAIN, parse=in_range(0, 1, "a share of all steps in [0, 1)"),
                           help="Share of steps with linear warm-up before cosine decay.")
    grad_clip: float = option(1.0, panel=TRAIN, parse=in_range(0, None, ">= 0 (0 = no clipping)"),
                              help="Max gradient norm (0 = off).")
    # --- checkpoints
    save_every: int = option(50, panel=OUTPUT, trains=False,
                             parse=in_range(0, None, ">= 0 steps (0 = only at the end)", cast=int),
                             help="Checkpoint every N optimizer steps (0 = only at the end).")
    resume: str | None = option(None, panel=OUTPUT, metavar="DIR", trains=False,
                                help="Continue the run in this directory (same options).")
    # --- final evaluation on a held-out split (PGD, same eps)
    eval_split: str = option("test", panel=EVALUATION, trains=False, help="Held-out split of the final evaluation.")
    eval_limit: int | None = option(None, panel=EVALUATION, parse=_positive, trains=False,
                                    help="Images of the held-out split (default all).")
    eval_steps: int = option(10, panel=EVALUATION, parse=_positive, trains=False,
                             help="PGD iterations of the final robust evaluation.")
    eval_batch_size: int = option(256, panel=EVALUATION, parse=_positive, trains=False,
                                  help="Images per evaluation batch.")
    eval_base: bool = option(False, panel=EVALUATION, trains=False,
                             help="Also evaluate the base model for comparison.")

    def __post_init__(self) -> None:
        if self.run_dir is None and self.resume is not None:  # --resume DIR alone continues that run
            object.__setattr__(self, "run_dir", self.resume)
        super().__post_init__()

    def check(self) -> None:
        validate(self)

    @classmethod
    def complete(cls, opts: dict) -> dict:
        """``--resume DIR`` alone continues that run with the options its checkpoint holds: an option left at its
        default takes the run's value; one given with another value is refused (it would change the run)."""
        if not opts.get("resume"):
            return opts
        try:
            stored = json.loads((Path(opts["resume"]) / "checkpoint.json").read_text())["config"]
        except (OSError, ValueError, KeyError):
            return opts  # nothing readable to resume from: check_resume says so in one line
        defaults = {f.name: f.default for f in _option_fields(cls)}
        out = dict(opts)
        for name, value in stored.items():
            if name not in defaults:
                continue
            mine = opts.get(name, defaults[name])
            if _same(mine, defaults[name]) or _same(mine, value):
                out[name] = value
            else:
                raise ClipguardError(f"--{name.replace('_', '-')} {mine!r}: the run in {opts['resume']!r} was made "
                                     f"with {value!r}; --resume keeps the run's options (leave it out) or start a new "
                                     "--run-dir")
        return out


def _same(a, b) -> bool:
    """Two option values as given (text, numbers, lists) that mean the same ("4/255" and "4/255", 1 and 1.0)."""
    def text(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

    return a == b or text(a) == text(b)


def finetune_config(**opts) -> FinetuneConfig:
    """A FinetuneConfig from flat keyword options (a script, a test): RunOptions fields by their own names."""
    return from_options(FinetuneConfig, opts)


def hashed_fields(cfg: FinetuneConfig) -> dict:
    """The config as one flat dict without the fields that do not change the training trajectory."""
    keep = {f.name for f in _option_fields(type(cfg)) if f.opt.trains and not f.opt.speed_only}
    return {k: v for k, v in flat(cfg).items() if k in keep}


def config_hash(cfg: FinetuneConfig) -> str:
    """sha256 of the fields that shape training (everything but output, checkpointing and evaluation)."""
    return hashlib.sha256(json.dumps(hashed_fields(cfg), sort_keys=True).encode()).hexdigest()


def config_diff(old: dict, new: dict) -> list[str]:
    """``["lr 0.01 -> 0.02", ...]`` for the hashed fields that differ."""
    keys = [f.name for f in _option_fields(FinetuneConfig) if f.opt.trains and not f.opt.speed_only]
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def validate(cfg: FinetuneConfig) -> None:
    """Checks across options (each option's own checks are in its parser); one ClipguardError naming the option."""
    from clipguard.finetune.adversary import TRAIN_ATTACKS  # torch: only when a config is built
    from clipguard.finetune.methods import METHODS
    from clipguard.finetune.objectives import OBJECTIVES

    METHODS.check(cfg.method)
    OBJECTIVES.check(cfg.objective)
    TRAIN_ATTACKS.check(cfg.train_attack)
    if not cfg.run_dir:
        raise ClipguardError("finetune needs --run-dir DIR (or --resume DIR)")
    check_linf_eps(cfg.eps)  # training is always L-inf: a bare 0.5 means 0.5/255
    if cfg.alpha is not None:
        check_linf_eps(cfg.alpha, "--alpha")
    if cfg.run.adapter:
        raise ClipguardError("finetune trains a new adapter on the base model: --adapter is not an input here "
                             "(evaluate an adapter with `clipguard eval --adapter DIR`; tune a prompt on an adapter's "
                             "image tower with --method prompt --base-adapter DIR)")
    # a transformers: model's default LoRA targets are its q/k/v/out_proj nn.Linear layers (dropout applies, compiles)
    mha_default = cfg.method == "lora" and not cfg.lora_targets and not cfg.run.model.startswith("transformers:")
    if mha_default and cfg.lora_dropout:  # default targets: attention modules
        raise ClipguardError("LoRA on nn.MultiheadAttention merges its weights each forward, so dropout never "
                             "applies: use --lora-dropout 0 (or --lora-targets c_fc,c_proj, where it does)")
    if mha_default and cfg.run.compile:  # default targets: attention modules
        from clipguard.finetune.methods import LORA_MHA_NO_COMPILE  # torch: only when a config is built

        raise ClipguardError(LORA_MHA_NO_COMPILE)
    if cfg.run.base_adapter and cfg.method != "prompt":
        raise ClipguardError(f"--base-adapter is the frozen image tower under --method prompt; --method {cfg.method} "
                             "trains the base model's own image tower: leave --base-adapter out")
    if cfg.method == "prompt" and cfg.objective == "fare":
        raise ClipguardError("--objective fare never reads the class text, so a prompt gets no gradient: use "
                             "--objective tecoa (APT's cross-entropy) with --method prompt")
    if cfg.method == "prompt" and cfg.objective == "tga":
        raise ClipguardError("--objective tga aligns the image tower's attention maps, which --method prompt leaves "
                             "frozen: use --method lora, vpt or full with tga")
    if cfg.objective == "tga":
        from clipguard.finetune.objectives import check_vit_spec  # torch: only when a config is built

        check_vit_spec(cfg.run.model)  # before any weights load: the loop checks the loaded tower again
    if cfg.method == "prompt" and cfg.run.compile:
        raise ClipguardError("--compile compiles the image tower, and under --method prompt nothing there trains: "
                             "leave --compile out")
    if cfg.method != "prompt" and (cfg.prompt_class_specific or cfg.prompt_init):
        raise ClipguardError(f"--prompt-class-specific and --prompt-init are used only with --method prompt (not "
                             f"{cfg.method})")
    if cfg.run.precision == "fp16":
        raise ClipguardError("--precision fp16 needs loss scaling, which finetune does not do: use bf16 or fp32")
    if cfg.train_attack == "transfer" and not cfg.surrogate:
        raise ClipguardError("--train-attack transfer needs --surrogate (e.g. clip:toy@seed1 or toy-cnn)")
    if cfg.train_attack != "transfer" and cfg.surrogate:
        raise ClipguardError(f"--surrogate is used only with --train-attack transfer (not {cfg.train_attack})")
    if cfg.surrogate:
        from clipguard.attacks.surrogates import check_surrogate_spec  # torch: only when a config is built

        check_surrogate_spec(cfg.surrogate, trust_remote_code=cfg.run.trust_remote_code)
    for name, owner, default in (("pmg_general_weight", "pmg", 1.0), ("pmg_clean_weight", "pmg", 1.0),
                                 ("tga_refine_weight", "tga", 0.08), ("tga_constraint_weight", "tga", 0.05)):
        if cfg.objective != owner and getattr(cfg, name) != default:
            raise ClipguardError(f"--{name.replace('_', '-')} is used only with --objective {owner} (not "
                                 f"{cfg.objective}): leave it out")
    if cfg.objective == "noise" and not (cfg.sigma or 0) > 0:
        raise ClipguardError("--objective noise needs --sigma S > 0: the noise std in [0, 1] pixel units (e.g. 0.25)")
    if cfg.objective != "noise" and cfg.sigma is not None:
        raise ClipguardError(f"--sigma is used only with --objective noise (not {cfg.objective})")
