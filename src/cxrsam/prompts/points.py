"""Point prompts from lung components.

Points are float32 arrays (N, 2) of ``(x, y)`` = (column, row) in original-image pixels, with
integer pixel positions (SAM adds half a pixel itself). Labels are 1 (lung) or 0 (not lung).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrsam.prompts.modes import NegativeKind, PointStrategy

STRATEGIES = tuple(s.value for s in PointStrategy if s != PointStrategy.PROBABILITY)
"""Strategies that place a number of points inside each lung (:func:`positive_points`)."""
NEGATIVE_KINDS = tuple(k.value for k in NegativeKind)
CORE_FRACTION = 0.5
"""``distance`` strategy: candidates lie at least this fraction of the deepest point's depth inside."""


def distance_transform(mask: np.ndarray, **options: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Euclidean distance of each pixel of ``mask`` (H, W) to the nearest zero pixel (``scipy.ndimage``'s
    ``distance_transform_edt``, with its ``options``; SciPy is imported on first use: box prompts never need it)."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(mask, **options)


def _pixels_xy(component: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(component)
    return np.stack([cols, rows], axis=1).astype(np.float64)


def _farthest_points(candidates: np.ndarray, first: int, n: int) -> list[int]:
    """Greedy farthest-point sampling over ``candidates`` (M, 2), starting at index ``first``."""
    chosen = [first]
    nearest = np.linalg.norm(candidates - candidates[first], axis=1)
    while len(chosen) < n:
        nxt = int(np.argmax(nearest))
        if nearest[nxt] == 0:
            break
        chosen.append(nxt)
        nearest = np.minimum(nearest, np.linalg.norm(candidates - candidates[nxt], axis=1))
    return chosen


def positive_points(component: np.ndarray, n: int, strategy: str = "distance",
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` points inside one lung component, as (n, 2) float32 xy.

    Strategies (exact rules):

    ``distance`` (default, deterministic)
        Depth of each lung pixel = Euclidean distance transform (distance to the nearest non-lung
        pixel). Candidates are pixels at least :data:`CORE_FRACTION` of the maximum depth inside.
        The first point is the deepest pixel (on ties, the deepest pixel nearest to the mean of all
        deepest pixels, then the first in row-major order); each next point
        is the candidate farthest from the points chosen so far (farthest-point sampling). The
        points are well inside the lung and spread along it.
    ``kmeans``
        k-means (k = n, k-means++ initialisation drawn from ``rng``) of the lung pixel
        coordinates; each centre is snapped to the nearest lung pixel.
    ``random``
        n distinct lung pixels drawn uniformly from ``rng``.

    A component with fewer than ``n`` pixels yields all of its pixels. Every point lies on a
    pixel of ``component``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown per-lung point strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise ValueError(f"points per lung must be >= 1, got {n}")
    xy = _pixels_xy(component)
    if len(xy) <= n:
        return xy.astype(np.float32)
    if strategy == "distance":
        depth = distance_transform(component)
        values = depth[xy[:, 1].astype(int), xy[:, 0].astype(int)]
        core = np.flatnonzero(values >= CORE_FRACTION * values.max())
        candidates = xy[core]
        deepest = np.flatnonzero(values[core] == values.max())
        centre = candidates[deepest].mean(axis=0)
        first = int(deepest[np.argmin(np.linalg.norm(candidates[deepest] - centre, axis=1))])
        return candidates[_farthest_points(candidates, first, n)].astype(np.float32)
    if rng is None:
        raise ValueError(f"point strategy {strategy!r} needs a random generator")
    if strategy == "random":
        return xy[np.sort(rng.choice(len(xy), size=n, replace=False))].astype(np.float32)
    from scipy.cluster.vq import kmeans2  # imported when used: 0.15 s of every start otherwise

    centres, _ = kmeans2(xy, n, minit="++", seed=rng)
    nearest = np.argmin(((xy[None, :, :] - centres[:, None, :]) ** 2).sum(-1), axis=1)
    return xy[nearest].astype(np.float32)


def negative_points(components: Sequence[np.ndarray], kinds: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Background points (label 0) of the requested kinds, and warnings for kinds that were skipped.

    Rules:

    ``mediastinum`` (needs two components)
        One point between the lungs: x halfway between the right edge of the image-left lung and
        the left edge of the image-right lung, y the mean of the two lungs' centroid rows.
    ``outside``
        Two points at the image's left and right borders (x = 2 % and 98 % of the width) at the
        mean centroid row of the lungs: outside the lungs, lateral to the chest.

    A point that falls on a lung pixel of the draft is dropped (and reported).

    Returns:
        (points (K, 2) float32 xy, warnings).
    """
    unknown = set(kinds) - set(NEGATIVE_KINDS)
    if unknown:
        raise ValueError(f"unknown negative kind(s) {sorted(unknown)}; choose from {', '.join(NEGATIVE_KINDS)}")
    if not components:
        return np.zeros((0, 2), np.float32), []
    h, w = components[0].shape
    union = np.logical_or.reduce(components)
    centroids = [_pixels_xy(c).mean(axis=0) for c in components]
    mid_row = float(np.mean([c[1] for c in centroids]))
    points: list[tuple[float, float]] = []
    warnings: list[str] = []
    if "mediastinum" in kinds:
        if len(components) < 2:
            warnings.append("mediastinum negative skipped: fewer than two lung components")
        else:
            right_edge_left_lung = np.flatnonzero(components[0].any(axis=0))[-1]
            left_edge_right_lung = np.flatnonzero(components[1].any(axis=0))[0]
            x = (right_edge_left_lung + left_edge_right_lung) / 2
            points.append((x, (centroids[0][1] + centroids[1][1]) / 2))
    if "outside" in kinds:
        points += [(0.02 * (w - 1), mid_row), (0.98 * (w - 1), mid_row)]
    kept = []
    for x, y in points:
        col, row = int(round(x)), int(round(y))
        if union[row, col]:
            warnings.append(f"negative point ({col}, {row}) lies on the draft lung mask; dropped")
        else:
            kept.append((float(col), float(row)))
    return np.array(kept, dtype=np.float32).reshape(-1, 2), warnings


NEGATIVE_BAND = 0.1
"""Random negatives lie within this fraction of the image's longer side from the draft's lungs."""


def _nearest_group(groups: Sequence[np.ndarray]) -> np.ndarray:
    """Index int (H, W) of the group (a bool mask (H, W)) nearest to each pixel (its own on group pixels)."""
    labels = np.zeros(groups[0].shape, np.int32)
    for i, group in enumerate(groups):
        labels[group & (labels == 0)] = i + 1
    if len(groups) == 1:
        return np.zeros(labels.shape, np.int64)
    _, (rows, cols) = distance_transform(labels == 0, return_indices=True)
    return labels[rows, cols].astype(np.int64) - 1


def weighted_pick(weight: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct pixels (k, 2) float32 xy drawn without replacement with probability proportional to
    ``weight`` (H, W) >= 0; all pixels of positive weight when there are at most ``n``."""
    flat = weight.ravel().astype(np.float64)
    candidates = np.flatnonzero(flat > 0)
    if len(candidates) > n:
        candidates = np.sort(rng.choice(candidates, size=n, replace=False, p=flat[candidates] / flat[candidates].sum()))
    rows, cols = np.unravel_index(candidates, weight.shape)
    return np.stack([cols, rows], axis=1).astype(np.float32)


def _split_count(n: int, masses: np.ndarray) -> list[int]:
    """``n`` split over groups in proportion to ``masses`` (largest remainder), each group at least one when
    ``n`` allows."""
    k = len(masses)
    floor = 1 if n >= k else 0
    share = (n - floor * k) * masses / masses.sum() if masses.sum() > 0 else np.full(k, (n - floor * k) / k)
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[:n - floor * k - counts.sum()]:
        counts[i] += 1
    return [int(c) + floor for c in counts]


def probability_points(weight: np.ndarray, groups: Sequence[np.ndarray], n: int,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` positive points per image drawn at random with the foreground probability as the weight, split
    over the prompt sets' lung groups (the paper's protocol; a plain mask draft is its own weight).

    Rules: every pixel belongs to the group (a bool mask (H, W): one lung, or all lungs for an enclosing set)
    nearest to it. ``n`` is split over the groups in proportion to their probability mass (the sum of
    ``weight`` over their pixels; largest remainder, at least one point each when ``n`` >= the number of groups);
    each group's points are distinct pixels drawn without replacement with probability proportional to
    ``weight``. Fewer pixels of positive weight than asked: all of them.

    Args:
        weight: foreground probability float (H, W) in [0, 1] (or a bool mask).
        groups: one bool mask (H, W) per prompt set, non-empty.
        n: total positive points of the image (>= 1).
        rng: random generator.

    Returns:
        per group, points (k, 2) float32 xy.
    """
    if n < 1:
        raise ValueError(f"points per image must be >= 1, got {n}")
    weight = np.clip(np.asarray(weight, dtype=np.float64), 0.0, 1.0)
    nearest = _nearest_group(groups)
    regions = [np.where(nearest == i, weight, 0.0) for i in range(len(groups))]
    counts = _split_count(n, np.array([r.sum() for r in regions]))
    return [weighted_pick(region, count, rng) if count else np.zeros((0, 2), np.float32)
            for region, count in zip(regions, counts)]


def low_probability_points(weight: np.ndarray, lungs: Sequence[np.ndarray], n: int,
                           rng: np.random.Generator) -> np.ndarray:
    """``n`` negative points (label 0) drawn at random from the low-probability region near the lungs.

    Candidates: pixels with ``weight`` < 0.5 within :data:`NEGATIVE_BAND` x the image's longer side of a lung
    of the draft; drawn without replacement with probability proportional to ``1 - weight``.

    Returns:
        points (k, 2) float32 xy, k = min(n, candidates).
    """
    weight = np.clip(np.asarray(weight, dtype=np.float64), 0.0, 1.0)
    if n < 1 or not lungs:
        return np.zeros((0, 2), np.float32)
    band = NEGATIVE_BAND * max(weight.shape)
    near = distance_transform(~np.logical_or.reduce(lungs)) <= band
    return weighted_pick(np.where(near & (weight < 0.5), 1.0 - weight, 0.0), n, rng)
