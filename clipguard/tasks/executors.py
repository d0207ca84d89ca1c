"""Who runs a suite's cells: ``local`` (this process), ``ray`` (one remote task per cell) or ``slurm`` (a submitit
job array per dependency wave). clipguard schedules nothing across machines itself: Ray or Slurm places the work.

Every executor is made with ``run``, the function a worker calls on one cell (``bench.run_cell``: handed in, so this
module never imports the suite runner that picks it), and is a context manager with ``run_wave(tasks, finished)``:
run these cells (none depends on another), call ``finished(row)`` as each ends. ``in_order`` executors get all
cells as one wave in file order; the others get dependency waves (``cells.dependency_waves``). A cell that fails on
a worker becomes a "failed" row with its error on one line and the file that holds its traceback (OUT/ray/<cell>.err,
or the task's log in OUT/slurm/).

Ray and submitit are optional extras (``pip install 'clipguard[ray]'``, ``'clipguard[slurm]'``), imported here only
when their executor starts.
"""

from __future__ import annotations

import importlib
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipguard.errors import ClipguardError
from clipguard.registry import Registry, unknown_choice
from clipguard.tasks.cells import CellTask, summary_row

Finished = Callable[[dict], None]
RunCell = Callable[[CellTask], dict]  # one cell on a worker -> its summary row (bench.run_cell; module-level: pickles)
EXECUTORS: Registry[Callable[..., object]] = Registry("--executor")
SUBMITIT_CLUSTERS = ("slurm", "local")


@dataclass
class RayOptions:
    address: str | None = None  # a running cluster: "auto", "HOST:6379" or "ray://HOST:10001"; None = start one here
    cpus_per_cell: float = 1  # CPU cores Ray reserves per cell; also the cell's torch threads (at least 1)
    gpus_per_cell: float | None = None  # GPUs per cell (0.5: two cells share one); None = 1 if the cluster has GPUs


@dataclass
class SlurmOptions:
    partition: str | None = None  # sbatch --partition; None = the cluster's default
    gpus_per_task: int = 1  # sbatch --gpus-per-task (0: CPU-only cells)
    cpus_per_task: int = 1  # sbatch --cpus-per-task; also the cell's torch threads
    time_min: int = 240  # wall-clock limit per cell, minutes; a timed-out cell is requeued (3 times at most)
    array_parallelism: int | None = None  # at most this many cells of a wave at once; None = as Slurm allows
    cluster: str = "slurm"  # submitit's backend: slurm (sbatch), or local (processes on this machine: try, test)


def _require(module: str, extra: str):
    """Import an optional extra, or the one-line error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ClipguardError(f"--executor {extra} needs {module}: pip install 'clipguard[{extra}]'") from None


def _one_line(exc: BaseException) -> str:
    """The error a worker raised, on one line: a ClipguardError's own message, else ``Type: first line``."""
    cause = getattr(exc, "cause", None) or exc  # Ray wraps the worker's exception and keeps it as .cause
    if isinstance(cause, ClipguardError):
        return str(cause)
    lines = str(cause).splitlines()
    if "Traceback (most recent call last):" in lines:  # submitit: the worker's traceback as text
        tb = lines[lines.index("Traceback (most recent call last):") + 1:]
        tb = tb[:next((i for i, line in enumerate(tb) if line.startswith("-----")), len(tb))]
        last = [line for line in tb if line.strip() and not line.startswith(" ")][-1]
        name, _, message = last.partition(": ")
        name = name.rsplit(".", 1)[-1]
        return message if name == "ClipguardError" else f"{name}: {message}"
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class Local:
    """This process, in file order: a cell's error propagates at once, as it always has."""

    in_order, threads = True, None

    def __init__(self, options=None, *, run: RunCell, **_):
        self.run = run

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run_wave(self, tasks: list[CellTask], finished: Finished) -> None:
        for task in tasks:
            finished(self.run(task))


