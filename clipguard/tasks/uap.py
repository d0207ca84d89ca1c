"""``clipguard uap fit`` and ``clipguard uap eval`` as library functions: config in, record out.

Both run in fp32 (attack precision). The perturbation is added at the resolution its manifest names:
"model" (images resized to the model's input size first, as attacks do) or "native" (the dataset's own
size; the classifier upsamples ``x + v``). A UAP whose size differs from those inputs (evaluated on
another model or dataset) is resized bicubically and projected back onto its eps-ball; see
:func:`clipguard.uap.core.fit_to`.
"""

from __future__ import annotations

import time
from dataclasses import replace

from safetensors.torch import load_file

from clipguard.attacks.integrity import check
from clipguard.config import flat
from clipguard.data.stream import chunks
from clipguard.distributed import barrier, is_main, world_size
from clipguard.errors import ClipguardError
from clipguard.models.inference import attack_inputs
from clipguard.progress import progress_bar
from clipguard.records.metrics import at_run_confidence, count, put
from clipguard.records.predictions import image_digests
from clipguard.records.schema import make_record
from clipguard.registry import suggest
from clipguard.report.uap_pictures import uap_pictures
from clipguard.tasks.configs import UAPEvalConfig, UAPFitConfig, uap_eval_config, uap_fit_config
from clipguard.tasks.setup import prepare
from clipguard.uap.core import (
    NORM_SLACK,
    fit_to,
    norm_of,
    perturb,
    predict,
    random_control,
    scaled_eps,
    universal_attack,
)
from clipguard.uap.file import UAPFile, tensor_digest
from clipguard.uap.fit import fit_uap, uap_metrics

__all__ = ["UAPEvalConfig", "UAPFitConfig", "run_uap_eval", "run_uap_fit", "uap_eval_config", "uap_fit_config"]


def resolve_target(name: str | None, classnames: list[str]) -> int | None:
    """Index of ``name`` in the class list (None stays None); an unknown name lists the close ones."""
    if name is None:
        return None
    if name in classnames:
        return classnames.index(name)
    close = suggest(name, classnames)
    known = ", ".join(classnames[:12]) + (", ..." if len(classnames) > 12 else "")
    raise ClipguardError(f"--target-class {name!r} is not in the class list"
                         + (f" (did you mean {close}?)" if close else f" ({known})"))


def _prepare(cfg, resolution: str, *, gradients: bool = False):
    """UAPs are fitted and scored in fp32; fitting takes gradients (--compile warms that pass up too)."""
    return prepare(cfg.run, resolution=resolution, precision="fp32", attack_precision="fp32" if gradients else None)


def _inputs(p, resolution: str):
    return lambda batch: attack_inputs(p.classifier, batch, resolution)


def _norm_check(v, norm, eps: float) -> dict:
    size = norm_of(v, norm)
    return check("norm_within_eps", size, size <= eps + NORM_SLACK, f"||v||_{norm.value} vs eps {eps:.6g}")


def _pictures(p, inputs, v, clean_pred, adv_pred, png_dir, n: int = 8) -> list[str]:
    x = inputs(p.data.images[:n]).cpu()
    return uap_pictures(v.cpu(), x, perturb(x, v.cpu()), clean_pred[:n], adv_pred[:n], p.data.labels[:n],
                        p.prompts.classnames, png_dir)


def _fit_overlap(manifest: dict, data) -> int:
    """How many evaluation images are among the fitting images, by image digest (a flat folder read as two
    "splits" is the same images; two limits of one split overlap). A UAP file without digests (made before them) is
    matched by dataset and split."""
    fitted = manifest.get("image_digests")
    if fitted is None:
        fit_data = manifest.get("data") or {}
        return len(data) if (fit_data.get("spec"), fit_data.get("split")) == (data.spec, data.split) else 0
    fitted = set(fitted)
    return sum(d in fitted for _, x in chunks(data.images, 1024) for d in image_digests(x))


@at_run_confidence  # every _ci at --confidence
def run_uap_fit(cfg: UAPFitConfig, *, progress: bool = True) -> dict:
    """Fit a UAP on ``cfg``'s split, save it to ``cfg.uap``; returns a ``clipguard.result/1`` record."""
    started = time.perf_counter()
    ucfg = cfg.uap_settings()
    if ucfg.method != "sgd" and world_size() > 1:
        raise ClipguardError(f"--method {ucfg.method} fits on one process (its loop walks the images one by one); "
                             "under torchrun use --method sgd, or run this without torchrun")
    p = _prepare(cfg, ucfg.resolution, gradients=True)
    ucfg = replace(ucfg, target_class=resolve_target(cfg.target_class, p.prompts.classnames))
    inputs = _inputs(p, ucfg.resolution)
    # Fitting draws random batches over the whole set: a streamed set is decoded into memory once.
    images = p.data.in_memory()
    fit = fit_uap(p.classifier, images, ucfg, inputs, progress=progress)
    metrics = uap_metrics(p.data.labels, fit.clean_pred, fit.adv_pred, ucfg.target_class)
    attack = {**ucfg.to_record(), "target_class_name": cfg.target_class, "precision": "fp32"}
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": {"model": p.clip.spec.text, "fingerprint": p.clip.fingerprint, "adapter": cfg.run.adapter},
                "data": p.data.to_record(), "attack": attack,
                "image_digests": image_digests(images),  # uap eval's held-out check: which images v was fitted on
                "fitting": {**metrics, "history": fit.history, "epochs_run": fit.timings["epochs_run"]}}
    fitted = tensor_digest(fit.delta)  # before anything is written
    uap = UAPFile(fit.delta, manifest)
    if is_main():  # under torchrun every rank holds the same v; one writes it, the others read its manifest
        uap.to_disk(cfg.uap)
    barrier()
    if not is_main():
        uap = UAPFile.from_disk(cfg.uap)
    stored = load_file(str(cfg.uap))["uap"]  # the raw tensor as it is on disk, no validation in between
    same = tensor_digest(stored) == fitted
    checks = [_norm_check(stored, ucfg.norm, ucfg.eps.value),
              check("reload_identical", same, same, "the tensor on disk has the bits that were fitted")]
    pngs = _pictures(p, inputs, fit.delta.to(p.clip.device), fit.clean_pred, fit.adv_pred, cfg.png) \
        if cfg.png and is_main() else []
    return make_record("uap_fit", clip=p.clip, started=started,
                       dataset=p.data, prompts=p.prompts,
                       metrics={**metrics, "fooling_history": fit.history}, timings=p.timings(fit.timings),
                       attack=attack,
                       uap={"path": str(cfg.uap), "sha256": uap.manifest["sha256"], "shape": uap.manifest["shape"],
                            "linf": float(fit.delta.abs().max()), "l2": float(fit.delta.norm(p=2))},
                       checks=checks, checks_passed=all(c["passed"] for c in checks), pngs=pngs,
                       text_embeddings=p.text.to_record(), adapter=cfg.run.adapter, adapters=p.adapters,
                       config=flat(cfg))


