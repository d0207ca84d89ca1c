"""PGD-10, APGD-100 and the reference AutoAttack on the toy TeCoA-LoRA adapter: robust accuracy and wall time.

    python benchmarks/perf_autoattack.py --out benchmarks/results/autoattack-toy-cpu.json [--n 300]
    python benchmarks/perf_autoattack.py --model ViT-B-32:none --n 1000 --batch-size 500 --out autoattack-gpu.json

Trains the README's LoRA-TeCoA toy adapter (4/255, 3 epochs) unless --adapter is given, then evaluates it at
L-inf 4/255 on --n held-out toy images with `clipguard eval --attack pgd` (10 steps), `apgd` (100 steps),
`autoattack` (standard: APGD-CE, APGD-T, FAB-T, Square) and `autoattack --aa-version custom --aa-attacks
apgd-ce,apgd-t` (FARE's protocol), all with RobustBench's accounting; and runs the reference package directly
(`pyautoattack.AutoAttack(...).run_standard_evaluation`, as FARE's CLIP_benchmark fork calls it) on the same
classifier and images. Uses only clipguard's public API (and its CLI to train the adapter).

With ``--model`` other than toy (e.g. a random-init ``ViT-B-32:none``, for wall time on a GPU) no adapter is trained:
the toy images are brought to the model's input size by the protocol, and both sides attack the same clean-correct
images (RobustBench's accounting; ``attacked`` in the record says how many).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--eps", default="4/255")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=300)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from pyautoattack import AutoAttack

    import clipguard
    from clipguard.cli.app import run
    from clipguard.records.schema import environment, write_record
    from clipguard.specs import parse_eps

    adapter = args.adapter
    if adapter is None and args.model == "toy":
        adapter = str(Path(tempfile.mkdtemp(prefix="clipguard-aa-")) / "lora-tecoa")
        assert run(["finetune", "--model", "toy", "--dataset", "toy", "--eps", "4/255", "--epochs", "3",
                    "--batch-size", "64", "--lr", "1e-2", "--eval-limit", "20", "--eval-steps", "1",
                    "--device", args.device, "--run-dir", adapter, "--json"]) == 0
    common = dict(model=args.model, dataset="toy", adapter=adapter, limit=args.n, eps=args.eps, device=args.device,
                  batch_size=args.batch_size)
    rows = []
    for name, opts in [("pgd-10", dict(attack="pgd", steps=10)), ("apgd-100", dict(attack="apgd")),
                       ("autoattack-standard", dict(attack="autoattack")),
                       ("autoattack-fare (apgd-ce, apgd-t)", dict(attack="autoattack", aa_version="custom",
                                                                   aa_attacks="apgd-ce,apgd-t"))]:
        t0 = time.perf_counter()
        rec = clipguard.evaluate(**common, **opts)
        rows.append({"attack": name, "clean_acc1": rec["metrics"]["acc1"], "robust_acc": rec["metrics"]["robust_acc"],
                     "wall_s": round(time.perf_counter() - t0, 2), "record_attack": rec["attack"],
                     "checks_passed": rec["checks_passed"]})
        print(f"{name:36s} clean {rows[-1]['clean_acc1']:.4f}  robust {rows[-1]['robust_acc']:.4f}  "
              f"{rows[-1]['wall_s']:8.1f} s", flush=True)

    # The reference package itself, on the same classifier and images.
    clf = clipguard.load_classifier(args.model, dataset="toy", adapter=adapter, device=args.device)
    data = clipguard.load_images("toy", split="test", limit=args.n, size=clf.input_size)
    x = torch.cat([clipguard.to_model_input(clf, data.images[i:i + args.batch_size])
                   for i in range(0, len(data), args.batch_size)])
    y = data.labels.to(x.device)
    with torch.no_grad():
        attacked = int(sum((clf(x[i:i + args.batch_size]).argmax(1) == y[i:i + args.batch_size]).sum()
                           for i in range(0, len(y), args.batch_size)))
    ref = AutoAttack(clf, norm="Linf", eps=parse_eps(args.eps).value, version="standard", seed=0,
                     device=x.device)
    ref.verbose = False
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    x_adv, _ = ref.run_standard_evaluation(x, y, batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        direct = (clf(x_adv).argmax(1) == y).float().mean().item()
    rows.append({"attack": "pyautoattack standard, called directly", "robust_acc": direct, "wall_s": round(wall, 2)})
    print(f"{'pyautoattack direct':36s} robust {direct:.4f}  {wall:8.1f} s")
    trained = "LoRA r=8 TeCoA 4/255, 3 epochs, batch 64, lr 1e-2 (README)"
    rec = {"schema": "clipguard.perf/1", "benchmark": "perf_autoattack", "model_spec": args.model,
           "adapter": trained if args.adapter is None and args.model == "toy" else adapter, "dataset": "toy",
           "split": "test", "n": args.n, "attacked": attacked, "batch_size": args.batch_size, "eps": args.eps,
           "norm": "linf", "accounting": "robustbench", "runs": rows,
           "aa_matches_reference": abs(rows[2]["robust_acc"] - direct) <= 0.005,
           "environment": environment(x.device, "fp32")}
    write_record(args.out, rec)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
