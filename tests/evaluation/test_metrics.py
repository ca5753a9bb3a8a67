"""Metrics against hand-computed cases and MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrsam.evaluation.metrics import batch_dice, batch_iou, dice_score, iou_score, segmentation_metrics


def _squares():
    gt = np.zeros((40, 40), bool)
    gt[10:20, 10:20] = True  # 100 px
    pred = np.zeros((40, 40), bool)
    pred[10:20, 15:25] = True  # 100 px, overlap 50
    return pred, gt


def test_hand_computed_overlap():
    pred, gt = _squares()
    m = segmentation_metrics(pred, gt)
    assert m["dice"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(50 / 150)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)


def test_shifted_square_distances():
    gt = np.zeros((40, 40), bool)
    gt[10:20, 10:20] = True
    pred = np.roll(gt, 3, axis=1)
    m = segmentation_metrics(pred, gt)
    assert m["hd95"] == pytest.approx(3.0)
    assert 0 < m["assd"] < 3.0
    m_mm = segmentation_metrics(pred, gt, spacing_mm=(0.5, 2.0))
    assert m_mm["hd95_mm"] == pytest.approx(6.0)  # the shift is along columns (2 mm per pixel)


def test_against_monai():
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = np.zeros((64, 64), bool)
        y, x = rng.integers(10, 30, 2)
        gt[y:y + 25, x:x + 20] = True
        pred = np.roll(gt, rng.integers(-4, 5, 2), axis=(0, 1))
        pred[rng.random((64, 64)) < 0.02] = True
        ours = segmentation_metrics(pred, gt)
        p = torch.from_numpy(pred[None, None].astype(np.float32))
        g = torch.from_numpy(gt[None, None].astype(np.float32))
        dice = DiceMetric(include_background=True)
        dice(p, g)
        hd = HausdorffDistanceMetric(include_background=True, percentile=95)
        hd(p, g)
        assert ours["dice"] == pytest.approx(dice.aggregate().item(), abs=1e-6)
        assert ours["hd95"] == pytest.approx(hd.aggregate().item(), abs=1e-5)
        assert ours["dice"] == pytest.approx(dice_score(pred, gt))
        assert ours["iou"] == pytest.approx(dice.aggregate().item() / (2 - dice.aggregate().item()), abs=1e-6)


def test_empty_rules():
    empty = np.zeros((10, 10), bool)
    full = np.zeros((10, 10), bool)
    full[2:5, 2:5] = True
    both = segmentation_metrics(empty, empty)
    assert both["dice"] == 1.0 and both["hd95"] == 0.0
    pred_empty = segmentation_metrics(empty, full)
    assert pred_empty["dice"] == 0.0 and math.isnan(pred_empty["hd95"]) and pred_empty["empty_flag"] == "pred_empty"
    gt_empty = segmentation_metrics(full, empty)
    assert gt_empty["dice"] == 0.0 and math.isnan(gt_empty["recall"]) and gt_empty["empty_flag"] == "gt_empty"


def test_iou_score_hand_computed_and_empty():
    pred, gt = _squares()
    assert iou_score(pred, gt) == pytest.approx(50 / 150)  # overlap 50 px, union 150 px
    assert iou_score(pred.astype(np.uint8), gt) == pytest.approx(50 / 150)
    empty = np.zeros_like(gt)
    assert iou_score(empty, empty) == 1.0 and iou_score(empty, gt) == 0.0


def test_batch_helpers_match_numpy():
    pred, gt = _squares()
    empty = np.zeros_like(gt)
    logits = torch.from_numpy(np.where(np.stack([pred, empty, empty]), 5.0, -5.0)[:, None]).float()
    target = torch.from_numpy(np.stack([gt, gt, empty])[:, None]).float()
    assert batch_dice(logits, target).tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert batch_iou(logits, target).tolist() == pytest.approx([iou_score(pred, gt), 0.0, 1.0])
