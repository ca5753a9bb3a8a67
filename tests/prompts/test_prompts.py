"""Prompt geometry on hand-made masks: boxes, points, negatives, edge cases, determinism; the paper's point
protocol (points drawn with the draft's foreground probability, negatives from its low-probability region) and the
fine-tuning prompt mixture."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cxrsam.prompts import PromptMixture, Prompts, PromptSet, PromptSpec, add_points, prompts_from_mask
from cxrsam.prompts.boxes import adjust_box, clip_box, mask_box
from cxrsam.prompts.components import lung_components
from cxrsam.prompts.points import (
    NEGATIVE_BAND,
    low_probability_points,
    negative_points,
    positive_points,
    probability_points,
)

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
    assert [s.signature for s in prompts.sets] == [(True, 2, False), (True, 2, False)]
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


def probability_map() -> np.ndarray:
    """A CNN-like map: 0.9 on the lungs' cores, 0.6 on their rims, 0.2 in a halo, 0 elsewhere."""
    mask = two_lungs(speck=False)
    prob = np.where(mask, 0.6, 0.0).astype(np.float32)
    prob[22:69, 12:29] = prob[17:74, 62:84] = 0.9
    from scipy import ndimage

    halo = ndimage.binary_dilation(mask, iterations=3) & ~mask
    prob[halo] = 0.2
    return prob


def test_probability_points_count_split_weighting_and_seed():
    prob, mask = probability_map(), two_lungs(speck=False)
    lungs, _ = lung_components(mask)
    groups = probability_points(prob, lungs, 45, np.random.default_rng(0))
    assert sum(len(g) for g in groups) == 45 and all(len(g) >= 1 for g in groups)
    for group in groups:
        cols, rows = group[:, 0].astype(int), group[:, 1].astype(int)
        assert (prob[rows, cols] > 0).all()  # never where the probability is 0
        assert len({(c, r) for c, r in zip(cols, rows)}) == len(group)  # distinct pixels
    # split in proportion to each lung's probability mass (the right lung is the larger)
    assert len(groups[1]) > len(groups[0])
    again = probability_points(prob, lungs, 45, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))
    # the weight decides: all mass on the left lung's top rows -> every point of the left set lies there
    skewed = np.zeros_like(prob)
    skewed[20:25, 10:31] = 1.0
    skewed[RIGHT] = 1.0
    left = probability_points(skewed, lungs, 30, np.random.default_rng(1))[0]
    assert (left[:, 1] < 25).all()


def test_probability_points_edge_cases():
    lungs, _ = lung_components(two_lungs(speck=False))
    one = probability_points(two_lungs(speck=False), lungs, 1, np.random.default_rng(0))
    assert sorted(len(g) for g in one) == [0, 1]  # fewer points than lungs: one lung gets none
    tiny = np.zeros((100, 100), np.float32)
    tiny[30, 20] = tiny[40, 70] = 1.0
    assert [len(g) for g in probability_points(tiny, lungs, 10, np.random.default_rng(0))] == [1, 1]
    with pytest.raises(ValueError, match=">= 1"):
        probability_points(tiny, lungs, 0, np.random.default_rng(0))


def test_low_probability_negatives_lie_near_the_lungs_where_probability_is_low():
    prob, mask = probability_map(), two_lungs(speck=False)
    lungs, _ = lung_components(mask)
    negs = low_probability_points(prob, lungs, 20, np.random.default_rng(0))
    assert len(negs) == 20
    cols, rows = negs[:, 0].astype(int), negs[:, 1].astype(int)
    assert (prob[rows, cols] < 0.5).all() and not mask[rows, cols].any()
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~mask)
    assert (distance[rows, cols] <= NEGATIVE_BAND * 100).all()
    assert len(low_probability_points(prob, lungs, 0, np.random.default_rng(0))) == 0


def test_probability_prompts_per_lung_and_enclosing():
    prob, mask = probability_map(), two_lungs()
    per_lung = prompts_from_mask(mask, mode="points", strategy="probability", points=30, random_negatives=4,
                                 weight=prob, rng=np.random.default_rng(3))
    assert len(per_lung.sets) == 2
    assert sum(int(s.labels.sum()) for s in per_lung.sets) == 30
    assert all(int((s.labels == 0).sum()) == 4 for s in per_lung.sets)  # the negatives go to every set
    enclosing = prompts_from_mask(mask, mode="box+points", box_mode="enclosing", strategy="probability", points=30,
                                  weight=prob, rng=np.random.default_rng(3))
    assert len(enclosing.sets) == 1 and int(enclosing.sets[0].labels.sum()) == 30
    assert enclosing.sets[0].box is not None
    with_mask = prompts_from_mask(mask, mode="points", strategy="probability", points=30, rng=np.random.default_rng(3))
    for s in with_mask.sets:  # a plain mask draft is its own weight: every point on the lung
        assert mask[s.points[:, 1].astype(int), s.points[:, 0].astype(int)].all()
    with pytest.raises(ValueError, match="probability strategy"):
        prompts_from_mask(mask, mode="points", strategy="probability")
    with pytest.raises(ValueError, match="differ in size"):
        prompts_from_mask(mask, mode="points", strategy="probability", points=5, weight=prob[:50])


