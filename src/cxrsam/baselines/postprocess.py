"""Mask clean-up after thresholding: connected components and hole filling (the component rules of
:mod:`cxrsam.prompts.components`).

:func:`clean_mask` is what ``predict-cnn`` applies by default: keep the two largest 8-connected
components (the two lungs; specks elsewhere are dropped) and fill holes enclosed by lung.
"""

from __future__ import annotations

import numpy as np

from cxrsam.prompts.components import fill_holes, label_components


def keep_largest_components(mask: np.ndarray, k: int = 2, connectivity: int = 8) -> np.ndarray:
    """The ``k`` largest connected components of a bool mask (H, W) (ties: lower label first)."""
    labels, areas = label_components(mask, connectivity)
    if areas.size <= k:
        return np.asarray(mask, dtype=bool).copy()
    keep = np.argsort(-areas, kind="stable")[:k] + 1
    return np.isin(labels, keep)


def clean_mask(mask: np.ndarray, k: int = 2) -> np.ndarray:
    """Default post-processing: keep the ``k`` largest components, then fill holes. Bool (H, W)."""
    return fill_holes(keep_largest_components(mask, k))
