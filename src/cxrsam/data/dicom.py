"""DICOM and JSRT raw readers (grayscale radiographs)."""

from __future__ import annotations

import contextlib
import io
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from cxrsam.data.xray import MAX_PIXELS, XRay, check_shape, normalize_intensity
from cxrsam.errors import CxrsamError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

JSRT_SHAPE = (2048, 2048)
JSRT_SPACING_MM = (0.175, 0.175)
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128
HEADER_BYTES = 4 << 20
"""Most bytes inflated from a deflated DICOM to find its image size before its pixel data."""


def has_dicom_magic(head: bytes) -> bool:
    """True if ``head`` (a file's first bytes) carries the DICOM magic ``DICM`` at byte 128."""
    return head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)] == DICOM_MAGIC


def is_dicom(path: Path) -> bool:
    """True if the file carries the DICOM preamble magic ``DICM`` at byte 128."""
    try:
        with Path(path).open("rb") as handle:
            return has_dicom_magic(handle.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)))
    except OSError:
        return False


def _stop_after_group(group: int) -> Callable[..., bool]:
    """A pydicom ``stop_when`` that stops reading at the first element past ``group``."""
    return lambda tag, vr, length: tag.group > group


def _check_header(ds: Dataset, path: Path, max_pixels: int) -> int:
    """Refuse a DICOM from its header alone (size over ``max_pixels`` counting every frame, not
    grayscale); returns the bytes its pixel data declares."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = 1 if ds.get("NumberOfFrames") in (None, "") else int(ds.NumberOfFrames)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CxrsamError(f"unreadable DICOM header (image size: {exc})", path=path) from None
    if frames < 1 or bits < 1:
        raise CxrsamError(f"unreadable DICOM header ({frames} frames of {bits}-bit samples)", path=path)
    if samples != 1:
        raise CxrsamError(f"unsupported DICOM: expected grayscale, got {samples} samples per pixel", path=path)
    check_shape((rows, cols), path, max_pixels, frames)
    return rows * cols * frames * -(-bits // 8)


def _dataset(handle: BinaryIO, path: Path, max_pixels: int) -> Dataset:
    """The DICOM dataset in ``handle``, refused by :func:`_check_header` before its pixel data is read.

    A deflated dataset (which pydicom would inflate whole) is inflated here: first at most
    :data:`HEADER_BYTES` for the header, then only as far as the declared pixels need.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    start = handle.tell()
    read_preamble(handle, force=True)
    meta = FileMetaDataset(read_dataset(handle, is_implicit_VR=False, is_little_endian=True,
                                        stop_when=_stop_after_group(0x0002)))
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        handle.seek(start)
        _check_header(pydicom.dcmread(handle, force=True, stop_before_pixels=True), path, max_pixels)
        handle.seek(start)
        return pydicom.dcmread(handle, force=True)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(handle.read(), HEADER_BYTES)
    header = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True,
                          stop_when=_stop_after_group(0x0028))
    if "Rows" not in header and len(inflated) == HEADER_BYTES:
        raise CxrsamError(f"deflated DICOM header over {HEADER_BYTES >> 20} MiB before its image size", path=path)
    budget = _check_header(header, path, max_pixels) + HEADER_BYTES
    inflated += inflater.decompress(inflater.unconsumed_tail, max(1, budget - len(inflated)))
    if inflater.unconsumed_tail:
        raise CxrsamError(f"deflated DICOM inflates past its declared image (over {budget:,} bytes)", path=path)
    if not inflater.eof:
        raise CxrsamError("unreadable DICOM (truncated deflated data)", path=path)
    ds = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _first_line(exc: Exception) -> str:
    """``Type: first line of the message``: pydicom's messages list every decoder plugin on further lines."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].rstrip(':') if lines else 'no message'}"


def read_dicom(path: str | Path, source: BinaryIO | None = None, max_pixels: int = MAX_PIXELS) -> XRay:
    """Read a grayscale DICOM radiograph (the first frame of a multi-frame one).

    ``source``: the file's content (``path`` then only names it). The image size is checked from
    the header (Rows x Columns x frames at most ``max_pixels``) before any pixels are decoded.
    Applies the modality LUT (rescale slope/intercept), then the VOI LUT or window
    centre/width when present, and inverts MONOCHROME1 so that bone is bright.
    Pixel spacing (``PixelSpacing``, else ``ImagerPixelSpacing``) is kept in mm.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    with warnings.catch_warnings():  # pydicom warns (several lines) about quirks it recovers from
        warnings.simplefilter("ignore")
        try:
            with path.open("rb") if source is None else contextlib.nullcontext(source) as handle:
                ds = _dataset(handle, path, max_pixels)
        except CxrsamError:
            raise
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
    if arr.ndim == 3:
        arr = arr[0]
    if arr.ndim != 2:
        raise CxrsamError(f"unsupported DICOM: expected one grayscale frame, got shape {arr.shape}", path=path)
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
    if "PixelData" in ds:
        del ds.PixelData  # the header stays with the image (for a DICOM Segmentation), the pixels do not
    return XRay(pixels=data.astype(np.float32), path=path, spacing_mm=spacing,
                bit_depth=int(getattr(ds, "BitsStored", 16)), dicom=ds)


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
