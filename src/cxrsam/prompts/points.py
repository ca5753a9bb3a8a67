"""Point prompts from lung components.

Points are float32 arrays (N, 2) of ``(x, y)`` = (column, row) in original-image pixels, with
integer pixel positions (SAM adds half a pixel itself). Labels are 1 (lung) or 0 (not lung).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.cluster.vq import kmeans2

from cxrsam.prompts.modes import NegativeKind, PointStrategy

STRATEGIES = tuple(s.value for s in PointStrategy)
NEGATIVE_KINDS = tuple(k.value for k in NegativeKind)
CORE_FRACTION = 0.5
"""``distance`` strategy: candidates lie at least this fraction of the deepest point's depth inside."""


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
        raise ValueError(f"unknown point strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise ValueError(f"points per lung must be >= 1, got {n}")
    xy = _pixels_xy(component)
    if len(xy) <= n:
        return xy.astype(np.float32)
    if strategy == "distance":
        depth = ndimage.distance_transform_edt(component)
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
