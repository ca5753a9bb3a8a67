"""Evaluate a folder of predicted masks against a folder of ground-truth masks."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsam.data.io import list_images, read_mask
from cxrsam.errors import CxrsamError
from cxrsam.evaluation.metrics import METRICS, segmentation_metrics
from cxrsam.evaluation.stats import summarize
from cxrsam.files import atomic_path

log = logging.getLogger(__name__)


def evaluate_masks(preds: dict[str, np.ndarray | None], gts: dict[str, np.ndarray],
                   spacings: dict[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """Per-image metrics: one row per ground-truth name, columns ``name`` + :data:`METRICS` + ``empty_flag``.

    A missing prediction (absent or None) scores Dice/IoU/precision/recall 0 and NaN distances, flagged
    ``"missing"``. When a prediction has another size than its ground truth, the **ground truth is resized
    to the prediction** (nearest neighbour): predictions are made at the image's own size, and masks of
    another size (the COVID-19 Radiography Database's 256x256 masks for 299x299 images) are brought to the
    image the same way for training and for the experiment's evaluation, so every score is computed on
    the same grid (resizing the prediction down instead costs about 0.02 Dice on that data).
    """
    rows, warned = [], False
    for name in sorted(gts):
        gt = gts[name]
        pred = preds.get(name)
        if pred is None:
            rows.append({"name": name, "dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                         "hd95": math.nan, "assd": math.nan, "empty_flag": "missing"})
            continue
        if pred.shape != gt.shape:
            if not warned:
                log.warning("ground truth of another size than its prediction is resized to the prediction "
                            "(nearest neighbour), e.g. %s: %s -> %s", name, gt.shape, pred.shape)
                warned = True
            from cxrsam.data.io import resize_mask

            gt = resize_mask(gt, pred.shape)
        rows.append({"name": name, **segmentation_metrics(pred, gt, (spacings or {}).get(name))})
    frame = pd.DataFrame(rows)
    cols = ["name", *METRICS, *[c for c in frame.columns if c not in ("name", *METRICS)]]
    return frame[cols] if len(frame) else pd.DataFrame(columns=["name", *METRICS, "empty_flag"])


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Match masks by file stem and score them; returns (per-image table, names missing a prediction)."""
    gt_files = {p.stem.removesuffix("_mask"): p for p in list_images(gt_dir)}
    if not gt_files:
        raise CxrsamError("no ground-truth masks found", path=gt_dir)
    pred_files = {p.stem.removesuffix("_mask"): p for p in list_images(pred_dir)}
    gts = {name: read_mask(path) for name, path in gt_files.items()}
    preds = {name: read_mask(pred_files[name]) for name in gts if name in pred_files}
    missing = sorted(set(gts) - set(preds))
    return evaluate_masks(preds, gts), missing


def summary_table(frame: pd.DataFrame, metrics: tuple[str, ...] = METRICS, seed: int = 0) -> pd.DataFrame:
    """One row per metric: mean, std, median, 95 % bootstrap CI, n."""
    return pd.DataFrame([{"metric": m, **summarize(frame[m].to_numpy(dtype=float), seed=seed)}
                         for m in metrics if m in frame])


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as CSV atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return path
