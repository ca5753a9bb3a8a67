"""Imitated dataset shift: X-rays that look as if they came from another hospital, scanner or CNN.

The training data (one public collection, 299 px square PNGs) is narrow; unseen hospitals differ in framing,
aspect ratio, intensity processing, detector noise and annotations on the film. :func:`shift_pair` turns an
image/mask pair into such a case, drawn from a seeded generator, in this order:

1. **framing** -- a target aspect ratio W/H drawn log-uniformly from ``aspect`` (0.75-1.3: portrait detectors
   such as 1005x1223 up to landscape); reached by cropping the sides (MONAI ``SpatialCrop``) when the lungs stay
   inside with a margin, else by padding the other axis with a dark constant (MONAI ``BorderPad``). Image and
   mask take the same geometry, so the mask stays exact; inference then letterboxes the non-square image as it
   does every input.
2. **intensity window** -- the range ``[low, high]`` is stretched to [0, 1] and clipped (MONAI
   ``ScaleIntensityRange``), then **gamma** (MONAI ``AdjustContrast``): other processing look-up tables.
3. **CLAHE** or not (OpenCV ``createCLAHE``; MONAI has no local histogram equalisation): some sites enhance
   contrast locally, others ship raw.
4. **detector** -- smoother (MONAI ``GaussianSmooth``) or sharper (MONAI ``GaussianSharpen``, unsharp masking)
   images, then Gaussian noise.
5. **collimation** -- bright bands along some image edges, never over the lungs' bounding box.
6. **burned-in text** -- side markers and labels (``L``, ``PORTABLE``, a date) in the corners (OpenCV
   ``putText``).

Steps 2-6 touch the image only. Every drawn parameter is returned, so a shifted set is documented and
reproducible from its seed (:func:`shifted_case`: ``(seed, index)``).

:class:`BoxError` and :func:`perturb_box` separately imitate the prompt boxes of a CNN weaker than ours: each
coordinate of a box moves by a bias plus heavy-tailed noise (Student t, 4 degrees of freedom) in fractions of
the box side, with the U-Net's measured error on the validation split (``bench/prompt_error.py``) as the unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cxrsam.data.xray import XRay

TEXTS = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "2020-03-14", "ID 483920", "CHEST 1 VIEW")
"""Labels burned into the image, as sites print them."""


class ShiftSettings(BaseModel):
    """Ranges the shift is drawn from (each ``(low, high)``; probabilities in [0, 1])."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aspect: tuple[float, float] = Field((0.75, 1.3), description="Target width / height, log-uniform")
    margin: float = Field(0.03, ge=0, description="Space kept around the lungs when cropping, fraction of a side")
    pad_level: tuple[float, float] = Field((0.0, 0.1), description="Grey level of padded borders")
    window_low: tuple[float, float] = Field((0.0, 0.15), description="Intensity mapped to black")
    window_high: tuple[float, float] = Field((0.8, 1.0), description="Intensity mapped to white")
    gamma: tuple[float, float] = Field((0.6, 1.6), description="Gamma, log-uniform")
    clahe_p: float = Field(0.4, ge=0, le=1, description="Probability of CLAHE")
    clahe_clip: tuple[float, float] = Field((1.5, 3.0), description="CLAHE clip limit")
    smooth_p: float = Field(0.3, ge=0, le=1, description="Probability of a smoother detector")
    sharpen_p: float = Field(0.3, ge=0, le=1, description="Probability of a sharper detector (if not smoother)")
    smooth_sigma: tuple[float, float] = Field((0.5, 1.5), description="Gaussian blur sigma, pixels")
    sharpen_alpha: tuple[float, float] = Field((0.5, 2.0), description="Unsharp-masking strength")
    noise_std: tuple[float, float] = Field((0.0, 0.025), description="Additive Gaussian noise std")
    border_p: float = Field(0.5, ge=0, le=1, description="Probability of collimation bands")
    border_width: tuple[float, float] = Field((0.02, 0.08), description="Band width, fraction of the side")
    border_level: tuple[float, float] = Field((0.75, 1.0), description="Grey level of collimation bands")
    text_p: float = Field(0.7, ge=0, le=1, description="Probability of burned-in text")


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) inclusive of the mask's pixels (the whole image when it is empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, mask.shape[0] - 1, 0, mask.shape[1] - 1
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def reframe(image: np.ndarray, mask: np.ndarray, aspect: float, margin: float, pad_level: float,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Bring an image/mask pair (H, W) to width/height ``aspect`` by cropping or padding (see module doc).

    Returns the image float32 (H', W'), the mask bool (H', W') and what was done (``how``: crop or pad, ``box``:
    the crop ``[row0, row1, col0, col1)`` or the pad ``[top, bottom, left, right]``)."""
    from monai.transforms import BorderPad, SpatialCrop

    h, w = image.shape
    r0, r1, c0, c1 = _bbox(mask)
    narrower = aspect < w / h
    axis_len, other = (w, h) if narrower else (h, w)
    target = round(other * aspect) if narrower else round(other / aspect)  # the cropped axis's new length
    lo, hi = (c0, c1) if narrower else (r0, r1)
    keep = round(margin * axis_len)
    first, last = max(0, hi + keep + 1 - target), min(lo - keep, axis_len - target)
    if target < axis_len and first <= last:
        start = int(rng.integers(first, last + 1))
        roi = ([0, start], [h, start + target]) if narrower else ([start, 0], [start + target, w])
        crop = SpatialCrop(roi_start=roi[0], roi_end=roi[1])
        image, mask = np.asarray(crop(image[None]))[0], np.asarray(crop(mask[None]))[0]
        return image, mask, {"how": "crop", "box": [roi[0][0], roi[1][0], roi[0][1], roi[1][1]]}
    grown = round(axis_len / aspect) if narrower else round(axis_len * aspect)  # the other axis's new length
    extra = max(grown - other, 0)
    before = int(rng.integers(0, extra + 1))
    border = [before, extra - before, 0, 0] if narrower else [0, 0, before, extra - before]
    image = np.asarray(BorderPad(border, mode="constant", value=pad_level)(image[None]))[0]
    mask = np.asarray(BorderPad(border, mode="constant", value=0)(mask[None]))[0]
    return image, mask, {"how": "pad", "box": border}


def collimate(image: np.ndarray, mask: np.ndarray, width: float, level: float,
              rng: np.random.Generator) -> list[str]:
    """Paint bright bands of up to ``width`` (fraction of the side) along 1-2 random edges of ``image`` in place,
    each stopping 2 px short of the lungs' bounding box; returns the edges painted."""
    h, w = image.shape
    r0, r1, c0, c1 = _bbox(mask)
    room = {"top": r0 - 2, "bottom": h - 3 - r1, "left": c0 - 2, "right": w - 3 - c1}
    edges = [str(e) for e in rng.choice(list(room), size=int(rng.integers(1, 3)), replace=False)]
    painted = []
    for edge in edges:
        side = h if edge in ("top", "bottom") else w
        band = min(round(width * side), room[edge])
        if band <= 0:
            continue
        region = {"top": np.s_[:band, :], "bottom": np.s_[h - band:, :], "left": np.s_[:, :band],
                  "right": np.s_[:, w - band:]}[edge]
        image[region] = level
        painted.append(edge)
    return painted


def burn_text(image: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Write 1-3 labels of :data:`TEXTS` in white into random corners of ``image`` in place; returns them."""
    h, w = image.shape
    labels = [str(t) for t in rng.choice(TEXTS, size=int(rng.integers(1, 4)), replace=False)]
    corners = rng.permutation(4)
    layer = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
    for label, corner in zip(labels, corners):
        scale = min(h, w) / 500 * rng.uniform(0.8, 1.6)
        thickness = max(1, round(min(h, w) / 300))
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        pad = round(0.03 * min(h, w))
        x = pad if corner % 2 == 0 else max(pad, w - pad - tw)
        y = pad + th if corner < 2 else h - pad
        cv2.putText(layer, label, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA)
    np.maximum(image, layer.astype(np.float32) / 255, out=image)
    return labels


def shift_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
               settings: ShiftSettings | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One imitated other-site case from an image float (H, W) in [0, 1] and its lung mask bool (H, W).

    Returns:
        image float32 (H', W') in [0, 1], mask bool (H', W') (same geometry), and the drawn parameters.
    """
    from monai.transforms import AdjustContrast, GaussianSharpen, GaussianSmooth, ScaleIntensityRange

    s = settings or ShiftSettings()
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    record: dict[str, Any] = {"aspect": _log_uniform(rng, *s.aspect)}
    image, mask, record["frame"] = reframe(image, mask, record["aspect"], s.margin,
                                           float(rng.uniform(*s.pad_level)), rng)
    record["window"] = [float(rng.uniform(*s.window_low)), float(rng.uniform(*s.window_high))]
    record["gamma"] = _log_uniform(rng, *s.gamma)
    image = np.asarray(ScaleIntensityRange(*record["window"], 0.0, 1.0, clip=True)(image[None]))
    image = np.asarray(AdjustContrast(record["gamma"])(image))[0]
    record["clahe"] = float(rng.uniform(*s.clahe_clip)) if rng.random() < s.clahe_p else None
    if record["clahe"] is not None:
        clahe = cv2.createCLAHE(clipLimit=record["clahe"], tileGridSize=(8, 8))
        image = clahe.apply(np.round(image * 255).astype(np.uint8)).astype(np.float32) / 255
    draw = rng.random()
    if draw < s.smooth_p:
        record["detector"] = {"smooth_sigma": float(rng.uniform(*s.smooth_sigma))}
        image = np.asarray(GaussianSmooth(record["detector"]["smooth_sigma"])(image[None]))[0]
    elif draw < s.smooth_p + s.sharpen_p:
        record["detector"] = {"sharpen_alpha": float(rng.uniform(*s.sharpen_alpha))}
        image = np.asarray(GaussianSharpen(0.5, 1.0, record["detector"]["sharpen_alpha"])(image[None]))[0]
    else:
        record["detector"] = None
    record["noise_std"] = float(rng.uniform(*s.noise_std))
    image = np.clip(image + rng.standard_normal(image.shape).astype(np.float32) * record["noise_std"], 0, 1)
    image = np.ascontiguousarray(image, dtype=np.float32)
    record["collimation"] = (collimate(image, mask, float(rng.uniform(*s.border_width)),
                                       float(rng.uniform(*s.border_level)), rng)
                             if rng.random() < s.border_p else [])
    record["text"] = burn_text(image, rng) if rng.random() < s.text_p else []
    return image, mask, record


def shifted_case(xray: XRay, mask: np.ndarray, index: int, seed: int = 0,
                 settings: ShiftSettings | None = None) -> tuple[XRay, np.ndarray, dict[str, Any]]:
    """:func:`shift_pair` of case ``index`` drawn from ``(seed, index)``: the shifted X-ray (same path, so
    results keep the stem; spacing unknown), its mask and the drawn parameters."""
    image, shifted, record = shift_pair(xray.pixels, mask, np.random.default_rng([seed, index]), settings)
    return replace(xray, pixels=image, spacing_mm=None, dicom=None), shifted, record


@dataclass(frozen=True)
class BoxError:
    """Per-coordinate error of a draft source's boxes (x0, y0, x1, y1), in fractions of the true box side.

    Defaults: the U-Net of ``configs/cpu.yaml`` on the 104 validation images at 256 px
    (``bench/prompt_error.py``; docs/results.md): std 0.028, 0.018, 0.025, 0.031 and mean +0.24, +0.17,
    +0.09, -1.08 px on sides of about 75 px (x) and 195 px (y). ``df`` 4 gives the measured heavy tail (median
    absolute error about half the std).
    """

    bias: tuple[float, float, float, float] = (0.003, 0.001, 0.001, -0.006)
    std: tuple[float, float, float, float] = (0.028, 0.018, 0.025, 0.031)
    df: float = 4.0

    def scaled(self, strength: float) -> BoxError:
        """The error of a draft source ``strength`` times worse (bias and spread)."""
        return BoxError(tuple(b * strength for b in self.bias), tuple(s * strength for s in self.std), self.df)


def perturb_box(box: np.ndarray, size: tuple[int, int], error: BoxError, rng: np.random.Generator) -> np.ndarray:
    """A box (4,) xyxy in pixels of an image ``size=(H, W)`` moved like a draft's box: per coordinate ``bias +
    std * t`` times the box side along its axis, ``t`` Student-t with ``error.df`` degrees of freedom scaled to
    unit variance and clipped to +-4; the result is clipped to the image and keeps x0 < x1, y0 < y1."""
    box = np.asarray(box, dtype=np.float64)
    sides = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2)
    unit = rng.standard_t(error.df, size=4) / math.sqrt(error.df / (error.df - 2)) if error.df > 2 \
        else rng.standard_t(error.df, size=4)
    moved = box + (np.asarray(error.bias) + np.asarray(error.std) * np.clip(unit, -4, 4)) * sides
    h, w = size
    x0, x1 = np.clip(sorted(moved[[0, 2]]), 0, w - 1)
    y0, y1 = np.clip(sorted(moved[[1, 3]]), 0, h - 1)
    x1, y1 = max(x1, min(x0 + 1, w - 1)), max(y1, min(y0 + 1, h - 1))
    return np.array([x0, y0, x1, y1], dtype=np.float32)
