"""The X-ray record every reader returns, the size limits and intensity scaling they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrsam.errors import CxrsamError

MAX_PIXELS = 50_000_000
"""Largest image accepted (pixels). Real CXR are at most ~4300x4300 (18.5 MP)."""
MIN_SIDE = 16
"""Smallest accepted image side (pixels); anything smaller cannot hold a lung."""


@dataclass
class XRay:
    """A chest X-ray as read from disk.

    Attributes:
        pixels: float32 array (H, W) in [0, 1]; brighter = more attenuation (bone white).
        path: the source file.
        spacing_mm: (row, col) pixel spacing in millimetres, or None when unknown.
        bit_depth: bits of the stored samples (8, 12, 16).
        dicom: the DICOM header (a pydicom ``Dataset`` without its pixel data) of a DICOM input, else None;
            what a DICOM Segmentation of the image references.
    """

    pixels: np.ndarray
    path: Path
    spacing_mm: tuple[float, float] | None = None
    bit_depth: int = 8
    dicom: Any = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def check_shape(shape: tuple[int, ...], path: Path, max_pixels: int = MAX_PIXELS, frames: int = 1) -> None:
    """Refuse an image of ``shape`` (H, W, ...) with more than ``max_pixels`` pixels in all ``frames``
    or a side under :data:`MIN_SIDE`; called on the header's size, before the pixels are decoded."""
    h, w = shape[:2]
    if h * w * frames > max_pixels:
        counted = f"{w}x{h} pixels" + (f" x {frames} frames" if frames != 1 else "")
        raise CxrsamError(f"image too large ({counted}, limit {max_pixels:,})", path=path)
    if min(h, w) < MIN_SIDE:
        raise CxrsamError(f"image too small ({w}x{h} pixels, need at least {MIN_SIDE} per side)", path=path)


def normalize_intensity(array: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """Map stored samples to float32 [0, 1].

    8-bit data is divided by 255. Deeper data (12/16-bit PNG, TIFF, DICOM, raw) is scaled by
    its own min/max, because 12-bit values stored in 16-bit containers would otherwise look black.
    """
    if array.dtype == np.uint8 or bit_depth == 8:
        return (array.astype(np.float32) / 255.0).clip(0, 1)
    array = array.astype(np.float32)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros_like(array, dtype=np.float32)
    return (array - lo) / (hi - lo)