def test_prompt_spec_points_rules_and_weight():
    spec = PromptSpec(mode="points", strategy="probability", points=15)
    assert spec.uses_weight and not PromptSpec().uses_weight
    assert not PromptSpec(mode="box", strategy="probability", points=15).uses_weight
    with pytest.raises(ValidationError, match="needs points per image"):
        PromptSpec(mode="points", strategy="probability")
    with pytest.raises(ValidationError, match="go with the probability strategy"):
        PromptSpec(mode="points", points=15)
    prob = probability_map()
    a = spec.prompts(two_lungs(), "case-1", prob)
    b = spec.prompts(two_lungs(), "case-1", prob)
    c = spec.prompts(two_lungs(), "case-2", prob)
    assert all(np.array_equal(x.points, y.points) for x, y in zip(a.sets, b.sets))  # seeded by the stem
    assert not all(np.array_equal(x.points, y.points) for x, y in zip(a.sets, c.sets))


def test_mixture_draws_kinds_counts_and_negatives_within_its_settings():
    truth = two_lungs(speck=False)
    mixture = PromptMixture(min_points=4, max_points=9, max_negatives=3)
    kinds, rng = set(), np.random.default_rng(0)
    for _ in range(40):
        prompts = mixture.draw(truth, rng, jitter=0.05)
        assert len(prompts.sets) == 2  # one set per lung, always
        kinds.add(prompts.mode)
        if prompts.mode != "box":
            positives = sum(int(s.labels.sum()) for s in prompts.sets)
            negatives = {int((s.labels == 0).sum()) for s in prompts.sets}
            assert 4 <= positives <= 9 and len(negatives) == 1 and negatives.pop() <= 3
    assert kinds == {"box", "points", "box+points"}
    only_points = PromptMixture(weights={"points": 1.0})
    assert {only_points.draw(truth, rng).mode for _ in range(5)} == {"points"}
    with pytest.raises(ValidationError, match="max_points"):
        PromptMixture(min_points=10, max_points=5)
    with pytest.raises(ValidationError, match="positive sum"):
        PromptMixture(weights={"box": 0.0})


def test_add_points_join_the_lung_whose_box_holds_them():
    prompts = Prompts([PromptSet(box=np.array([5, 10, 29, 49], np.float32)),
                       PromptSet(box=np.array([50, 15, 69, 44], np.float32))], (60, 80), "box", 2)
    refined = add_points(prompts, np.array([[60, 30], [20, 20], [35, 5]], np.float32), np.array([0, 1, 1]))
    assert refined.sets[1].points.tolist() == [[60, 30]] and refined.sets[1].labels.tolist() == [0]
    # (35, 5) is in no box: it joins the nearest box centre, (17, 29.5) of the image-left lung.
    assert refined.sets[0].points.tolist() == [[20, 20], [35, 5]] and refined.mode == "box+points"
    # a positive click outside every box moves the sides of the box it joins past it, by as far again as it lies
    # beyond them (clipped to the image); a click inside a box leaves that box alone
    assert refined.sets[0].box.tolist() == [5, 0, 41, 49] and refined.sets[1].box.tolist() == [50, 15, 69, 44]
    low = add_points(prompts, np.array([[20, 55]], np.float32), np.array([1]))
    assert low.sets[0].box.tolist() == [5, 10, 29, 59]  # 49 + 2 x 6 = 61, clipped to the image's last row
    assert prompts.sets[0].points is None and prompts.sets[0].box.tolist() == [5, 10, 29, 49]  # drafts unmodified
    # a negative click outside every box leaves the boxes as they are
    negative = add_points(prompts, np.array([[35, 5], [75, 55]], np.float32), np.array([0, 0]))
    assert [s.box.tolist() for s in negative.sets] == [[5, 10, 29, 49], [50, 15, 69, 44]]
    assert negative.sets[1].points.tolist() == [[75, 55]]


def test_with_previous_gives_each_set_its_own_logits_and_keeps_the_rest():
    from cxrsam.prompts import with_previous

    prompts = prompts_from_mask(two_lungs(), mode="box+points", points_per_lung=2)
    logits = [np.full(prompts.image_size, float(i)) for i in range(2)]
    nxt = with_previous(prompts, logits)
    assert [s.signature for s in nxt.sets] == [(True, 2, True), (True, 2, True)]
    assert [float(s.logits[0, 0]) for s in nxt.sets] == [0.0, 1.0] and nxt.sets[0].logits.dtype == np.float32
    assert all(np.array_equal(a.box, b.box) and np.array_equal(a.points, b.points) for a, b in zip(nxt.sets,
                                                                                                     prompts.sets))
    assert all(s.logits is None for s in prompts.sets)  # a copy: the given prompts are unchanged
    with pytest.raises(ValueError, match="1 previous results for 2 prompt sets"):
        with_previous(prompts, logits[:1])
