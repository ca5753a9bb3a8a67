"""Summary statistics, bootstrap confidence intervals and the paired comparison of per-image metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (N,) (NaNs dropped); ``(nan, nan)`` for no data."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarize(values: Sequence[float], seed: int = 0) -> dict[str, float]:
    """Mean, std (ddof=1), median, 95 % bootstrap CI and count of the non-NaN values of ``values`` (N,)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    lo, hi = bootstrap_ci(x, seed=seed)
    return {
        "mean": float(x.mean()) if x.size else math.nan,
        "std": float(x.std(ddof=1)) if x.size > 1 else math.nan,
        "median": float(np.median(x)) if x.size else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "n": int(x.size),
    }


@dataclass(frozen=True)
class PairedComparison:
    """Method A against method B on the same images; every difference is A - B, in the metric's units.

    Attributes:
        mean_diff: mean of the per-image differences.
        ci_low, ci_high: percentile-bootstrap CI of ``mean_diff`` (95 % unless asked otherwise).
        n_better, n_worse, n_tied: images where A - B is > 0, < 0, == 0.
        p: two-sided Wilcoxon signed-rank p-value (scipy's default: zero differences dropped); 1.0 when
            every difference is zero, NaN with fewer than two pairs.
        n: pairs compared (pairs with a NaN on either side are dropped).
    """

    mean_diff: float
    ci_low: float
    ci_high: float
    n_better: int
    n_worse: int
    n_tied: int
    p: float
    n: int


def paired_comparison(a: Sequence[float], b: Sequence[float], level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> PairedComparison:
    """Compare paired per-image values ``a`` (N,) and ``b`` (N,) (the same images in the same order).

    The one place that computes a difference, its bootstrap CI (:func:`bootstrap_ci` of the differences),
    better/worse counts and the Wilcoxon p-value; the report and the bench scripts call it.
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    d = x - y
    lo, hi = bootstrap_ci(d, level=level, n_boot=n_boot, seed=seed)
    if d.size < 2:
        p = math.nan
    elif np.all(d == 0):
        p = 1.0
    else:
        p = float(wilcoxon(x, y).pvalue)
    return PairedComparison(mean_diff=float(d.mean()) if d.size else math.nan, ci_low=lo, ci_high=hi,
                            n_better=int((d > 0).sum()), n_worse=int((d < 0).sum()), n_tied=int((d == 0).sum()),
                            p=p, n=int(d.size))
