"""The CLI's shared options, declared once (Annotated aliases grouped into help panels), and the decorator
that gives a command the whole RunOptions block. No torch import here: ``clipguard --help`` stays fast."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated

import typer

from clipguard.run_options import RunOptions

MODEL_DATA, ATTACK, OUTPUT, PERF, TRAIN = "Model & data", "Attack", "Output", "Performance", "Training"

# ---- RunOptions: every command that loads a model and a dataset takes these
ModelOpt = Annotated[str, typer.Option("--model", "-m", rich_help_panel=MODEL_DATA,
                                       help="Model spec: ViT-B-32:openai, ARCH:/path/weights.safetensors, "
                                            "ARCH:none (random init), hf-hub:ORG/NAME, or toy.")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", rich_help_panel=MODEL_DATA,
                                         help="Dataset spec: toy, a catalogue name (cifar10, imagenet1k, ...: "
                                              "clipguard datasets), hf:ORG/NAME or hf:SAVED_DIR, "
                                              "imagefolder:PATH (ImageNet's layout too), wds:PATH (CLIP_benchmark "
                                              "shards) or prepared:PATH.")]
SplitOpt = Annotated[str, typer.Option(help="Dataset split.", rich_help_panel=MODEL_DATA)]
LimitOpt = Annotated[int | None, typer.Option(help="Keep N images, stratified by class and seeded by --seed.",
                                              rich_help_panel=MODEL_DATA)]
SeedOpt = Annotated[int, typer.Option(help="Seed for --limit selection, attacks and training.",
                                      rich_help_panel=MODEL_DATA)]
PromptsOpt = Annotated[str | None, typer.Option(help="Prompts JSON overriding prompts/<dataset>.json.",
                                                rich_help_panel=MODEL_DATA)]
TemplatesOpt = Annotated[str, typer.Option(help="Template set in the prompts file: seed or openai.",
                                           rich_help_panel=MODEL_DATA)]
ImageColOpt = Annotated[str | None, typer.Option(help="Image column of an hf: dataset.", rich_help_panel=MODEL_DATA)]
LabelColOpt = Annotated[str | None, typer.Option(help="Label column of an hf: dataset.", rich_help_panel=MODEL_DATA)]
AdapterOpt = Annotated[str | None, typer.Option(help="Adapter directory (LoRA, VPT or full) made by finetune.",
                                                rich_help_panel=MODEL_DATA)]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.",
                                        rich_help_panel=PERF)]
PrecisionOpt = Annotated[str, typer.Option(help="Clean passes: auto (bf16 on capable GPUs, else fp32), fp32, "
                                                "bf16, fp16.", rich_help_panel=PERF)]
BatchOpt = Annotated[int, typer.Option(help="Images per batch, per process under torchrun (halved automatically "
                                            "on GPU out-of-memory).",
                                       rich_help_panel=PERF)]
WorkersOpt = Annotated[int | None, typer.Option(help="Decode processes (default: the machine's cores; 0: decode in "
                                                     "the main process).", rich_help_panel=PERF)]
StreamingOpt = Annotated[bool, typer.Option(help="hf: hub datasets: read the first --limit rows as a stream "
                                               "instead of downloading the whole set (not stratified).",
                                          rich_help_panel=MODEL_DATA)]
DataModeOpt = Annotated[str, typer.Option(help="memory (decode once, hold the set), stream (decode batch by batch, "
                                               "memory bounded) or auto (memory up to 512 MiB of pixels).",
                                          rich_help_panel=PERF)]
DecodeOpt = Annotated[str, typer.Option(help="pil (the protocol: PIL on the decode workers) or device (JPEG files "
                                             "decoded by torchvision on --device, nvJPEG on a GPU, and resized "
                                             "there; within the README's tolerance of pil, named in the record).",
                                        rich_help_panel=PERF)]
CompileModeOpt = Annotated[str, typer.Option(help="torch.compile mode with --compile: default, reduce-overhead (CUDA "
                                                  "graphs: replays each batch shape's kernels without launch "
                                                  "overhead), max-autotune or max-autotune-no-cudagraphs.",
                                             rich_help_panel=PERF)]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the classifier's forward (inductor; "
                                                          "compile time is reported apart from run time).",
                                         rich_help_panel=PERF)]

_RUN_PARAMS = {"model": ModelOpt, "dataset": DatasetOpt, "split": SplitOpt, "limit": LimitOpt, "seed": SeedOpt,
               "prompts": PromptsOpt, "templates": TemplatesOpt, "image_column": ImageColOpt,
               "label_column": LabelColOpt, "adapter": AdapterOpt, "device": DeviceOpt, "precision": PrecisionOpt,
               "batch_size": BatchOpt, "workers": WorkersOpt, "data_mode": DataModeOpt, "streaming": StreamingOpt,
               "decode": DecodeOpt, "compile": CompileOpt,
               "compile_mode": CompileModeOpt}


def _option_group(arg: str, params: dict, base: dict, make, *, exclude: tuple[str, ...] = (),
                  help: dict[str, str] | None = None, **defaults):
    """A decorator giving a command a block of options declared once: ``params`` (name -> Annotated option)
    become its parameters (``defaults`` override ``base``, ``help`` a help text, ``exclude`` drops one) and
    the command receives them as one argument ``arg`` = ``make(values)``."""
    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != arg]
        added = []
        for name, ann in params.items():
            if name in exclude:
                continue
            if help and name in help:
                info = ann.__metadata__[0]
                decls = (info.default, *info.param_decls) if isinstance(info.default, str) else info.param_decls
                ann = Annotated[ann.__origin__, typer.Option(*decls, help=help[name],
                                                             rich_help_panel=info.rich_help_panel)]
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                           default=defaults.get(name, base[name])))
        params_all = added + own  # the group's panel comes first in --help

        @functools.wraps(fn)
        def command(**kw):
            values = {**{k: defaults.get(k, base[k]) for k in exclude},
                      **{k: kw.pop(k) for k in list(kw) if k in params}}
            return fn(**{arg: make(values)}, **kw)

        command.__signature__ = sig.replace(parameters=params_all)
        command.__annotations__ = {p.name: p.annotation for p in params_all}
        return command

    return deco


def run_options(**kw):
    """Give a command the RunOptions block (the options above) as one ``run: RunOptions`` argument; keyword
    arguments as :func:`_option_group` (``batch_size=128``, ``exclude=("adapter",)``, ``help={...}``)."""
    return _option_group("run", _RUN_PARAMS, vars(RunOptions()), lambda values: RunOptions(**values), **kw)


# ---- attacks (eval, attack)
AttackOpt = Annotated[str | None, typer.Option(help="Attack: fgsm, pgd, apgd (torchattacks) or autoattack (the "
                                                    "reference AutoAttack, pyautoattack).", rich_help_panel=ATTACK)]
EpsOpt = Annotated[str, typer.Option(help="Radius in [0, 1] pixel units: 8/255 or 0.0314 (linf: per pixel; l2: "
                                          "the image's L2 norm); a comma list (0,2/255,4/255,8/255) gives a sweep.",
                                     rich_help_panel=ATTACK)]
NormOpt = Annotated[str, typer.Option(help="Threat model: linf or l2 (every attack).", rich_help_panel=ATTACK)]
AlphaOpt = Annotated[str | None, typer.Option(help="PGD step size in [0, 1] pixel units (default eps/4; PGD only).",
                                              rich_help_panel=ATTACK)]
StepsOpt = Annotated[int | None, typer.Option(help="Iterations (PGD: default 10, APGD: default 100; FGSM and "
                                                   "AutoAttack take none).", rich_help_panel=ATTACK)]
RestartsOpt = Annotated[int | None, typer.Option(help="Random restarts (PGD, APGD; default 1); worst case over "
                                                      "restarts.", rich_help_panel=ATTACK)]
AAVersionOpt = Annotated[str | None, typer.Option(help="AutoAttack version: standard (default: APGD-CE, APGD-T, "
                                                       "FAB-T, Square, 100 iterations), plus, rand or custom.",
                                                  rich_help_panel=ATTACK)]
AAAttacksOpt = Annotated[str | None, typer.Option(help="AutoAttack custom: comma list of apgd-ce, apgd-dlr, fab, "
                                                       "square, apgd-t, fab-t (e.g. apgd-ce,apgd-t as FARE).",
                                                  rich_help_panel=ATTACK)]
ResolutionOpt = Annotated[str, typer.Option(help="Where the perturbation lives: model (the model's input size, "
                                                 "as TeCoA/FARE) or native (the dataset's own size).",
                                            rich_help_panel=ATTACK)]
AttackPrecisionOpt = Annotated[str, typer.Option(help="Attack precision: fp32 (default) or bf16 (weaker "
                                                      "small-eps gradients: recorded as a warning, and checked "
                                                      "against fp32 on 256 images, within 0.5 points).",
                                                 rich_help_panel=PERF)]
SurrogateOpt = Annotated[str | None, typer.Option(help="Transfer attack: craft on toy-cnn, clip:ARCH:TAG, "
                                                       "clip:toy@seed1, hub:OWNER/REPO:ENTRY or a TorchScript file.",
                                                  rich_help_panel=ATTACK)]

# ---- output: every command writes its JSON record with --out and prints it with --json
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write the JSON record to this file.",
                                             rich_help_panel=OUTPUT)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON record to stdout instead of a table.",
                                       rich_help_panel=OUTPUT)]
RecordOpt = Annotated[Path | None, typer.Option("--record", hidden=True,
                                                help="Deprecated name of --out (the JSON record).")]
PngOpt = Annotated[str | None, typer.Option(help="Write picture grids (clean | perturbation | adversarial) to "
                                                 "this folder.", rich_help_panel=OUTPUT)]

_ATTACK_PARAMS = {"attack": AttackOpt, "eps": EpsOpt, "norm": NormOpt, "alpha": AlphaOpt, "steps": StepsOpt,
                  "restarts": RestartsOpt, "aa_version": AAVersionOpt, "aa_attacks": AAAttacksOpt,
                  "resolution": ResolutionOpt, "surrogate": SurrogateOpt, "attack_precision": AttackPrecisionOpt}
_ATTACK_DEFAULTS = {"attack": None, "eps": "8/255", "norm": "linf", "alpha": None, "steps": None, "restarts": None,
                    "aa_version": None, "aa_attacks": None, "resolution": "model", "surrogate": None,
                    "attack_precision": "fp32"}  # the EvalConfig defaults (tasks are not imported here: no torch)


def attack_options(**kw):
    """Give a command the attack block (the options above) as one ``attack_opts: dict`` argument, the
    EvalConfig fields of the same names; keyword arguments as :func:`_option_group`."""
    return _option_group("attack_opts", _ATTACK_PARAMS, _ATTACK_DEFAULTS, dict, **kw)
