"""The tiny segment_anything SAM of :mod:`cxrsam.sam.testing`, saved like an official checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrsam.sam.testing import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """state_dict of a seeded tiny SAM saved with torch.save (the official files' format)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny_sam.pth", seed=0)
