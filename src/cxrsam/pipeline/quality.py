"""Quality flags of one segmentation: signals we already have, checked against :class:`QualityThresholds`.

Signals (all unitless; :func:`quality_signals`):

* ``draft_dice``: Dice between the draft the prompts came from and SAM's mask (None without a draft or SAM);
  SAM and the CNN disagreeing means one of them is wrong.
* ``predicted_iou``: SAM's own predicted IoU of each prompt set's mask (image-left lung first; None without SAM).
* ``lung_components``: components of the mask with at least 0.5 % of the image (a lung is 8-20 %).
* ``area_fraction``: mask pixels / image pixels, against the range seen in the training masks.
* ``lung_ratio``: smaller / larger lung area in (0, 1] (None with fewer than two lungs).
* ``border_contact``: fraction of the image's outer frame (a band of 1 % of the shorter side) covered by the
  mask; a lung running along the image edge is cut off or spilled out of the chest.
* ``uncertainty``: the largest per-lung prompt-perturbation disagreement
  (:mod:`cxrsam.pipeline.uncertainty`; None when off).

:func:`assess` turns them into ``ok`` or ``review`` with one reason per failed rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxrsam.evaluation.metrics import dice_score
from cxrsam.prompts.components import DEFAULT_MIN_AREA_FRAC, lung_components

BORDER_BAND_FRAC = 0.01
"""Width of the image frame checked by ``border_contact``: 1 % of the shorter side (at least 1 pixel)."""


class QualityStatus(StrEnum):
    """``ok``: no rule fired; ``review``: at least one did (a person should look at the mask)."""

    OK = "ok"
    REVIEW = "review"


class Flag(StrEnum):
    """Why a segmentation needs review (one per rule of :func:`assess`)."""

    DRAFT_DISAGREEMENT = "draft_disagreement"
    LOW_PREDICTED_IOU = "low_predicted_iou"
    LUNG_COUNT = "lung_count"
    AREA_OUT_OF_RANGE = "area_out_of_range"
    LUNG_RATIO = "lung_ratio"
    TOUCHES_BORDER = "touches_border"
    UNCERTAIN = "uncertain"


class QualityThresholds(BaseModel):
    """When a segmentation is flagged for review. Defaults were chosen on the validation split of the COVID-19
    Radiography Database, U-Net drafts and deliberately degraded ones pooled (``bench/quality_flags.py``;
    docs/results.md, "Quality flags"); all values unitless."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_draft_dice: float = Field(0.0, ge=0, le=1, description="Least Dice between the draft and SAM's mask "
                                  "(0 = off: on validation it caught nothing the other rules missed)")
    min_predicted_iou: float = Field(0.926, ge=0, le=1, description="Least SAM-predicted IoU of any prompt set")
    lungs: int = Field(2, ge=1, description="Lung components expected (each at least 0.5 % of the image)")
    min_area_fraction: float = Field(0.119, ge=0, le=1, description="Least lung area / image area (training 0.5 %)")
    max_area_fraction: float = Field(0.387, ge=0, le=1, description="Largest lung area / image area (training 99.5 %)")
    min_lung_ratio: float = Field(0.0, ge=0, le=1, description="Least smaller / larger lung area (0 = off)")
    max_border_contact: float = Field(1.0, ge=0, le=1, description="Largest fraction of the image frame on a lung "
                                      "(1 = off: on validation it caught nothing the other rules missed)")
    max_uncertainty: float = Field(1.0, ge=0, le=1, description="Largest per-lung prompt disagreement (1 = off: on "
                                   "validation, at K = 4, it added no catch within the false-alarm budget)")

    @model_validator(mode="after")
    def _ordered(self) -> QualityThresholds:
        if self.min_area_fraction > self.max_area_fraction:
            raise ValueError("min_area_fraction must not exceed max_area_fraction")
        return self


@dataclass
class QualitySignals:
    """The measured signals (see the module docstring); None = not available for this image."""

    draft_dice: float | None
    predicted_iou: list[float] | None
    lung_components: int
    area_fraction: float
    lung_ratio: float | None
    border_contact: float
    uncertainty: float | None = None


@dataclass
class Reason:
    """One fired rule: its flag and a one-line message with the value and the threshold."""

    flag: Flag
    message: str


