"""``clipguard attack``: craft adversarial examples for a split and save them as a reusable set."""

from __future__ import annotations

from typing import Annotated

import typer

from clipguard.cli import common as c


def attack_command(
    out: Annotated[str, typer.Option("--out", "-o", help="Adversarial set to write (.safetensors).")],
    model: c.ModelOpt = "toy",
    dataset: c.DatasetOpt = "toy",
    split: c.SplitOpt = "test",
    limit: c.LimitOpt = None,
    seed: c.SeedOpt = 0,
    prompts: c.PromptsOpt = None,
    templates: c.TemplatesOpt = "seed",
    batch_size: c.BatchOpt = 128,
    device: c.DeviceOpt = "auto",
    precision: c.PrecisionOpt = "auto",
    adapter: c.AdapterOpt = None,
    attack: Annotated[str, typer.Option(help="fgsm, pgd, apgd or autoattack (L-inf).")] = "pgd",
    eps: Annotated[str, typer.Option(help="L-inf radius in [0, 1] pixel units (8/255 or 0.0314).")] = "8/255",
    alpha: c.AlphaOpt = None,
    steps: c.StepsOpt = 10,
    restarts: c.RestartsOpt = 1,
    resolution: c.ResolutionOpt = "model",
    attack_precision: c.AttackPrecisionOpt = "fp32",
    surrogate: c.SurrogateOpt = None,
    quantize: Annotated[bool, typer.Option(help="Store uint8 pixels (k/255), clipped to stay within eps.")] = False,
    png: Annotated[str | None, typer.Option(help="Write picture grids (clean | perturbation | adversarial) "
                                            "to this folder.")] = None,
    record: Annotated[str | None, typer.Option(help="Also write the JSON record to this file.")] = None,
    json_out: c.JsonOpt = False,
) -> None:
    """Craft adversarial examples (eps in [0, 1] pixel units) and save them for `eval --adv-set`."""
    c.check_positive("--limit", limit)
    c.check_positive("--batch-size", batch_size)
    from pathlib import Path

    from clipguard.attack_run import run_craft
    from clipguard.errors import ClipguardError
    from clipguard.eval_run import EvalConfig, attack_config

    if "," in eps:
        raise ClipguardError(f"--eps {eps!r}: attack crafts one set, give one eps (sweeps are for `eval`)")
    cfg = EvalConfig(model=model, dataset=dataset, split=split, limit=limit, seed=seed, prompts=prompts,
                     templates=templates, batch_size=batch_size, device=device, precision=precision, adapter=adapter,
                     attack=attack, eps=eps, alpha=alpha, steps=steps, restarts=restarts, resolution=resolution,
                     attack_precision=attack_precision, surrogate=surrogate)
    attack_config(cfg)
    rec = run_craft(cfg, out, quantize=quantize, png_dir=png, progress=not json_out)
    c.emit(rec, out=Path(record) if record else None, as_json=json_out, table=attack_table)


def attack_table(rec: dict):
    from rich.table import Table

    a, m = rec["attack"], rec["metrics"]
    t = Table(title=f"{a['name']} eps={a['eps']['text']} on {rec['model_spec']}"
                    + (f" (crafted on {a['surrogate']})" if a.get("surrogate") else "")
                    + f" -> {rec['adv_set']['path']}")
    for col in ("n", "clean acc", "robust acc", "attack success", "img/s"):
        t.add_column(col, justify="right")
    t.add_row(str(rec["data"]["n"]), f"{m['acc1']:.4f}", f"{m['robust_acc']:.4f}", f"{m['attack_success_rate']:.4f}",
              f"{rec['timings']['images_per_s']:,.1f}")
    return t
