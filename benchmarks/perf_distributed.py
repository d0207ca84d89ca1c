"""One process against ``torchrun --nproc-per-node N``: wall time of ``clipguard eval --attack pgd`` as a user runs
it, and whether the two give the same per-image predictions.

Each run is the CLI in a subprocess (start-up, model load, clean pass, PGD, record), timed from launch to exit; the
record's own img/s (clean pass, PGD) is kept too. The single process gets every core as torch threads; each of the
N ranks gets cores / N threads (torchrun's OMP_NUM_THREADS is overridden so both use the whole machine). Runs
alternate (1, N, 1, N, ...) so drift of the machine hits both alike; the median of ``--repeats`` is reported.

    python benchmarks/perf_distributed.py --out benchmarks/results/perf_distributed-cpu.json
    python benchmarks/perf_distributed.py --model ViT-B-32:none --limit 256 --batch-size 64 --nproc 8 \\
        --out benchmarks/results/perf_distributed-vit-b-32-random-8gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cores() -> int:
    return len(os.sched_getaffinity(0))


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--dataset", default="toy")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=100, help="per process")
    ap.add_argument("--steps", type=int, default=10, help="PGD iterations")
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="clipguard-perf-dist-"))
    task = ["eval", "--model", args.model, "--dataset", args.dataset, "--limit", str(args.limit), "--batch-size",
            str(args.batch_size), "--attack", "pgd", "--eps", args.eps, "--steps", str(args.steps), "--device",
            args.device, "--json"]
    single = [sys.executable, "-m", "clipguard.cli.app"]
    multi = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
             "-m", "clipguard.cli.app"]
    # warm-up: the text embeddings are cached once; both kinds of run then find them
    run([*single, *task, "--out", str(work / "warm.json")], cores())
    walls: dict[str, list[float]] = {"1": [], str(args.nproc): []}
    for i in range(args.repeats):
        for name, launcher, threads in (("1", single, cores()), (str(args.nproc), multi,
                                                                 max(1, cores() // args.nproc))):
            out = ["--out", str(work / f"{name}-{i}.json"), "--predictions", str(work / f"{name}-{i}.csv")]
            walls[name].append(round(run([*launcher, *task, *out], threads), 3))
    recs = {n: json.loads((work / f"{n}-0.json").read_text()) for n in walls}
    same = all((work / f"{n}-{i}.csv").read_bytes() == (work / "1-0.csv").read_bytes()
               for n in walls for i in range(args.repeats))

    def summary(n: str) -> dict:
        r = recs[n]
        return {"processes": int(n), "threads_per_process": cores() if n == "1" else max(1, cores() // args.nproc),
                "wall_s": walls[n], "wall_s_median": statistics.median(walls[n]),
                "clean_img_s": r["timings"]["images_per_s"], "pgd_img_s": r["metrics"]["robust"][0]["images_per_s"],
                "robust_acc": r["metrics"]["robust_acc"], "distributed": r["environment"]["distributed"]}

    one, many = summary("1"), summary(str(args.nproc))
    env = recs["1"]["environment"]
    result = {"benchmark": "perf_distributed", "device": env.get("device"), "device_name": env.get("device_name"),
              "cores": cores(), "task": " ".join(task), "one_process": one, "torchrun": many,
              "speedup_wall": round(one["wall_s_median"] / many["wall_s_median"], 3),
              "speedup_pgd_img_s": round(many["pgd_img_s"] / one["pgd_img_s"], 3),
              "same_predictions": same, "environment": env,
              "measured": time.strftime("%Y-%m-%d", time.gmtime())}
    print(f"{args.model} on {env.get('device_name')} ({cores()} cores): 1 process {one['wall_s_median']:.1f} s "
          f"(PGD {one['pgd_img_s']:.0f} img/s), {args.nproc} processes {many['wall_s_median']:.1f} s "
          f"(PGD {many['pgd_img_s']:.0f} img/s); same predictions: {same}")
    from clipguard.fsutil import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
