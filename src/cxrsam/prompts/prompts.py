"""Prompt sets for SAM derived from a draft lung mask (:func:`prompts_from_mask`).

A :class:`Prompts` holds one :class:`PromptSet` per lung (``box_mode="per_lung"``) or a single
set for both lungs (``box_mode="enclosing"``). SAM decodes each set into one mask; the masks are
merged by union. All coordinates are in original-image pixels; see ``docs/prompts.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cxrsam.prompts.boxes import adjust_box, clip_box, enclosing_box, mask_box
from cxrsam.prompts.components import DEFAULT_MIN_AREA_FRAC, lung_components
from cxrsam.prompts.modes import BoxMode, PromptMode
from cxrsam.prompts.points import low_probability_points, negative_points, positive_points, probability_points

MODES = tuple(m.value for m in PromptMode)
BOX_MODES = tuple(m.value for m in BoxMode)


@dataclass
class PromptSet:
    """Prompts SAM decodes into one mask.

    Attributes:
        box: (4,) float32 ``(x0, y0, x1, y1)`` in original pixels (inclusive ends), or None.
        points: (N, 2) float32 ``(x, y)`` in original pixels, or None.
        labels: (N,) int64, 1 = lung, 0 = background; None exactly when ``points`` is None.
        logits: (H, W) float32 mask logits of this set's previous result at the image's size (SAM's dense, or
            mask, prompt: what an interactive round refines), or None.
    """

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    logits: np.ndarray | None = None

    @property
    def signature(self) -> tuple[bool, int, bool]:
        """(has box, number of points, has logits): sets with equal signatures can be decoded in one batch."""
        return self.box is not None, 0 if self.points is None else len(self.points), self.logits is not None


@dataclass
class Prompts:
    """All prompt sets for one image, and what was found in its draft.

    Attributes:
        sets: the prompt sets (empty when the draft had no usable lung).
        image_size: (H, W) of the image the coordinates refer to.
        mode: ``box``, ``points`` or ``box+points``.
        components_found: lung components above the minimum area in the draft.
        warnings: what went wrong or was skipped (one component, none, dropped negatives).
    """

    sets: list[PromptSet]
    image_size: tuple[int, int]
    mode: str
    components_found: int
    warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when there is nothing to decode (the segmentation is then an empty mask)."""
        return not self.sets


def prompts_from_mask(mask: np.ndarray, mode: str = "box", box_mode: str = "per_lung", points_per_lung: int = 3,
                      strategy: str = "distance", negatives: Sequence[str] = (), margin: float = 0.0,
                      jitter: float = 0.0, min_area_frac: float = DEFAULT_MIN_AREA_FRAC,
                      seed: int | None = 0, rng: np.random.Generator | None = None, points: int | None = None,
                      random_negatives: int = 0, weight: np.ndarray | None = None) -> Prompts:
    """Build SAM prompts from a draft lung mask.

    Rules:

    1. Lungs = the two largest 8-connected components with at least ``min_area_frac`` of the
       image area, image-left first (:func:`~cxrsam.prompts.components.lung_components`). None
       found: no prompt sets and a warning; one found: it is used alone and a warning says so;
       more than two: the extra ones are ignored and reported.
    2. ``box``: per lung, the extent of its component (:func:`~cxrsam.prompts.boxes.mask_box`);
       with ``box_mode="enclosing"`` one box around all lungs. Then ``margin`` and ``jitter``
       (:func:`~cxrsam.prompts.boxes.adjust_box`).
    3. ``points``: per lung, ``points_per_lung`` positive points chosen by ``strategy``
       (:func:`~cxrsam.prompts.points.positive_points`), then the ``negatives`` (label 0,
       :func:`~cxrsam.prompts.points.negative_points`) appended to every set. With
       ``box_mode="enclosing"`` the single set holds the points of all lungs. ``strategy="probability"``:
       ``points`` positives per image drawn with ``weight`` (the draft's foreground probability; the mask
       when None) and split over the sets (:func:`~cxrsam.prompts.points.probability_points`).
       ``random_negatives``: that many negatives drawn from the low-probability region near the lungs
       (:func:`~cxrsam.prompts.points.low_probability_points`), appended to every set.
    4. ``box+points``: both, in the same set(s).

    Args:
        mask: draft lung mask (H, W), bool or {0, 1}.
        mode: ``box``, ``points`` or ``box+points``.
        box_mode: ``per_lung`` (one set per lung, masks merged by union) or ``enclosing``.
        points_per_lung: positive points per lung (N).
        strategy: ``distance``, ``kmeans`` or ``random``.
        negatives: kinds of negative points, any of ``mediastinum``, ``outside``.
        margin: pixels added to every box side.
        jitter: box noise std as a fraction of the box side (training; 0 = off).
        min_area_frac: minimum lung component area, fraction of the image.
        seed: seed of the random generator used by ``kmeans``/``random``/``jitter``
            (ignored when ``rng`` is given). Same inputs and seed give the same prompts.
        rng: random generator to draw from instead of ``seed``.
        points: positive points per image of the ``probability`` strategy (required by it, refused by others).
        random_negatives: negatives drawn from the low-probability region (0 = none).
        weight: foreground probability float (H, W) in [0, 1] of the draft (None: the mask itself).
    """
    if mode not in MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; choose one of {', '.join(MODES)}")
    if box_mode not in BOX_MODES:
        raise ValueError(f"unknown box mode {box_mode!r}; choose one of {', '.join(BOX_MODES)}")
    if (strategy == "probability") != (points is not None):
        raise ValueError("the probability strategy takes points per image (points), the others points_per_lung")
    rng = rng if rng is not None else np.random.default_rng(seed)
    mask = np.asarray(mask) > 0
    if weight is not None and np.shape(weight) != mask.shape:
        raise ValueError(f"probability map {np.shape(weight)} and draft {mask.shape} differ in size")
    size = (int(mask.shape[0]), int(mask.shape[1]))
    lungs, found = lung_components(mask, min_area_frac)
    warnings: list[str] = []
    if found == 0:
        warnings.append("no lung component in the draft: empty segmentation")
        return Prompts([], size, mode, 0, warnings)
    if found == 1:
        warnings.append("one lung component in the draft (lungs merged or one missing)")
    elif found > 2:
        warnings.append(f"{found} components in the draft; the two largest are used")

    groups = [[lung] for lung in lungs] if box_mode == "per_lung" else [lungs]
    use_box, use_points = mode in ("box", "box+points"), mode in ("points", "box+points")
    negs = np.zeros((0, 2), np.float32)
    if use_points and negatives:
        negs, neg_warnings = negative_points(lungs, negatives)
        warnings += neg_warnings
    weight = mask if weight is None else weight
    if use_points and random_negatives:
        negs = np.concatenate([negs, low_probability_points(weight, lungs, random_negatives, rng)])
    drawn = (probability_points(weight, [np.logical_or.reduce(g) for g in groups], points, rng)
             if use_points and points is not None else None)
    sets = []
    for i, group in enumerate(groups):
        prompt = PromptSet()
        if use_box:
            box = enclosing_box([mask_box(lung) for lung in group])
            prompt.box = adjust_box(box, size, margin=margin, jitter=jitter, rng=rng)
        if use_points:
            pos = drawn[i] if drawn is not None else np.concatenate(
                [positive_points(lung, points_per_lung, strategy, rng) for lung in group])
            if not len(pos) and not use_box:  # fewer points than lungs: this lung got none
                continue
            prompt.points = np.concatenate([pos, negs]).astype(np.float32)
            prompt.labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(negs), np.int64)])
        sets.append(prompt)
    return Prompts(sets, size, mode, found, warnings)


