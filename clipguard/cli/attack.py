"""``clipguard attack``: craft adversarial examples for a split and save them as a reusable set."""

from __future__ import annotations

from clipguard.cli import options as o
from clipguard.cli.output import emit, model_label
from clipguard.tasks.configs import AttackSetConfig


@o.command(AttackSetConfig)
def attack_command(cfg: AttackSetConfig, out: o.OutOpt = None, json_out: o.JsonOpt = False,
                   strict: o.StrictOpt = False) -> None:
    """Craft adversarial examples (eps in [0, 1] pixel units) and save them for `eval --adv-set`."""
    from clipguard.tasks.attack import run_craft

    emit(run_craft(cfg, progress=not json_out), out=out, as_json=json_out, table=attack_table, strict=strict)


def attack_table(rec: dict):
    from rich.table import Table

    a, m = rec["attack"], rec["metrics"]
    t = Table(title=f"{a['name']} eps={a['eps']['text']} on {model_label(rec)}"
                    + (f" (crafted on {a['surrogate']})" if a.get("surrogate") else "")
                    + f" -> {rec['adv_set']['path']}")
    for col in ("n", "clean acc", "robust acc", "attack success", "img/s"):
        t.add_column(col, justify="right")
    t.add_row(str(rec["data"]["n"]), f"{m['acc1']:.4f}", f"{m['robust_acc']:.4f}", f"{m['attack_success_rate']:.4f}",
              f"{rec['timings']['images_per_s']:,.1f}")
    return t
