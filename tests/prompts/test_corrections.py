"""Simulated corrections (issue 18): a wrong box per lung and the clicks that fix it, as fine-tuning draws them."""

from __future__ import annotations

import numpy as np

from cxrsam.prompts import PromptMixture
from cxrsam.prompts.boxes import mask_box
from cxrsam.prompts.components import lung_components
from cxrsam.prompts.corrections import box_region, corrected_set

LEFT = (slice(20, 71), slice(10, 31))
RIGHT = (slice(15, 76), slice(60, 86))


def lungs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    left, right = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
    left[LEFT], right[RIGHT] = True, True
    return left, right, left | right


def test_clicks_sit_on_what_the_wrong_box_gets_wrong():
    left, _, every = lungs()
    box = mask_box(left)
    rng = np.random.default_rng(0)
    seen = {"cut": 0, "grown": 0, "positive": 0, "negative": 0}
    for _ in range(200):
        s = corrected_set(left, every, box, rng, max_clicks=3)
        inside = box_region(s.box, every.shape)
        assert (s.box >= 0).all() and s.box[2] <= 99 and s.box[3] <= 99 and s.box[0] <= s.box[2]
        missed = left & ~inside
        seen["cut"] += bool(missed.any())
        seen["grown"] += bool((inside & ~box_region(box, every.shape)).any())
        if s.points is None:
            assert not missed.any()  # a cut that misses lung always gets a positive click
            continue
        cols, rows = s.points[:, 0].astype(int), s.points[:, 1].astype(int)
        positive, negative = s.labels == 1, s.labels == 0
        assert missed[rows[positive], cols[positive]].all()  # on the lung the box cut off
        assert 1 <= positive.sum() <= 3 or not missed.any()
        assert negative.sum() <= 1
        assert (inside[rows[negative], cols[negative]] & ~every[rows[negative], cols[negative]]).all()
        assert not box_region(box, every.shape)[rows[negative], cols[negative]].any()  # in the part it added
        assert len({(c, r) for c, r in zip(cols, rows)}) == len(cols)
        seen["positive"] += int(positive.sum())
        seen["negative"] += int(negative.sum())
    assert min(seen.values()) > 10  # every kind of error and click occurs
    a = corrected_set(left, every, box, np.random.default_rng(5))
    b = corrected_set(left, every, box, np.random.default_rng(5))
    assert np.array_equal(a.box, b.box) and np.array_equal(a.points, b.points)


def test_positive_clicks_lean_to_the_middle_of_the_missed_part():
    left, _, every = lungs()
    box = mask_box(left)
    rng = np.random.default_rng(1)
    depths, uniform = [], []
    from scipy import ndimage

    for _ in range(100):
        s = corrected_set(left, every, box, rng, max_clicks=1)
        missed = left & ~box_region(s.box, every.shape)
        if s.points is None or not missed.any():
            continue
        depth = ndimage.distance_transform_edt(np.pad(missed, 1))[1:-1, 1:-1]
        p = s.points[s.labels == 1][0].astype(int)
        depths.append(depth[p[1], p[0]])
        uniform.append(depth[missed].mean())
    assert np.mean(depths) > 1.2 * np.mean(uniform)


def test_a_mixture_with_corrections_gives_every_lung_a_wrong_box_and_its_clicks():
    _, _, every = lungs()
    always = PromptMixture(corrections=1.0)
    rng = np.random.default_rng(0)
    truth_lungs, _ = lung_components(every)
    for _ in range(20):
        prompts = always.draw(every, rng, jitter=0.05)
        assert prompts.mode == "box+points" and len(prompts.sets) == 2 and all(s.box is not None for s in prompts.sets)
        for lung, s in zip(truth_lungs, prompts.sets):  # each set's clicks belong to its own lung
            if s.points is not None:
                pos = s.points[s.labels == 1].astype(int)
                assert lung[pos[:, 1], pos[:, 0]].all()
    half = PromptMixture(weights={"points": 1.0}, corrections=0.5)
    modes = [half.draw(every, rng).mode for _ in range(60)]
    assert 15 < modes.count("box+points") < 45 and modes.count("points") == 60 - modes.count("box+points")


def test_the_error_click_sits_deepest_in_the_largest_error_and_asks_for_what_is_wrong():
    from cxrsam.prompts.corrections import error_click

    _, _, truth = lungs()
    missed = truth.copy()
    missed[55:71, 10:31] = False  # the left base missed: 16 x 21 px
    missed[15:18, 60:86] = False  # a thin strip of the right apex missed too (smaller)
    point, label, depth = error_click(truth, missed)
    assert label == 1 and 55 + 5 <= point[1] <= 70 - 5 and 10 + 5 <= point[0] <= 30 - 5  # the base's middle
    assert depth == 8  # 16 rows of the base: 8 px to the nearest edge at best
    taken = truth.copy()
    taken[80:95, 40:60] = True  # non-lung below, larger than the missed strip
    taken[15:17, 60:86] = False
    point, label, _ = error_click(truth, taken)
    assert label == 0 and not truth[int(point[1]), int(point[0])] and taken[int(point[1]), int(point[0])]
    assert 84 <= point[1] <= 90 and 45 <= point[0] <= 54
    assert error_click(truth, truth.copy()) is None
