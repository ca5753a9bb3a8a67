"""Lung masks for new images: prompts (CNN draft, draft mask file or hand-given box/points) -> SAM -> outputs.

One :class:`Segmenter` serves both ``cxrsam predict`` and the web app (``cxrsam app``):

* prompts come from a CNN run's draft mask (:func:`cxrsam.baselines.predict.load_cnn_run`), from a
  draft mask given by the caller (``--drafts DIR``), or from a box and/or points given by hand;
* the SAM stage is a LoRA run (:func:`cxrsam.sam.lora.load_run`) when given, else the pretrained
  backend (:func:`cxrsam.sam.registry.build_sam`, LiteMedSAM by default);
* one :class:`~cxrsam.sam.engine.SamEngine` caches image embeddings, so refining a mask with new
  clicks on the same image only runs the prompt encoder and mask decoder.

:func:`write_outputs` writes, per image, ``<stem>_mask.png`` ({0, 255}, original size; or
``<stem>_mask.nii.gz`` with ``format="nifti"``), ``<stem>_overlay.png`` and ``<stem>.json``
(lung areas in pixels and mm², left/right areas, prompts, models and versions). Every file is
encoded in memory first and written atomically, so a failing image leaves no files behind.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxrsam.data.io import XRay, read_draft, read_image
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, sha256_file
from cxrsam.prompts import Prompts, PromptSet, prompts_from_mask
from cxrsam.prompts.boxes import clip_box
from cxrsam.prompts.components import lung_components

log = logging.getLogger(__name__)

FORMATS = ("png", "nifti")
SIDES = {"image_left": "right lung (patient's right in a PA view)",
         "image_right": "left lung (patient's left in a PA view)"}
"""Left/right keys of the JSON: the side of the *image* the lung is on, and its anatomical name
assuming the usual PA (or AP) view with the patient facing the viewer."""
OVERLAY_RGB = (255, 64, 64)
OVERLAY_ALPHA = 0.35


@dataclass
class Segmentation:
    """The result for one image.

    Attributes:
        xray: the image (``pixels`` float32 (H, W) in [0, 1], ``spacing_mm`` (row, col) or None).
        mask: bool (H, W), the lung mask at the image's original size.
        draft: bool (H, W) draft mask the prompts were derived from, or None (hand-given prompts).
        prompts: the prompt sets SAM decoded (original pixel coordinates), merged by union.
        source: where the prompts came from: ``cnn-draft``, ``draft-file``, ``box`` or ``points``,
            with ``+clicks`` when hand-given points were added to draft prompts.
        models: identities of the models used (``sam``, ``sam_kind``, ``cnn``, versions).
        warnings: problems noticed on the way (e.g. one lung component in the draft).
    """

    xray: XRay
    mask: np.ndarray
    draft: np.ndarray | None
    prompts: Prompts
    source: str
    models: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


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
    check_format("nifti")
    import nibabel as nib

    row_mm, col_mm = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    data = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8).T[:, :, None])
    image = nib.Nifti1Image(data, affine=np.diag([col_mm, row_mm, 1.0, 1.0]))
    image.header.set_xyzt_units("mm" if spacing_mm is not None else "unknown")
    return gzip.compress(image.to_bytes(), mtime=0)


def check_format(format: str) -> None:
    """Refuse, in one line, an unknown output format or one whose optional package is not installed
    (``nifti`` needs nibabel): called before any image is read, so no work is done in vain."""
    if format not in FORMATS:
        raise CxrsamError(f"unknown output format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "nifti":
        try:
            import nibabel  # noqa: F401
        except ImportError:
            raise CxrsamError("--format nifti needs the optional package nibabel (pip install nibabel)") from None


def output_paths(out_dir: str | Path, stem: str, format: str = "png") -> dict[str, Path]:
    """The files :func:`write_outputs` writes for ``stem``: ``mask``, ``overlay``, ``json``."""
    check_format(format)
    out_dir = Path(out_dir)
    mask_name = f"{stem}_mask.png" if format == "png" else f"{stem}_mask.nii.gz"
    return {"mask": out_dir / mask_name, "overlay": out_dir / f"{stem}_overlay.png", "json": out_dir / f"{stem}.json"}


def write_outputs(seg: Segmentation, out_dir: str | Path, stem: str, format: str = "png") -> dict[str, Path]:
    """Write the mask (original size), overlay PNG and JSON of one image; returns their paths.

    All three files are encoded first and then written atomically, so an error leaves none of them.
    ``<stem>_mask.png`` matches ground truth ``<stem>.png`` in ``cxrsam evaluate``.
    """
    paths = output_paths(out_dir, stem, format)
    record = result_dict(seg, seg.xray.path.name)
    record["outputs"] = {key: path.name for key, path in paths.items()}
    contents = {
        "mask": mask_png(seg.mask) if format == "png" else mask_nifti(seg.mask, seg.xray.spacing_mm),
        "overlay": overlay_png(seg),
        "json": (json.dumps(record, indent=2) + "\n").encode(),
    }
    for key, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.write_bytes(contents[key])
    return paths


def parse_box(text: str) -> np.ndarray:
    """``"x0,y0,x1,y1"`` (pixels of the original image) -> (4,) float32; raises on malformed text."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise CxrsamError(f"--box must be x0,y0,x1,y1 in pixels with x0 < x1 and y0 < y1, got {text!r}")
    return np.array(values, dtype=np.float32)