def add_points(prompts: Prompts, points: np.ndarray, labels: np.ndarray) -> Prompts:
    """Draft prompts with hand-given points added: each point joins the set whose box contains it
    (else the set whose box or points centre is nearest), so a click refines the lung it is on; each set keeps its
    previous result's logits.

    A box never excludes a positive click: a positive point outside every box moves the box of the set it joins past
    it (:func:`reach_past`; a user who clicks missed lung past a draft's box asks for that box to reach there; SAM
    keeps its masks inside the box and would otherwise ignore the click). Negative points leave boxes as they are
    (pulling a box's side in past a background click cost Dice on validation: docs/results.md)."""
    sets = [PromptSet(s.box, s.points, s.labels, s.logits) for s in prompts.sets]

    def centre(s: PromptSet) -> np.ndarray:
        return (s.box[:2] + s.box[2:]) / 2 if s.box is not None else s.points.mean(axis=0)

    for point, label in zip(points, labels):
        inside = [i for i, s in enumerate(sets) if s.box is not None
                  and s.box[0] <= point[0] <= s.box[2] and s.box[1] <= point[1] <= s.box[3]]
        target = inside[0] if inside else int(np.argmin([np.linalg.norm(centre(s) - point) for s in sets]))
        s = sets[target]
        if label == 1 and s.box is not None and not inside:
            s.box = reach_past(s.box, point, prompts.image_size)
        s.points = point[None] if s.points is None else np.concatenate([s.points, point[None]])
        s.labels = np.array([label]) if s.labels is None else np.concatenate([s.labels, [label]])
    mode = "box+points" if any(s.box is not None for s in sets) else "points"
    return Prompts(sets, prompts.image_size, mode, prompts.components_found, list(prompts.warnings))


def reach_past(box: np.ndarray, point: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``box`` (4,) xyxy extended to a ``point`` (2,) xy outside it: each side the point lies beyond moves past the
    point by as far again (the click marks the middle of the missed lung between the box and the new side), then the
    box is clipped to the image of ``size`` (H, W). float32 (4,)."""
    box = np.asarray(box, np.float64)
    low = np.where(point < box[:2], 2 * point - box[:2], box[:2])
    high = np.where(point > box[2:], 2 * point - box[2:], box[2:])
    return clip_box(np.concatenate([low, high]), size).astype(np.float32)


def with_previous(prompts: Prompts, logits: Sequence[np.ndarray]) -> Prompts:
    """``prompts`` with each set given its previous result's ``logits`` (H, W) float32 (one per set, in order) as its
    mask prompt: the next round of an interactive session."""
    if len(logits) != len(prompts.sets):
        raise ValueError(f"{len(logits)} previous results for {len(prompts.sets)} prompt sets")
    sets = [PromptSet(s.box, s.points, s.labels, np.asarray(previous, np.float32))
            for s, previous in zip(prompts.sets, logits)]
    return Prompts(sets, prompts.image_size, prompts.mode, prompts.components_found, list(prompts.warnings))
