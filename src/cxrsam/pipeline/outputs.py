"""What a segmentation writes: mask (PNG, NIfTI or DICOM-SEG), overlay PNG, uncertainty PNG and JSON record, under
one naming scheme.

Per image ``<stem>``: ``<stem>_mask.png`` ({0, 255}, original size; ``<stem>_mask.nii.gz`` with
``format="nifti"``; ``<stem>_seg.dcm`` with ``format="dicom-seg"``, DICOM inputs only), ``<stem>_overlay.png``,
``<stem>_uncertainty.png`` (when uncertainty was measured) and ``<stem>.json`` (lung measurements in pixels and mm,
quality flags, uncertainty, prompts and the prompt spec, models and versions). ``docs/predict.md`` documents every
field.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrsam.data.io import OVERLAY_SUFFIX, SEG_SUFFIX, UNCERTAINTY_SUFFIX, XRay, mask_file_name
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path
from cxrsam.pipeline.quality import Quality
from cxrsam.pipeline.uncertainty import Uncertainty
from cxrsam.prompts import Prompts, PromptSpec
from cxrsam.prompts.boxes import mask_box
from cxrsam.prompts.components import lung_components


class OutputFormat(StrEnum):
    """Mask file format: ``png`` ({0, 255}), ``nifti`` (``.nii.gz``, uint8 {0, 1}; needs nibabel) or ``dicom-seg``
    (``<stem>_seg.dcm``, a DICOM Segmentation with a segment per lung; DICOM inputs only)."""

    PNG = "png"
    NIFTI = "nifti"
    DICOM_SEG = "dicom-seg"


OUTPUT_KINDS = ("mask", "overlay", "uncertainty", "json")
"""The files written per image, in order (``uncertainty`` only when it was measured)."""


def output_format(format: OutputFormat | str) -> OutputFormat:
    """``format`` as an :class:`OutputFormat`, its optional dependency checked now (before any work)."""
    try:
        format = OutputFormat(format)
    except ValueError:
        raise CxrsamError(f"unknown output format {format!r}; choose one of "
                          f"{', '.join(f.value for f in OutputFormat)}") from None
    if format is OutputFormat.NIFTI:
        try:
            import nibabel  # noqa: F401 - optional dependency of the nifti format
        except ImportError:
            raise CxrsamError("--format nifti needs the optional package nibabel "
                              "(pip install 'cxrsam[nifti]')") from None
    if format is OutputFormat.DICOM_SEG:
        try:
            import highdicom  # noqa: F401 - writes the dicom-seg format
        except ImportError:
            raise CxrsamError("--format dicom-seg needs the package highdicom (pip install highdicom)") from None
    return format


@dataclass
class Segmentation:
    """The result for one image.

    Attributes:
        xray: the image (``pixels`` float32 (H, W) in [0, 1], ``spacing_mm`` (row, col) or None).
        mask: bool (H, W), the lung mask at the image's original size.
        draft: bool (H, W) draft mask the prompts were derived from, or None (hand-given prompts).
        prompts: the prompt sets SAM decoded (original pixel coordinates), merged by union.
        source: where the prompts came from: ``cnn-draft``, ``draft-file``, ``box`` or ``points``,
            with ``+clicks`` when hand-given points were added to draft prompts; ``cnn`` when the mask is
            the CNN's own (no SAM stage).
        models: identities of the models used (``sam``, ``sam_kind``, ``cnn``, versions).
        warnings: problems noticed on the way (e.g. one lung component in the draft).
        spec: the prompt rules that turned the draft into prompts (None for hand-given prompts).
        quality: the quality flags (:func:`cxrsam.pipeline.quality.assess`), or None.
        uncertainty: the prompt-perturbation uncertainty (:mod:`cxrsam.pipeline.uncertainty`), or None when off.
    """

    xray: XRay
    mask: np.ndarray
    draft: np.ndarray | None
    prompts: Prompts
    source: str
    models: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    spec: PromptSpec | None = None
    quality: Quality | None = None
    uncertainty: Uncertainty | None = None


SIDES = {"image_left": "right lung (patient's right in a PA view)",
         "image_right": "left lung (patient's left in a PA view)"}
"""Left/right keys of the JSON: the side of the *image* the lung is on, and its anatomical name
assuming the usual PA (or AP) view with the patient facing the viewer."""
OVERLAY_RGB = (255, 64, 64)
OVERLAY_ALPHA = 0.35


def _extent(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> dict[str, Any]:
    """Pixels, mm², bounding box and its height/width (px and mm) of a non-empty bool mask (H, W)."""
    box = [int(v) for v in mask_box(mask)]  # x0, y0, x1, y1, inclusive
    height, width = box[3] - box[1] + 1, box[2] - box[0] + 1
    pixels = int(np.count_nonzero(mask))
    mm = spacing_mm is not None
    return {"pixels": pixels, "mm2": round(pixels * spacing_mm[0] * spacing_mm[1], 3) if mm else None,
            "bbox": box, "height_px": height, "width_px": width,
            "height_mm": round(height * spacing_mm[0], 2) if mm else None,
            "width_mm": round(width * spacing_mm[1], 2) if mm else None}


def lung_areas(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> dict[str, Any]:
    """Measurements of a bool lung mask (H, W): total area in pixels and (when spacing is known) mm², and per lung
    its area, bounding box ``[x0, y0, x1, y1]`` (pixels, inclusive) and the box's height and width in pixels and mm.

    Left/right: the two largest components (each at least 0.5 % of the image) are the lungs, sorted
    by centroid column (:func:`cxrsam.prompts.components.lung_components`); keys are the *image*
    side (``image_left``, ``image_right``) with the anatomical name for a PA view. With fewer than
    two such components the lungs are not separable and ``lungs`` is None.
    """
    spacing = None if spacing_mm is None else (float(spacing_mm[0]), float(spacing_mm[1]))
    pixel_mm2 = None if spacing is None else spacing[0] * spacing[1]
    mask = np.asarray(mask, dtype=bool)
    pixels = int(np.count_nonzero(mask))
    total = {"pixels": pixels, "mm2": None if pixel_mm2 is None else round(pixels * pixel_mm2, 3)}
    components, _ = lung_components(mask)
    lungs = None
    if len(components) == 2:
        lungs = {side: {"anatomical": name, **_extent(comp, spacing)}
                 for (side, name), comp in zip(SIDES.items(), components)}
    return {"total": total, "pixel_area_mm2": pixel_mm2, "lungs": lungs,
            "lungs_note": None if lungs else "left and right lungs are not separable (fewer than two components)"}


RESULT_COLUMNS = ("quality", "flags", "reasons", "draft_dice", "min_predicted_iou", "lung_components",
                  "area_fraction", "lung_ratio", "border_contact", "uncertainty", "area_px", "area_mm2",
                  *(f"{side}_{m}" for side in ("image_left", "image_right")
                    for m in ("px", "mm2", "height_px", "width_px", "height_mm", "width_mm", "bbox")))
"""The per-image columns of ``results.csv`` from :func:`result_row` (units in docs/predict.md)."""


def result_row(seg: Segmentation) -> dict[str, Any]:
    """The :data:`RESULT_COLUMNS` of one segmentation (None where not available)."""
    area = lung_areas(seg.mask, seg.xray.spacing_mm)
    q = seg.quality
    signals = None if q is None else q.signals
    row: dict[str, Any] = {
        "quality": None if q is None else q.status.value,
        "flags": None if q is None else ";".join(f.value for f in q.flags),
        "reasons": None if q is None else "; ".join(r.message for r in q.reasons),
        "draft_dice": None if signals is None or signals.draft_dice is None else round(signals.draft_dice, 4),
        "min_predicted_iou": None if signals is None or not signals.predicted_iou
        else round(min(signals.predicted_iou), 4),
        "lung_components": None if signals is None else signals.lung_components,
        "area_fraction": None if signals is None else round(signals.area_fraction, 4),
        "lung_ratio": None if signals is None or signals.lung_ratio is None else round(signals.lung_ratio, 4),
        "border_contact": None if signals is None else round(signals.border_contact, 4),
        "uncertainty": None if seg.uncertainty is None else round(seg.uncertainty.score, 4),
        "area_px": area["total"]["pixels"], "area_mm2": area["total"]["mm2"]}
    for side in ("image_left", "image_right"):
        lung = None if area["lungs"] is None else area["lungs"][side]
        for m in ("px", "mm2", "height_px", "width_px", "height_mm", "width_mm", "bbox"):
            value = None if lung is None else lung["pixels" if m == "px" else m]
            row[f"{side}_{m}"] = " ".join(map(str, value)) if isinstance(value, list) else value
    return row


def _prompts_json(prompts: Prompts) -> list[dict[str, Any]]:
    return [{"box": None if s.box is None else [round(float(v), 2) for v in s.box],
             "points": None if s.points is None else [[round(float(v), 2) for v in p] for p in s.points],
             "labels": None if s.labels is None else [int(v) for v in s.labels]} for s in prompts.sets]


def result_dict(seg: Segmentation, image_name: str) -> dict[str, Any]:
    """The JSON record of one segmentation (what ``<stem>.json`` and the app's download hold)."""
    height, width = seg.xray.size
    return {
        "image": image_name,
        "size": {"height": height, "width": width},
        "spacing_mm": None if seg.xray.spacing_mm is None else list(seg.xray.spacing_mm),
        "bit_depth": seg.xray.bit_depth,
        "area": lung_areas(seg.mask, seg.xray.spacing_mm),
        "prompt_source": seg.source,
        "prompt_mode": seg.prompts.mode,
        "prompt_spec": None if seg.spec is None else seg.spec.model_dump(mode="json"),
        "prompts": _prompts_json(seg.prompts),
        "draft_pixels": None if seg.draft is None else int(np.count_nonzero(seg.draft)),
        "quality": None if seg.quality is None else seg.quality.to_json(),
        "uncertainty": None if seg.uncertainty is None else seg.uncertainty.to_json(),
        "models": seg.models,
        "warnings": seg.warnings,
    }


def mask_png(mask: np.ndarray) -> bytes:
    """A bool mask (H, W) as 8-bit PNG bytes with values {0, 255}."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def image_png(pixels: np.ndarray) -> bytes:
    """X-ray pixels float32 (H, W) in [0, 1] as 8-bit grey PNG bytes (for display)."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(seg: Segmentation) -> bytes:
    """RGB PNG bytes: the X-ray with the mask tinted red, its outline, prompt boxes (yellow) and points
    (green = lung, blue = background)."""
    import cv2

    grey = (np.clip(seg.xray.pixels, 0, 1) * 255).round().astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    tint = np.array(OVERLAY_RGB, np.float32)
    rgb[seg.mask] = (1 - OVERLAY_ALPHA) * rgb[seg.mask] + OVERLAY_ALPHA * tint
    canvas = np.ascontiguousarray(rgb.round().astype(np.uint8))
    thickness = max(1, round(max(seg.xray.size) / 300))
    contours, _ = cv2.findContours(seg.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, OVERLAY_RGB, thickness)
    for prompt in seg.prompts.sets:
        if prompt.box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
            cv2.rectangle(canvas, (x0, y0), (x1, y1), (255, 220, 0), thickness)
        if prompt.points is not None:
            for (x, y), label in zip(prompt.points, prompt.labels):
                colour = (0, 200, 0) if label == 1 else (40, 120, 255)
                cv2.circle(canvas, (int(round(x)), int(round(y))), 2 * thickness + 1, colour, -1)
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_nifti(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> bytes:
    """A bool mask (H, W) as gzipped NIfTI-1 bytes (uint8 {0, 1}).

    Array axes are (x = column, y = row, z = 1) and the affine scales them by the pixel spacing
    (column mm, row mm, 1) when known, else by 1. Needs the optional dependency ``nibabel``.
    """
    try:
        import nibabel as nib
    except ImportError:
        raise CxrsamError("--format nifti needs the optional package nibabel (pip install 'cxrsam[nifti]')") from None
    row_mm, col_mm = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    data = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8).T[:, :, None])
    image = nib.Nifti1Image(data, affine=np.diag([col_mm, row_mm, 1.0, 1.0]))
    image.header.set_xyzt_units("mm" if spacing_mm is not None else "unknown")
    return gzip.compress(image.to_bytes(), mtime=0)


