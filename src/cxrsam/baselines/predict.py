"""Draft lung masks from a trained CNN run: ``load_cnn_run(run_dir).predict(pixels)``.

Prediction: the image (H, W) is resized to the model size S (as in training), the lung probability
map (S, S) is resized back to (H, W) bilinearly and thresholded at 0.5. Post-processing (on by
default, :func:`cxrsam.baselines.postprocess.clean_mask`) keeps the two largest components and
fills holes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrsam.baselines.models import build_cnn, to_model_input
from cxrsam.baselines.postprocess import clean_mask
from cxrsam.data.dataset import resize_image
from cxrsam.errors import CxrsamError
from cxrsam.train.cnn import CnnTrainConfig, read_config
from cxrsam.train.loop import BEST, load_checkpoint


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class CnnPredictor:
    """A trained U-Net/DeepLabv3+ that maps X-ray pixels to lung masks at the image's own size."""

    def __init__(self, model: nn.Module, config: CnnTrainConfig, device: torch.device | str | None = None,
                 postprocess: bool = True, threshold: float = 0.5):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.config = config
        self.postprocess = postprocess
        self.threshold = threshold

    @property
    def size(self) -> int:
        """Model input side S in pixels."""
        return self.config.size

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lung probability maps float32 (H, W) in [0, 1], one per image float32 (H, W) in [0, 1]."""
        if not images:
            return []
        batch = np.stack([resize_image(np.asarray(img, dtype=np.float32), self.size) for img in images])
        x = torch.from_numpy(batch)[:, None].to(self.device)
        probs = torch.sigmoid(self.model(to_model_input(x, self.config.in_channels)).float())[:, 0].cpu().numpy()
        return [cv2.resize(p, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
                for p, img in zip(probs, images)]

    def predict_many(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Masks bool (H_i, W_i) for images float32 (H_i, W_i) in [0, 1] (sizes may differ)."""
        masks: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            for prob in self.probabilities(images[start:start + batch_size]):
                mask = prob >= self.threshold
                masks.append(clean_mask(mask) if self.postprocess else mask)
        return masks

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Mask bool (H, W) for one image float32 (H, W) in [0, 1]."""
        return self.predict_many([pixels])[0]


def load_cnn_run(run_dir: str | Path, device: torch.device | str | None = None,
                 postprocess: bool = True) -> CnnPredictor:
    """The best model of a ``train-cnn`` run folder (reads ``config.yaml`` and ``best.pt``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CxrsamError("run folder not found", path=run_dir)
    config = read_config(run_dir)
    if not (run_dir / BEST).is_file():
        raise CxrsamError(f"run folder has no {BEST} (training has not finished an epoch)", path=run_dir)
    checkpoint = load_checkpoint(run_dir / BEST)
    model = build_cnn(config.arch, config.encoder, config.in_channels, encoder_weights=None)
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as exc:
        raise CxrsamError(f"checkpoint does not match {config.arch}/{config.encoder} in config.yaml "
                          f"({str(exc).splitlines()[0]})", path=run_dir / BEST) from None
    return CnnPredictor(model, config, device=device, postprocess=postprocess)


@dataclass
class PredictionReport:
    """What :func:`predict_folder` did: masks written and images skipped (path, problem)."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def predict_folder(run_dir: str | Path, images_dir: str | Path, out_dir: str | Path, postprocess: bool = True,
                   batch_size: int = 8, device: torch.device | str | None = None,
                   progress: bool = True) -> PredictionReport:
    """Write ``out_dir/<stem>.png`` ({0, 255}, the image's size) for every image in ``images_dir``.

    Unreadable images are skipped and listed in the report; an empty folder, or an ``out_dir`` that cannot
    be a folder of outputs (:func:`~cxrsam.files.require_output_dir`), raises before any work.
    """
    from rich.progress import track

    from cxrsam.data.io import list_images, read_image, write_mask
    from cxrsam.files import require_output_dir

    require_output_dir(out_dir)
    predictor = load_cnn_run(run_dir, device=device, postprocess=postprocess)
    images = list_images(images_dir)
    if not images:
        raise CxrsamError("no images found (png, jpg, tif, bmp, dcm, ...)", path=images_dir)
    report = PredictionReport()
    stems: set[str] = set()
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    for paths in track(batches, description="predict", disable=not progress, transient=True):
        loaded: list[tuple[Path, np.ndarray]] = []
        for path in paths:
            if path.stem in stems:
                report.failed.append((path, f"another image has the stem {path.stem!r}; its mask would be overwritten"))
                continue
            try:
                loaded.append((path, read_image(path).pixels))
                stems.add(path.stem)
            except CxrsamError as exc:
                report.failed.append((path, exc.problem))
        masks = predictor.predict_many([pixels for _, pixels in loaded], batch_size=batch_size)
        for (path, _), mask in zip(loaded, masks):
            report.written.append(write_mask(Path(out_dir) / f"{path.stem}.png", mask))
    return report


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
    from cxrsam.train.runs import MANIFEST_CSV

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
