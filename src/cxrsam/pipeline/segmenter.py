"""One image through the pipeline: draft (CNN run, mask file, or none) -> prompts (a :class:`PromptSpec`, or a
hand-given box/points) -> SAM (a LoRA run or a pretrained backend; or none, when the CNN's draft is the answer).

One :class:`Segmenter` serves ``cxrsam predict``, ``cxrsam zero-shot``, ``cxrsam predict-cnn``, the web app and the
experiment's stages; its :class:`~cxrsam.sam.engine.SamEngine` caches image embeddings, so refining a mask with
new clicks on the same image only runs the prompt encoder and mask decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrsam.baselines.drafts import DraftSource, drafts_from_path
from cxrsam.config import resolve_device
from cxrsam.data.io import XRay
from cxrsam.errors import CxrsamError
from cxrsam.pipeline.outputs import Segmentation
from cxrsam.pipeline.quality import QualityThresholds, assess, quality_signals
from cxrsam.pipeline.uncertainty import DEFAULT_JITTER, prompt_uncertainty
from cxrsam.prompts import Prompts, PromptSet, PromptSpec
from cxrsam.prompts.boxes import clip_box
from cxrsam.sam.engine import Precision, SamEngine
from cxrsam.sam.lora import LoraSam
from cxrsam.sam.onnx_cache import exporter_versions
from cxrsam.sam.onnx_runtime import Runtime, make_engine, resolve_runtime
from cxrsam.sam.registry import LoadedSam

DEFAULT_UNCERTAINTY_SAMPLES = 0
"""Perturbed prompt decodes per image for the uncertainty map by default (0 = off; ``--uncertainty-samples``)."""


def check_uncertainty_samples(samples: int) -> int:
    """``samples`` if it is 0 (uncertainty off) or at least 2, else :class:`CxrsamError`."""
    if samples == 1 or samples < 0:
        raise CxrsamError(f"--uncertainty-samples must be 0 (off) or at least 2, got {samples}")
    return samples


def parse_box(text: str) -> np.ndarray:
    """``"x0,y0,x1,y1"`` (pixels of the original image) -> (4,) float32; raises on malformed text."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise CxrsamError(f"--box must be x0,y0,x1,y1 in pixels with x0 < x1 and y0 < y1, got {text!r}")
    return np.array(values, dtype=np.float32)


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


