"""Per-image segmentation metrics for binary lung masks.

Overlap metrics are computed from the confusion counts; surface distances (HD95, ASSD) come from
MONAI's ``compute_hausdorff_distance`` and ``compute_average_surface_distance`` (edge-based,
Euclidean), so they match what MONAI users report.

Empty-mask rules (documented and tested):

* both masks empty: Dice = IoU = precision = recall = 1, HD95 = ASSD = 0;
* exactly one empty: Dice = IoU = 0, precision/recall 0 where defined (precision of an empty
  prediction is NaN, recall of an empty ground truth is NaN), HD95 = ASSD = NaN and
  ``empty_flag`` = ``"pred_empty"`` or ``"gt_empty"``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

METRICS = ("dice", "iou", "precision", "recall", "hd95", "assd")
"""Column order of every results table."""


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] | None) -> tuple[float, float]:
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(gt[None, None].astype(np.float32))
    kwargs = {"include_background": True, "spacing": list(spacing) if spacing else None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(p, g, percentile=95, **kwargs)
        assd = compute_average_surface_distance(p, g, symmetric=True, **kwargs)
    return float(hd95.item()), float(assd.item())


def segmentation_metrics(pred: np.ndarray, gt: np.ndarray,
                         spacing_mm: tuple[float, float] | None = None) -> dict[str, float | str]:
    """Dice, IoU, precision, recall, HD95 and ASSD of one binary prediction.

    Args:
        pred: predicted mask (H, W), bool or {0, 1}.
        gt: ground-truth mask (H, W), same shape.
        spacing_mm: (row, col) pixel spacing; when given, ``hd95_mm`` and ``assd_mm`` are added.

    Returns:
        dict with the keys of :data:`METRICS` (distances in pixels), optionally ``hd95_mm`` and
        ``assd_mm``, and ``empty_flag`` (``""``, ``"pred_empty"``, ``"gt_empty"``).
    """
    pred = np.asarray(pred) > 0
    gt = np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    tp = float(np.logical_and(pred, gt).sum())
    n_pred, n_gt = float(pred.sum()), float(gt.sum())
    out: dict[str, float | str] = {}
    if n_pred == 0 and n_gt == 0:
        out.update(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hd95=0.0, assd=0.0, empty_flag="")
        if spacing_mm:
            out.update(hd95_mm=0.0, assd_mm=0.0)
        return out
    out["dice"] = dice_score(pred, gt)
    out["iou"] = iou_score(pred, gt)
    out["precision"] = tp / n_pred if n_pred else math.nan
    out["recall"] = tp / n_gt if n_gt else math.nan
    out["empty_flag"] = "pred_empty" if n_pred == 0 else "gt_empty" if n_gt == 0 else ""
    if out["empty_flag"]:
        out["hd95"] = out["assd"] = math.nan
        if spacing_mm:
            out["hd95_mm"] = out["assd_mm"] = math.nan
        return out
    out["hd95"], out["assd"] = _surface_distances(pred, gt, None)
    if spacing_mm:
        out["hd95_mm"], out["assd_mm"] = _surface_distances(pred, gt, spacing_mm)
    return out


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks (H, W), bool or {0, 1} (both empty -> 1)."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    total = pred.sum() + gt.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, gt).sum() / total)


def iou_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU (Jaccard index) of two binary masks (H, W), bool or {0, 1} (both empty -> 1)."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def batch_dice(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Per-sample Dice of thresholded logits (B, 1, H, W) against targets (B, 1, H, W) -> (B,)."""
    import torch

    pred = (logits > threshold).float()
    inter = (pred * target).flatten(1).sum(1)
    total = pred.flatten(1).sum(1) + target.flatten(1).sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-8), torch.ones_like(total))


def batch_iou(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Per-sample IoU of thresholded logits (B, 1, H, W) against targets (B, 1, H, W) -> (B,) (both empty -> 1)."""
    import torch

    pred = (logits > threshold).float()
    inter = (pred * target).flatten(1).sum(1)
    union = ((pred + target) > 0).float().flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
