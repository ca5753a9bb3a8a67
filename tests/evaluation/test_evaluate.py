"""Folder/mapping evaluation: which grid a score is computed on."""

from __future__ import annotations

import numpy as np
import pytest

from cxrsam.data.io import resize_mask
from cxrsam.evaluation.evaluate import evaluate_masks


def test_ground_truth_of_another_size_is_brought_to_the_prediction():
    # A 256x256 mask for a 299x299 image (the COVID-19 Radiography Database's layout). The prediction lives on
    # the image grid; the ground truth brought to that grid the way training does it must score exactly 1.
    gt = np.zeros((256, 256), bool)
    gt[40:200, 30:110] = True
    gt[50:210, 140:230] = True
    pred = resize_mask(gt, (299, 299))
    row = evaluate_masks({"a": pred}, {"a": gt}).iloc[0]
    assert row["dice"] == pytest.approx(1.0) and row["hd95"] == pytest.approx(0.0)
    # resizing the prediction down instead is not the inverse of that resize: it would not score 1
    assert (resize_mask(pred, gt.shape) != gt).any()
