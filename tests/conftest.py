"""Shared fixtures: the real data in ../shared/data (skipped when absent) and small phantom datasets."""

from __future__ import annotations

import os
from collections.abc import Callable
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
def undecodable_dicom() -> Callable[[Path, str], Path]:
    """``undecodable_dicom(path, syntax)``: a 64x64 DICOM whose pixel data cannot be decoded here: ``jpeg2000``
    (a JPEG 2000 transfer syntax with a broken codestream) or ``unknown`` (a transfer syntax UID nobody knows)."""

    def make(path: Path, syntax: str = "jpeg2000") -> Path:
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.encaps import encapsulate
        from pydicom.uid import UID, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = {"jpeg2000": JPEG2000Lossless, "unknown": UID("1.2.3.4.5.6.7")}[syntax]
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", 64, 64, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(100)])  # a JPEG 2000 start, then nothing
        ds["PixelData"].VR = "OB"
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
        return path

    return make
