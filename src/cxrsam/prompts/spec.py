"""The one validated description of how draft masks become SAM prompts (:class:`PromptSpec`).

Every stage that prompts SAM from drafts (``predict``, ``zero-shot``, the app, fine-tuning's validation and the
experiment) takes a :class:`PromptSpec`, and every output records it, so model selection and evaluation always
use the same prompts.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxrsam.prompts.components import DEFAULT_MIN_AREA_FRAC, lung_components
from cxrsam.prompts.corrections import corrected_set
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
    points_per_lung: int = Field(3, ge=1, description="Positive points per lung (distance, kmeans, random)")
    strategy: PointStrategy = Field(PointStrategy.DISTANCE, description="Point placement")
    points: int | None = Field(None, ge=1, description="Positive points per image (probability strategy only)")
    negatives: tuple[NegativeKind, ...] = Field((), description="Kinds of negative (background) points")
    random_negatives: int = Field(0, ge=0, description="Negatives drawn from the low-probability region")
    margin: float = Field(0.0, description="Pixels added to every box side")
    min_area_frac: float = Field(DEFAULT_MIN_AREA_FRAC, gt=0, lt=1,
                                 description="Smallest lung component, fraction of the image area")
    multimask: bool = Field(False, description="Keep the best of SAM's 3 candidates by predicted IoU")
    seed: int = Field(0, description="Seed of random point strategies (each image draws from it and its stem)")

    @model_validator(mode="after")
    def _check_points(self) -> PromptSpec:
        if self.strategy == PointStrategy.PROBABILITY and self.points is None:
            raise ValueError("the probability strategy needs points per image (--points N)")
        if self.strategy != PointStrategy.PROBABILITY and self.points is not None:
            raise ValueError("points per image (--points) go with the probability strategy; "
                             "other strategies take points per lung")
        return self

    @property
    def uses_weight(self) -> bool:
        """Whether the prompts depend on the draft's foreground probability, not only on its mask."""
        return self.mode != PromptMode.BOX and (self.strategy == PointStrategy.PROBABILITY
                                               or self.random_negatives > 0)

    def prompts(self, draft: np.ndarray, stem: str, weight: np.ndarray | None = None) -> Prompts:
        """The prompt sets of one image's draft mask bool (H, W), in its original pixels (seeded by ``stem``);
        ``weight``: the draft's foreground probability float32 (H, W) (None: the mask)."""
        return prompts_from_mask(draft, mode=self.mode.value, box_mode=self.box_mode.value,
                                 points_per_lung=self.points_per_lung, strategy=self.strategy.value,
                                 negatives=[n.value for n in self.negatives], margin=self.margin,
                                 min_area_frac=self.min_area_frac, points=self.points,
                                 random_negatives=self.random_negatives, weight=weight,
                                 rng=np.random.default_rng(image_seed(self.seed, stem)))


class PromptMixture(BaseModel):
    """The prompt of each fine-tuning example drawn from a mixture (``train_prompt="mixed"``), as interactive
    SAM training does (SAM-Med2D, MedSAM2, micro-sam): a kind by ``weights``; points (positives per image
    uniform in [``min_points``, ``max_points``], drawn by the probability rule with the truth mask as the
    weight) plus negatives uniform in [0, ``max_negatives``] from the background near the lungs; boxes jittered.
    A share ``corrections`` of the examples instead gets a visibly wrong box per lung with the clicks that correct it
    (:func:`cxrsam.prompts.corrections.corrected_set`), so that clicks outside or inside the box act. A share
    ``interactive`` of the examples is trained as a user refines a result (SAM-Med2D, micro-sam): fine-tuning decodes
    the drawn prompt once without gradient, adds the click on that result's own largest error
    (:func:`cxrsam.prompts.corrections.error_click`) and learns from the second pass; with ``click_rounds`` > 1 an
    interactive example gets 1..``click_rounds`` such rounds (uniform), each clicking the previous round's result,
    and with ``previous_mask`` every round after the first is also given the previous round's logits as SAM's mask
    prompt, as SAM's own interactive training and inference loop do; with ``first_round_loss`` an interactive example
    also learns from its first round (the drawn prompt alone), not only from its last.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[PromptMode, float] = Field(
        default_factory=lambda: {PromptMode.BOX: 1.0, PromptMode.POINTS: 1.0, PromptMode.BOX_POINTS: 1.0},
        description="Relative frequency of each prompt kind")
    min_points: int = Field(2, ge=2, description="Fewest positive points per image (one per lung at least, so "
                                                 "every lung keeps its prompt set and target)")
    max_points: int = Field(105, ge=1, description="Most positive points per image")
    max_negatives: int = Field(10, ge=0, description="Most negative points per image")
    corrections: float = Field(0.0, ge=0, le=1, description="Share of examples given a wrong box per lung and the "
                                                             "clicks that correct it (0: none)")
    max_clicks: int = Field(3, ge=1, description="Most positive clicks of a correction")
    interactive: float = Field(0.0, ge=0, le=1, description="Share of examples given one more click on the model's "
                                                             "own error after a first pass (0: none)")
    click_rounds: int = Field(1, ge=1, description="Most click rounds of an interactive example (each adds one click "
                                                   "on the previous round's largest error)")
    previous_mask: bool = Field(False, description="Give every round after the first the previous round's logits as "
                                                   "SAM's mask prompt (the model is then served that way)")
    first_round_loss: bool = Field(False, description="Interactive examples also learn from their first round (the "
                                                      "drawn prompt alone; SAM takes a loss on every round)")

    @model_validator(mode="after")
    def _check(self) -> PromptMixture:
        if self.max_points < self.min_points:
            raise ValueError(f"max_points {self.max_points} < min_points {self.min_points}")
        if not self.weights or min(self.weights.values()) < 0 or sum(self.weights.values()) <= 0:
            raise ValueError("mixture weights must be >= 0 with a positive sum")
        return self

    def draw(self, truth: np.ndarray, rng: np.random.Generator, jitter: float = 0.0) -> Prompts:
        """One example's prompts (one set per lung) from its truth mask bool (H, W), drawn from ``rng``."""
        if self.corrections and rng.random() < self.corrections:
            prompts = prompts_from_mask(truth, mode=PromptMode.BOX.value, jitter=jitter, rng=rng)
            lungs, _ = lung_components(truth)  # the sets' lungs, in their order
            every = np.any(lungs, axis=0) if lungs else truth
            prompts.sets = [corrected_set(lung, every, s.box, rng, self.max_clicks)
                            for lung, s in zip(lungs, prompts.sets)]
            prompts.mode = PromptMode.BOX_POINTS.value
            return prompts
        kinds = list(self.weights)
        p = np.array([self.weights[k] for k in kinds], dtype=np.float64)
        mode = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        points = int(rng.integers(self.min_points, self.max_points + 1))
        negatives = int(rng.integers(0, self.max_negatives + 1))
        return prompts_from_mask(truth, mode=mode.value, strategy=PointStrategy.PROBABILITY.value, points=points,
                                 random_negatives=negatives, jitter=jitter, rng=rng)
