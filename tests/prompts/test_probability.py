"""The paper's point protocol: points drawn with the draft's foreground probability, negatives from its
low-probability region, and the fine-tuning prompt mixture."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cxrsam.prompts import PromptMixture, PromptSpec, prompts_from_mask
from cxrsam.prompts.components import lung_components
from cxrsam.prompts.points import NEGATIVE_BAND, low_probability_points, probability_points

LEFT = (slice(20, 71), slice(10, 31))    # rows 20..70, cols 10..30 (image-left lung)
RIGHT = (slice(15, 76), slice(60, 86))   # rows 15..75, cols 60..85 (image-right lung)


def two_lungs(speck: bool = True) -> np.ndarray:
    mask = np.zeros((100, 100), bool)
    mask[LEFT] = True
    mask[RIGHT] = True
    if speck:
        mask[90:92, 45:47] = True  # 4 px speck, below the minimum lung area
    return mask


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
