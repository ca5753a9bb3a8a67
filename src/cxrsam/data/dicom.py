"""DICOM and JSRT raw readers (grayscale radiographs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from cxrsam.data.io import XRay, _check_shape, normalize_intensity
from cxrsam.errors import CxrsamError

JSRT_SHAPE = (2048, 2048)
JSRT_SPACING_MM = (0.175, 0.175)


def is_dicom(path: Path) -> bool:
    """True if the file carries the DICOM preamble magic ``DICM`` at byte 128."""
    try:
        with Path(path).open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _first_line(exc: Exception) -> str:
    """``Type: first line of the message``: pydicom's messages list every decoder plugin on further lines."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].rstrip(':') if lines else 'no message'}"


def read_dicom(path: str | Path) -> XRay:
    """Read a single-frame grayscale DICOM radiograph.

    Applies the modality LUT (rescale slope/intercept), then the VOI LUT or window
    centre/width when present, and inverts MONOCHROME1 so that bone is bright.
    Pixel spacing (``PixelSpacing``, else ``ImagerPixelSpacing``) is kept in mm.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    with warnings.catch_warnings():  # pydicom warns (several lines) about quirks it recovers from
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # pydicom raises many types for broken files
            raise CxrsamError(f"unreadable DICOM ({_first_line(exc)})", path=path) from None
        try:
            arr = ds.pixel_array
        except Exception as exc:
            syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            if syntax is not None and (not syntax.is_transfer_syntax or syntax.is_compressed):
                raise CxrsamError(f"unreadable DICOM (transfer syntax {syntax.name} cannot be decoded here: "
                                  f"{_first_line(exc)})", path=path) from None
            raise CxrsamError(f"unreadable DICOM ({_first_line(exc)})", path=path) from None
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise CxrsamError(f"unsupported DICOM: expected one grayscale frame, got shape {arr.shape}", path=path)
    _check_shape(arr.shape, path)
    data = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        data = apply_voi_lut(data, ds)
    data = normalize_intensity(np.asarray(data, dtype=np.float32), bit_depth=int(getattr(ds, "BitsStored", 16)))
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        data = 1.0 - data
    spacing = None
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if tag in ds and ds.get(tag):
            spacing = (float(ds.get(tag)[0]), float(ds.get(tag)[1]))
            break
    return XRay(pixels=data.astype(np.float32), path=path, spacing_mm=spacing,
                bit_depth=int(getattr(ds, "BitsStored", 16)))


def read_jsrt_raw(path: str | Path, shape: tuple[int, int] = JSRT_SHAPE) -> XRay:
    """Read a JSRT ``.IMG``: headerless 12-bit big-endian samples, 2048x2048, 0.175 mm pixels.

    JSRT stores high values for low attenuation (film density), so the image is inverted
    to the usual display (bone bright).
    """
    path = Path(path)
    expected = shape[0] * shape[1] * 2
    size = path.stat().st_size
    if size != expected:
        raise CxrsamError(f"not a JSRT raw image: {size} bytes, expected {expected} for {shape[1]}x{shape[0]} 16-bit",
                          path=path)
    arr = np.fromfile(path, dtype=">u2").reshape(shape).astype(np.float32)
    pixels = 1.0 - normalize_intensity(arr, bit_depth=12)
    return XRay(pixels=pixels, path=path, spacing_mm=JSRT_SPACING_MM, bit_depth=12)
