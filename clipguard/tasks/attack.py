"""``clipguard attack`` as a library function: craft adversarial examples for a split and save them."""

from __future__ import annotations

import time

import torch

from clipguard.attacks import integrity as ic
from clipguard.attacks import runner  # called as runner.run_attack: tests spy on it
from clipguard.attacks.advset import image_digest, save_adv_set
from clipguard.attacks.advset import quantize as quantize_fn
from clipguard.attacks.surrogates import build_surrogate
from clipguard.attacks.sweep import robust_entry
from clipguard.config import flat
from clipguard.defenses.adaptive import adjust_entries, defense_cost, defense_record, plan_attack
from clipguard.distributed import is_main
from clipguard.models.inference import attack_inputs
from clipguard.records.metrics import at_run_confidence, put
from clipguard.records.schema import make_record
from clipguard.report.pictures import adversarial_grid
from clipguard.tasks.configs import AttackSetConfig
from clipguard.tasks.eval import clean_rows, load_resolution
from clipguard.tasks.setup import prepare


@at_run_confidence  # every _ci at --confidence
def run_craft(cfg: AttackSetConfig, *, n_png: int = 8, progress: bool = True) -> dict:
    """Attack every image of ``cfg``'s split once (at ``cfg.eps``) and save the set to ``cfg.adv_set``.

    The set's manifest names the source dataset, the model or surrogate it was crafted on and the attack,
    so ``clipguard eval --adv-set`` can send it to any target.
    """
    started = time.perf_counter()
    base, out, quantize, png_dir = cfg.attack_settings(), cfg.adv_set, cfg.quantize, cfg.png
    resolution = load_resolution(cfg)
    p = prepare(cfg.run, resolution=resolution, attack_precision=cfg.attack_precision,  # --compile: warmed up
                defense=cfg.defended)
    surrogate, plan = None, None
    if cfg.surrogate:  # crafted on the dataset's own images
        surrogate = build_surrogate(cfg.surrogate, p, trust_remote_code=cfg.run.trust_remote_code)
    if p.undefended is not None:  # --defense: through the whole defense (adaptive) or not (defenses.adaptive)
        plan = plan_attack(p, cfg.defended, base, aa_version_given=cfg.aa_version is not None)
        base, surrogate = plan.attack, plan.craft_on
    run = runner.run_attack(p.classifier, p.data.images, p.data.labels, base, batch_size=cfg.run.batch_size,
                            resolution=resolution, precision=cfg.attack_precision, keep_adv=True,
                            progress=progress, craft_on=surrogate)
    adv = run.adv_images
    if quantize and is_main():
        clean = p.data.images
        if tuple(adv.shape[-2:]) != tuple(clean.shape[-2:]):  # model resolution: the exact float image attacked
            bs = cfg.run.batch_size
            with torch.no_grad():  # in batches, converted on the device: a whole dataset at 224 px is GBs
                clean = torch.cat([attack_inputs(p.classifier, clean[i:i + bs], "model").cpu()
                                   for i in range(0, clean.shape[0], bs)])
        adv = quantize_fn(adv, clean, base.eps.value)  # nearest uint8 level inside the eps-ball of that image
    attack = {**base.to_record(len(p.prompts.classnames)), "resolution": resolution,
              "precision": cfg.attack_precision, "surrogate": cfg.surrogate}
    source = {"model": p.clip.spec.text, "fingerprint": p.clip.fingerprint, "surrogate": cfg.surrogate,
              "adapter": cfg.run.adapter}
    defense = None
    if plan is not None:  # the set was crafted against (or around) a defense: the manifest and the record say how
        defense = defense_record(p, plan=plan, cost=defense_cost(p, precision=p.clip.precision,
                                                                 batch_size=cfg.run.batch_size))
        source["defense"] = {"name": defense["name"], "evaluation": plan.mode}
    if is_main():  # under torchrun every rank holds the whole set, in dataset order: one writes it
        manifest = {"data": p.data.to_record(), "images_digest": image_digest(p.data.images), "source": source,
                    "attack": attack, "quantized": quantize}
        save_adv_set(out, adv, p.data.labels, manifest)
    entry = robust_entry(run, p.data.labels, base)
    if plan is not None:
        adjust_entries([entry], plan)
    pngs = []
    if png_dir and is_main():
        pngs = adversarial_grid(p, run, png_dir, n=n_png)
    # the attack's own checks (as eval's), and the saved set's against the images it was made from
    checks = [{**c, "eps": base.eps.text} for c in ic.cheap_checks(run, base.eps.value, base.norm)]
    if is_main():
        checks += [{**c, "eps": base.eps.text} for c in ic.saved_set_checks(adv, clean_rows(p, adv), base.eps.value,
                                                                          base.norm, batch_size=cfg.run.batch_size)]
    counts = entry["counts"]  # each metric k / n of integers, its counts beside it (clean_acc is acc1 here)
    metrics = put({}, "acc1", **counts["clean_acc"])
    for name in ("robust_acc", "attack_success_rate", "surrogate_clean_acc", "surrogate_robust_acc",
                 "undefended_clean_acc", "undefended_adv_acc"):
        if name in counts:
            put(metrics, name, **counts[name])
    return make_record("attack", started=started, clip=p.clip, dataset=p.data, prompts=p.prompts, metrics=metrics,
                       timings=p.timings(run.timings), attack=attack, adv_set={"path": str(out), "quantized": quantize},
                       stats=run.stats, pngs=pngs, config=flat(cfg), checks=checks, adapters=p.adapters,
                       checks_passed=all(c["passed"] for c in checks), **({"defense": defense} if defense else {}))
