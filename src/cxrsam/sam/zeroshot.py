"""Zero-shot SAM over a folder: draft masks -> prompts -> SAM masks written as PNG by image stem."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsam.data.io import XRay, list_images, read_draft, read_image, write_mask
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path
from cxrsam.prompts import Prompts, prompts_from_mask
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.registry import build_sam

log = logging.getLogger(__name__)

DraftSource = Callable[[XRay], np.ndarray]
"""Returns the draft lung mask bool (H, W) of an X-ray."""


@dataclass
class ZeroShotResult:
    """What :func:`run_zero_shot` wrote and met.

    Attributes:
        written: mask files, one per segmented image (``<out>/<stem>.png``).
        report: ``<out>/prompts.csv`` (stem, components found, prompt sets, warnings).
        missing_drafts: stems of images without a draft (skipped).
        warnings: stem -> prompt warnings (one component, empty draft, ...).
    """

    written: list[Path]
    report: Path
    missing_drafts: list[str] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=dict)


def image_seed(seed: int, stem: str) -> list[int]:
    """Seed sequence of one image's prompts: from ``seed`` and the stem, independent of file order."""
    return [seed, int.from_bytes(hashlib.sha256(stem.encode()).digest()[:4], "big")]


def drafts_from_dir(drafts_dir: str | Path) -> DraftSource:
    """Drafts read from ``drafts_dir/<stem>.<image suffix>`` (:func:`cxrsam.data.io.read_draft`; an empty
    draft is allowed and gives an empty mask)."""
    by_stem = {p.stem: p for p in list_images(drafts_dir)}
    if not by_stem:
        raise CxrsamError("no draft masks (image files) in folder", path=drafts_dir)

    def draft(xray: XRay) -> np.ndarray:
        path = by_stem.get(xray.path.stem)
        if path is None:
            raise KeyError(xray.path.stem)
        return read_draft(path, xray.size, allow_empty=True)

    return draft


def drafts_from_mapping(drafts: Mapping[str, np.ndarray]) -> DraftSource:
    """Drafts given in memory by stem (resized to the image by nearest neighbour when needed)."""
    from cxrsam.data.io import resize_mask

    def draft(xray: XRay) -> np.ndarray:
        mask = np.asarray(drafts[xray.path.stem]) > 0
        return mask if mask.shape == xray.size else resize_mask(mask, xray.size)

    return draft


def drafts_from_cnn(run_dir: str | Path) -> DraftSource:
    """Drafts predicted by a trained CNN baseline run (``cxrsam.baselines.predict.load_cnn_run``)."""
    try:
        from cxrsam.baselines.predict import load_cnn_run
    except ImportError as exc:
        raise CxrsamError(f"CNN baselines are not available in this install ({exc})", path=run_dir) from None
    predictor = load_cnn_run(run_dir)
    return lambda xray: np.asarray(predictor.predict(xray.pixels)) > 0


def drafts_from_path(source: str | Path) -> DraftSource:
    """Drafts from a CNN run folder (it holds ``config.yaml``: :func:`drafts_from_cnn`) or from a folder of
    draft masks named by image stem (:func:`drafts_from_dir`)."""
    from cxrsam.train.runs import CONFIG_YAML

    return drafts_from_cnn(source) if (Path(source) / CONFIG_YAML).is_file() else drafts_from_dir(source)


def _image_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(images, (str, Path)):
        paths = list_images(images)
        if not paths:
            raise CxrsamError("no images in folder", path=images)
        return paths
    return [Path(p) for p in images]


