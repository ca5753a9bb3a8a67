"""Evaluate a folder of predicted masks against a folder of ground-truth masks."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsam.data.io import aspect_differs, list_images, read_mask
from cxrsam.errors import CxrsamError
from cxrsam.evaluation.metrics import METRICS, segmentation_metrics
from cxrsam.evaluation.stats import summarize
from cxrsam.files import atomic_path

log = logging.getLogger(__name__)


def evaluate_masks(preds: dict[str, np.ndarray | None], gts: dict[str, np.ndarray],
                   spacings: dict[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """Per-image metrics: one row per ground-truth name, columns ``name`` + :data:`METRICS` + ``empty_flag``.

    A missing prediction (absent or None) scores Dice/IoU/precision/recall 0 and NaN distances, flagged
    ``"missing"``. When a prediction has another size than its ground truth (of the same aspect ratio:
    :func:`evaluate_dirs` refuses another one), the **ground truth is resized to the prediction** (nearest
    neighbour): predictions are made at the image's own size, and masks of another size (the COVID-19
    Radiography Database's 256x256 masks for 299x299 images) are brought to the image the same way for
    training and for the experiment's evaluation, so every score is computed on the same grid (resizing the
    prediction down instead costs about 0.02 Dice on that data).
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


@dataclass
class FolderEvaluation:
    """What :func:`evaluate_dirs` did.

    Attributes:
        frame: per-image metrics (:func:`evaluate_masks`) of every ground truth that was scored.
        missing: names without a prediction (scored Dice 0, flagged ``missing``).
        refused: one line per name that was not scored, naming the file(s) at fault: two files with
            the same name, a prediction of another aspect ratio than its ground truth, an unreadable mask.
    """

    frame: pd.DataFrame
    missing: list[str]
    refused: list[str]


def _masks_by_name(folder: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Mask files of ``folder`` by name (stem without ``_mask``), and the names that two or more files share
    (``x.png`` and ``x_mask.png``, ``x.png`` and ``x.tif``) with a line naming those files."""
    groups: dict[str, list[Path]] = {}
    for path in list_images(folder):
        groups.setdefault(path.stem.removesuffix("_mask"), []).append(path)
    unique = {name: paths[0] for name, paths in groups.items() if len(paths) == 1}
    shared = {name: str(CxrsamError(f"has the same name {name!r} as {', '.join(map(str, paths[1:]))}; "
                                    "rename or remove one of them", path=paths[0]))
              for name, paths in groups.items() if len(paths) > 1}
    return unique, shared


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path) -> FolderEvaluation:
    """Match masks by name (file stem, ``_mask`` removed) and score them.

    A prediction of another size but the same aspect ratio (within :data:`~cxrsam.data.io.ASPECT_TOLERANCE`)
    is scored with its ground truth resized to it (:func:`evaluate_masks`); another aspect ratio, a name that
    two files share (in either folder) or an unreadable mask is refused for that name, and the others are
    scored.
    """
    gt_files, refused = _masks_by_name(gt_dir)
    if not gt_files and not refused:
        raise CxrsamError("no ground-truth masks found", path=gt_dir)
    pred_files, pred_shared = _masks_by_name(pred_dir)
    refused.update({name: line for name, line in pred_shared.items() if name in gt_files})
    gts, preds = {}, {}
    for name, gt_path in gt_files.items():
        if name in refused:
            continue
        try:
            gt = read_mask(gt_path)
            if name in pred_files:
                pred = read_mask(pred_files[name])
                if aspect_differs(pred.shape, gt.shape):
                    raise CxrsamError(f"prediction is {pred.shape[1]}x{pred.shape[0]} but its ground truth {gt_path} "
                                      f"is {gt.shape[1]}x{gt.shape[0]} (another aspect ratio)", path=pred_files[name])
                preds[name] = pred
            gts[name] = gt
        except CxrsamError as exc:
            refused[name] = str(exc)
    missing = sorted(set(gts) - set(preds))
    return FolderEvaluation(evaluate_masks(preds, gts), missing, [refused[name] for name in sorted(refused)])


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
