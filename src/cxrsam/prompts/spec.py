"""The one validated description of how draft masks become SAM prompts (:class:`PromptSpec`).

Every stage that prompts SAM from drafts (``predict``, ``zero-shot``, the app, fine-tuning's validation and the
experiment) takes a :class:`PromptSpec`, and every output records it, so model selection and evaluation always
use the same prompts.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cxrsam.prompts.components import DEFAULT_MIN_AREA_FRAC
from cxrsam.prompts.modes import BoxMode, NegativeKind, PointStrategy, PromptMode
from cxrsam.prompts.prompts import Prompts, prompts_from_mask


def image_seed(seed: int, stem: str) -> list[int]:
    """Seed sequence of one image's prompts: from ``seed`` and the image's stem, independent of file order."""
    return [seed, int.from_bytes(hashlib.sha256(stem.encode()).digest()[:4], "big")]


class PromptSpec(BaseModel):
    """Prompt rules from a draft mask (:func:`~cxrsam.prompts.prompts_from_mask`) plus SAM's decoder choice."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: PromptMode = Field(PromptMode.BOX, description="box | points | box+points")
    box_mode: BoxMode = Field(BoxMode.PER_LUNG, description="per_lung (masks merged) | enclosing")
    points_per_lung: int = Field(3, ge=1, description="Positive points per lung")
    strategy: PointStrategy = Field(PointStrategy.DISTANCE, description="Point placement")
    negatives: tuple[NegativeKind, ...] = Field((), description="Kinds of negative (background) points")
    margin: float = Field(0.0, description="Pixels added to every box side")
    min_area_frac: float = Field(DEFAULT_MIN_AREA_FRAC, gt=0, lt=1,
                                 description="Smallest lung component, fraction of the image area")
    multimask: bool = Field(False, description="Keep the best of SAM's 3 candidates by predicted IoU")
    seed: int = Field(0, description="Seed of random point strategies (each image draws from it and its stem)")

    def prompts(self, draft: np.ndarray, stem: str) -> Prompts:
        """The prompt sets of one image's draft mask bool (H, W), in its original pixels (seeded by ``stem``)."""
        return prompts_from_mask(draft, mode=self.mode.value, box_mode=self.box_mode.value,
                                 points_per_lung=self.points_per_lung, strategy=self.strategy.value,
                                 negatives=[n.value for n in self.negatives], margin=self.margin,
                                 min_area_frac=self.min_area_frac,
                                 rng=np.random.default_rng(image_seed(self.seed, stem)))
