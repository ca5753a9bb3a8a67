"""Segmentation metrics, statistics and directory evaluation."""

from cxrsam.evaluation.metrics import METRICS, dice_score, iou_score, segmentation_metrics
from cxrsam.evaluation.stats import PairedComparison, bootstrap_ci, paired_comparison, summarize

__all__ = ["METRICS", "PairedComparison", "bootstrap_ci", "dice_score", "iou_score", "paired_comparison",
           "segmentation_metrics", "summarize"]
