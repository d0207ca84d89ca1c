"""Many processes under ``torchrun``: who am I, which images are mine, and the few collectives clipguard needs.

``torchrun --nproc-per-node N clipguard eval ...`` starts N copies of a command with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment. Every copy runs the same code; a loop over a dataset walks only its rank's
contiguous run of whole batches (:func:`batch_range`) and gathers the per-image results in dataset order
(:func:`gather_rows`), so the record is the one a single process would write. Training averages gradients with
:func:`all_reduce_sum_`. Only rank 0 prints and writes (:func:`is_main`).

The process group starts lazily, where the ranks' work starts to differ (:func:`start`, called before every loop over a
rank's own images): every check of the options runs before it, on every rank alike, so a bad option ends each rank
with the same one-line error, printed once by rank 0; an error after it is printed by the rank that met it.
Backend: nccl when the process drives a CUDA device, gloo on CPU. Without torchrun (``WORLD_SIZE`` unset or 1)
everything here is a no-op and no process group is made.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

# torch is imported inside the functions that use it: cli.app.run imports this module for every command, --help
# included, and --help must not load torch (tests/test_cli.py). Without torchrun none of those functions runs.

TIMEOUT = timedelta(minutes=30)  # a rank stuck this long in a collective ends the run (torch's default is 10)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes of this run on this machine (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def bind_device() -> None:
    """Under torchrun on a CUDA machine, make ``cuda`` mean this process's GPU (``LOCAL_RANK``)."""
    if not active():
        return
    import torch  # lazy: see the note at the top

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())


def start() -> None:
    """Make the process group now (called where the ranks' work starts to differ: a loop over a rank's own
    images), so an error one rank meets from here on is printed by that rank (see ``cli.app.run``)."""
    if active():
        _group()


def _group():
    """The default process group, made on first use (nccl with CUDA, gloo without)."""
    import torch  # lazy: see the note at the top
    import torch.distributed as dist

    if not dist.is_initialized():
        bind_device()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return dist


def _comm_device():
    import torch  # lazy: see the note at the top

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def batch_range(n: int, batch_size: int) -> tuple[int, int]:
    """This rank's positions [start, stop) of ``n`` images cut in batches of ``batch_size``: a contiguous run of
    whole batches, so every batch (and every per-batch random draw) is the one a single process would see; no
    image is repeated to even out the ranks (the last rank may get fewer or none)."""
    if not active():
        return 0, n
    batches, w, r = -(-n // batch_size), world_size(), rank()
    first, last = r * batches // w, (r + 1) * batches // w
    return min(first * batch_size, n), min(last * batch_size, n)


def gather_rows(t):
    """Concatenate every rank's tensor along dim 0, in rank order (so dataset order after :func:`batch_range`);
    every rank gets the whole. Rows may differ in number between ranks; other dims must match."""
    if not active():
        return t
    import torch  # lazy: see the note at the top

    dist, dev = _group(), _comm_device()
    counts = torch.zeros(world_size(), dtype=torch.long, device=dev)
    counts[rank()] = t.shape[0]
    dist.all_reduce(counts)
    most = int(counts.max())
    flat = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    code = flat.view(torch.uint8) if flat.dtype == torch.bool else flat  # gloo has no bool all_gather
    padded = torch.zeros((most, *code.shape[1:]), dtype=code.dtype, device=dev)
    padded[:t.shape[0]] = code.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    rows = torch.cat([p[:int(c)] for p, c in zip(parts, counts.tolist(), strict=True)])
    if t.dtype == torch.bool:
        rows = rows.view(torch.bool)
    return rows.reshape(-1, *t.shape[1:]).to(t.device)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    dist = _group()
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum_(tensors) -> None:
    """Sum each tensor over the ranks, in place (one flat buffer: one collective for all of them)."""
    if not active() or not tensors:
        return
    import torch  # lazy: see the note at the top

    dist, dev = _group(), _comm_device()
    buf = torch.cat([x.reshape(-1).to(dev, torch.float64 if x.dtype == torch.float64 else torch.float32)
                     for x in tensors])
    dist.all_reduce(buf)
    i = 0
    for x in tensors:
        x.copy_(buf[i:i + x.numel()].view_as(x))
        i += x.numel()


def started() -> bool:
    """Whether this run's ranks have begun talking (the process group exists)."""
    if not active():
        return False
    import torch.distributed as dist  # lazy: see the note at the top

    return dist.is_initialized()


ERROR_KEY = "clipguard/error"


def report_error(line: str) -> None:
    """Leave this rank's one-line error where the other ranks look when their next collective breaks."""
    try:
        import torch.distributed as dist  # lazy: see the note at the top

        dist.distributed_c10d._get_default_store().set(ERROR_KEY, line)
    except Exception:  # best effort: the line is printed by this rank anyway
        pass


def peer_error(wait_s: float = 5.0) -> str | None:
    """The one-line error another rank reported (after a collective of ours broke), or None."""
    try:
        import torch.distributed as dist  # lazy: see the note at the top

        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))
        return store.get(ERROR_KEY).decode()
    except Exception:  # no store, or nobody reported: the caller re-raises its own error
        return None


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if active():
        _group().barrier()


def shutdown() -> None:
    if active():
        import torch.distributed as dist  # lazy: see the note at the top

        if dist.is_initialized():
            dist.destroy_process_group()


def describe() -> dict:
    """Provenance for records: how many processes made the record."""
    return {"world_size": world_size(), "backend": ("nccl" if _cuda() else "gloo") if active() else None}


def _cuda() -> bool:
    import torch  # lazy: see the note at the top

    return torch.cuda.is_available()
