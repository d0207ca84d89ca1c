"""PGD-10 throughput (images/s) of clipguard's attack path for the toy CLIP and a random-init ViT-B-32.

The attack runs through ZeroShotClassifier exactly as ``clipguard eval --attack pgd`` does (fp32, inputs
at the model's resolution). One warm-up batch precedes each timed run.

    python benchmarks/perf_attack.py --out benchmarks/results/perf_attack-cpu.json
"""

from __future__ import annotations

import argparse

import torch

CASES = {  # name -> (model spec, images, batch size) per device type
    "toy": ("toy", {"cpu": 500, "cuda": 1000}, {"cpu": 250, "cuda": 1000}),
    "vit-b-32-random": ("ViT-B-32:none", {"cpu": 16, "cuda": 512}, {"cpu": 8, "cuda": 256}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from clipguard.attacks.registry import AttackConfig
    from clipguard.attacks.runner import run_attack
    from clipguard.data.prompts import load_prompts
    from clipguard.data.registry import load_dataset
    from clipguard.models.classifier import ZeroShotClassifier
    from clipguard.models.loader import load_clip, resolve_device
    from clipguard.models.text_embeddings import get_text_embeddings
    from clipguard.records.schema import environment, write_record
    from clipguard.specs import parse_eps

    dev = resolve_device(args.device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # DESIGN: attacks default to fp32/TF32
        torch.backends.cudnn.allow_tf32 = True
    cfg = AttackConfig("pgd", parse_eps("8/255"), parse_eps("2/255"), args.steps)
    results = {}
    for name in args.cases.split(","):
        spec, n, bs = CASES[name]
        clip = load_clip(spec, device=str(dev), precision="fp32")
        data = load_dataset("toy", split="test", limit=n[kind])
        prompts = load_prompts("toy")
        clf = ZeroShotClassifier.from_clip(clip, get_text_embeddings(clip, prompts.classnames,
                                                                     prompts.templates).embeddings).eval()
        run_attack(clf, data.images[: bs[kind]], data.labels[: bs[kind]], cfg, batch_size=bs[kind], progress=False)
        run = run_attack(clf, data.images, data.labels, cfg, batch_size=bs[kind], progress=False)
        results[name] = {"model_spec": spec, "n": len(data), "batch_size": bs[kind],
                         "input_size": list(clip.input_size),
                         "images_per_s": run.timings["images_per_s"], "wall_s": run.timings["wall_s"],
                         "robust_acc": (run.adv_pred == data.labels).float().mean().item()}
        print(f"{name}: PGD-{args.steps} {run.timings['images_per_s']:,.1f} img/s ({len(data)} images, {dev})")
    rec = {"schema": "clipguard.perf/1", "benchmark": "perf_attack", "attack": cfg.to_record(),
           "precision": "fp32" + ("+tf32" if dev.type == "cuda" else ""), "results": results,
           "environment": environment(dev, "fp32")}
    write_record(args.out, rec)


if __name__ == "__main__":
    main()
