"""Imitated dataset shift (cxrsam.data.shift): seeded, geometry shared by image and mask, lungs never cut or
covered, and CNN-like box errors with the measured spread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrsam.data.shift import BoxError, ShiftSettings, perturb_box, shift_pair, shifted_case
from cxrsam.data.synthetic import make_phantom
from cxrsam.data.xray import XRay


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    image, mask = make_phantom(size=96, seed=3)
    return image.astype(np.float32) / 255, mask.astype(bool)


def test_shift_is_seeded_and_keeps_the_whole_lung_mask(pair):
    image, mask = pair
    xray = XRay(pixels=image, path=Path("case.png"), spacing_mm=(0.5, 0.5))
    first = shifted_case(xray, mask, index=4, seed=1)
    again = shifted_case(xray, mask, index=4, seed=1)
    assert np.array_equal(first[0].pixels, again[0].pixels) and first[2] == again[2]
    assert first[0].path == xray.path and first[0].spacing_mm is None
    sizes, hows = set(), set()
    for index in range(24):
        shifted, shifted_mask, record = shifted_case(xray, mask, index=index, seed=1)
        pixels = shifted.pixels
        assert pixels.dtype == np.float32 and pixels.shape == shifted_mask.shape
        assert 0 <= pixels.min() and pixels.max() <= 1
        h, w = pixels.shape
        assert 0.75 - 0.02 <= w / h <= 1.3 + 0.02 and abs(w / h - record["aspect"]) < 0.02
        assert shifted_mask.sum() == mask.sum()  # cropped around the lungs or padded: no lung pixel lost
        frame = record["frame"]
        if frame["how"] == "crop":
            r0, r1, c0, c1 = frame["box"]
            assert np.array_equal(shifted_mask, mask[r0:r1, c0:c1])
        else:
            top, bottom, left, right = frame["box"]
            assert np.array_equal(shifted_mask[top:h - bottom, left:w - right], mask)
        sizes.add((h, w))
        hows.add(frame["how"])
    assert len(sizes) > 10 and hows == {"crop", "pad"}


def test_collimation_and_text_stay_off_the_lungs_box(pair):
    image, mask = pair
    settings = ShiftSettings(border_p=1.0, text_p=0.0, clahe_p=0.0, smooth_p=0.0, sharpen_p=0.0,
                             noise_std=(0.0, 0.0), window_low=(0.0, 0.0), window_high=(1.0, 1.0), gamma=(1.0, 1.0),
                             aspect=(1.0, 1.0))
    painted = 0
    for index in range(8):
        shifted, shifted_mask, record = shift_pair(image, mask, np.random.default_rng(index), settings)
        assert np.array_equal(shifted_mask, mask)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        inner = np.s_[rows[0] - 1:rows[-1] + 2, cols[0] - 1:cols[-1] + 2]
        np.testing.assert_allclose(shifted[inner], image[inner], atol=1e-6)  # the lungs' box is untouched
        changed = ~np.isclose(shifted, image, atol=1e-6)
        painted += bool(record["collimation"])
        assert changed.any() == bool(record["collimation"])
    assert painted >= 4


def test_text_is_burned_in_white():
    settings = ShiftSettings(text_p=1.0, border_p=0.0, noise_std=(0.0, 0.0), clahe_p=0.0, smooth_p=0.0,
                             sharpen_p=0.0)
    image, mask = np.full((300, 300), 0.5, np.float32), np.zeros((300, 300), bool)
    mask[100:200, 60:140] = mask[100:200, 160:240] = True
    shifted, _, record = shift_pair(image, mask, np.random.default_rng(0), settings)
    assert record["text"] and shifted.max() == 1.0 and (shifted == 1.0).sum() > 20


def test_cnn_like_box_error_has_the_measured_spread_and_stays_in_the_image():
    rng = np.random.default_rng(0)
    box = np.array([20.0, 10.0, 69.0, 109.0])  # 50 x 100 px
    error = BoxError()
    moved = np.stack([perturb_box(box, (128, 128), error, rng) for _ in range(4000)])
    fractions = (moved - box) / np.array([50, 100, 50, 100])
    np.testing.assert_allclose(fractions.std(axis=0), error.std, rtol=0.15)
    np.testing.assert_allclose(fractions.mean(axis=0), error.bias, atol=0.003)
    assert np.median(np.abs(fractions - error.bias), axis=0).max() < 0.75 * max(error.std)  # heavy-tailed
    weak = np.stack([perturb_box(box, (128, 128), error.scaled(2), rng) for _ in range(4000)])
    assert 1.7 < ((weak - box) / np.array([50, 100, 50, 100])).std() / fractions.std() < 2.3
    edge = np.stack([perturb_box(np.array([0.0, 0.0, 127.0, 127.0]), (128, 128), error.scaled(5), rng)
                     for _ in range(200)])
    assert edge.min() >= 0 and edge.max() <= 127
    assert (edge[:, 2] > edge[:, 0]).all() and (edge[:, 3] > edge[:, 1]).all()
