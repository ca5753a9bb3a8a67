"""Lung components of a draft mask: the connected regions prompts are built from, and the two component rules
every mask clean-up shares (:func:`label_components`, :func:`fill_holes`; OpenCV's connected components, numbered and
filled exactly as ``scipy.ndimage.label`` and ``binary_fill_holes`` do, without SciPy's 0.3 s import)."""

from __future__ import annotations

import cv2
import numpy as np


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a bool mask (H, W).

    Returns ``(labels int32 (H, W), areas (n,))``: label 0 is background, component ``i`` (1-based) has
    ``areas[i - 1]`` pixels; components are numbered in raster order of their first pixel (``scipy.ndimage.label``'s
    order, whatever order OpenCV's labelling found them in). ``connectivity`` is 4 or 8.
    """
    mask = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=connectivity, ltype=cv2.CV_32S)
    if count <= 1:
        return np.zeros(mask.shape, np.int32), np.zeros(0, np.int64)
    tops = stats[1:, cv2.CC_STAT_TOP]
    first = [int(top) * mask.shape[1] + int(np.argmax(labels[top] == label)) for label, top in enumerate(tops, 1)]
    order = np.argsort(first, kind="stable")
    renumber = np.zeros(count, np.int32)
    renumber[order + 1] = np.arange(1, count, dtype=np.int32)
    return renumber[labels], stats[1:, cv2.CC_STAT_AREA][order].astype(np.int64)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions of a bool mask (H, W) not 4-connected to the image border
    (``scipy.ndimage.binary_fill_holes``)."""
    mask = np.asarray(mask) > 0
    outside = np.pad(~mask, 1, constant_values=True).astype(np.uint8)  # the border joins every edge region
    _, labels = cv2.connectedComponents(outside, connectivity=4, ltype=cv2.CV_32S)
    return mask | (labels[1:-1, 1:-1] != labels[0, 0])


DEFAULT_MIN_AREA_FRAC = 0.005
"""Smallest component kept, as a fraction of the image area (0.5 %; a lung is ~8-20 %)."""


def lung_components(mask: np.ndarray, min_area_frac: float = DEFAULT_MIN_AREA_FRAC,
                    max_lungs: int = 2) -> tuple[list[np.ndarray], int]:
    """Split a draft lung mask into lung components.

    Rules: 8-connected components of ``mask``; those with fewer than
    ``ceil(min_area_frac * H * W)`` pixels are dropped; the ``max_lungs`` largest remaining ones
    are kept (ties broken by label order) and returned sorted by centroid column, image-left
    first (in a PA view the image-left lung is the patient's right lung).

    Args:
        mask: draft mask (H, W), bool or {0, 1}.
        min_area_frac: minimum component area as a fraction of H * W.
        max_lungs: how many components to keep at most.

    Returns:
        (components, found): bool masks (H, W), one per kept component, and the number of
        components above the minimum area (may exceed ``max_lungs``).
    """
    mask = np.asarray(mask) > 0
    labels, areas = label_components(mask)
    if areas.size == 0:
        return [], 0
    min_area = int(np.ceil(min_area_frac * mask.size))
    big = [i for i in np.argsort(-areas, kind="stable") if areas[i] >= max(min_area, 1)]
    kept = [labels == (i + 1) for i in big[:max_lungs]]
    kept.sort(key=lambda comp: float(np.nonzero(comp)[1].mean()))
    return kept, len(big)
