"""CNN drafts in ONNX Runtime on the CPU: a CNN run exported once, checked against PyTorch, cached, served.

``cnn.onnx``
    ``image`` (B, 1, S, S) float32, the grey image resized to the model size S (:class:`DraftPredictor`'s rule)
    -> ``probability`` (B, 1, S, S) float32, the sigmoid of the CNN's lung logits (channels replicated inside the
    graph when the run was trained on three). B is dynamic.

It goes in ``<cache>/onnx/cnn-<arch>-<key>/`` (the SAM exports' :func:`~cxrsam.sam.onnx_runtime.cache_root`), keyed by
the SHA-256 of the run's ``best.pt`` (checked against its ``checksums.json``), the architecture, encoder, input
channels and size, the opset, :data:`GRAPHS` and the cxrsam and torch versions; ``check.json`` holds the check and
the file's SHA-256. The check: two seeded phantoms (a square one and a non-square one, both resized to S), the
largest probability difference (:data:`MAX_PROBABILITY_DIFF`) and the smallest mask IoU at the threshold 0.5
(:data:`MIN_MASK_IOU`); an export that disagrees is refused in one line. A cached export needs neither
segmentation_models_pytorch nor the PyTorch model: ``cxrsam predict`` with ``--runtime onnx`` (``auto`` on the
CPU) builds the CNN only the first time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cxrsam.baselines.config import CnnTrainConfig, read_config
from cxrsam.baselines.predict import CnnPredictor, DraftPredictor, load_cnn_run
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path
from cxrsam.runs import BEST, verify_checksum
from cxrsam.sam.onnx_cache import (
    INSTALL_HINT,
    OPSET,
    cache_root,
    exporter_versions,
    inference_session,
    load_checked,
    onnx_installed,
    record_check,
)

log = logging.getLogger(__name__)

MODEL = "cnn.onnx"
GRAPHS = 1
"""Version of the exported graph's inputs and outputs; part of the cache key."""
MAX_PROBABILITY_DIFF = 1e-4
"""Largest accepted |probability difference| between PyTorch and ONNX Runtime at export."""
MIN_MASK_IOU = 0.999
"""Smallest accepted IoU of the thresholded probability maps (before post-processing) at export."""


def export_key(config: CnnTrainConfig, checkpoint_sha256: str, opset: int = OPSET) -> dict[str, Any]:
    """What a CNN export depends on: the weights' SHA-256, the network, its input, opset and versions
    (:func:`~cxrsam.sam.onnx_runtime.exporter_versions`)."""
    return {"kind": "cnn", "checkpoint_sha256": checkpoint_sha256, "arch": config.arch, "encoder": config.encoder,
            "in_channels": config.in_channels, "size": config.size, "opset": opset, "graphs": GRAPHS,
            **exporter_versions()}


def export_dir(config: CnnTrainConfig, checkpoint_sha256: str, opset: int = OPSET,
               root: str | Path | None = None) -> Path:
    """``<root>/cnn-<arch>-<first 16 hex of the SHA-256 of export_key>`` (root default: the SAM exports' cache)."""
    digest = hashlib.sha256(json.dumps(export_key(config, checkpoint_sha256, opset), sort_keys=True).encode())
    return Path(root or cache_root()) / f"cnn-{config.arch}-{digest.hexdigest()[:16]}"


class OnnxCnnPredictor(DraftPredictor):
    """A CNN run's checked ONNX export: the same drafts as :class:`~cxrsam.baselines.predict.CnnPredictor`."""

    runtime = "onnx"

    def __init__(self, session: Any, config: CnnTrainConfig, folder: Path, check: dict[str, Any],  # noqa: ANN401
                 postprocess: bool = True, threshold: float = 0.5):
        super().__init__(config, postprocess, threshold)
        self.session, self.folder, self.check = session, folder, check

    def forward(self, batch: np.ndarray) -> np.ndarray:
        image = np.ascontiguousarray(batch, dtype=np.float32)[:, None]
        return self.session.run(None, {"image": image})[0][:, 0]


