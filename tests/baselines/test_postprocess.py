"""Post-processing on hand-made masks: components, hole filling, the default clean-up."""

from __future__ import annotations

import numpy as np

from cxrsam.baselines.postprocess import clean_mask, fill_holes, keep_largest_components, label_components


def lungs_with_speck_and_hole() -> np.ndarray:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 3:15] = True    # left lung, 360 px
    mask[5:30, 22:36] = True   # right lung, 350 px
    mask[15:18, 8:11] = False  # hole inside the left lung
    mask[37:39, 37:39] = True  # 4 px speck
    return mask


def test_label_components_counts_and_areas():
    mask = lungs_with_speck_and_hole()
    labels, areas = label_components(mask)
    assert labels.shape == mask.shape and labels.dtype == np.int32
    assert sorted(areas.tolist()) == [4, 350, 360 - 9]
    diagonal = np.eye(5, dtype=bool)
    assert label_components(diagonal, connectivity=8)[1].tolist() == [5]
    assert label_components(diagonal, connectivity=4)[1].tolist() == [1] * 5


def test_keep_largest_drops_speck_only():
    mask = lungs_with_speck_and_hole()
    kept = keep_largest_components(mask, k=2)
    assert not kept[37:39, 37:39].any()
    assert (kept == (mask & ~np.pad(np.ones((2, 2), bool), ((37, 1), (37, 1))))).all()
    assert keep_largest_components(mask, k=1).sum() == 351
    assert (keep_largest_components(mask, k=5) == mask).all()


def test_fill_holes_fills_enclosed_but_not_open_regions():
    mask = lungs_with_speck_and_hole()
    filled = fill_holes(mask)
    assert filled[15:18, 8:11].all()
    assert not filled[:, 16:21].any()  # the gap between the lungs touches the border: stays open
    notch = np.zeros((10, 10), bool)
    notch[2:8, 2:8] = True
    notch[4:6, 2:5] = False  # a notch open to the outside is not a hole
    assert (fill_holes(notch) == notch).all()


def test_clean_mask_combines_both_and_handles_empty():
    mask = lungs_with_speck_and_hole()
    cleaned = clean_mask(mask)
    assert cleaned.sum() == 360 + 350
    assert not clean_mask(np.zeros((8, 8), bool)).any()
