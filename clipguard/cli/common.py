"""Options shared by the commands (Annotated aliases) and the output helpers. No torch import here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model spec: ViT-B-32:openai, ARCH:/path/weights."
                                       "safetensors, ARCH:none (random init), hf-hub:ORG/NAME, or toy.")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset spec: toy, cifar10, cifar100, "
                                         "hf:ORG/NAME, or imagefolder:PATH.")]
SplitOpt = Annotated[str, typer.Option(help="Dataset split.")]
LimitOpt = Annotated[int | None, typer.Option(help="Keep N images, stratified by class and seeded by --seed.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for --limit selection and attacks.")]
PromptsOpt = Annotated[str | None, typer.Option(help="Prompts JSON overriding prompts/<dataset>.json.")]
TemplatesOpt = Annotated[str, typer.Option(help="Template set in the prompts file: seed or openai.")]
BatchOpt = Annotated[int, typer.Option(help="Images per batch (halved automatically on GPU out-of-memory).")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(help="Clean passes: auto (bf16 on capable GPUs, else fp32), fp32, "
                                           "bf16, fp16.")]
ImageColOpt = Annotated[str | None, typer.Option(help="Image column of an hf: dataset.")]
LabelColOpt = Annotated[str | None, typer.Option(help="Label column of an hf: dataset.")]
AdapterOpt = Annotated[str | None, typer.Option(help="Adapter directory (LoRA or VPT) made by finetune.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write the JSON record to this file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON record to stdout instead of a table.")]


def check_positive(name: str, value: int | None) -> None:
    from clipguard.errors import ClipguardError

    if value is not None and value < 1:
        raise ClipguardError(f"{name} {value} must be a positive integer")


def emit(record: dict, *, out: Path | None, as_json: bool, table) -> None:
    """Write the record (atomically) and print either its JSON or a human table."""
    from rich.console import Console

    if out is not None:
        from clipguard.results import write_record

        write_record(out, record)
    if as_json:
        typer.echo(json.dumps(record, indent=2))
    else:
        console = Console()
        console.print(table(record))
        if out is not None:
            console.print(f"record written to {out}")

AttackOpt = Annotated[str | None, typer.Option(help="Attack: fgsm, pgd, apgd or autoattack (L-inf).")]
EpsOpt = Annotated[str, typer.Option(help="L-inf radius in [0, 1] pixel units: 8/255 or 0.0314; a comma list "
                                     "(0,2/255,4/255,8/255) gives a sweep.")]
AlphaOpt = Annotated[str | None, typer.Option(help="PGD step size in [0, 1] pixel units (default eps/4).")]
StepsOpt = Annotated[int, typer.Option(help="Attack iterations (PGD, APGD).")]
RestartsOpt = Annotated[int, typer.Option(help="Random restarts (PGD, APGD); worst case over restarts.")]
ResolutionOpt = Annotated[str, typer.Option(help="Where the perturbation lives: model (the model's input size, "
                                            "as TeCoA/FARE) or native (the dataset's own size).")]
AttackPrecisionOpt = Annotated[str, typer.Option(help="Attack precision: fp32 (default) or bf16 (weaker "
                                                 "small-eps gradients; recorded as a warning).")]
SurrogateOpt = Annotated[str | None, typer.Option(help="Transfer attack: craft on toy-cnn, clip:ARCH:TAG, "
                                                  "clip:toy@seed1, hub:OWNER/REPO:ENTRY or a TorchScript file.")]
