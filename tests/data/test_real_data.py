"""The real COVID-19 Radiography Database subset in ../shared/data (skipped when absent)."""

from __future__ import annotations

import numpy as np

from cxrsam.data.dataset import load_case
from cxrsam.data.layouts import discover
from cxrsam.data.split import split_cases


def test_discovers_all_pairs(shared_data):
    found = discover(shared_data)
    assert found.layout == "covid19" and len(found.cases) == 1061 and not found.problems
    sizes = {k: len(v) for k, v in split_cases(found.cases).items()}
    assert sizes == {"train": 848, "val": 104, "test": 109}


def test_case_loads_with_mask_resized_to_image(shared_data):
    found = discover(shared_data, classes=["Viral Pneumonia"])
    xray, mask = load_case(found.cases[0])
    assert xray.size == (299, 299) and mask.shape == (299, 299)
    assert 0.1 < mask.mean() < 0.6
    assert xray.pixels[mask].mean() < xray.pixels[~mask].mean()  # lungs darker than the rest
    assert np.isfinite(xray.pixels).all()