@dataclass
class Quality:
    """``status`` with the ``reasons`` (empty when ok), the ``signals`` and the ``thresholds`` used."""

    status: QualityStatus
    reasons: list[Reason]
    signals: QualitySignals
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)

    @property
    def flags(self) -> list[Flag]:
        """The fired rules, in rule order."""
        return [r.flag for r in self.reasons]

    def to_json(self) -> dict[str, Any]:
        """The ``quality`` object of the JSON record."""
        signals = {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, list) else v)
                   for k, v in asdict(self.signals).items()}
        return {"status": self.status.value, "reasons": [{"flag": r.flag.value, "message": r.message}
                                                         for r in self.reasons],
                "signals": signals, "thresholds": self.thresholds.model_dump(mode="json")}


def border_contact(mask: np.ndarray, band_frac: float = BORDER_BAND_FRAC) -> float:
    """Fraction (0-1) of the outer frame of a bool mask (H, W), ``band_frac`` of the shorter side wide, that is mask."""
    mask = np.asarray(mask, dtype=bool)
    band = max(1, round(band_frac * min(mask.shape)))
    frame = np.ones_like(mask)
    frame[band:-band, band:-band] = False
    return float(mask[frame].mean())


def quality_signals(mask: np.ndarray, draft: np.ndarray | None = None, predicted_iou: Sequence[float] | None = None,
                    uncertainty: float | None = None, min_area_frac: float = DEFAULT_MIN_AREA_FRAC) -> QualitySignals:
    """Signals of a bool lung mask (H, W), with the draft bool (H, W) it was prompted from (None: no draft or no
    SAM stage), SAM's predicted IoU per prompt set and the largest per-lung uncertainty (None: not measured)."""
    mask = np.asarray(mask, dtype=bool)
    components, found = lung_components(mask, min_area_frac)
    areas = sorted(int(c.sum()) for c in components)
    return QualitySignals(
        draft_dice=None if draft is None else float(dice_score(mask, np.asarray(draft, dtype=bool))),
        predicted_iou=None if predicted_iou is None else [float(v) for v in predicted_iou],
        lung_components=int(found),
        area_fraction=float(mask.mean()),
        lung_ratio=areas[0] / areas[1] if len(areas) == 2 else None,
        border_contact=border_contact(mask),
        uncertainty=None if uncertainty is None else float(uncertainty))


def assess(signals: QualitySignals, thresholds: QualityThresholds | None = None) -> Quality:
    """``review`` with a reason per fired rule, else ``ok``. Rules (signals that are None are skipped):
    draft Dice below ``min_draft_dice``; any predicted IoU below ``min_predicted_iou``; lung components other
    than ``lungs``; area fraction outside [``min_area_fraction``, ``max_area_fraction``]; lung ratio below
    ``min_lung_ratio``; border contact above ``max_border_contact``; uncertainty above ``max_uncertainty``."""
    t = thresholds or QualityThresholds()
    s = signals
    reasons: list[Reason] = []
    if s.draft_dice is not None and s.draft_dice < t.min_draft_dice:
        reasons.append(Reason(Flag.DRAFT_DISAGREEMENT,
                              f"Dice(draft, SAM mask) {s.draft_dice:.3f} < {t.min_draft_dice:g}"))
    if s.predicted_iou and min(s.predicted_iou) < t.min_predicted_iou:
        reasons.append(Reason(Flag.LOW_PREDICTED_IOU,
                              f"SAM predicted IoU {min(s.predicted_iou):.3f} < {t.min_predicted_iou:g}"))
    if s.lung_components != t.lungs:
        reasons.append(Reason(Flag.LUNG_COUNT, f"{s.lung_components} lung component(s), expected {t.lungs}"))
    if not t.min_area_fraction <= s.area_fraction <= t.max_area_fraction:
        reasons.append(Reason(Flag.AREA_OUT_OF_RANGE, f"lung area {100 * s.area_fraction:.1f} % of the image, "
                              f"outside {100 * t.min_area_fraction:g}-{100 * t.max_area_fraction:g} %"))
    if s.lung_ratio is not None and s.lung_ratio < t.min_lung_ratio:
        reasons.append(Reason(Flag.LUNG_RATIO, f"smaller/larger lung area {s.lung_ratio:.2f} < {t.min_lung_ratio:g}"))
    if s.border_contact > t.max_border_contact:
        reasons.append(Reason(Flag.TOUCHES_BORDER, f"mask covers {100 * s.border_contact:.1f} % of the image border "
                              f"(> {100 * t.max_border_contact:g} %)"))
    if s.uncertainty is not None and s.uncertainty > t.max_uncertainty:
        reasons.append(Reason(Flag.UNCERTAIN, f"prompt-perturbation disagreement {s.uncertainty:.3f} > "
                              f"{t.max_uncertainty:g}"))
    return Quality(QualityStatus.REVIEW if reasons else QualityStatus.OK, reasons, signals, t)
