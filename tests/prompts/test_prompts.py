"""Prompt geometry on hand-made masks: boxes, points, negatives, edge cases, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from cxrsam.prompts import prompts_from_mask
from cxrsam.prompts.boxes import adjust_box, clip_box, mask_box
from cxrsam.prompts.components import lung_components
from cxrsam.prompts.points import negative_points, positive_points

LEFT = (slice(20, 71), slice(10, 31))    # rows 20..70, cols 10..30 (image-left lung)
RIGHT = (slice(15, 76), slice(60, 86))   # rows 15..75, cols 60..85 (image-right lung)


def two_lungs(speck: bool = True) -> np.ndarray:
    mask = np.zeros((100, 100), bool)
    mask[LEFT] = True
    mask[RIGHT] = True
    if speck:
        mask[90:92, 45:47] = True  # 4 px, below the 0.5 % (50 px) minimum
    return mask


def crescent(size: int = 120) -> np.ndarray:
    """A non-convex, banana-shaped lung whose centroid lies outside it."""
    yy, xx = np.mgrid[:size, :size]
    outer = (yy - 60) ** 2 + (xx - 60) ** 2 < 50 ** 2
    inner = (yy - 60) ** 2 + (xx - 85) ** 2 < 45 ** 2
    return outer & ~inner


def test_components_drop_specks_and_sort_left_to_right():
    comps, found = lung_components(two_lungs())
    assert found == 2 and len(comps) == 2
    assert comps[0][LEFT].all() and comps[0].sum() == 21 * 51
    assert comps[1][RIGHT].all() and comps[1].sum() == 26 * 61


def test_per_lung_boxes_equal_component_extents():
    prompts = prompts_from_mask(two_lungs(), mode="box")
    assert prompts.components_found == 2 and not prompts.warnings
    boxes = [s.box.tolist() for s in prompts.sets]
    assert boxes == [[10, 20, 30, 70], [60, 15, 85, 75]]
    assert all(s.points is None and s.labels is None for s in prompts.sets)


def test_enclosing_box_spans_both_lungs():
    prompts = prompts_from_mask(two_lungs(), mode="box", box_mode="enclosing")
    assert len(prompts.sets) == 1
    assert prompts.sets[0].box.tolist() == [10, 15, 85, 75]


def test_margin_grows_and_clips_to_image():
    box = adjust_box(np.array([10, 20, 30, 70], np.float32), (100, 100), margin=5)
    assert box.tolist() == [5, 15, 35, 75]
    assert adjust_box(np.array([2, 1, 97, 98], np.float32), (100, 100), margin=5).tolist() == [0, 0, 99, 99]
    assert clip_box(np.array([50, 40, 10, 5]), (60, 45)).tolist() == [10, 5, 44, 40]


def test_jitter_is_seeded_and_bounded():
    box = mask_box(two_lungs(speck=False)[:, :50])
    a = adjust_box(box, (100, 100), jitter=0.1, rng=np.random.default_rng(3))
    b = adjust_box(box, (100, 100), jitter=0.1, rng=np.random.default_rng(3))
    c = adjust_box(box, (100, 100), jitter=0.1, rng=np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    sides = np.array([21, 51, 21, 51])
    assert np.all(np.abs(a - box) <= 2 * 0.1 * sides + 1e-6)
    with pytest.raises(ValueError):
        adjust_box(box, (100, 100), jitter=0.1)


@pytest.mark.parametrize("strategy", ["distance", "kmeans", "random"])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_points_lie_inside_their_own_lung(strategy, n):
    mask = two_lungs()
    comps, _ = lung_components(mask)
    prompts = prompts_from_mask(mask, mode="points", points_per_lung=n, strategy=strategy, seed=7)
    assert len(prompts.sets) == 2
    for comp, prompt_set in zip(comps, prompts.sets):
        assert prompt_set.box is None
        assert prompt_set.points.shape == (n, 2) and prompt_set.labels.tolist() == [1] * n
        cols, rows = prompt_set.points[:, 0].astype(int), prompt_set.points[:, 1].astype(int)
        assert comp[rows, cols].all()
        assert len({tuple(p) for p in prompt_set.points.tolist()}) == n


@pytest.mark.parametrize("strategy", ["distance", "kmeans", "random"])
def test_points_inside_a_non_convex_lung(strategy):
    lung = crescent()
    points = positive_points(lung, 5, strategy, np.random.default_rng(0))
    assert points.shape == (5, 2)
    assert lung[points[:, 1].astype(int), points[:, 0].astype(int)].all()


def test_distance_points_start_deepest_and_spread_out():
    lung = np.zeros((100, 60), bool)
    lung[10:91, 20:41] = True  # 81 x 21 rectangle; deepest pixel is its centre
    points = positive_points(lung, 3, "distance")
    assert points[0].tolist() == [30, 50]
    depth_ok = np.minimum(points[:, 0] - 20, 40 - points[:, 0]).min()
    assert depth_ok >= 4  # at least half the maximum depth (10 px) inside
    ys = sorted(points[:, 1].tolist())
    assert ys[0] < 30 and ys[-1] > 70  # spread along the lung


def test_point_prompts_are_deterministic_under_seed():
    mask = two_lungs()
    for strategy in ("kmeans", "random"):
        a = prompts_from_mask(mask, mode="points", strategy=strategy, points_per_lung=4, seed=1)
        b = prompts_from_mask(mask, mode="points", strategy=strategy, points_per_lung=4, seed=1)
        c = prompts_from_mask(mask, mode="points", strategy=strategy, points_per_lung=4, seed=2)
        assert all(np.array_equal(x.points, y.points) for x, y in zip(a.sets, b.sets))
        assert any(not np.array_equal(x.points, y.points) for x, y in zip(a.sets, c.sets))


def test_negatives_between_lungs_and_outside():
    mask = two_lungs()
    prompts = prompts_from_mask(mask, mode="points", points_per_lung=2, negatives=("mediastinum", "outside"))
    for prompt_set in prompts.sets:
        negs = prompt_set.points[prompt_set.labels == 0]
        assert len(negs) == 3 and (prompt_set.labels == 1).sum() == 2
        assert not mask[negs[:, 1].astype(int), negs[:, 0].astype(int)].any()
    mediastinum, left_out, right_out = negs
    assert 30 < mediastinum[0] < 60 and mediastinum[0] == 45
    assert left_out[0] < 10 and right_out[0] > 85


def test_mediastinum_needs_two_lungs_and_lung_pixels_are_never_negative():
    one = np.zeros((100, 100), bool)
    one[20:70, 1:99] = True  # spans the image width: "outside" points would fall on it
    points, warnings = negative_points(lung_components(one)[0], ("mediastinum", "outside"))
    assert points.shape == (0, 2)
    assert any("mediastinum" in w for w in warnings) and sum("dropped" in w for w in warnings) == 2


def test_box_plus_points_in_the_same_sets():
    prompts = prompts_from_mask(two_lungs(), mode="box+points", points_per_lung=2)
    assert [s.signature for s in prompts.sets] == [(True, 2), (True, 2)]
    enclosing = prompts_from_mask(two_lungs(), mode="box+points", box_mode="enclosing", points_per_lung=2)
    assert len(enclosing.sets) == 1 and enclosing.sets[0].points.shape == (4, 2)


def test_empty_single_and_extra_components_are_reported():
    empty = prompts_from_mask(np.zeros((64, 64), bool), mode="box")
    assert empty.empty and empty.components_found == 0 and "no lung" in empty.warnings[0]
    speck_only = np.zeros((64, 64), bool)
    speck_only[5:7, 5:7] = True
    assert prompts_from_mask(speck_only).empty

    merged = np.zeros((100, 100), bool)
    merged[20:70, 10:90] = True
    one = prompts_from_mask(merged, mode="box+points")
    assert len(one.sets) == 1 and one.components_found == 1 and "one lung component" in one.warnings[0]

    three = two_lungs(speck=False)
    three[85:95, 40:50] = True  # 100 px, above the minimum area
    many = prompts_from_mask(three)
    assert many.components_found == 3 and len(many.sets) == 2 and "two largest" in many.warnings[0]


def test_tiny_lung_gives_all_its_pixels_and_bad_arguments_fail():
    lung = np.zeros((20, 20), bool)
    lung[5, 5:8] = True
    assert positive_points(lung, 5).shape == (3, 2)
    with pytest.raises(ValueError):
        prompts_from_mask(two_lungs(), mode="scribble")
    with pytest.raises(ValueError):
        prompts_from_mask(two_lungs(), mode="points", strategy="grid")
    with pytest.raises(ValueError):
        prompts_from_mask(two_lungs(), mode="points", negatives=("heart",))
