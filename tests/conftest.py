"""Shared fixtures: the real data in ../shared/data (skipped when absent) and small phantom datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_COVID = REPO.parent / "shared" / "data" / "COVID-19_Radiography_Dataset"

os.environ.setdefault("MPLBACKEND", "Agg")


SHARED_DATA_PRESENT = (SHARED_COVID / "Viral Pneumonia" / "images").is_dir()
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA_PRESENT,
    reason=f"real CXR data not present at {SHARED_COVID} (../shared/data is provided to developers and CI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses the real data (directly or through another fixture) skips, with the reason, without it."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(needs_shared_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real COVID-19 Radiography Database subset beside the repo (tests using it skip when absent)."""
    return SHARED_COVID


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """12 synthetic phantoms at 96 px in the generic layout (images/ + masks/)."""
    from cxrsam.data.synthetic import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), n=12, size=96, seed=1, progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """state_dict of a seeded tiny SAM (:mod:`cxrsam.sam.testing`) saved with torch.save (the official files' format)."""
    from cxrsam.sam.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny_sam.pth", seed=0)
