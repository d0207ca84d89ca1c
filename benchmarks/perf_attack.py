"""PGD-10 throughput (images/s) of clipguard's attack path for the toy CLIP and a random-init ViT-B-32.

The attack runs through ZeroShotClassifier exactly as ``clipguard eval --attack pgd`` does (fp32, inputs
at the model's resolution). One warm-up batch precedes each timed run. ``--compile`` compiles the classifier
first, warmed up forward and forward + backward (compile_s apart from the timed run).

Each case carries a roofline line (benchmarks/roofline.py). RobustBench's accounting attacks only the
clean-correct images, so the FLOPs of a run are counted from what it did: 2 forwards per image (clean and final
predictions) + (steps + 1) forward + input-gradient passes per ATTACKED image (the steps, and the runner's
zero-gradient check); FLOPs per image = that total / images. On random-init weights few images are clean-correct
(ViT-B-32 on the toy: about 1 in 5), so img/s there is not PGD-10 img/s (``attacked`` says how many were):
``--attack-all`` labels every image with the model's own clean prediction, so every image is attacked.

``--batch-size auto`` searches each case's batch upward from its default (``tuning.search_batch_size``: doubled
while img/s improves by 5 %, each trial a warm-up batch then two timed batches); ``--n`` sets the images per case;
``--profile`` runs one batch's attack once more under ``torch.profiler`` (``tuning.profile_top``).

    python benchmarks/perf_attack.py --out benchmarks/results/perf_attack-cpu.json
"""

from __future__ import annotations

import argparse

import roofline as rf
import torch
import tuning

CASES = {  # name -> (model spec, images, batch size) per device type
    "toy": ("toy", {"cpu": 500, "cuda": 1000}, {"cpu": 250, "cuda": 1000}),
    "vit-b-32-random": ("ViT-B-32:none", {"cpu": 16, "cuda": 512}, {"cpu": 8, "cuda": 256}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--compile", action="store_true", help="torch.compile the classifier first")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    ap.add_argument("--attack-all", action="store_true",
                    help="label images with the model's clean predictions: every image is attacked (throughput)")
    ap.add_argument("--n", type=int, default=None, help="images per case (default: the case's own)")
    ap.add_argument("--batch-size", default=None, help="images per batch, or auto (default: the case's own)")
    ap.add_argument("--profile", action="store_true", help="profile one batch's attack (kernels, copies)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from clipguard.attacks.registry import AttackConfig
    from clipguard.attacks.runner import run_attack
    from clipguard.data.prompts import load_prompts
    from clipguard.data.registry import load_dataset
    from clipguard.models.classifier import ZeroShotClassifier, compile_classifier
    from clipguard.models.inference import predict_logits
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
        n, bs = args.n or n[kind], bs[kind]
        clip = load_clip(spec, device=str(dev), precision="fp32")
        data = load_dataset("toy", split="test")
        if n > len(data):  # the toy test split tiled: throughput needs more images than it has
            reps = -(-n // len(data))
            data.images, data.labels = data.images.repeat(reps, 1, 1, 1), data.labels.repeat(reps)
        data.images, data.labels = data.images[:n], data.labels[:n]
        prompts = load_prompts("toy")
        clf = ZeroShotClassifier.from_clip(clip, get_text_embeddings(clip, prompts.classnames,
                                                                     prompts.templates).embeddings).eval()
        if args.attack_all:  # clean-correct by construction: RobustBench's accounting then attacks them all
            data.labels = predict_logits(clf, data.images, batch_size=bs, progress=False)[0].argmax(1)
        shape = (3, *clip.input_size)  # the attack perturbs (and the classifier sees) the model's input size
        compile_s = compile_classifier(clf, shape, precision="fp32", attack_precision="fp32",
                                       mode=args.compile_mode) if args.compile else None

        def attack(k, size, clf=clf, data=data):
            return run_attack(clf, data.images[:k], data.labels[:k], cfg, batch_size=size, progress=False)

        search = None
        if args.batch_size == "auto":
            def measure(size, n=n, attack=attack):
                attack(size, size)  # warm-up at this size
                return attack(min(2 * size, n), size).timings["images_per_s"]

            search = tuning.search_batch_size(measure, min(bs, n), limit=n)
            print(f"{name}: batch size searched: {search['trials']} -> {search['batch_size']} ({search['stopped']})")
        bs = search["batch_size"] if search else int(args.batch_size or bs)
        attack(bs, bs)
        run = attack(n, bs)
        profile = tuning.profile_top(lambda bs=bs, attack=attack: attack(bs, bs), dev) if args.profile else None
        n, attacked = len(data), int(run.attacked.sum())
        fwd, step = rf.image_flops(clf, shape), rf.image_flops(clf, shape, grad="input")
        flops = (n * 2 * fwd + attacked * (args.steps + 1) * step) / n
        what = (f"2 forwards per image + {args.steps + 1} forward+input-gradient passes per attacked image "
                f"({attacked}/{n} attacked); forward {fwd / 1e9:.3f} GFLOP, attack step {step / 1e9:.3f} GFLOP")
        line = rf.roofline(f"pgd-{args.steps} ({name})", flops, run.timings["images_per_s"],
                           precision=rf.matmul_precision("fp32", dev), device=dev, flops_model=what)
        results[name] = {"model_spec": spec, "n": n, "batch_size": bs, "batch_search": search, "profile": profile,
                         "input_size": list(clip.input_size), "attacked": attacked, "compile_s": compile_s,
                         "compile_mode": args.compile_mode if args.compile else None,
                         "images_per_s": run.timings["images_per_s"], "wall_s": run.timings["wall_s"],
                         "robust_acc": (run.adv_pred == data.labels).float().mean().item(), "roofline": line}
        print(f"{name}: PGD-{args.steps} {run.timings['images_per_s']:,.1f} img/s ({n} images, {dev})")
        print(f"  {rf.describe(line)}")
        if profile:
            print(f"  {tuning.describe_profile(profile)}")
    rec = {"schema": "clipguard.perf/1", "benchmark": "perf_attack", "attack": cfg.to_record(),
           "attack_all": args.attack_all,
           "precision": "fp32" + ("+tf32" if dev.type == "cuda" else ""), "results": results,
           "environment": environment(dev, "fp32")}
    write_record(args.out, rec)


if __name__ == "__main__":
    main()