def run_zero_shot(images: str | Path | Sequence[str | Path], out_dir: str | Path, prompt: str = "box",
                  drafts: Mapping[str, np.ndarray] | str | Path | None = None, drafts_from: str | Path | None = None,
                  backend: str = "litemedsam", checkpoint: str | Path | None = None, device: str = "cpu",
                  cache_dir: str | Path | None = None, batch_size: int | None = None, box_mode: str = "per_lung",
                  points_per_lung: int = 3, strategy: str = "distance", negatives: Sequence[str] = (),
                  margin: float = 0.0, multimask: bool = False, seed: int = 0, progress: bool = True,
                  engine: SamEngine | None = None) -> ZeroShotResult:
    """Segment images with SAM prompted from draft masks; write ``<out_dir>/<stem>.png`` ({0, 255}).

    Args:
        images: a folder of images, or a list of image files.
        out_dir: output folder (created); masks are written atomically.
        prompt: ``box``, ``points`` or ``box+points``.
        drafts: draft masks as a folder (matched by stem) or a mapping stem -> mask (H, W).
        drafts_from: a CNN baseline run folder whose model predicts the drafts (instead of ``drafts``).
        backend, checkpoint, device: the SAM model (:func:`~cxrsam.sam.registry.build_sam`).
        cache_dir: on-disk embedding cache (re-runs with other prompts skip the encoder).
        batch_size: images per encoder call (None: the engine's default for the device, 1 on CPU).
        box_mode, points_per_lung, strategy, negatives, margin: prompt rules
            (:func:`~cxrsam.prompts.prompts_from_mask`).
        multimask: decode 3 candidates per prompt set and keep the one with the best predicted IoU.
        seed: prompt seed (each image draws from ``seed`` and its stem).
        progress: show a progress bar.
        engine: an existing engine to reuse (then backend/checkpoint/device/cache_dir are ignored).

    Images without a draft are skipped and listed; an empty draft gives an empty mask and a warning.
    """
    if (drafts is None) == (drafts_from is None):
        raise CxrsamError("give exactly one source of draft masks: --drafts DIR or --drafts-from CNN_RUNDIR")
    paths = _image_paths(images)
    if drafts_from is not None:
        draft_of = drafts_from_cnn(drafts_from)
    elif isinstance(drafts, Mapping):
        draft_of = drafts_from_mapping(drafts)
    else:
        draft_of = drafts_from_dir(drafts)
    engine = engine or SamEngine(build_sam(backend, checkpoint, device), cache_dir=cache_dir, batch_size=batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ZeroShotResult(written=[], report=out_dir / "prompts.csv")
    rows = []
    chunk = engine.batch_size * 4
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"zero-shot SAM ({engine.loaded.spec.name}, {prompt})", total=len(paths))
        for start in range(0, len(paths), chunk):
            xrays: list[XRay] = []
            prompts: list[Prompts] = []
            for path in paths[start:start + chunk]:
                xray = read_image(path)
                try:
                    draft = draft_of(xray)
                except KeyError:
                    result.missing_drafts.append(path.stem)
                    continue
                found = prompts_from_mask(draft, mode=prompt, box_mode=box_mode, points_per_lung=points_per_lung,
                                          strategy=strategy, negatives=negatives, margin=margin,
                                          rng=np.random.default_rng(image_seed(seed, path.stem)))
                if found.warnings:
                    result.warnings[path.stem] = found.warnings
                rows.append({"stem": path.stem, "components_found": found.components_found,
                             "prompt_sets": len(found.sets), "warnings": "; ".join(found.warnings)})
                xrays.append(xray)
                prompts.append(found)
            for xray, mask in zip(xrays, engine.segment_many(xrays, prompts, multimask=multimask)):
                result.written.append(write_mask(out_dir / f"{xray.path.stem}.png", mask))
            bar.advance(task, len(paths[start:start + chunk]))
    if not result.written:
        raise CxrsamError("no image had a draft mask (drafts are matched by file stem)", path=out_dir)
    with atomic_path(result.report) as tmp:
        pd.DataFrame(rows, columns=["stem", "components_found", "prompt_sets", "warnings"]).to_csv(tmp, index=False)
    return result


def dice_by_prompt_variant(engine: SamEngine, xrays: Sequence[XRay], truths: Sequence[np.ndarray],
                           drafts: Mapping[str, Sequence[np.ndarray]], variants: Mapping[str, Mapping],
                           only: Mapping[str, Collection[str]] | None = None, seed: int = 0,
                           progress: bool = True) -> pd.DataFrame:
    """Dice of SAM masks for every (draft source, prompt variant) pair, each image encoded once.

    Args:
        engine: the SAM engine.
        xrays: images.
        truths: ground-truth masks bool (H, W), one per image.
        drafts: draft source name (``ground truth``, a CNN run, ...) -> one draft mask per image.
        variants: variant name -> keyword arguments of :func:`~cxrsam.prompts.prompts_from_mask`,
            plus ``multimask`` (bool) for the decoder.
        only: draft source -> the variant names to score for it (default: all variants).
        seed: prompt seed (each image draws from ``seed`` and its stem).

    Returns:
        one row per image, source and variant: ``stem, source, variant, dice, components``.
    """
    from rich.progress import Progress

    from cxrsam.evaluation.metrics import dice_score

    rows = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("SAM prompt variants", total=len(xrays))
        for start in range(0, len(xrays), engine.batch_size):
            chunk = range(start, min(start + engine.batch_size, len(xrays)))
            engine.embed([xrays[i] for i in chunk])
            for i in chunk:
                stem = xrays[i].path.stem
                for source, masks in drafts.items():
                    for variant, options in variants.items():
                        if only is not None and source in only and variant not in only[source]:
                            continue
                        options = dict(options)
                        multimask = bool(options.pop("multimask", False))
                        prompts = prompts_from_mask(masks[i], rng=np.random.default_rng(image_seed(seed, stem)),
                                                    **options)
                        mask = engine.segment(xrays[i], prompts, multimask=multimask)
                        rows.append({"stem": stem, "source": source, "variant": variant,
                                     "dice": dice_score(mask, truths[i]), "components": prompts.components_found})
                bar.advance(task)
    return pd.DataFrame(rows, columns=["stem", "source", "variant", "dice", "components"])
