"""Mask clean-up after thresholding: connected components and hole filling (numpy/scipy only).

:func:`clean_mask` is what ``predict-cnn`` applies by default: keep the two largest 8-connected
components (the two lungs; specks elsewhere are dropped) and fill holes enclosed by lung.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a bool mask (H, W).

    Returns ``(labels int32 (H, W), areas (n,))``: label 0 is background, component ``i`` (1-based)
    has ``areas[i - 1]`` pixels. ``connectivity`` is 4 or 8.
    """
    structure = EIGHT_CONNECTED if connectivity == 8 else None
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=structure)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return labels.astype(np.int32), areas


def keep_largest_components(mask: np.ndarray, k: int = 2, connectivity: int = 8) -> np.ndarray:
    """The ``k`` largest connected components of a bool mask (H, W) (ties: lower label first)."""
    labels, areas = label_components(mask, connectivity)
    if areas.size <= k:
        return np.asarray(mask, dtype=bool).copy()
    keep = np.argsort(-areas, kind="stable")[:k] + 1
    return np.isin(labels, keep)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (H, W) not connected to the image border."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def clean_mask(mask: np.ndarray, k: int = 2) -> np.ndarray:
    """Default post-processing: keep the ``k`` largest components, then fill holes. Bool (H, W)."""
    return fill_holes(keep_largest_components(mask, k))
