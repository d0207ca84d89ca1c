"""Throughput of ``clipguard certify`` (noise samples/s through CERTIFY) and the certified-accuracy curve it gives.

One warm-up certificate first (kernels, caches, text embeddings), then ``--limit`` images certified exactly as
``clipguard certify`` does, with Cohen et al.'s settings by default (n0 = 100, n = 100,000, alpha = 0.001), and the
integrity check. Device and precision as in the CLI: cuda > mps > cpu, bf16 on a capable GPU, fp32 otherwise.
The output is the command's own ``clipguard.result/1`` record plus a ``benchmark`` section, so ``clipguard report``
draws its curve.

    python benchmarks/perf_certify.py --threads 2 --out benchmarks/results/certify-toy-cpu.json
    python benchmarks/perf_certify.py --model ViT-B-32:none --limit 10 \\
        --out benchmarks/results/certify-vit-b-32-random-h100.json
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--dataset", default="toy")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--limit", type=int, default=20, help="images certified")
    ap.add_argument("--sigma", type=float, default=0.25, help="noise std, [0, 1] pixel units")
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=100_000, help="estimation samples per image (Cohen et al.: 100,000)")
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--noise-batch", type=int, default=1000, help="noisy samples per forward pass")
    ap.add_argument("--radii", default="0,0.25,0.5,0.75,1,1.25,1.5,1.75,2")
    ap.add_argument("--check-images", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from clipguard.records.schema import write_record
    from clipguard.tasks.certify import certify_config, run_certify

    opts = dict(model=args.model, dataset=args.dataset, adapter=args.adapter, sigma=args.sigma, n0=args.n0,
                alpha=args.alpha, noise_batch=args.noise_batch, radii=args.radii, device=args.device)
    run_certify(certify_config(**opts, limit=1, n=args.noise_batch, check_images=1, check_steps=1), progress=False)
    rec = run_certify(certify_config(**opts, limit=args.limit, n=args.n, check_images=args.check_images))
    t, m = rec["timings"], rec["metrics"]
    rec["benchmark"] = {"script": "benchmarks/perf_certify.py", "warm_up": "one image, n = noise batch, untimed",
                        "cpu_threads": torch.get_num_threads()}
    print(f"{args.model} on {rec['environment'].get('device_name')}: {t['samples_per_s']:,.0f} noise samples/s, "
          f"{t['images_per_s']:.4f} img/s ({args.limit} images x {args.n0 + args.n:,} samples, {t['wall_s']:.1f} s)")
    print("certified accuracy: " + ", ".join(f"r={e['radius']:g}: {e['certified_acc']:.3f}" for e in m["certified"])
          + f"; checks {'passed' if rec['checks_passed'] else 'FAILED'}")
    write_record(args.out, rec)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
