"""What a segmentation writes: mask (PNG or NIfTI), overlay PNG and JSON record, under one naming scheme.

Per image ``<stem>``: ``<stem>_mask.png`` ({0, 255}, original size; ``<stem>_mask.nii.gz`` with
``format="nifti"``), ``<stem>_overlay.png`` and ``<stem>.json`` (lung areas in pixels and mm², left/right areas,
prompts and the prompt spec, models and versions). ``docs/predict.md`` documents every field.
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

from cxrsam.data.io import OVERLAY_SUFFIX, XRay, mask_file_name
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path
from cxrsam.prompts import Prompts, PromptSpec
from cxrsam.prompts.components import lung_components


class OutputFormat(StrEnum):
    """Mask file format: ``png`` ({0, 255}) or ``nifti`` (``.nii.gz``, uint8 {0, 1}; needs nibabel)."""

    PNG = "png"
    NIFTI = "nifti"


OUTPUT_KINDS = ("mask", "overlay", "json")
"""The files written per image, in order."""


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
    """

    xray: XRay
    mask: np.ndarray
    draft: np.ndarray | None
    prompts: Prompts
    source: str
    models: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    spec: PromptSpec | None = None


SIDES = {"image_left": "right lung (patient's right in a PA view)",
         "image_right": "left lung (patient's left in a PA view)"}
"""Left/right keys of the JSON: the side of the *image* the lung is on, and its anatomical name
assuming the usual PA (or AP) view with the patient facing the viewer."""
OVERLAY_RGB = (255, 64, 64)
OVERLAY_ALPHA = 0.35


def lung_areas(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> dict[str, Any]:
    """Total and per-lung areas of a bool mask (H, W), in pixels and (when spacing is known) mm².

    Left/right: the two largest components (each at least 0.5 % of the image) are the lungs, sorted
    by centroid column (:func:`cxrsam.prompts.components.lung_components`); keys are the *image*
    side (``image_left``, ``image_right``) with the anatomical name for a PA view. With fewer than
    two such components the lungs are not separable and ``lungs`` is None.
    """
    pixel_mm2 = None if spacing_mm is None else float(spacing_mm[0]) * float(spacing_mm[1])

    def area(pixels: int) -> dict[str, Any]:
        return {"pixels": int(pixels), "mm2": None if pixel_mm2 is None else round(pixels * pixel_mm2, 3)}

    components, _ = lung_components(mask)
    lungs = None
    if len(components) == 2:
        lungs = {side: {"anatomical": name, **area(int(comp.sum()))}
                 for (side, name), comp in zip(SIDES.items(), components)}
    return {"total": area(int(np.count_nonzero(mask))), "pixel_area_mm2": pixel_mm2, "lungs": lungs,
            "lungs_note": None if lungs else "left and right lungs are not separable (fewer than two components)"}


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


def output_paths(out_dir: str | Path, stem: str, format: OutputFormat | str = OutputFormat.PNG,
                 kinds: Sequence[str] = OUTPUT_KINDS) -> dict[str, Path]:
    """The files :func:`write_outputs` writes for ``stem`` (the one naming scheme): ``mask`` =
    ``<stem>_mask.png`` (or ``.nii.gz``), ``overlay`` = ``<stem>_overlay.png``, ``json`` = ``<stem>.json``."""
    format = output_format(format)
    out_dir = Path(out_dir)
    names = {"mask": mask_file_name(stem, ".png" if format is OutputFormat.PNG else ".nii.gz"),
             "overlay": f"{stem}{OVERLAY_SUFFIX}.png", "json": f"{stem}.json"}
    return {kind: out_dir / names[kind] for kind in kinds}


def write_outputs(seg: Segmentation, out_dir: str | Path, stem: str, format: OutputFormat | str = OutputFormat.PNG,
                  kinds: Sequence[str] = OUTPUT_KINDS) -> dict[str, Path]:
    """Write the mask (original size), overlay PNG and JSON of one image (the ``kinds`` asked for); returns
    their paths. Every file is encoded first and then written atomically, so an error leaves none of them.
    ``<stem>_mask.png`` matches ground truth ``<stem>.png`` in ``cxrsam evaluate``."""
    format = output_format(format)
    paths = output_paths(out_dir, stem, format, kinds)
    encoders = {
        "mask": lambda: mask_png(seg.mask) if format is OutputFormat.PNG else mask_nifti(seg.mask, seg.xray.spacing_mm),
        "overlay": lambda: overlay_png(seg),
        "json": lambda: (json.dumps({**result_dict(seg, seg.xray.path.name),
                                     "outputs": {k: p.name for k, p in paths.items()}}, indent=2) + "\n").encode(),
    }
    contents = {kind: encoders[kind]() for kind in paths}
    for kind, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.write_bytes(contents[kind])
    return paths
