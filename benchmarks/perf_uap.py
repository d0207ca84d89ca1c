"""Throughput of fitting a universal adversarial perturbation (``clipguard uap fit``), per method.

For each method, fits one UAP for a fixed number of epochs (no early stop, so every run does the same
work) after a short warm-up fit, and reports images/s = images visited / fit wall time; then evaluates the
UAP on the held-out split (fooling rate, and that of a random sign pattern of the same norm). The
device is picked as in the CLI (cuda > mps > cpu); fp32 as attacks use.

    python benchmarks/perf_uap.py --out benchmarks/results/perf_uap-cpu.json
    python benchmarks/perf_uap.py --model ViT-B-32:none --n 1024 --methods sgd --out perf_uap-vitb32-gpu.json
"""

from __future__ import annotations

import argparse
import time

import torch


def _fit_one(p, method: str, args, n: int) -> dict:
    from clipguard.data.registry import load_dataset
    from clipguard.models.inference import attack_inputs
    from clipguard.specs import parse_eps
    from clipguard.uap.core import UAPConfig, predict, random_control, universal_attack
    from clipguard.uap.fit import check_uap_config, fit_uap

    cfg = UAPConfig(eps=parse_eps(args.eps), norm=args.norm, method=method, target_fooling=1.0,
                    epochs=args.epochs, batch_size=args.batch_size)
    check_uap_config(cfg)
    inputs = lambda b: attack_inputs(p.classifier, b, "model")  # noqa: E731
    images = p.data.images[:n]
    warm = UAPConfig(eps=cfg.eps, norm=cfg.norm, method=method, epochs=1, batch_size=args.batch_size)
    fit_uap(p.classifier, images[: min(n, 2 * args.batch_size if method == "sgd" else 16)], warm, inputs,
            progress=False)
    fit = fit_uap(p.classifier, images, cfg, inputs, progress=False)
    test = load_dataset(args.dataset, split="test", limit=args.n_test)
    v = fit.delta.to(p.clip.device)
    clean, adv, rand = predict(p.classifier, test.images, inputs, None, universal_attack(v),
                               universal_attack(random_control(v, cfg.norm)), batch_size=args.batch_size)
    return {"method": method, "n": n, "epochs": len(fit.history), "images_seen": fit.timings["images_seen"],
            "fit_s": fit.timings["fit_s"], "images_per_s": fit.timings["images_per_s"],
            "fitting_fooling_rate": (fit.adv_pred != fit.clean_pred).float().mean().item(),
            "held_out_fooling_rate": (adv != clean).float().mean().item(),
            "random_sign_fooling_rate": (rand != clean).float().mean().item(), "n_test": len(test)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--dataset", default="toy")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=2000, help="fitting images for sgd")
    ap.add_argument("--n-deepfool", type=int, default=300, help="fitting images for deepfool (one image at a time)")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--methods", default="sgd,deepfool")
    ap.add_argument("--eps", default="16/255")
    ap.add_argument("--norm", default="linf")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from clipguard.records.schema import environment, write_record
    from clipguard.run_options import RunOptions
    from clipguard.tasks.setup import prepare

    p = prepare(RunOptions(model=args.model, dataset=args.dataset, split=args.split,
                           limit=max(args.n, args.n_deepfool), device=args.device, precision="fp32"))
    t0 = time.perf_counter()
    runs = []
    for method in args.methods.split(","):
        runs.append(_fit_one(p, method, args, args.n if method == "sgd" else args.n_deepfool))
        r = runs[-1]
        print(f"{method:8s} {r['images_per_s']:>10,.1f} img/s  fit {r['fit_s']:.2f} s ({r['epochs']} epochs x "
              f"{r['n']})  fooling: fitting {r['fitting_fooling_rate']:.3f}  held-out "
              f"{r['held_out_fooling_rate']:.3f}  random {r['random_sign_fooling_rate']:.3f}")
    rec = {"schema": "clipguard.perf/1", "benchmark": "perf_uap", "model_spec": args.model, "dataset": args.dataset,
           "split": args.split, "eps": args.eps, "norm": args.norm, "batch_size": args.batch_size,
           "resolution": "model", "model_input": list(p.clip.input_size),
           "resolution_in": list(p.data.images.shape[-2:]), "precision": "fp32", "runs": runs,
           "wall_s": round(time.perf_counter() - t0, 3), "environment": environment(p.clip.device, "fp32")}
    write_record(args.out, rec)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
