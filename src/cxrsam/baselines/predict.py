"""Draft lung masks from a trained CNN run: ``load_cnn_run(run_dir).predict(pixels)`` (folders of images go
through the one pipeline, :func:`cxrsam.pipeline.segment_images`, as ``cxrsam predict-cnn``).

Prediction: the image (H, W) is resized to the model size S (as in training), the lung probability
map (S, S) is resized back to (H, W) bilinearly and thresholded at 0.5. Post-processing (on by
default, :func:`cxrsam.baselines.postprocess.clean_mask`) keeps the two largest components and
fills holes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cxrsam.baselines.config import CnnTrainConfig, read_config
from cxrsam.baselines.postprocess import clean_mask
from cxrsam.config import resolve_device
from cxrsam.data.dataset import resize_image
from cxrsam.errors import CxrsamError
from cxrsam.runs import BEST, MANIFEST_CSV, load_checkpoint, require_finite, verify_checksum

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn


class DraftPredictor:
    """What every CNN runtime shares: the image resized to the model size S (as in training), the probability map
    (S, S) resized back to the image's (H, W) bilinearly, thresholded and post-processed. A runtime gives
    :meth:`forward`."""

    runtime = ""
    """What runs the CNN: ``torch`` or ``onnx``."""

    def __init__(self, config: CnnTrainConfig, postprocess: bool = True, threshold: float = 0.5):
        self.config = config
        self.postprocess = postprocess
        self.threshold = threshold

    @property
    def size(self) -> int:
        """Model input side S in pixels."""
        return self.config.size

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Lung probabilities float32 (B, S, S) of grey model-size images float32 (B, S, S) in [0, 1]."""
        raise NotImplementedError

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lung probability maps float32 (H, W) in [0, 1], one per image float32 (H, W) in [0, 1]."""
        if not images:
            return []
        probs = self.forward(np.stack([resize_image(np.asarray(img, dtype=np.float32), self.size) for img in images]))
        return [cv2.resize(p, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
                for p, img in zip(probs, images)]

    def predict_many(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Masks bool (H_i, W_i) for images float32 (H_i, W_i) in [0, 1] (sizes may differ)."""
        masks: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            masks += [self.mask_of(prob) for prob in self.probabilities(images[start:start + batch_size])]
        return masks

    def mask_of(self, probability: np.ndarray) -> np.ndarray:
        """The mask bool (H, W) of a probability map float32 (H, W): thresholded, then post-processed."""
        mask = probability >= self.threshold
        return clean_mask(mask) if self.postprocess else mask

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Mask bool (H, W) for one image float32 (H, W) in [0, 1]."""
        return self.predict_many([pixels])[0]


class CnnPredictor(DraftPredictor):
    """A trained U-Net/DeepLabv3+ in PyTorch that maps X-ray pixels to lung masks at the image's own size."""

    runtime = "torch"

    def __init__(self, model: nn.Module, config: CnnTrainConfig, device: torch.device | str | None = None,
                 postprocess: bool = True, threshold: float = 0.5):
        super().__init__(config, postprocess, threshold)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    def forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from cxrsam.baselines.models import to_model_input

        x = torch.from_numpy(batch)[:, None].to(self.device)
        with torch.no_grad():
            return torch.sigmoid(self.model(to_model_input(x, self.config.in_channels)).float())[:, 0].cpu().numpy()


def load_cnn_run(run_dir: str | Path, device: torch.device | str | None = None,
                 postprocess: bool = True) -> CnnPredictor:
    """The best model of a ``train-cnn`` run folder (reads ``config.yaml`` and ``best.pt``)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if not (run_dir / BEST).is_file():
        raise CxrsamError(f"run folder has no {BEST} (training has not finished an epoch)", path=run_dir)
    from cxrsam.baselines.models import build_cnn  # segmentation_models_pytorch: imported only to build one

    verify_checksum(run_dir / BEST)
    checkpoint = load_checkpoint(run_dir / BEST)
    model = build_cnn(config.arch, config.encoder, config.in_channels, encoder_weights=None)
    try:
        state = checkpoint["model"]
        require_finite(state, run_dir / BEST)
        model.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise CxrsamError(f"checkpoint does not match {config.arch}/{config.encoder} in config.yaml "
                          f"({str(exc).splitlines()[0]})", path=run_dir / BEST) from None
    return CnnPredictor(model, config, device=device, postprocess=postprocess)


def evaluate_cnn_run(run_dir: str | Path, split: str = "test", postprocess: bool = True,
                     device: torch.device | str | None = None, progress: bool = True) -> pd.DataFrame:
    """Per-image metrics of a run's best model on one part of its own ``manifest.csv``.

    Predictions and ground truth are compared at the image's original size (ground truth resized
    to the image by nearest neighbour, as :func:`cxrsam.data.dataset.load_case` does).
    """
    from rich.progress import track

    from cxrsam.data.dataset import load_case
    from cxrsam.data.split import read_manifest
    from cxrsam.evaluation.evaluate import evaluate_masks

    manifest = Path(run_dir) / MANIFEST_CSV
    if not manifest.is_file():
        raise CxrsamError(f"run folder has no {MANIFEST_CSV}", path=run_dir)
    cases = read_manifest(manifest).get(split, [])
    if not cases:
        raise CxrsamError(f"the {split!r} split of this run is empty", path=manifest)
    predictor = load_cnn_run(run_dir, device=device, postprocess=postprocess)
    preds, gts = {}, {}
    for case in track(cases, description=f"evaluate {split}", disable=not progress, transient=True):
        xray, gt = load_case(case)
        preds[case.case_id] = predictor.predict(xray.pixels)
        gts[case.case_id] = gt
    return evaluate_masks(preds, gts)