def _graph(predictor: CnnPredictor):  # noqa: ANN202 - torch.nn.Module
    import torch

    from cxrsam.baselines.models import to_model_input

    class ProbabilityGraph(torch.nn.Module):
        """``image`` (B, 1, S, S) -> ``probability`` (B, 1, S, S)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = predictor.model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.model(to_model_input(image, predictor.config.in_channels)))

    return ProbabilityGraph().cpu().eval()


def check_export(predictor: CnnPredictor, onnx: OnnxCnnPredictor) -> dict[str, Any]:
    """PyTorch against ONNX Runtime on two seeded phantoms (square and 3:4), at the model size: the largest
    probability difference and the smallest IoU of the maps thresholded at ``predictor.threshold``."""
    from cxrsam.data.dataset import resize_image
    from cxrsam.data.synthetic import make_phantom

    images = [make_phantom(size=96, seed=0)[0], make_phantom(size=128, seed=1)[0][:, 16:112]]
    batch = np.stack([resize_image(image.astype(np.float32) / 255, predictor.size) for image in images])
    reference, got = predictor.forward(batch), onnx.forward(batch)
    ious = []
    for ref, new in zip(reference >= predictor.threshold, got >= predictor.threshold):
        union = np.logical_or(ref, new).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(ref, new).sum() / union))
    diff = float(np.abs(reference - got).max())
    return {"max_abs_probability_diff": diff, "min_mask_iou": min(ious),
            "limits": {"max_abs_probability_diff": MAX_PROBABILITY_DIFF, "min_mask_iou": MIN_MASK_IOU},
            "passed": bool(diff <= MAX_PROBABILITY_DIFF and min(ious) >= MIN_MASK_IOU)}


def export_checked(run_dir: Path, config: CnnTrainConfig, checkpoint_sha256: str, folder: Path,
                   postprocess: bool = True, opset: int = OPSET) -> OnnxCnnPredictor:
    """Export the CNN run into ``folder``, check it against PyTorch and write ``check.json``; a disagreeing export
    is refused (:class:`CxrsamError` naming its ``check.json``) and its ONNX file removed."""
    import torch

    predictor = load_cnn_run(run_dir, device="cpu", postprocess=postprocess)
    log.info("exporting CNN run %s to ONNX (opset %d) in %s", run_dir, opset, folder)
    size = predictor.size
    try:
        with atomic_path(folder / MODEL) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(_graph(predictor), (torch.zeros(1, 1, size, size),), str(tmp), dynamo=False,
                              opset_version=opset, input_names=["image"], output_names=["probability"],
                              dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}})
    except Exception as exc:  # the exporter raises many types for unsupported operators
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CxrsamError(f"CNN {config.arch}/{config.encoder} could not be exported to ONNX "
                          f"({type(exc).__name__}: {first})", path=run_dir) from None
    onnx = OnnxCnnPredictor(inference_session(folder / MODEL), config, folder, {}, postprocess, predictor.threshold)
    check = {"key": export_key(config, checkpoint_sha256, opset), **check_export(predictor, onnx)}
    onnx.check = record_check(
        folder, check, (MODEL,),
        f"ONNX export of CNN run {run_dir} disagrees with PyTorch (probability difference "
        f"{check['max_abs_probability_diff']:.2e}, limit {MAX_PROBABILITY_DIFF:g}; mask IoU "
        f"{check['min_mask_iou']:.4f}, limit {MIN_MASK_IOU:g})")
    return onnx


def load_onnx_cnn(run_dir: str | Path, postprocess: bool = True, root: str | Path | None = None,
                  opset: int = OPSET) -> OnnxCnnPredictor:
    """The checked ONNX export of a CNN run from the cache (:func:`export_dir`), exported on first use; the run's
    ``best.pt`` must match its recorded SHA-256 either way."""
    if not onnx_installed():
        raise CxrsamError(f"ONNX Runtime needs onnx and onnxruntime: {INSTALL_HINT}")
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if not (run_dir / BEST).is_file():
        raise CxrsamError(f"run folder has no {BEST} (training has not finished an epoch)", path=run_dir)
    digest = verify_checksum(run_dir / BEST)
    folder = export_dir(config, digest, opset, root)
    cached = load_checked(folder, lambda check: OnnxCnnPredictor(inference_session(folder / MODEL), config, folder,
                                                                 check, postprocess))
    return cached or export_checked(run_dir, config, digest, folder, postprocess, opset)
