"""Uncertainty from prompt perturbation: K jittered copies of an image's prompts decoded against its one cached
embedding (decoder passes only, no encoder), and how much their masks disagree.

Rules (:func:`prompt_uncertainty`):

* every prompt set is copied K times; each copy's box gets :func:`cxrsam.prompts.boxes.adjust_box` jitter
  (Gaussian, std ``jitter`` x the box side, truncated at 2 std) and each point Gaussian noise with std ``jitter``
  x the side of its set's box (of the image without a box), clipped to the image; a set's previous-result logits
  (the mask prompt of an interactive round) are kept as they are; seeded per image;
* per pixel, with p = fraction of the K copies whose mask (union of its sets) covers it, the disagreement is
  ``1 - |2p - 1|``: 0 where all copies agree, 1 where half of them cover the pixel;
* per prompt set (a lung in the default ``per_lung`` box mode): the mean of that set's own disagreement over
  the pixels any of its copies covers (0 when all copies agree exactly).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cxrsam.prompts import Prompts, PromptSet
from cxrsam.prompts.boxes import adjust_box
from cxrsam.prompts.spec import image_seed
from cxrsam.sam.engine import SamEngine

DEFAULT_JITTER = 0.05
"""Default perturbation: std of 5 % of the box side per coordinate (SAM's own training jitter is ~10 %)."""
DECODE_PIXELS = 1 << 25
"""Most logits (float32, original size, all sets) one batched decoder call of the uncertainty returns: 128 MiB."""


@dataclass
class Uncertainty:
    """Prompt-perturbation uncertainty of one image.

    Attributes:
        disagreement: float32 (H, W) in [0, 1] (0 = all perturbed masks agree).
        per_set: mean disagreement (0-1) over each prompt set's covered pixels, in prompt-set order.
        samples: K, the perturbed copies decoded.
        jitter: std of the perturbation as a fraction of the box side.
        seconds: wall time of the K decodes and the maps.
    """

    disagreement: np.ndarray
    per_set: list[float]
    samples: int
    jitter: float
    seconds: float

    @property
    def score(self) -> float:
        """The largest per-set disagreement (the quality flag's signal)."""
        return max(self.per_set, default=0.0)

    def to_json(self) -> dict:
        """The ``uncertainty`` object of the JSON record."""
        return {"samples": self.samples, "jitter": self.jitter, "per_prompt_set": [round(v, 4) for v in self.per_set],
                "max": round(self.score, 4), "mean_disagreement": round(float(self.disagreement.mean()), 5),
                "seconds": round(self.seconds, 4)}


def perturb(prompts: Prompts, jitter: float, rng: np.random.Generator) -> Prompts:
    """One jittered copy of ``prompts`` (every set's box and points moved; see the module docstring)."""
    h, w = prompts.image_size
    sets = []
    for s in prompts.sets:
        box = None if s.box is None else adjust_box(s.box, (h, w), jitter=jitter, rng=rng)
        points = None
        if s.points is not None:
            side = np.array([w, h], np.float64) if s.box is None else s.box[2:] - s.box[:2] + 1
            noise = np.clip(rng.standard_normal(s.points.shape), -2, 2) * jitter * side
            points = np.clip(s.points + noise, 0, [w - 1, h - 1]).astype(np.float32)
        sets.append(PromptSet(box, points, None if s.labels is None else s.labels.copy(), s.logits))
    return Prompts(sets, prompts.image_size, prompts.mode, prompts.components_found)


def _disagreement(counts: np.ndarray, samples: int) -> np.ndarray:
    """Votes (H, W) out of ``samples`` -> disagreement ``1 - |2p - 1|`` float32 (H, W) in [0, 1]."""
    return (1.0 - np.abs(2.0 * counts.astype(np.float32) / samples - 1.0)).astype(np.float32)


def prompt_uncertainty(engine: SamEngine, embedding: np.ndarray, prompts: Prompts, samples: int,
                       jitter: float = DEFAULT_JITTER, seed: int = 0, stem: str = "", multimask: bool = False
                       ) -> Uncertainty:
    """Disagreement of ``samples`` (K >= 2) perturbed decodes of ``prompts`` against one image's ``embedding``
    (C, h, w); seeded by ``seed`` and the image ``stem``. See the module docstring for the rules. The K copies are
    decoded together, in calls of at most :data:`DECODE_PIXELS` logits at the original size (memory: those logits
    plus vote counts (P + 1, H, W))."""
    if samples < 2:
        raise ValueError(f"prompt uncertainty needs at least 2 samples, got {samples}")
    started = time.perf_counter()
    rng = np.random.default_rng(image_seed(seed, stem))
    n_sets = len(prompts.sets)
    set_votes = np.zeros((n_sets, *prompts.image_size), np.int32)
    union_votes = np.zeros(prompts.image_size, np.int32)
    copies = [perturb(prompts, jitter, rng) for _ in range(samples)]
    per_call = max(1, DECODE_PIXELS // (n_sets * union_votes.size))
    for start in range(0, samples, per_call):  # the copies' sets share decoder calls
        chunk = copies[start:start + per_call]
        together = Prompts([s for copy in chunk for s in copy.sets], prompts.image_size, prompts.mode,
                           prompts.components_found)
        masks = engine.decode_logits(embedding, together, multimask) > engine.threshold
        for sample in masks.reshape(len(chunk), n_sets, *prompts.image_size):
            set_votes += sample
            union_votes += sample.any(axis=0)
    per_set = []
    for votes in set_votes:
        covered = votes > 0
        per_set.append(float(_disagreement(votes, samples)[covered].mean()) if covered.any() else 0.0)
    return Uncertainty(_disagreement(union_votes, samples), per_set, samples, jitter, time.perf_counter() - started)