class Ray:
    """One Ray task per cell with its CPU and GPU share, on ``address`` or on a cluster started here (shut down at
    the end). A Ray session this process already opened (``ray.init``) is used as it is."""

    in_order = False

    def __init__(self, options: RayOptions | None = None, *, run: RunCell, out_dir: Path, quiet: bool = False, **_):
        self.opts, self.run = options or RayOptions(), run
        self.errors = Path(out_dir) / "ray"  # the full error of a failed cell: OUT/ray/<cell>.err
        self.quiet = quiet
        self.threads = max(1, round(self.opts.cpus_per_cell))

    def __enter__(self):
        self.ray = ray = _require("ray", "ray")
        self.refs: dict = {}
        self.started = not ray.is_initialized()
        if self.started:
            init = {"address": self.opts.address, "log_to_driver": not self.quiet}
            if not self.opts.address:
                init["include_dashboard"] = False
            try:
                ray.init(**init)
            except ConnectionError as e:
                raise ClipguardError(f"--ray-address {self.opts.address}: {e}") from None
        gpus = self.opts.gpus_per_cell
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        self.remote = ray.remote(self.run).options(num_cpus=self.opts.cpus_per_cell, num_gpus=gpus)
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:  # interrupted: end the wave's tasks, so a rerun never races a cell still running
            for ref in self.refs:
                self.ray.cancel(ref, force=True)
        if self.started:
            self.ray.shutdown()
        return False

    def run_wave(self, tasks: list[CellTask], finished: Finished) -> None:
        self.refs = refs = {self.remote.remote(t): t for t in tasks}
        pending = list(refs)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    row = self.ray.get(ref)
                except Exception as e:  # the cell raised on its worker, or the worker died
                    log = self.errors / f"{refs[ref].id}.err"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    log.write_text(re.sub(r"\x1b\[[0-9;]*m", "", f"{e}\n"))  # Ray's message: the worker's traceback
                    row = summary_row(refs[ref], "failed", error=_one_line(e), log=str(log))
                finished(row)


class CellJob:
    """The function a Slurm array task runs: one cell. ``checkpoint`` makes a timed-out or preempted task requeue
    itself (submitit looks for the method), and the requeued cell resumes: from its record (skipped) or from its
    fine-tuning checkpoint."""

    def __init__(self, run: RunCell):
        self.run = run

    def __call__(self, task: CellTask) -> dict:
        return self.run(task)

    def checkpoint(self, task: CellTask):
        from submitit.helpers import DelayedSubmission  # the slurm extra: only a submitit worker calls this

        return DelayedSubmission(self, task)


class Slurm:
    """A submitit job array per dependency wave; this process submits, waits and submits the next wave (keep it
    alive: tmux, or an sbatch job of its own; interrupted, it cancels the wave's tasks). Each task's log and
    submitit's pickles go to OUT/slurm/ (<job id>_<task>_log.out / .err)."""

    in_order = False

    def __init__(self, options: SlurmOptions | None = None, *, run: RunCell, out_dir: Path, suite: str = "suite", **_):
        self.opts, self.run = options or SlurmOptions(), run
        self.folder = Path(out_dir) / "slurm"
        self.name = f"clipguard-{suite}"
        self.threads = max(1, self.opts.cpus_per_task)
        if self.opts.cluster not in SUBMITIT_CLUSTERS:
            raise unknown_choice("--submitit-cluster", self.opts.cluster, list(SUBMITIT_CLUSTERS))

    def __enter__(self):
        submitit = _require("submitit", "slurm")
        if self.opts.cluster == "slurm" and not shutil.which("sbatch"):
            raise ClipguardError("--executor slurm: no sbatch on this machine (run it on a Slurm login node; "
                                 "--submitit-cluster local runs the job array as local processes)")
        self.ex, self.jobs = submitit.AutoExecutor(folder=self.folder, cluster=self.opts.cluster), {}
        gpus = self.opts.gpus_per_task or None
        self.ex.update_parameters(name=self.name, timeout_min=self.opts.time_min, cpus_per_task=self.opts.cpus_per_task,
                                  slurm_partition=self.opts.partition, slurm_gpus_per_task=gpus,
                                  slurm_array_parallelism=self.opts.array_parallelism,
                                  local_gpus_per_node=gpus)
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:  # interrupted: end the wave's tasks, so a rerun never races a cell still running
            for job in self.jobs:
                job.cancel(check=False)
        return False

    def run_wave(self, tasks: list[CellTask], finished: Finished) -> None:
        self.jobs = jobs = dict(zip(self.ex.map_array(CellJob(self.run), tasks), tasks, strict=True))
        while jobs:
            for job in [j for j in jobs if j.done()]:
                task = jobs.pop(job)
                try:
                    row = job.result()
                except Exception as e:  # the cell raised, or Slurm ended the task (time, preemption, node)
                    row = summary_row(task, "failed", error=_one_line(e), log=str(job.paths.stderr))
                finished(row)
            if jobs:
                time.sleep(1.0 if self.opts.cluster == "local" else 10.0)  # Slurm: submitit also rate-limits sacct


EXECUTORS.register("local", Local)
EXECUTORS.register("ray", Ray)
EXECUTORS.register("slurm", Slurm)