def validate_points(points: Sequence[Sequence[float]] | np.ndarray | None, labels: Sequence[int] | np.ndarray | None,
                    size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Hand-given points (N, 2) xy inside an image of ``size=(H, W)`` and labels (N,) in {0, 1}
    (default 1) as arrays, or None without points; raises :class:`CxrsamError` otherwise."""
    if points is None or len(points) == 0:
        return None
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    labs = np.ones(len(pts), np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labs) != len(pts) or not np.isin(labs, (0, 1)).all():
        raise CxrsamError("point labels must be 0 (background) or 1 (lung), one per point")
    h, w = size
    if (pts[:, 0] < 0).any() or (pts[:, 0] > w - 1).any() or (pts[:, 1] < 0).any() or (pts[:, 1] > h - 1).any():
        raise CxrsamError(f"points must lie inside the {w}x{h} image")
    return pts, labs


def validate_box(box: Sequence[float] | np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """A hand-given box (x0, y0, x1, y1 in pixels, corners in any order) on an image of ``size=(H, W)``:
    (4,) float32 clipped to the image, and a warning when clipping changed it (else None). A box that is
    not four finite numbers, or has no area inside the image, raises :class:`CxrsamError`."""
    values = np.asarray(box, dtype=np.float32).reshape(-1)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise CxrsamError(f"a box is four numbers x0,y0,x1,y1, got {np.asarray(box).tolist()}")
    h, w = size
    x0, x1 = sorted(values[[0, 2]])
    y0, y1 = sorted(values[[1, 3]])
    given = np.array([x0, y0, x1, y1], dtype=np.float32)
    text = ",".join(f"{v:g}" for v in given)
    if x1 <= 0 or y1 <= 0 or x0 >= w - 1 or y0 >= h - 1:
        raise CxrsamError(f"box {text} lies outside the {w}x{h} image")
    clipped = clip_box(given, size)
    if np.array_equal(clipped, given):
        return given, None
    return clipped, (f"box {text} reaches outside the {w}x{h} image; clipped to "
                     + ",".join(f"{v:g}" for v in clipped))


def add_points(prompts: Prompts, points: np.ndarray, labels: np.ndarray) -> Prompts:
    """Draft prompts with hand-given points added: each point joins the set whose box contains it
    (else the set whose box or points centre is nearest), so a click refines the lung it is on."""
    sets = [PromptSet(s.box, s.points, s.labels) for s in prompts.sets]

    def centre(s: PromptSet) -> np.ndarray:
        return (s.box[:2] + s.box[2:]) / 2 if s.box is not None else s.points.mean(axis=0)

    for point, label in zip(points, labels):
        inside = [i for i, s in enumerate(sets) if s.box is not None
                  and s.box[0] <= point[0] <= s.box[2] and s.box[1] <= point[1] <= s.box[3]]
        target = inside[0] if inside else int(np.argmin([np.linalg.norm(centre(s) - point) for s in sets]))
        s = sets[target]
        s.points = point[None] if s.points is None else np.concatenate([s.points, point[None]])
        s.labels = np.array([label]) if s.labels is None else np.concatenate([s.labels, [label]])
    mode = "box+points" if any(s.box is not None for s in sets) else "points"
    return Prompts(sets, prompts.image_size, mode, prompts.components_found, list(prompts.warnings))


class Segmenter:
    """Draft (optional CNN) -> prompts -> SAM (LoRA run or pretrained backend) for one image at a time.

    Args:
        sam: the SAM model: a :class:`~cxrsam.sam.registry.LoadedSam` or a LoRA run from
            :func:`cxrsam.sam.lora.load_run` (anything :class:`~cxrsam.sam.engine.SamEngine` accepts,
            with a ``model_id``).
        drafter: a CNN (:class:`~cxrsam.baselines.predict.CnnPredictor`) giving draft masks, or None.
        prompt_mode: how draft masks become prompts: ``box``, ``points`` or ``box+points``.
        models: identities recorded in every result (see :meth:`from_runs`).
        cache_dir: on-disk embedding cache of the engine (None: memory only).
        memory_items: image embeddings kept in memory (the app re-prompts recent uploads without
            re-encoding them; LiteMedSAM embeddings take 4 MiB each).
    """

    def __init__(self, sam: Any, drafter: Any | None = None, prompt_mode: str = "box",
                 models: dict[str, Any] | None = None, cache_dir: str | Path | None = None,
                 memory_items: int = 32):
        from cxrsam.sam.engine import SamEngine

        self.sam = sam
        self.drafter = drafter
        self.prompt_mode = prompt_mode
        self.engine = SamEngine(sam, cache_dir=cache_dir, memory_items=memory_items)
        self.models = models if models is not None else describe_models(sam)

    @classmethod
    def from_runs(cls, run: str | Path | None = None, drafts_from: str | Path | None = None,
                  backend: str = "litemedsam", checkpoint: str | Path | None = None, prompt_mode: str = "box",
                  device: str | torch.device | None = None, cache_dir: str | Path | None = None) -> Segmenter:
        """Build from run folders: ``run`` = LoRA run (else pretrained ``backend``/``checkpoint``),
        ``drafts_from`` = CNN run for automatic drafts (else prompts must be given per image)."""
        from cxrsam.baselines.predict import default_device, load_cnn_run

        device = torch.device(device) if device is not None else default_device()
        drafter = None
        cnn_info = None
        if drafts_from is not None:
            drafter = load_cnn_run(drafts_from, device=device)
            best = Path(drafts_from) / "best.pt"
            cnn_info = {"run": str(Path(drafts_from).resolve()), "arch": drafter.config.arch,
                        "encoder": drafter.config.encoder, "size": drafter.size,
                        "checkpoint_sha256": sha256_file(best)}
        if run is not None:
            from cxrsam.sam.lora import load_run

            sam = load_run(run, device=device, checkpoint=checkpoint)
            kind = "lora"
        else:
            from cxrsam.sam.registry import build_sam

            sam = build_sam(backend, checkpoint, device=device)
            kind = "pretrained"
        models = describe_models(sam, kind=kind, run=run, cnn=cnn_info)
        return cls(sam, drafter, prompt_mode=prompt_mode, models=models, cache_dir=cache_dir)

    def draft(self, xray: XRay) -> np.ndarray | None:
        """The CNN's draft lung mask bool (H, W) for ``xray``, or None without a CNN."""
        return None if self.drafter is None else self.drafter.predict(xray.pixels)

    def segment(self, xray: XRay, box: Sequence[float] | np.ndarray | None = None,
                points: Sequence[Sequence[float]] | np.ndarray | None = None,
                labels: Sequence[int] | np.ndarray | None = None, draft: np.ndarray | None = None,
                draft_source: str = "cnn-draft") -> Segmentation:
        """Segment the lungs of one X-ray.

        Prompt rules: a hand-given ``box`` (x0, y0, x1, y1 in original pixels) replaces draft
        prompts and forms one prompt set with the given ``points``; without a box the prompts come
        from ``draft`` (or the CNN's draft when ``draft`` is None), per lung, and ``points``
        (x, y; ``labels`` 1 = lung, 0 = background, default 1) are added to the lung they fall on;
        with neither a box nor a usable draft, the points alone form one prompt set. A box that
        reaches outside the image is clipped to it, with a warning (:func:`validate_box`).

        Raises :class:`CxrsamError` naming the image when there is nothing to prompt SAM with, and
        :class:`CxrsamError` when a point or the box lies outside the image.
        """
        size = xray.size
        clicks = validate_points(points, labels, size)
        warnings: list[str] = []
        if box is not None:
            box_arr, clipped = validate_box(box, size)
            if clipped:
                log.warning("%s: %s", xray.path, clipped)
                warnings.append(clipped)
            prompt = PromptSet(box=box_arr)
            if clicks is not None:
                prompt.points, prompt.labels = clicks
            prompts = Prompts([prompt], size, "box" if clicks is None else "box+points", 0)
            source = "box"
        else:
            if draft is None and self.drafter is not None:
                draft, draft_source = self.draft(xray), "cnn-draft"
            prompts = None if draft is None else prompts_from_mask(draft, mode=self.prompt_mode)
            warnings += [] if prompts is None else prompts.warnings
            if prompts is not None and not prompts.empty:
                source = draft_source
                if clicks is not None:
                    prompts, source = add_points(prompts, *clicks), f"{draft_source}+clicks"
            elif clicks is not None:
                prompts, source = Prompts([PromptSet(points=clicks[0], labels=clicks[1])], size, "points", 0), "points"
            elif prompts is None:
                raise CxrsamError("no prompt for SAM: give a CNN run (--drafts-from), draft masks (--drafts) "
                                  "or a box (--box x0,y0,x1,y1)", path=xray.path)
        if prompts.empty:
            raise CxrsamError(f"no lung found to prompt SAM with ({'; '.join(warnings) or 'empty draft'})",
                              path=xray.path)
        mask = np.asarray(self.engine.segment(xray, prompts), dtype=bool)
        if not mask.any():
            warnings.append("SAM returned an empty mask")
        return Segmentation(xray=xray, mask=mask, draft=draft, prompts=prompts, source=source,
                            models=self.models, warnings=warnings)


def describe_models(sam: Any, kind: str = "pretrained", run: str | Path | None = None,
                    cnn: dict[str, Any] | None = None) -> dict[str, Any]:
    """Identities and versions recorded in every result JSON."""
    import cxrsam

    spec = getattr(sam, "spec", None)
    return {
        "sam": {"kind": kind, "model_id": sam.model_id,
                "backend": getattr(spec, "name", None),
                "run": None if run is None else str(Path(run).resolve())},
        "cnn": cnn,
        "versions": {"cxrsam": cxrsam.__version__, "torch": torch.__version__},
    }


@dataclass
class PredictReport:
    """What :func:`predict_images` did: output files per image, and the images that failed
    (image path, one-line message naming the file at fault: the image or its draft mask)."""

    written: dict[Path, dict[str, Path]] = field(default_factory=dict)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from ``paths``: files as given (their type is checked by content when read), folders
    by :func:`cxrsam.data.io.list_images`. A missing path or a folder without images raises."""
    from cxrsam.data.io import list_images

    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise CxrsamError("no images in this folder (png, jpg, tif, bmp, dcm, ...)", path=path)
            found += images
        elif path.exists():
            found.append(path)
        else:
            raise CxrsamError("file or folder not found", path=path)
    return list(dict.fromkeys(found))


def _draft_files(drafts_dir: Path) -> dict[str, Path]:
    from cxrsam.data.io import list_images

    return {p.stem.removesuffix("_mask"): p for p in list_images(drafts_dir)}


def predict_images(segmenter: Segmenter, images: Sequence[Path], out_dir: str | Path,
                   box: np.ndarray | None = None, drafts_dir: str | Path | None = None,
                   format: str = "png", progress: bool = True) -> PredictReport:
    """Segment every image and write its outputs (:func:`write_outputs`) to ``out_dir``.

    Prompts: ``box`` for every image if given, else the draft mask ``drafts_dir/<stem>.png`` (or
    ``<stem>_mask.png``) if ``drafts_dir`` is given, else the segmenter's CNN draft. An image that
    cannot be read or segmented is reported in :attr:`PredictReport.failed` and leaves no output
    files; the others go on. Two images with the same stem: the second fails (it would overwrite).
    """
    from rich.progress import track

    check_format(format)
    drafts = _draft_files(Path(drafts_dir)) if drafts_dir is not None else None
    report = PredictReport()
    stems: set[str] = set()
    for path in track(images, description="predict", disable=not progress, transient=True):
        try:
            if path.stem in stems:
                raise CxrsamError(f"another image has the stem {path.stem!r}; its outputs would be overwritten",
                                  path=path)
            xray = read_image(path)
            draft, source = None, "cnn-draft"
            if box is None and drafts is not None:
                if path.stem not in drafts:
                    raise CxrsamError(f"no draft mask for this image in {drafts_dir}", path=path)
                draft, source = read_draft(drafts[path.stem], xray.size), "draft-file"
            seg = segmenter.segment(xray, box=box, draft=draft, draft_source=source)
            report.written[path] = write_outputs(seg, out_dir, path.stem, format)
            stems.add(path.stem)
        except CxrsamError as exc:
            report.failed.append((path, str(exc) if exc.path is not None else f"{path}: {exc}"))
    return report