class Segmenter:
    """Draft -> prompts -> SAM for one image at a time.

    Args:
        sam: the SAM model: a :class:`~cxrsam.sam.registry.LoadedSam` (pretrained, or a LoRA run from
            :func:`cxrsam.sam.lora.load_run`), or None when the draft itself is the result (CNN baseline).
        drafter: a :class:`~cxrsam.baselines.drafts.DraftSource` giving draft masks, or None (prompts are then
            given per image: a box, points, or a draft).
        spec: how drafts become prompts (:class:`~cxrsam.prompts.PromptSpec`).
        models: identities recorded in every result (default: :func:`describe_models`).
        cache_dir: on-disk embedding cache of the engine (None: memory only).
        memory_items: image embeddings kept in memory (LiteMedSAM embeddings take 4 MiB each).
        batch_size: images per encoder call (None: the engine's default for the device).
        runtime: what runs SAM: ``torch``, ``onnx`` or ``auto`` (:func:`~cxrsam.sam.onnx_runtime.resolve_runtime`).
        precision: the encoder's arithmetic (:class:`~cxrsam.sam.engine.Precision`; fp32 by default).
        thresholds: when a result is flagged for review (:class:`~cxrsam.pipeline.quality.QualityThresholds`).
        uncertainty_samples: K perturbed prompt decodes per image for the uncertainty map
            (:mod:`cxrsam.pipeline.uncertainty`); 0 = off, else at least 2.
        uncertainty_jitter: std of the perturbation as a fraction of the box side.
    """

    def __init__(self, sam: LoadedSam | None, drafter: DraftSource | None = None, spec: PromptSpec | None = None,
                 models: dict[str, Any] | None = None, cache_dir: str | Path | None = None, memory_items: int = 32,
                 batch_size: int | None = None, runtime: str = "torch", thresholds: QualityThresholds | None = None,
                 uncertainty_samples: int = DEFAULT_UNCERTAINTY_SAMPLES, uncertainty_jitter: float = DEFAULT_JITTER,
                 precision: Precision | str = Precision.FP32):
        if sam is None and drafter is None:
            raise CxrsamError("nothing to segment with: give a SAM model, a draft source, or both")
        check_uncertainty_samples(uncertainty_samples)
        self.sam = sam
        self.drafter = drafter
        self.spec = spec or PromptSpec()
        self.thresholds = thresholds or QualityThresholds()
        self.uncertainty_samples = uncertainty_samples
        self.uncertainty_jitter = uncertainty_jitter
        self.engine = None if sam is None else make_engine(sam, runtime, cache_dir=cache_dir, precision=precision,
                                                           memory_items=memory_items, batch_size=batch_size)
        self.models = models if models is not None else describe_models(sam, drafter, engine=self.engine)

    @classmethod
    def from_engine(cls, engine: SamEngine, drafter: DraftSource | None = None, spec: PromptSpec | None = None,
                    **settings: Any) -> Segmenter:
        """A segmenter around an existing engine (sharing its embedding caches, e.g. across experiment stages);
        ``settings``: ``thresholds``, ``uncertainty_samples``, ``uncertainty_jitter``."""
        segmenter = cls(engine.loaded, drafter, spec, **settings)
        segmenter.engine = engine
        segmenter.models = describe_models(engine.loaded, drafter, engine=engine)
        return segmenter

    def draft(self, xray: XRay) -> np.ndarray | None:
        """The draft lung mask bool (H, W) for ``xray`` from the draft source, or None without one."""
        return None if self.drafter is None else self.drafter(xray)

    def probability(self, xray: XRay) -> np.ndarray | None:
        """The draft's foreground probability float32 (H, W) when the prompt spec draws points with it (the
        ``probability`` strategy or random negatives) and there is a draft source; else None."""
        return self.drafter.probability(xray) if self.drafter is not None and self.spec.uses_weight else None

    def segment(self, xray: XRay, box: Sequence[float] | np.ndarray | None = None,
                points: Sequence[Sequence[float]] | np.ndarray | None = None,
                labels: Sequence[int] | np.ndarray | None = None, draft: np.ndarray | None = None,
                draft_source: str | None = None, probability: np.ndarray | None = None) -> Segmentation:
        """Segment the lungs of one X-ray.

        Prompt rules: a hand-given ``box`` (x0, y0, x1, y1 in original pixels; refused when outside the image)
        replaces draft prompts and forms one prompt set with the given ``points``; without a box the prompts come
        from ``draft`` (named ``draft_source`` in the record; or the draft source's draft when ``draft`` is None)
        by :attr:`spec` (points of the ``probability`` strategy weighted by ``probability``, the draft's foreground
        probability float32 (H, W), or the draft source's; the draft mask itself when neither), and ``points``
        (x, y; ``labels`` 1 = lung, 0 = background, default 1) refine the box or draft prompts as clicks in their
        order (:meth:`~cxrsam.sam.engine.SamEngine.decode_clicks`: one round per click for a model trained with its
        previous result as a mask prompt); with neither a box nor a usable draft, the points alone form one prompt
        set. Without a SAM model the draft is the mask.

        Raises :class:`CxrsamError` naming the image when there is nothing to prompt SAM with.
        """
        size = xray.size
        clicks = validate_points(points, labels, size)
        warnings: list[str] = []
        source = draft_source or (self.drafter.kind if self.drafter is not None else "draft-file")
        if box is None and draft is None and self.drafter is not None:
            draft = self.draft(xray)
            probability = self.probability(xray) if probability is None else probability
        if self.engine is None:  # the CNN baseline: its draft is the result
            if draft is None:
                raise CxrsamError("no draft: a segmenter without SAM needs a draft source", path=xray.path)
            mask = np.asarray(draft, dtype=bool)
            return Segmentation(xray=xray, mask=mask, draft=draft, prompts=Prompts([], size, "none", 0),
                                source="cnn", models=self.models,
                                quality=assess(quality_signals(mask, min_area_frac=self.spec.min_area_frac),
                                               self.thresholds))
        spec = None
        if box is not None:
            box_arr, warning = validate_box(box, size)
            warnings += [warning] if warning else []
            prompts, source = Prompts([PromptSet(box=box_arr)], size, "box", 0), "box"
        else:
            spec = self.spec if draft is not None else None
            prompts = None if draft is None else self.spec.prompts(draft, xray.path.stem, probability)
            warnings += [] if prompts is None else prompts.warnings
            if prompts is not None and not prompts.empty:
                source = source if clicks is None else f"{source}+clicks"
            elif clicks is not None:  # the points alone are the prompt: nothing to refine
                prompts, source = Prompts([PromptSet(points=clicks[0], labels=clicks[1])], size, "points", 0), "points"
                clicks = None
            elif prompts is None:
                raise CxrsamError("no prompt for SAM: give a CNN run (--drafts-from), draft masks (--drafts) "
                                  "or a box (--box x0,y0,x1,y1)", path=xray.path)
        if prompts.empty:
            raise CxrsamError(f"no lung found to prompt SAM with ({'; '.join(warnings) or 'empty draft'})",
                              path=xray.path)
        embedding = self.engine.embed([xray])[0]
        prompts, logits, iou = self.engine.decode_clicks(embedding, prompts, *(clicks or (None, None)),
                                                         multimask=self.spec.multimask)
        mask = self.engine.union_mask(logits)
        if not mask.any():
            warnings.append("SAM returned an empty mask")
        uncertainty = None if not self.uncertainty_samples else prompt_uncertainty(
            self.engine, embedding, prompts, self.uncertainty_samples, self.uncertainty_jitter, seed=self.spec.seed,
            stem=xray.path.stem, multimask=self.spec.multimask)
        signals = quality_signals(mask, draft if spec is not None else None, iou.tolist(),
                                  None if uncertainty is None else uncertainty.score, self.spec.min_area_frac)
        return Segmentation(xray=xray, mask=mask, draft=draft, prompts=prompts, source=source, models=self.models,
                            warnings=warnings, spec=spec, quality=assess(signals, self.thresholds),
                            uncertainty=uncertainty)


