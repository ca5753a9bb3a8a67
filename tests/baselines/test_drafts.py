"""Draft sources give the foreground probability beside the mask: a CNN's map, a stored ``<stem>_prob.png``, or the
mask itself."""

from __future__ import annotations

import numpy as np
import pytest

from cxrsam.baselines.drafts import CnnDrafts, MaskFolderDrafts
from cxrsam.data.io import index_masks, probability_file, read_image, read_probability, write_mask, write_probability
from cxrsam.errors import CxrsamError


def test_probability_file_roundtrip_name_rule_and_refusals(tmp_path):
    prob = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    path = write_probability(tmp_path / "x_prob.png", prob)
    assert np.abs(read_probability(path, (40, 60)) - prob).max() <= 0.5 / 255 + 1e-6  # uint8 quantisation
    assert read_probability(path, (80, 120)).shape == (80, 120)  # resized to the image
    with pytest.raises(CxrsamError, match="different aspect ratio"):
        read_probability(path, (60, 60))
    assert probability_file(tmp_path / "x_mask.png") == probability_file(tmp_path / "x.png") == path
    write_mask(tmp_path / "x_mask.png", prob > 0.5)
    assert set(index_masks(tmp_path)) == {"x"}  # the map is never read as a mask


def test_mask_folder_probability_is_the_stored_map_else_the_mask(phantoms, tmp_path):
    image = sorted((phantoms / "images").iterdir())[0]
    xray = read_image(image)
    mask = np.zeros(xray.size, bool)
    mask[10:40, 8:30] = mask[10:40, 34:56] = True
    write_mask(tmp_path / f"{image.stem}_mask.png", mask)
    source = MaskFolderDrafts(tmp_path)
    assert np.array_equal(source.probability(xray), mask.astype(np.float32))
    prob = np.where(mask, 0.8, 0.1).astype(np.float32)
    write_probability(probability_file(tmp_path / f"{image.stem}_mask.png"), prob)
    assert np.abs(source.probability(xray) - prob).max() < 0.01


def test_cnn_probability_and_mask_come_from_one_pass(cnn_run, phantoms, monkeypatch):
    image = sorted((phantoms / "images").iterdir())[0]
    xray = read_image(image)
    source = CnnDrafts(cnn_run)
    calls = []
    plain = source.predictor.probabilities
    monkeypatch.setattr(source.predictor, "probabilities", lambda images: calls.append(1) or plain(images))
    mask, prob = source(xray), source.probability(xray)
    assert len(calls) == 1 and prob.shape == mask.shape == xray.size and prob.dtype == np.float32
    assert np.array_equal(mask, source.predictor.mask_of(prob)) and 0 <= prob.min() and prob.max() <= 1
    assert np.array_equal(mask, source.predictor.predict(xray.pixels))
