"""Box prompts from lung components.

Boxes are ``(x0, y0, x1, y1)`` float arrays in original-image pixel coordinates: x is the
column, y the row, and ``x1``/``y1`` are the *inclusive* last column/row of the region (the
convention of segment_anything's ``batched_mask_to_box``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Extent of a non-empty bool mask (H, W) as ``(x0, y0, x1, y1)`` float32 (inclusive ends)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask_box of an empty mask")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def enclosing_box(boxes: Sequence[np.ndarray]) -> np.ndarray:
    """Smallest box containing all ``boxes`` (each (4,) xyxy)."""
    stack = np.stack(boxes)
    return np.array([stack[:, 0].min(), stack[:, 1].min(), stack[:, 2].max(), stack[:, 3].max()],
                    dtype=np.float32)


def clip_box(box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Clip a box to the image ``size=(H, W)``: x in [0, W-1], y in [0, H-1], and keep x0 <= x1, y0 <= y1."""
    h, w = size
    x0, y0, x1, y1 = box
    x0, x1 = np.clip(sorted((x0, x1)), 0, w - 1)
    y0, y1 = np.clip(sorted((y0, y1)), 0, h - 1)
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def adjust_box(box: np.ndarray, size: tuple[int, int], margin: float = 0.0, jitter: float = 0.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Grow a box by a margin and perturb it with random jitter, then clip to the image.

    Rules (in this order):

    * margin: every side moves outwards by ``margin`` pixels (negative shrinks);
    * jitter (training augmentation, as in the SAM paper): each coordinate gets Gaussian noise with
      standard deviation ``jitter`` times the box side along its axis (width for x, height for y),
      truncated to +-2 standard deviations;
    * the result is clipped to the image (:func:`clip_box`).

    Args:
        box: (4,) xyxy float.
        size: image (H, W).
        margin: pixels added on each side.
        jitter: noise std as a fraction of the box side; 0 disables it (then ``rng`` is unused).
        rng: random generator, required when ``jitter > 0``.
    """
    box = np.asarray(box, dtype=np.float64) + np.array([-margin, -margin, margin, margin])
    if jitter > 0:
        if rng is None:
            raise ValueError("box jitter needs a random generator")
        sides = np.array([box[2] - box[0], box[3] - box[1]] * 2) + 1
        noise = np.clip(rng.standard_normal(4), -2, 2) * jitter * sides
        box = box + noise
    return clip_box(box, size)
