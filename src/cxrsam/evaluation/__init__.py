"""Segmentation metrics, statistics and directory evaluation."""

from cxrsam.evaluation.metrics import METRICS, segmentation_metrics
from cxrsam.evaluation.stats import bootstrap_ci, paired_wilcoxon, summarize

__all__ = ["METRICS", "segmentation_metrics", "bootstrap_ci", "paired_wilcoxon", "summarize"]
