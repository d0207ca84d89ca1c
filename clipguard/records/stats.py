"""Statistics over paired and per-dataset correctness: the exact McNemar test, Holm's step-down adjustment, the
paired difference of two accuracies with its interval, and a bootstrap interval of an average over datasets.

Pure functions over numbers and boolean arrays (numpy, scipy). scipy does the statistics: the McNemar p-value is
scipy's exact binomial test on the discordant pairs, the intervals are ``scipy.stats.bootstrap``. Holm's adjustment
is not in scipy, so it is written here (Holm 1979, "A simple sequentially rejective multiple test procedure").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, bootstrap

N_RESAMPLES = 9999  # scipy.stats.bootstrap's default
BOOTSTRAP_METHOD = "BCa"  # scipy's default: bias-corrected and accelerated percentile interval
BCA_MAX_IMAGES = 5000  # BCa's jackknife costs images² operations: above this many images, the percentile interval
BATCH_ELEMENTS = 5_000_000  # resampled values held at once (scipy's `batch`): memory stays ~40 MB at any size
DIFFERENCE_METHOD = "paired bootstrap (scipy.stats.bootstrap, BCa) over images"
AVERAGE_METHOD = "bootstrap (scipy.stats.bootstrap, BCa) over images, resampled within each dataset"


def bootstrap_method(images: int) -> str:
    """scipy's BCa up to BCA_MAX_IMAGES images in all, the percentile interval above (where it and BCa agree to
    well under the interval's width, and BCa's jackknife would cost images² operations)."""
    return BOOTSTRAP_METHOD if images <= BCA_MAX_IMAGES else "percentile"


def _batch(images: int) -> int:
    return max(1, BATCH_ELEMENTS // max(images, 1))


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of ``b`` pairs where only the first is right and ``c`` where only the
    second is: scipy's two-sided binomial test of b successes in b + c trials at p = 1/2. No discordant pair
    (b + c = 0) gives 1.0: the two agree on every image, nothing speaks for a difference."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: sorted ascending, the i-th smallest (0-based) is
    multiplied by (m - i), capped at 1, and made non-decreasing along the sorted order. Rejecting where the
    adjusted p < alpha controls the family-wise error rate at alpha."""
    p = [float(x) for x in pvalues]
    for x in p:
        if not 0.0 <= x <= 1.0 or x != x:
            raise ValueError(f"p-values must lie in [0, 1], got {x}")
    m, out, running = len(p), [0.0] * len(p), 0.0
    for i, j in enumerate(sorted(range(m), key=lambda k: p[k])):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def discordant(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(images only ``a`` gets right, images only ``b`` gets right) of two paired boolean correctness vectors."""
    a, b = _paired(a, b)
    return int((a & ~b).sum()), int((~a & b).sum())


def paired_difference(a: np.ndarray, b: np.ndarray, *, confidence: float = 0.95, seed: int = 0,
                      n_resamples: int = N_RESAMPLES) -> dict:
    """Accuracy of ``b`` minus accuracy of ``a`` on the same images (paired correctness vectors), with its
    interval: scipy's bootstrap (BCa, seeded) of the mean per-image difference, images resampled as pairs.

    When every image has the same difference (no discordant pair, or all discordant one way) the resampled
    differences do not vary and the interval is that one value (``degenerate`` true)."""
    a, b = _paired(a, b)
    d = b.astype(np.int8) - a.astype(np.int8)
    diff = float(d.mean()) if d.size else 0.0
    out = {"difference": diff, "method": DIFFERENCE_METHOD, "confidence": confidence, "n_resamples": n_resamples,
           "seed": seed, "degenerate": False}
    if d.size == 0 or np.all(d == d[0]):
        return {**out, "ci": [diff, diff], "degenerate": True}
    method = bootstrap_method(d.size)
    res = bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method=method,
                    batch=_batch(d.size), rng=np.random.default_rng(seed))
    return {**out, "method": DIFFERENCE_METHOD.replace(BOOTSTRAP_METHOD, method),
            "ci": [float(res.confidence_interval.low), float(res.confidence_interval.high)]}


def bootstrap_average(per_dataset: Sequence[np.ndarray], *, confidence: float = 0.95, seed: int = 0,
                      n_resamples: int = N_RESAMPLES) -> dict:
    """The average over datasets of each dataset's accuracy (``per_dataset``: one boolean correctness vector per
    dataset), with scipy's bootstrap interval (BCa, seeded): each resample draws every dataset's images with
    replacement from that dataset alone, so each dataset keeps its size and its weight of 1 / len(per_dataset)."""
    samples = [np.asarray(s, dtype=float) for s in per_dataset]
    if not samples or any(s.size == 0 for s in samples):
        raise ValueError("bootstrap_average needs at least one dataset, each with at least one image")
    average = float(np.mean([s.mean() for s in samples]))
    out = {"average": average, "method": AVERAGE_METHOD, "confidence": confidence, "n_resamples": n_resamples,
           "seed": seed, "datasets": len(samples), "degenerate": False}
    if all(np.all(s == s[0]) for s in samples):  # nothing varies under resampling
        return {**out, "ci": [average, average], "degenerate": True}

    def mean_of_means(*xs, axis=-1):
        return np.mean([x.mean(axis=axis) for x in xs], axis=0)

    images = sum(s.size for s in samples)
    method = bootstrap_method(images)
    res = bootstrap(tuple(samples), mean_of_means, vectorized=True, confidence_level=confidence,
                    n_resamples=n_resamples, method=method, batch=_batch(images), rng=np.random.default_rng(seed))
    return {**out, "method": AVERAGE_METHOD.replace(BOOTSTRAP_METHOD, method),
            "ci": [float(res.confidence_interval.low), float(res.confidence_interval.high)]}


def from_counts(k: int, n: int) -> np.ndarray:
    """A correctness vector with ``k`` of ``n`` right: what a resampling of images needs to know of a dataset
    whose per-image results were not kept (the mean of a resample does not depend on the images' order)."""
    k, n = int(k), int(n)
    return np.r_[np.ones(k, dtype=bool), np.zeros(n - k, dtype=bool)]


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool).ravel(), np.asarray(b, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired vectors must have the same length, got {a.size} and {b.size}")
    return a, b