def build_segmenter(run: str | Path | None = None, drafts_from: str | Path | None = None,
                    backend: str | None = "litemedsam", checkpoint: str | Path | None = None,
                    spec: PromptSpec | None = None, device: str | None = None,
                    cache_dir: str | Path | None = None, batch_size: int | None = None, runtime: str = "torch",
                    uncertainty_samples: int = DEFAULT_UNCERTAINTY_SAMPLES,
                    thresholds: QualityThresholds | None = None, precision: Precision | str = Precision.FP32,
                    lora_scale: float | None = None) -> Segmenter:
    """A :class:`Segmenter` from folders on disk: ``run`` = LoRA run (else the pretrained ``backend`` and
    ``checkpoint``; ``backend=None`` and no run: no SAM, the CNN's drafts are the result), ``drafts_from`` = a CNN
    run or a folder of draft masks (else prompts must be given per image); ``runtime`` runs SAM;
    ``uncertainty_samples``, ``thresholds`` and ``precision`` as in :class:`Segmenter`; ``lora_scale``: the run's
    WiSE-FT scale in [0, 1] instead of its recorded one (:func:`cxrsam.sam.lora.load_run`; refused without a run)."""
    check_uncertainty_samples(uncertainty_samples)
    if lora_scale is not None and run is None:
        raise CxrsamError("--lora-scale needs a LoRA run (--run)")
    device = resolve_device(device)
    onnx = resolve_runtime(runtime, device, precision) is Runtime.ONNX  # a cached export needs no PyTorch model
    drafter = None if drafts_from is None else drafts_from_path(drafts_from, device=device, runtime=runtime)
    if run is not None:
        from cxrsam.sam.lora import load_run

        sam = load_run(run, device=device, checkpoint=checkpoint, scale=lora_scale, lazy=onnx)
    elif backend is not None:
        from cxrsam.sam.registry import build_sam

        sam = build_sam(backend, checkpoint, device=device, lazy=onnx)
    else:
        sam = None
    segmenter = Segmenter(sam, drafter, spec=spec, cache_dir=cache_dir, batch_size=batch_size, runtime=runtime,
                          thresholds=thresholds, uncertainty_samples=uncertainty_samples, precision=precision)
    segmenter.models = describe_models(sam, drafter, run=run, engine=segmenter.engine)
    return segmenter


def describe_models(sam: LoadedSam | None, drafter: DraftSource | None = None, run: str | Path | None = None,
                    engine: SamEngine | None = None) -> dict[str, Any]:
    """Identities and versions recorded in every result JSON (``runtime`` and ``precision``: what ran SAM and in
    which arithmetic, from ``engine``; ``versions``: cxrsam's and torch's, by the rule of the ONNX cache keys)."""
    sam_info = None if sam is None else {
        "kind": "lora" if run is not None else "pretrained", "model_id": sam.model_id, "backend": sam.spec.name,
        "run": None if run is None else str(Path(run).resolve()),
        **({"lora_scale": sam.scale} if isinstance(sam, LoraSam) else {}),
        **({"mask_prompt": True} if sam.mask_prompt else {}),  # hand-given clicks replayed one round each
        "runtime": engine.runtime if engine is not None else "torch",
        "precision": str(engine.precision if engine is not None else Precision.FP32)}
    return {"sam": sam_info, "drafts": None if drafter is None else drafter.describe(),
            "versions": exporter_versions()}
