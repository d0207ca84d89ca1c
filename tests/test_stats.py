"""clipguard.records.stats (issue 24): exact McNemar, Holm, the paired difference and the average over datasets,
each checked against scipy's own computation, with a twin that feeds the check a wrong answer."""

import numpy as np
import pytest
from scipy.stats import binom, bootstrap

from clipguard.records.stats import bootstrap_average, discordant, from_counts, holm, mcnemar_p, paired_difference


def _exact_mcnemar(b, c):
    """statsmodels' ``mcnemar(table, exact=True)``: twice the binomial tail of the smaller discordant count at 1/2,
    capped at 1 (written with scipy.stats.binom, since statsmodels is not a dependency)."""
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * binom.cdf(min(b, c), n, 0.5))


@pytest.mark.parametrize("b, c", [(0, 0), (5, 0), (0, 12), (1, 1), (3, 9), (20, 50), (143, 120), (7, 7)])
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs(b, c):
    assert mcnemar_p(b, c) == pytest.approx(_exact_mcnemar(b, c), rel=1e-12, abs=1e-15)
    assert mcnemar_p(b, c) == mcnemar_p(c, b)  # two-sided: which model is first does not matter


def test_mcnemar_edge_cases():
    assert mcnemar_p(0, 0) == 1.0  # all agree
    assert mcnemar_p(0, 6) == pytest.approx(2 * 0.5 ** 6)  # one-sided discordance: 0.03125
    assert mcnemar_p(0, 5) == pytest.approx(0.0625)  # 5 flips one way are not enough at 0.05
    with pytest.raises(ValueError):
        mcnemar_p(-1, 3)


def test_twin_a_one_sided_p_value_would_not_match():
    one_sided = binom.cdf(3, 12, 0.5)
    assert mcnemar_p(3, 9) != pytest.approx(one_sided, rel=1e-6)


def test_discordant_counts_pairs_image_by_image():
    a = np.array([1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 1, 1, 1, 0], bool)
    assert discordant(a, b) == (1, 2)
    with pytest.raises(ValueError):
        discordant(a, b[:4])


def test_holm_on_a_worked_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def _holm_by_definition(p):
    """Holm as a sequence of tests: H_(i) is rejected at alpha iff p_(j) <= alpha / (m - j) for every j <= i; the
    adjusted p-value is the smallest alpha that rejects it."""
    m, order = len(p), np.argsort(p, kind="stable")
    adj = np.empty(m)
    for i, j in enumerate(order):
        adj[j] = min(1.0, max((m - k) * p[order[k]] for k in range(i + 1)))
    return adj


def test_holm_equals_its_definition_and_not_bonferroni():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.random(rng.integers(1, 9)) ** 3
        assert holm(p) == pytest.approx(_holm_by_definition(p))
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) != pytest.approx([min(1, 4 * x) for x in p])  # twin: Bonferroni is not Holm
    assert holm([]) == [] and holm([0.2]) == [0.2]
    with pytest.raises(ValueError):
        holm([0.1, 1.5])


def test_paired_difference_is_scipys_paired_bootstrap():
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.4, rng.random(300) < 0.5
    got = paired_difference(a, b, confidence=0.95, seed=0, n_resamples=2000)
    ref = bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis),
                    paired=True, vectorized=True, n_resamples=2000, method="BCa", rng=np.random.default_rng(0))
    assert got["difference"] == pytest.approx(b.mean() - a.mean())
    assert got["ci"] == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high])
    assert "BCa" in got["method"] and got["n_resamples"] == 2000 and got["seed"] == 0
    other = paired_difference(a, b, confidence=0.5, seed=0, n_resamples=2000)  # twin: another level shows
    assert other["ci"] != pytest.approx(got["ci"])


def test_paired_difference_without_variation_is_that_value():
    a = np.array([1, 0, 1, 0], bool)
    assert paired_difference(a, a)["ci"] == [0.0, 0.0] and paired_difference(a, a)["degenerate"]
    got = paired_difference(np.zeros(5, bool), np.ones(5, bool))
    assert got["difference"] == 1.0 and got["ci"] == [1.0, 1.0]


def test_bootstrap_average_resamples_within_each_dataset():
    rng = np.random.default_rng(2)
    sets = [rng.random(200) < 0.3, rng.random(400) < 0.8, rng.random(100) < 0.5]
    got = bootstrap_average(sets, seed=4, n_resamples=2000)

    def stat(x, y, z, axis=-1):
        return (x.mean(axis) + y.mean(axis) + z.mean(axis)) / 3

    ref = bootstrap(tuple(s.astype(float) for s in sets), stat, vectorized=True, n_resamples=2000, method="BCa",
                    rng=np.random.default_rng(4))
    assert got["average"] == pytest.approx(np.mean([s.mean() for s in sets]))
    assert got["ci"] == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high])
    lo, hi = got["ci"]
    assert lo < got["average"] < hi and got["datasets"] == 3
    # twin: pooling all images (the 400-image set would weigh 4x the 100-image one) is another interval
    pooled = bootstrap((np.concatenate(sets).astype(float),), np.mean, n_resamples=2000, method="BCa",
                       rng=np.random.default_rng(4))
    assert got["ci"] != pytest.approx([pooled.confidence_interval.low, pooled.confidence_interval.high])


def test_from_counts_keeps_the_accuracy():
    v = from_counts(3, 10)
    assert v.sum() == 3 and v.size == 10 and v.dtype == bool
    assert bootstrap_average([from_counts(10, 10)])["ci"] == [1.0, 1.0]
    with pytest.raises(ValueError):
        bootstrap_average([])


def test_large_sets_use_the_percentile_interval_in_batches():
    from clipguard.records.stats import BCA_MAX_IMAGES

    rng = np.random.default_rng(5)
    a, b = rng.random(BCA_MAX_IMAGES + 1) < 0.4, rng.random(BCA_MAX_IMAGES + 1) < 0.42
    got = paired_difference(a, b, n_resamples=500)
    ref = bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis),
                    paired=True, vectorized=True, n_resamples=500, method="percentile", rng=np.random.default_rng(0))
    assert "percentile" in got["method"]
    assert got["ci"] == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high])
    assert "BCa" in paired_difference(a[:100], b[:100], n_resamples=200)["method"]
