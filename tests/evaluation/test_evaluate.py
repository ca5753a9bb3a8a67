"""Folder/mapping evaluation: which grid a score is computed on, which files are matched, what is refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrsam.data.io import resize_mask, write_mask
from cxrsam.evaluation.evaluate import evaluate_dirs, evaluate_masks


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


def _lungs(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[h // 6:5 * h // 6, w // 8:3 * w // 8] = mask[h // 6:5 * h // 6, 5 * w // 8:7 * w // 8] = True
    return mask


def test_folders_refuse_other_aspect_and_shared_names_and_score_the_rest(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for name in ("same", "bigger", "squashed", "two_preds", "two_gts"):
        write_mask(gt / f"{name}.png", _lungs(60, 80))
    write_mask(gt / "two_gts_mask.png", _lungs(60, 80))
    write_mask(pred / "same.png", _lungs(60, 80))
    write_mask(pred / "bigger_mask.png", _lungs(120, 160))   # same aspect ratio: the ground truth is resized
    write_mask(pred / "squashed.png", _lungs(80, 80))        # another aspect ratio: refused
    write_mask(pred / "two_preds.png", _lungs(60, 80))
    write_mask(pred / "two_preds_mask.png", _lungs(60, 80))
    write_mask(pred / "two_gts.png", _lungs(60, 80))
    write_mask(pred / "unmatched.png", _lungs(60, 80))
    write_mask(pred / "unmatched_mask.png", _lungs(60, 80))  # shared, but no ground truth has this name
    done = evaluate_dirs(pred, gt)
    assert list(done.frame["name"]) == ["bigger", "same"]
    assert done.frame["dice"].tolist() == pytest.approx([1.0, 1.0]) and done.missing == []
    assert done.refused == [
        f"{pred / 'squashed.png'}: prediction is 80x80 but its ground truth {gt / 'squashed.png'} is 80x60 "
        "(another aspect ratio)",
        f"{gt / 'two_gts.png'}: has the same name 'two_gts' as {gt / 'two_gts_mask.png'}; rename or remove one of them",
        f"{pred / 'two_preds.png'}: has the same name 'two_preds' as {pred / 'two_preds_mask.png'}; "
        "rename or remove one of them",
    ]


def test_an_opaque_rgba_prediction_equal_to_its_ground_truth_scores_one(tmp_path):
    lungs = _lungs(60, 80)
    write_mask(tmp_path / "gt" / "a.png", lungs)
    (tmp_path / "pred").mkdir()
    rgba = np.dstack([lungs * 255] * 3 + [np.full(lungs.shape, 255)]).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "pred" / "a.png")
    done = evaluate_dirs(tmp_path / "pred", tmp_path / "gt")
    assert done.frame["dice"].tolist() == [1.0] and not done.refused
