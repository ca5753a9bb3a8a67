"""Fixtures of the SAM tests: phantom images of several shapes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cxrsam.data.synthetic import make_phantom


@pytest.fixture(scope="module")
def cases():
    """Three phantoms of different shapes (non-square ones get padded differently)."""
    out = []
    for seed, (h, w) in enumerate([(96, 96), (80, 110), (120, 72)]):
        image, mask = make_phantom(size=96, seed=seed)
        image = cv2.resize(image.astype(np.float32) / 255, (w, h), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        out.append((image, mask))
    return out
