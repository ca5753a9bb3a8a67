"""The comparison table: one row per method over the same test images."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrsam.evaluation.stats import paired_comparison, summarize

TABLE_METRICS = ("dice", "iou", "precision", "recall", "hd95")
VS_REFERENCE = ("dice_diff_vs_reference", "dice_diff_ci_low", "dice_diff_ci_high", "images_better", "images_worse",
                "p_vs_reference")
"""Columns of the paired per-image Dice comparison with the reference (NaN on the reference's own row)."""


@dataclass
class MethodInfo:
    """What is known about a method besides its per-image scores.

    Attributes:
        name: display name, e.g. ``"Zero-shot SAM, box (U-Net drafts)"``.
        params_total: parameters of everything that runs at inference (CNN + SAM where drafts are used).
        params_trainable: parameters trained for this method (0 for zero-shot).
        train_seconds: wall time of training (0 when nothing was trained).
        infer_seconds_per_image: wall time per test image of this method's own stage.
        peak_memory_mb: peak memory of the inference stage (GPU allocator peak, else process RSS).
    """

    name: str
    params_total: int = 0
    params_trainable: int = 0
    train_seconds: float = 0.0
    infer_seconds_per_image: float = math.nan
    peak_memory_mb: float = math.nan


def comparison_table(per_image: pd.DataFrame, methods: list[MethodInfo], reference: str | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """Summarise per-image results (columns ``method``, ``name`` + metrics) into one row per method.

    Each metric gets ``<m>_mean``, ``<m>_std``, ``<m>_ci_low``, ``<m>_ci_high``. Against ``reference``
    (images matched by name) the columns :data:`VS_REFERENCE` hold
    :func:`cxrsam.evaluation.stats.paired_comparison` of per-image Dice: the mean difference (method minus
    reference) with its 95 % bootstrap CI, the images better / worse and the paired Wilcoxon p-value.
    """
    rows = []
    ref = per_image[per_image["method"] == reference].set_index("name")["dice"] if reference else None
    for info in methods:
        part = per_image[per_image["method"] == info.name]
        row: dict[str, object] = {"method": info.name, "n": len(part)}
        for metric in TABLE_METRICS:
            s = summarize(part[metric].to_numpy(dtype=float), seed=seed)
            row.update({f"{metric}_mean": s["mean"], f"{metric}_std": s["std"],
                        f"{metric}_ci_low": s["ci_low"], f"{metric}_ci_high": s["ci_high"]})
        if ref is not None and info.name != reference:
            mine = part.set_index("name")["dice"]
            common = mine.index.intersection(ref.index)
            c = paired_comparison(mine[common].to_numpy(), ref[common].to_numpy(), seed=seed)
            row.update(zip(VS_REFERENCE, (c.mean_diff, c.ci_low, c.ci_high, c.n_better, c.n_worse, c.p), strict=True))
        else:
            row.update(dict.fromkeys(VS_REFERENCE, math.nan))
        row.update(params_total=info.params_total, params_trainable=info.params_trainable,
                   train_seconds=info.train_seconds, infer_seconds_per_image=info.infer_seconds_per_image,
                   peak_memory_mb=info.peak_memory_mb)
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(row: pd.Series, metric: str, digits: int) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if mean != mean:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std == std else f"{mean:.{digits}f}"


def _ci(row: pd.Series, metric: str, digits: int) -> str:
    lo, hi = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    return "n/a" if lo != lo else f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _number(value: float, spec: str) -> str:
    return "n/a" if value != value else format(value, spec)


def _count(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{int(n):,}"


def display_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparison table (shared by Markdown, HTML and rich)."""
    header = ["Method", "Dice", "Dice 95% CI", "IoU", "Precision", "Recall", "HD95 (px)", "p (Dice vs ref.)",
              "Params total", "Params trained", "Train time (s)", "Inference (s/img)", "Peak mem (MB)"]
    rows = []
    for _, r in table.iterrows():
        p = r["p_vs_reference"]
        rows.append([
            str(r["method"]), _pm(r, "dice", 4), _ci(r, "dice", 4), _pm(r, "iou", 4), _pm(r, "precision", 4),
            _pm(r, "recall", 4), _pm(r, "hd95", 2), "ref." if p != p else f"{p:.2g}", _count(r["params_total"]),
            _count(r["params_trainable"]), f"{r['train_seconds']:.0f}",
            _number(r["infer_seconds_per_image"], ".3f"), _number(r["peak_memory_mb"], ".0f"),
        ])
    return header, rows


def table_markdown(table: pd.DataFrame) -> str:
    """The comparison table as a GitHub-flavoured Markdown table."""
    header, rows = display_rows(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def quality_note(pred_dirs: dict[str, Path], stems: Sequence[str]) -> str | None:
    """One Markdown line: per method, how many test images the pipeline's quality flags sent to review (from the
    ``quality.status`` of each ``<stem>.json`` beside the masks) and the most frequent flags; None without JSONs."""
    parts = []
    for method, folder in pred_dirs.items():
        statuses, flags = [], Counter()
        for stem in stems:
            path = Path(folder) / f"{stem}.json"
            quality = json.loads(path.read_text()).get("quality") if path.is_file() else None
            if quality:
                statuses.append(quality["status"])
                flags.update(r["flag"] for r in quality["reasons"])
        if statuses:
            top = ", ".join(f"{flag} {n}" for flag, n in flags.most_common(3))
            parts.append(f"{method}: {statuses.count('review')}/{len(statuses)}" + (f" ({top})" if top else ""))
    return None if not parts else "Quality flags (test images sent to review / images; most frequent flags): " \
        + "; ".join(parts) + "."
