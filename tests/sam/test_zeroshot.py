"""dice_by_prompt_variant: many prompt variants scored against ground truth, each image encoded once."""

from __future__ import annotations

import numpy as np

from cxrsam.data.io import list_images, read_image, read_mask
from cxrsam.evaluation.metrics import dice_score
from cxrsam.prompts import image_seed, prompts_from_mask
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.registry import build_sam
from cxrsam.sam.testing import tiny_spec


def test_dice_by_prompt_variant_encodes_each_image_once(tiny_checkpoint, phantoms):
    from cxrsam.sam.zeroshot import dice_by_prompt_variant

    engine = SamEngine(build_sam(tiny_spec(), checkpoint=tiny_checkpoint))
    paths = list_images(phantoms / "images")[:3]
    xrays = [read_image(p) for p in paths]
    truths = [read_mask(phantoms / "masks" / p.name) for p in paths]
    variants = {"box": {"mode": "box"}, "points": {"mode": "points", "points_per_lung": 2, "multimask": True}}
    fresh = SamEngine(engine.loaded)
    shifted = [np.roll(t, 3, axis=1) for t in truths]
    frame = dice_by_prompt_variant(fresh, xrays, truths, {"truth": truths, "shifted": shifted}, variants,
                                   only={"shifted": ["box"]}, progress=False)
    assert fresh.images_encoded == 3
    assert frame.groupby(["source", "variant"]).size().to_dict() == {
        ("shifted", "box"): 3, ("truth", "box"): 3, ("truth", "points"): 3}
    box = frame[(frame.source == "truth") & (frame.variant == "box")]
    expected = [dice_score(fresh.segment(x, prompts_from_mask(t, rng=np.random.default_rng(image_seed(0, x.path.stem)))), t)
                for x, t in zip(xrays, truths)]
    assert np.allclose(box.dice.to_numpy(), expected) and (frame.components == 2).all()
