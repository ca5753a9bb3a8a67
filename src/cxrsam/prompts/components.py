"""Lung components of a draft mask: the connected regions prompts are built from."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return [], 0
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    min_area = int(np.ceil(min_area_frac * mask.size))
    big = [i for i in np.argsort(-areas, kind="stable") if areas[i] >= max(min_area, 1)]
    kept = [labels == (i + 1) for i in big[:max_lungs]]
    kept.sort(key=lambda comp: float(np.nonzero(comp)[1].mean()))
    return kept, len(big)
