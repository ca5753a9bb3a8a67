"""Scoring many prompt variants of zero-shot SAM against ground truth, each image encoded once (the bench
scripts' tool for choosing prompt rules on validation images)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from cxrsam.data.io import XRay
from cxrsam.evaluation.metrics import dice_score
from cxrsam.prompts import image_seed, prompts_from_mask
from cxrsam.sam.engine import SamEngine


def dice_by_prompt_variant(engine: SamEngine, xrays: Sequence[XRay], truths: Sequence[np.ndarray],
                           drafts: Mapping[str, Sequence[np.ndarray]], variants: Mapping[str, Mapping],
                           only: Mapping[str, Collection[str]] | None = None, seed: int = 0,
                           progress: bool = True,
                           weights: Mapping[str, Sequence[np.ndarray]] | None = None) -> pd.DataFrame:
    """Dice of SAM masks for every (draft source, prompt variant) pair, each image encoded once.

    Args:
        engine: the SAM engine.
        xrays: images.
        truths: ground-truth masks bool (H, W), one per image.
        drafts: draft source name (``ground truth``, a CNN run, ...) -> one draft mask per image.
        variants: variant name -> keyword arguments of :func:`~cxrsam.prompts.prompts_from_mask`,
            plus ``multimask`` (bool) for the decoder.
        only: draft source -> the variant names to score for it (default: all variants).
        seed: prompt seed (each image draws from ``seed`` and its stem).
        weights: draft source -> one foreground probability map float32 (H, W) per image, the weight of
            ``probability`` points and random negatives (sources without one: the draft mask).

    Returns:
        one row per image, source and variant: ``stem, source, variant, dice, components``.
    """
    from rich.progress import Progress

    rows = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("SAM prompt variants", total=len(xrays))
        for start in range(0, len(xrays), engine.batch_size):
            chunk = range(start, min(start + engine.batch_size, len(xrays)))
            engine.embed([xrays[i] for i in chunk])
            for i in chunk:
                stem = xrays[i].path.stem
                for source, masks in drafts.items():
                    for variant, options in variants.items():
                        if only is not None and source in only and variant not in only[source]:
                            continue
                        options = dict(options)
                        multimask = bool(options.pop("multimask", False))
                        weight = None if weights is None or source not in weights else weights[source][i]
                        prompts = prompts_from_mask(masks[i], rng=np.random.default_rng(image_seed(seed, stem)),
                                                    weight=weight, **options)
                        mask = engine.segment(xrays[i], prompts, multimask=multimask)
                        rows.append({"stem": stem, "source": source, "variant": variant,
                                     "dice": dice_score(mask, truths[i]), "components": prompts.components_found})
                bar.advance(task)
    return pd.DataFrame(rows, columns=["stem", "source", "variant", "dice", "components"])
