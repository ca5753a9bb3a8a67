"""Fixtures of the web app tests: pretrained LiteMedSAM, phantoms and a draft provider from their masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrsam.data.io import read_mask


class MaskDrafts:
    """Stands in for a CNN run: a :class:`~cxrsam.baselines.drafts.DraftSource` giving the reference lung mask
    of a known image as its draft, so the app's automatic path is tested with a known, good draft."""

    kind = "cnn-draft"

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def __call__(self, xray) -> np.ndarray:
        assert xray.size == self.mask.shape, "the tests upload the image these drafts belong to"
        return self.mask.copy()

    def describe(self) -> dict:
        return {"kind": self.kind, "test": "reference mask"}


@pytest.fixture(scope="session")
def litemedsam():
    """Pretrained LiteMedSAM on CPU (shared by the app tests)."""
    from cxrsam.sam.registry import build_sam

    return build_sam("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def phantom_256(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """One 256 px phantom X-ray: (image path, lung mask bool (256, 256))."""
    from cxrsam.data.synthetic import generate_phantoms

    root = generate_phantoms(tmp_path_factory.mktemp("phantom256"), n=1, size=256, seed=3, progress=False)
    image = sorted((root / "images").iterdir())[0]
    return image, read_mask(root / "masks" / image.name)


@pytest.fixture(scope="session")
def mask_drafts():
    """``mask_drafts(mask)``: a draft provider returning ``mask``."""
    return MaskDrafts


@pytest.fixture(scope="session")
def lung_point():
    """``lung_point(mask) -> (x, y)``: the pixel deepest inside the image-left lung of ``mask``."""
    from scipy import ndimage

    from cxrsam.prompts.components import lung_components

    def deepest(mask: np.ndarray) -> tuple[int, int]:
        left = lung_components(mask)[0][0]
        y, x = np.unravel_index(np.argmax(ndimage.distance_transform_edt(left)), left.shape)
        return int(x), int(y)

    return deepest
