"""What the GPU benchmarks share beyond the roofline: the batch size searched upward, and a profile that says where
the time of a run went.

``search_batch_size`` doubles the batch from ``start`` while throughput still improves by at least ``min_gain``
(5 %), and stops at the first out-of-memory error or at ``limit``. clipguard's own walker only ever halves a batch
on out-of-memory (``clipguard.models.inference.run_batches``): a batch that fits can still be far below the one
that fills the device, and a benchmark that reports a goal as missed must first have tried the larger batches.

``profile_top`` runs a function under ``torch.profiler`` and sums its kernels' own device time (CPU ops on a CPU)
by name and by kind: matrix products, attention, copies between host and device, elementwise and the rest, and
what share of the wall time the device was busy at all (a device idle between kernels is bound by the host: launch
overhead, Python, the data). This is the "which kernel or copy dominates" that a missed goal has to name.

    import tuning  # from a script in benchmarks/
    found = tuning.search_batch_size(lambda bs: images_per_s(bs), 256, limit=8192)
    prof = tuning.profile_top(lambda: run_once(), torch.device("cuda"))
"""

from __future__ import annotations

import re
import time

import torch

from clipguard.models.inference import is_oom

# Kinds of kernels, first match wins (kernel names from cuBLAS/CUTLASS, flash/efficient attention, inductor's
# generated Triton kernels, and the profiler's own names for copies; on a CPU the aten op names).
KINDS = (
    ("copy host<->device", re.compile(r"memcpy (htod|dtoh)|memcpy host|cudamemcpy|pinned", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|_efficient_attention|sdpa|softmax", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|cublas|nvjet|matmul|addmm|::mm\b|::bmm\b|linear|convolution|conv2d",
                          re.I)),
    ("copy on device", re.compile(r"memcpy dtod|memset|copy_|to_copy|contiguous|cat", re.I)),
    ("elementwise / norm", re.compile(r"elementwise|vectorized|layer_norm|layernorm|triton_|reduce|gelu|add|mul|"
                                      r"div|clamp|sign|norm", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def search_batch_size(measure, start: int, *, limit: int, min_gain: float = 0.05) -> dict:
    """Double the batch from ``start`` while ``measure(batch_size)`` (images/s) improves by at least
    ``min_gain``; stop at the first out-of-memory error or past ``limit``.

    Returns {"batch_size": the fastest tried, "images_per_s": its rate, "stopped": "throughput" | "memory" |
    "limit", "trials": [{"batch_size", "images_per_s"} or {"batch_size", "oom": True}, ...]}. An error that is not
    out-of-memory is raised; out-of-memory at ``start`` itself is raised too (nothing fits: pick a smaller start).
    """
    if start < 1 or limit < start:
        raise ValueError(f"start={start}, limit={limit}: need 1 <= start <= limit")
    trials, best, bs, stopped = [], None, start, "limit"
    while bs <= limit:
        try:
            rate = float(measure(bs))
        except RuntimeError as e:
            if not is_oom(e) or best is None:
                raise
            trials.append({"batch_size": bs, "oom": True})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            stopped = "memory"
            break
        trials.append({"batch_size": bs, "images_per_s": round(rate, 2)})
        if best is not None and rate < best["images_per_s"] * (1 + min_gain):
            if rate > best["images_per_s"]:
                best = trials[-1]
            stopped = "throughput"
            break
        if best is None or rate > best["images_per_s"]:
            best = trials[-1]
        bs *= 2
    return {"batch_size": best["batch_size"], "images_per_s": best["images_per_s"], "stopped": stopped,
            "min_gain": min_gain, "trials": trials}


def _self_device_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def own_time_rows(events, cuda: bool) -> list[dict]:
    """One row per profiled name with its own time in ms. On CUDA only the device's own events count (kernels,
    copies, memsets): kineto also credits each kernel's time to the CPU op that launched it (``aten::mm`` carries
    its GEMM's self device time), so summing every event would count each kernel twice; user annotations
    (``record_function`` ranges) are spans, not work. On a CPU: every op's own CPU time."""
    rows = []
    for e in events:
        if cuda:
            if str(getattr(e, "device_type", "")).endswith("CPU") or getattr(e, "is_user_annotation", False):
                continue
            us = _self_device_us(e)
        else:
            us = float(e.self_cpu_time_total)
        if us > 0:
            rows.append({"name": e.key[:160], "kind": kind_of(e.key), "calls": int(e.count), "ms": us / 1e3})
    return rows


def profile_top(fn, device: torch.device, *, top: int = 12) -> dict:
    """Run ``fn()`` once under ``torch.profiler`` and say where the time went.

    On CUDA the rows are kernels (and copies) by their own device time (:func:`own_time_rows`); elsewhere aten ops
    by their own CPU time. Returns {"wall_ms", "measured": "device" | "cpu", "busy_ms" (the summed own times),
    "busy_share" (busy / wall: well under 1 on a GPU means it waited on the host; copies on a side stream overlap
    kernels, so it can pass 1), "by_kind": {kind: {"ms", "share"}}, "top": [{"name", "kind", "calls", "ms",
    "share"}, ...]}; shares are of busy_ms. The profiler's own overhead is in wall_ms."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    rows = own_time_rows(prof.key_averages(), cuda)
    busy = sum(r["ms"] for r in rows)
    by_kind: dict[str, dict] = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"ms": 0.0})
        k["ms"] += r["ms"]
    for k in by_kind.values():
        k["share"] = round(k["ms"] / busy, 4) if busy else None
        k["ms"] = round(k["ms"], 3)
    rows.sort(key=lambda r: r["ms"], reverse=True)
    for r in rows:
        r["share"] = round(r["ms"] / busy, 4) if busy else None
        r["ms"] = round(r["ms"], 3)
    return {"wall_ms": round(wall_ms, 3), "measured": "device" if cuda else "cpu", "busy_ms": round(busy, 3),
            "busy_share": round(busy / wall_ms, 4) if wall_ms else None,
            "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["ms"])), "top": rows[:top]}


def describe_profile(p: dict) -> str:
    """A profile in two lines, for a script's output."""
    kinds = ", ".join(f"{k} {v['share']:.0%}" for k, v in p["by_kind"].items() if v["share"])
    head = p["top"][0]["name"][:70] if p["top"] else "-"
    return (f"profile: {p['measured']} busy {p['busy_ms']:.1f} of {p['wall_ms']:.1f} ms wall "
            f"({p['busy_share']:.0%}); {kinds}\n  top: {head}")