def uncertainty_png(uncertainty: Uncertainty) -> bytes:
    """The disagreement map (H, W) in [0, 1] as 8-bit grey PNG bytes: value = round(255 x disagreement)."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(uncertainty.disagreement, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_dicom_seg(seg: Segmentation) -> bytes:
    """The mask as DICOM Segmentation bytes (:mod:`cxrsam.pipeline.dicom_seg`); only for a DICOM input."""
    from cxrsam.pipeline.dicom_seg import dicom_seg_bytes

    if seg.xray.dicom is None:
        raise CxrsamError("--format dicom-seg needs DICOM input (write png or nifti for other images)",
                          path=seg.xray.path)
    versions = seg.models.get("versions") or {}
    min_area_frac = seg.spec.min_area_frac if seg.spec is not None else PromptSpec().min_area_frac
    return dicom_seg_bytes(seg.mask, seg.xray.dicom, seg.xray.path, seg.xray.spacing_mm,
                           software=str(versions.get("cxrsam", "unknown")), min_area_frac=min_area_frac,
                           algorithm=("cxrsam", "SAM" if seg.source != "cnn" else "CNN"))


def output_paths(out_dir: str | Path, stem: str, format: OutputFormat | str = OutputFormat.PNG,
                 kinds: Sequence[str] = OUTPUT_KINDS) -> dict[str, Path]:
    """The files :func:`write_outputs` writes for ``stem`` (the one naming scheme): ``mask`` =
    ``<stem>_mask.png`` (``<stem>_mask.nii.gz`` for nifti, ``<stem>_seg.dcm`` for dicom-seg), ``overlay`` =
    ``<stem>_overlay.png``, ``uncertainty`` = ``<stem>_uncertainty.png``, ``json`` = ``<stem>.json``."""
    format = output_format(format)
    out_dir = Path(out_dir)
    mask_names = {OutputFormat.PNG: mask_file_name(stem, ".png"), OutputFormat.NIFTI: mask_file_name(stem, ".nii.gz"),
                  OutputFormat.DICOM_SEG: f"{stem}{SEG_SUFFIX}.dcm"}
    names = {"mask": mask_names[format], "overlay": f"{stem}{OVERLAY_SUFFIX}.png",
             "uncertainty": f"{stem}{UNCERTAINTY_SUFFIX}.png", "json": f"{stem}.json"}
    return {kind: out_dir / names[kind] for kind in kinds}


def write_outputs(seg: Segmentation, out_dir: str | Path, stem: str, format: OutputFormat | str = OutputFormat.PNG,
                  kinds: Sequence[str] = OUTPUT_KINDS) -> dict[str, Path]:
    """Write the mask (original size), overlay PNG, uncertainty PNG (when measured) and JSON of one image (the
    ``kinds`` asked for); returns their paths. Every file is encoded first and then written atomically, so an
    error (e.g. ``dicom-seg`` for a PNG input) leaves none of them.
    ``<stem>_mask.png`` matches ground truth ``<stem>.png`` in ``cxrsam evaluate``."""
    format = output_format(format)
    paths = output_paths(out_dir, stem, format, [k for k in kinds if k != "uncertainty" or seg.uncertainty])
    masks = {OutputFormat.PNG: lambda: mask_png(seg.mask),
             OutputFormat.NIFTI: lambda: mask_nifti(seg.mask, seg.xray.spacing_mm),
             OutputFormat.DICOM_SEG: lambda: mask_dicom_seg(seg)}
    encoders = {
        "mask": masks[format],
        "overlay": lambda: overlay_png(seg),
        "uncertainty": lambda: uncertainty_png(seg.uncertainty),
        "json": lambda: (json.dumps({**result_dict(seg, seg.xray.path.name),
                                     "outputs": {k: p.name for k, p in paths.items()}}, indent=2) + "\n").encode(),
    }
    contents = {kind: encoders[kind]() for kind in paths}
    for kind, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.write_bytes(contents[kind])
    return paths
