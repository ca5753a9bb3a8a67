"""Summary statistics and the paired comparison against scipy and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cxrsam.evaluation.stats import PairedComparison, bootstrap_ci, paired_comparison, summarize


def test_summary_and_bootstrap():
    values = np.linspace(0.8, 1.0, 101)
    s = summarize(values)
    assert s["mean"] == pytest.approx(0.9) and s["median"] == pytest.approx(0.9) and s["n"] == 101
    assert s["std"] == pytest.approx(np.std(values, ddof=1))
    assert s["ci_low"] < 0.9 < s["ci_high"] and s["ci_high"] - s["ci_low"] < 0.03
    assert bootstrap_ci([np.nan, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_bootstrap_ci_is_the_percentile_bootstrap():
    x = np.array([0.2, 0.5, 0.9, 0.4, 0.7])
    # by hand: resample indices with the documented generator, take the means' 2.5 % and 97.5 % quantiles
    draws = np.random.default_rng(3).integers(0, 5, size=(400, 5))
    means = x[draws].mean(axis=1)
    expected = (np.quantile(means, 0.025), np.quantile(means, 0.975))
    assert bootstrap_ci(x, n_boot=400, seed=3) == pytest.approx(expected)
    # and it agrees with scipy's percentile bootstrap up to resampling noise
    y = np.random.default_rng(0).normal(0.01, 0.02, 60)
    theirs = scipy_stats.bootstrap((y,), np.mean, confidence_level=0.9, n_resamples=20000, method="percentile",
                                   rng=np.random.default_rng(1)).confidence_interval
    lo, hi = bootstrap_ci(y, level=0.9, n_boot=20000)
    width = theirs.high - theirs.low
    assert lo == pytest.approx(theirs.low, abs=0.03 * width) and hi == pytest.approx(theirs.high, abs=0.03 * width)


def test_paired_comparison_hand_computed():
    a = [0.90, 0.80, 0.70, 0.60, 0.95, np.nan]
    b = [0.85, 0.80, 0.75, 0.50, 0.90, 0.70]  # differences +0.05, 0, -0.05, +0.10, +0.05 (last pair dropped)
    c = paired_comparison(a, b)
    assert isinstance(c, PairedComparison)
    assert c.n == 5 and (c.n_better, c.n_worse, c.n_tied) == (3, 1, 1)
    assert c.mean_diff == pytest.approx(0.03)
    d = np.array([0.05, 0.0, -0.05, 0.10, 0.05])
    assert (c.ci_low, c.ci_high) == pytest.approx(bootstrap_ci(d))
    assert c.ci_low <= c.mean_diff <= c.ci_high
    assert c.p == pytest.approx(scipy_stats.wilcoxon(a[:5], b[:5]).pvalue)


def test_wilcoxon_exact_p_by_hand():
    # six positive differences of distinct sizes: W+ takes its largest value in 1 of 2**6 sign patterns,
    # so the exact two-sided p is 2 / 64
    b = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.4])
    a = b + np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert paired_comparison(a, b).p == pytest.approx(2 / 64)
    assert paired_comparison(b, a).p == pytest.approx(2 / 64)
    assert paired_comparison(b, a).mean_diff == pytest.approx(-0.035)


def test_paired_comparison_matches_scipy_on_random_data():
    rng = np.random.default_rng(1)
    a = rng.normal(0.9, 0.02, 80).round(3)  # rounding gives ties and zero differences
    b = (a + rng.normal(0.004, 0.01, 80)).round(3)
    c = paired_comparison(a, b, seed=5)
    assert c.p == pytest.approx(scipy_stats.wilcoxon(a, b).pvalue)
    assert c.mean_diff == pytest.approx(np.mean(a - b))
    assert (c.ci_low, c.ci_high) == pytest.approx(bootstrap_ci(a - b, seed=5))
    assert c.n_better + c.n_worse + c.n_tied == 80 and c.n_tied == int(np.sum(a == b))


def test_paired_comparison_edge_cases():
    same = paired_comparison([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    assert same.p == 1.0 and same.n_tied == 3 and (same.mean_diff, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    one = paired_comparison([0.5, np.nan], [0.4, 0.3])
    assert one.n == 1 and math.isnan(one.p) and one.mean_diff == pytest.approx(0.1)
    none = paired_comparison([], [])
    assert none.n == 0 and math.isnan(none.mean_diff) and math.isnan(none.ci_low) and math.isnan(none.p)
    with pytest.raises(ValueError, match="paired"):
        paired_comparison([0.1, 0.2], [0.1])
