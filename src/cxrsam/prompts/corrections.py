"""Simulated corrections for fine-tuning: a visibly wrong box and the clicks a user would add to fix it.

Interactive SAM training (SAM-Med2D, micro-sam) shows the model clicks placed on its errors. Boxes from good
drafts leave only thin rims to click on, so cxrsam simulates the errors that users do click on: a box that cuts
off part of a lung (a missed base or apex) or reaches past it, with positive clicks in the lung it cut off and
negative clicks in the non-lung it added. The target stays the whole lung, so the model learns that a click
outside the box asks for more lung and a negative click inside it for less.

:func:`error_click` is the click a user makes on a model's own result: fine-tuning's interactive share
(``PromptMixture.interactive``) adds it after a first pass, and ``bench/point_sweep.py`` probes with it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cxrsam.prompts.boxes import clip_box
from cxrsam.prompts.components import label_components
from cxrsam.prompts.points import distance_transform, weighted_pick
from cxrsam.prompts.prompts import PromptSet

CUT = (0.15, 0.4)
"""A cut side moves inwards by this fraction (uniform) of the box side along its axis."""
GROW = (0.1, 0.3)
"""A grown side moves outwards by this fraction (uniform) of the box side."""


def box_region(box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels bool (H, W) inside ``box`` (x0, y0, x1, y1; inclusive ends, rounded)."""
    x0, y0, x1, y1 = np.round(box).astype(int)
    region = np.zeros(size, bool)
    region[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    return region


def region_depth(region: np.ndarray) -> np.ndarray:
    """Distance (pixels) of each pixel of ``region`` bool (H, W) to its edge, the image border counting as an edge;
    0 outside it. float64 (H, W)."""
    return distance_transform(np.pad(region, 1))[1:-1, 1:-1]


def corrected_set(lung: np.ndarray, lungs: np.ndarray, box: np.ndarray, rng: np.random.Generator,
                  max_clicks: int = 3, cut_share: float = 0.7) -> PromptSet:
    """A wrong box for ``lung`` and the clicks that correct it.

    Rules: one or two sides of ``box`` (chosen at random) move, each inwards (probability ``cut_share``) by a
    fraction :data:`CUT` of the box side or outwards by :data:`GROW`, then the box is clipped to the image. The
    lung pixels it cuts off get 1..``max_clicks`` positive clicks and the non-lung pixels it adds (outside every
    lung in ``lungs``) 0..1 negative click; clicks are distinct pixels drawn with probability proportional to
    their distance from the region's edge (squared), so they sit in the error's middle, where users click.
    A move that leaves no error region gives the moved box alone.

    Args:
        lung: this set's lung bool (H, W) (the target).
        lungs: every lung of the image bool (H, W) (negatives never land on a lung).
        box: (4,) float xyxy, the lung's (jittered) box.
        rng: random generator.
        max_clicks: most positive clicks.
        cut_share: probability that a moved side cuts into the lung rather than reaching past it.

    Returns:
        one :class:`PromptSet` with the moved box and the clicks (labels 1 positive, 0 negative; None without).
    """
    size = (int(lung.shape[0]), int(lung.shape[1]))
    moved = np.asarray(box, np.float64).copy()
    extent = np.array([moved[2] - moved[0], moved[3] - moved[1]])
    for side in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        axis, sign = side % 2, (1 if side < 2 else -1)  # sides x0, y0 move inwards by +, x1, y1 by -
        if rng.random() < cut_share:
            moved[side] += sign * rng.uniform(*CUT) * extent[axis]
        else:
            moved[side] -= sign * rng.uniform(*GROW) * extent[axis]
    moved = clip_box(moved, size)
    inside = box_region(moved, size)
    points, labels = [], []
    for region, count, label in ((lung & ~inside, int(rng.integers(1, max_clicks + 1)), 1),
                                 (inside & ~box_region(box, size) & ~lungs, int(rng.integers(0, 2)), 0)):
        if count and region.any():
            picked = weighted_pick(region_depth(region) ** 2, count, rng)
            points.append(picked)
            labels.append(np.full(len(picked), label, np.int64))
    if not points:
        return PromptSet(moved.astype(np.float32))
    return PromptSet(moved.astype(np.float32), np.concatenate(points).astype(np.float32), np.concatenate(labels))


class Click(NamedTuple):
    """One corrective click: ``point`` (2,) float32 (x, y) in the masks' pixels, ``label`` 1 ("more lung") or 0
    ("less lung"), and ``depth``: the error region's depth there (distance to its edge, pixels)."""

    point: np.ndarray
    label: int
    depth: float


def error_click(truth: np.ndarray, predicted: np.ndarray) -> Click | None:
    """The corrective click on a segmentation: at the deepest pixel (largest distance to the region's edge) of its
    largest 8-connected error region, positive (1, "more lung") on lung it missed, negative (0, "less lung") on
    non-lung it took. Ties in size go to the missed region.

    Args:
        truth: the lungs bool (H, W).
        predicted: the segmentation bool (H, W).

    Returns:
        the :class:`Click`, or None when the two agree.
    """
    best = None
    for error, label in ((truth & ~predicted, 1), (predicted & ~truth, 0)):
        regions, sizes = label_components(error)
        if sizes.size:
            if best is None or sizes.max() > best[0]:
                best = (int(sizes.max()), regions == int(np.argmax(sizes)) + 1, label)
    if best is None:
        return None
    depth = region_depth(best[1])
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return Click(np.array([col, row], np.float32), best[2], float(depth[row, col]))
