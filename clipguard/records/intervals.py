"""The interval every counted metric carries (``<metric>_ci``: exact Clopper-Pearson, as scipy computes it) and its
level: 0.95, or a run's ``--confidence`` for everything computed under :func:`at_confidence`. No torch here:
``report`` and ``gate`` read records through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from scipy.stats import binomtest

CONFIDENCE = 0.95  # the default level of every interval a record carries (Clopper-Pearson, exact)
INTERVAL_METHOD = "Clopper-Pearson exact (scipy.stats.binomtest(...).proportion_ci(method='exact'))"
_LEVEL: ContextVar[float] = ContextVar("clipguard_confidence", default=CONFIDENCE)


def confidence() -> float:
    """The level :func:`put` and :func:`interval` use now (``--confidence``; 0.95 outside :func:`at_confidence`)."""
    return _LEVEL.get()


@contextmanager
def at_confidence(level: float) -> Iterator[float]:
    """Every interval computed inside is at ``level`` (a run's ``--confidence``), so ``put`` needs no parameter."""
    token = _LEVEL.set(float(level))
    try:
        yield float(level)
    finally:
        _LEVEL.reset(token)


def at_run_confidence(task: Callable) -> Callable:
    """Decorates a task function ``(cfg, ...) -> record``: its intervals are at ``cfg.run.confidence`` (the run's
    ``--confidence``), however it is called (a command, a suite cell, a script)."""

    @functools.wraps(task)
    def run(cfg, *args, **kwargs):
        with at_confidence(getattr(cfg.run, "confidence", CONFIDENCE)):
            return task(cfg, *args, **kwargs)

    return run


def interval(k: int, n: int, confidence: float | None = None) -> list[float]:
    """The exact (Clopper-Pearson) interval of a proportion k of n, as scipy computes it, at ``confidence``
    (default: the current level, :func:`confidence`); [0, 1] when n is 0."""
    if not n:
        return [0.0, 1.0]
    level = _LEVEL.get() if confidence is None else confidence
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return [float(ci.low), float(ci.high)]
