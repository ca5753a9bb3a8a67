"""Summary statistics, bootstrap confidence intervals and paired tests over per-image metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (NaNs dropped); ``(nan, nan)`` for no data."""
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
    """Mean, std (ddof=1), median, 95 % bootstrap CI and count of the non-NaN values."""
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


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired per-image values (pairs with a NaN dropped).

    Returns 1.0 when all differences are zero and NaN with fewer than two pairs.
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    if d.size < 2:
        return math.nan
    if np.all(d == 0):
        return 1.0
    return float(wilcoxon(x[keep], y[keep]).pvalue)
