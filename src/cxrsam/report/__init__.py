"""Comparison tables, figures and the self-contained HTML/Markdown report."""

from cxrsam.report.figures import dice_boxplot, lung_area_histogram, overlay_grid, training_curves
from cxrsam.report.render import ReportContent, write_report
from cxrsam.report.tables import MethodInfo, comparison_table, table_markdown

__all__ = ["MethodInfo", "ReportContent", "comparison_table", "dice_boxplot", "lung_area_histogram", "overlay_grid",
           "table_markdown", "training_curves", "write_report"]
