"""Image size checked from the header before decoding (DICOM Rows x Columns x frames, PIL formats),
deflated DICOM inflated only as far as its declared image needs, and images read from memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrsam.data.io import read_image, read_image_bytes
from cxrsam.errors import CxrsamError

RAMP = np.tile(np.arange(64) * 60, (64, 1)).astype(np.uint16)


def dicom_bytes(rows: int, cols: int, pixel_data: bytes, deflated: bool = False, private: dict[int, int] | None = None,
                **attributes) -> bytes:
    """A 16-bit grayscale DICOM declaring ``rows`` x ``cols`` with ``pixel_data`` as its pixels (which
    may be shorter than declared), optionally deflated and with private elements {tag: bytes of zeros};
    ``attributes`` are set on the dataset (None deletes one)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attributes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    for tag, size in (private or {}).items():
        ds.add_new(tag, "OB", bytes(size))
    ds.PixelData = pixel_data
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("deflated", [False, True])
def test_dicom_read_from_file_and_memory_alike(tmp_path, deflated):
    data = dicom_bytes(64, 64, RAMP.tobytes(), deflated=deflated)
    (tmp_path / "a.dcm").write_bytes(data)
    from_file, from_memory = read_image(tmp_path / "a.dcm"), read_image_bytes(data, "upload.png")
    np.testing.assert_array_equal(from_file.pixels, from_memory.pixels)
    assert from_memory.pixels[0, 0] == 0.0 and from_memory.pixels[0, -1] == 1.0 and from_memory.bit_depth == 12
    assert from_memory.path == Path("upload.png")  # named by the caller, typed by content


def test_multiframe_dicom_gives_its_first_frame():
    frames = np.stack([RAMP, RAMP[:, ::-1]])
    x = read_image_bytes(dicom_bytes(64, 64, frames.tobytes(), NumberOfFrames=2), "two.dcm")
    assert x.pixels[0, 0] == 0.0 and x.pixels[0, -1] == 1.0


SHORT = b"\0\0"
"""Pixel data far shorter than declared: decoding would fail, so only a header check says 'too large'."""
REFUSED = [  # (case, dicom_bytes arguments, problem)
    ("8000x8000", dict(rows=8000, cols=8000, pixel_data=SHORT), "image too large (8000x8000 pixels, limit 50,000,000)"),
    ("8000x8000 deflated", dict(rows=8000, cols=8000, pixel_data=SHORT, deflated=True),
     "image too large (8000x8000 pixels, limit 50,000,000)"),
    ("frames counted", dict(rows=3000, cols=3000, pixel_data=SHORT, NumberOfFrames=6),
     "image too large (3000x3000 pixels x 6 frames, limit 50,000,000)"),
    ("colour", dict(rows=64, cols=64, pixel_data=SHORT, SamplesPerPixel=3), "expected grayscale, got 3 samples"),
    ("no Rows", dict(rows=64, cols=64, pixel_data=SHORT, Rows=None), "unreadable DICOM header"),
    ("zero frames", dict(rows=64, cols=64, pixel_data=SHORT, NumberOfFrames=0), "unreadable DICOM header"),
    ("8x8", dict(rows=8, cols=8, pixel_data=bytes(128)), "image too small (8x8 pixels"),
    ("deflated, inflating past its image", dict(rows=64, cols=64, pixel_data=RAMP.tobytes(), deflated=True,
                                                private={0x7FE11010: 16 << 20}), "inflates past its declared image"),
    ("deflated, header over 4 MiB", dict(rows=64, cols=64, pixel_data=RAMP.tobytes(), deflated=True,
                                         private={0x00091010: 8 << 20}), "header over 4 MiB before its image size"),
]


@pytest.mark.parametrize("case, arguments, problem", REFUSED, ids=[c[0] for c in REFUSED])
def test_dicom_refused_from_its_header_one_line_naming_the_file(tmp_path, case, arguments, problem):
    data = dicom_bytes(**arguments)
    (tmp_path / "bad.dcm").write_bytes(data)
    for read in (lambda: read_image(tmp_path / "bad.dcm"), lambda: read_image_bytes(data, tmp_path / "bad.dcm")):
        with pytest.raises(CxrsamError) as info:
            read()
        message = str(info.value)
        assert problem in message and "\n" not in message and message.startswith(str(tmp_path / "bad.dcm")), message


def test_truncated_deflated_dicom_is_unreadable():
    data = dicom_bytes(64, 64, RAMP.tobytes(), deflated=True)
    with pytest.raises(CxrsamError, match="unreadable DICOM"):
        read_image_bytes(data[:-40], "cut.dcm")


def _encoded(format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((RAMP // 16).astype(np.uint8)).save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize("format", ["PNG", "JPEG", "TIFF", "BMP", "GIF", "DICOM"])
def test_max_pixels_applies_to_every_format(format):
    data = dicom_bytes(64, 64, RAMP.tobytes()) if format == "DICOM" else _encoded(format)
    assert read_image_bytes(data, "ok", max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(CxrsamError, match=r"image too large \(64x64 pixels, limit 4,095\)"):
        read_image_bytes(data, "big", max_pixels=64 * 64 - 1)


def test_bytes_decided_by_content_and_empty_refused():
    assert read_image_bytes(_encoded("PNG"), "scan.dcm").bit_depth == 8  # PNG named like a DICOM
    with pytest.raises(CxrsamError, match="^up.png: empty image file"):
        read_image_bytes(b"", "up.png")
    with pytest.raises(CxrsamError, match="^up.png: not an image"):
        read_image_bytes(b"\0" * 200, "up.png")