@at_run_confidence  # every _ci at --confidence
def run_uap_eval(cfg: UAPEvalConfig, *, progress: bool = True) -> dict:
    """Fooling rate, accuracy with and without the UAP and attack success rate of ``cfg.uap`` on any model.

    The record also holds ``random_fooling_rate``: a random sign pattern of the same norm, the chance level.
    """
    started = time.perf_counter()
    uap = UAPFile.from_disk(cfg.uap)  # a bad file fails before any model loads
    p = _prepare(cfg, uap.resolution)
    overlap = _fit_overlap(uap.manifest, p.data)
    same_images = overlap > 0
    if same_images and not cfg.allow_fit_split:
        raise ClipguardError(f"--uap {str(cfg.uap)!r} was fitted on {overlap} of the {len(p.data)} images evaluated "
                             f"here ({p.data.spec} {p.data.split}): that is not a held-out fooling rate. Evaluate "
                             "on other images (e.g. --split test) or pass --allow-fit-split to measure it anyway (the "
                             "record says so)")
    inputs = _inputs(p, uap.resolution)
    size = tuple(inputs(p.data.images[:1]).shape[-2:])
    v = fit_to(uap.delta.to(p.clip.device), size, uap.norm, uap.eps)
    warnings, target = [], None
    if same_images:
        warnings.append("evaluated on the images the UAP was fitted on (--allow-fit-split): not a held-out rate")
    if uap.target_name is not None:
        if uap.target_name in p.prompts.classnames:
            target = p.prompts.classnames.index(uap.target_name)
        else:
            warnings.append(f"target class {uap.target_name!r} is not a class here: targeted success not measured")
    t0 = time.perf_counter()
    with progress_bar(len(p.data), f"uap eval {uap.norm.value} eps={uap.manifest['attack']['eps']['text']}",
                      enabled=progress, sharded=True) as advance:
        control = universal_attack(random_control(v, uap.norm, cfg.run.seed))
        clean, adv, rand = predict(p.classifier, p.data.images, inputs, None, universal_attack(v), control,
                                   batch_size=cfg.run.batch_size, advance=advance)
    wall = time.perf_counter() - t0
    clean, adv, rand = clean.cpu(), adv.cpu(), rand.cpu()
    metrics = uap_metrics(p.data.labels, clean, adv, target)
    put(metrics, "random_fooling_rate", count(rand != clean), len(clean))  # k / n of integers, counts beside
    src = uap.manifest.get("source", {})
    checks = [_norm_check(v, uap.norm, scaled_eps(uap.eps, uap.norm, tuple(uap.delta.shape[-2:]), size)),
              check("beats_random_control", metrics["random_fooling_rate"],
                    metrics["fooling_rate"] > metrics["random_fooling_rate"],
                    "fooling rate of a random sign pattern of the same norm (must be below the UAP's)")]
    info = {"path": str(cfg.uap), "sha256": uap.manifest["sha256"], "shape": uap.manifest["shape"],
            "applied_shape": list(v.shape), "resized": tuple(v.shape) != tuple(uap.delta.shape),
            "source": src, "fitted_on": uap.manifest.get("data"), "fitting": uap.manifest.get("fitting"),
            "evaluated_on_fit_images": same_images, "fit_images_overlap": {"k": overlap, "n": len(p.data)},
            "transfer": src.get("fingerprint") != p.clip.fingerprint or src.get("adapter") != cfg.run.adapter}
    pngs = _pictures(p, inputs, v, clean, adv, cfg.png) if cfg.png and is_main() else []
    return make_record("uap_evaluation", clip=p.clip, started=started,
                       dataset=p.data, prompts=p.prompts, metrics=metrics,
                       timings=p.timings({"wall_s": round(wall, 4), "images_per_s": round(len(p.data) / wall, 2)}),
                       attack=uap.manifest["attack"], uap=info, checks=checks,
                       checks_passed=all(c["passed"] for c in checks), warnings=warnings, pngs=pngs,
                       text_embeddings=p.text.to_record(), adapter=cfg.run.adapter, adapters=p.adapters,
                       config=flat(cfg))
