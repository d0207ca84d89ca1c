"""Training throughput of ``clipguard finetune``, per method: images/s through the full training step.

One step = craft a fresh adversarial batch (``--attack-steps`` PGD iterations against the model being
trained) + one AdamW update, exactly the training loop (``finetune.loop.train``). For each method a one-step warm-up
comes first; then a run of ``--steps`` optimizer steps (no checkpoints inside) is timed by the loop itself
(images / loop wall time). Device and precision as in the CLI: cuda > mps > cpu, bf16 autocast on a
capable GPU, fp32 otherwise. The final evaluation is cut to a few images and is not part of the timing.

Each method carries a roofline line (benchmarks/roofline.py), FLOPs per training image counted on the method's
own model: ``--attack-steps`` x (forward + input gradient) for the adversary + one forward + backward to the
trainable parameters (+ the frozen reference forward for objectives that need one, e.g. FARE).

``--profile`` runs each method once more for 3 steps under ``torch.profiler`` (``tuning.profile_top``): its kernel
table is the training's (a whole run: the model load and the 4-image final check are in its wall time, so its
busy share is low by construction; the kernels' shares are what it is for).

    python benchmarks/perf_finetune.py --out benchmarks/results/perf_finetune-toy-cpu.json
    python benchmarks/perf_finetune.py --model ViT-B-32:none --batch-size 8 --steps 2 --out perf_ft-vitb32-cpu.json
"""

from __future__ import annotations

import argparse
import tempfile

import roofline as rf
import torch
import tuning


def _config(args, method: str, steps: int, out: str):
    from clipguard.finetune.config import finetune_config

    lr = {"lora": 1e-2, "vpt": 5e-2, "full": 1e-3}[method]  # toy-scale rates; throughput does not depend on them
    return finetune_config(model=args.model, dataset=args.dataset, split="train", limit=steps * args.batch_size,
                           method=method, objective=args.objective, eps=args.eps, steps=args.attack_steps, epochs=1,
                           batch_size=args.batch_size, lr=lr, device=args.device, run_dir=out, save_every=0,
                           eval_limit=4, eval_batch_size=4, eval_steps=1, compile=args.compile,
                           lora_targets=args.lora_targets.split(",") if args.lora_targets else None)


def _run(args, method: str, steps: int, out: str) -> dict:
    from clipguard.tasks.finetune import run_finetune

    return run_finetune(_config(args, method, steps, out), progress=False)


def _train_flops(args, method: str, n_classes: int) -> tuple[float, str]:
    """FLOPs one training image costs, counted on the method's model, and what they are made of."""
    import torch.nn.functional as F

    from clipguard.finetune.methods import METHODS
    from clipguard.finetune.objectives import OBJECTIVES
    from clipguard.models.classifier import ZeroShotClassifier
    from clipguard.models.loader import load_clip

    clip = load_clip(args.model, device=args.device)
    emb = F.normalize(torch.randn(n_classes, clip.model.visual.output_dim), dim=-1)  # only its shape counts
    trained = METHODS.get(method).build(clip.model.visual, _config(args, method, 1, "unused")).to(clip.device)
    model = ZeroShotClassifier.from_clip(clip, emb, visual=trained)
    shape = (3, *clip.input_size)
    bs = args.batch_size  # LoRA merges its weights once per forward: that share is per batch
    step, train = (rf.image_flops(model, shape, grad=g, batch_size=bs) for g in ("input", "params"))
    ref = rf.image_flops(ZeroShotClassifier.from_clip(clip, emb), shape) \
        if OBJECTIVES.get(args.objective).reference else 0
    what = (f"{args.attack_steps} x attack step {step / 1e9:.3f} + training step {train / 1e9:.3f}"
            + (f" + reference forward {ref / 1e9:.3f}" if ref else "") + " GFLOP")
    return args.attack_steps * step + train + ref, what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--dataset", default="toy")
    ap.add_argument("--methods", default="lora,vpt,full")
    ap.add_argument("--objective", default="tecoa")
    ap.add_argument("--eps", default="4/255")
    ap.add_argument("--attack-steps", type=int, default=2, help="training PGD iterations per batch")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps timed per method")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="finetune --compile (compile_s apart from the timing; "
                    "LoRA needs --lora-targets off the attention modules)")
    ap.add_argument("--lora-targets", default=None, help="LoRA targets, comma list (default: the attention modules)")
    ap.add_argument("--profile", action="store_true", help="profile a 3-step run of each method (kernels, copies)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from clipguard.records.schema import environment, write_record

    results, rec = [], None
    with tempfile.TemporaryDirectory(prefix="perf_finetune-") as tmp:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            _run(args, method, 1, f"{tmp}/{method}-warm")  # one-time costs: kernels, caches, text embeddings
            rec = _run(args, method, args.steps, f"{tmp}/{method}")
            t = rec["finetune"]["train"]
            flops, what = _train_flops(args, method, rec["prompts"]["n_classes"])
            dev = torch.device(rec["environment"]["device"])
            profile = tuning.profile_top(lambda m=method: _run(args, m, 3, f"{tmp}/{m}-profile"), dev) \
                if args.profile else None
            line = rf.roofline(f"{method}-{args.objective} ({args.attack_steps}-step PGD)", flops, t["images_per_s"],
                               precision=rf.matmul_precision(rec["environment"]["precision"], dev), device=dev,
                               flops_model=what)
            results.append({"method": method, "objective": args.objective, "steps": t["steps"], "images": t["images"],
                            "wall_s": t["wall_s"], "images_per_s": t["images_per_s"],
                            "trainable_params": t["trainable_params"], "loss_last": t["loss_last10"],
                            "compile_s": t.get("compile_s"), "lora_targets": args.lora_targets,
                            "roofline": line, "profile": profile})
            print(f"{args.model} {method:5s} {t['images_per_s']:>9,.1f} img/s  ({t['images']} images, "
                  f"{t['wall_s']:.2f} s, {t['trainable_params']:,} trainable)")
            print(f"  {rf.describe(line)}")
            if profile:
                print(f"  {tuning.describe_profile(profile)}")
    env = rec["environment"] if rec else environment()
    out = {"schema": "clipguard.perf/1", "benchmark": "perf_finetune", "model_spec": args.model,
           "dataset": args.dataset, "batch_size": args.batch_size, "attack_steps": args.attack_steps,
           "eps": args.eps, "compile": args.compile, "device": env.get("device"), "precision": env.get("precision"),
           "results": results,
           "environment": {**env, "cpu_threads": torch.get_num_threads()}}
    write_record(args.out, out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
