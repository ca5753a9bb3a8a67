"""Training the CNN baselines (U-Net, DeepLabv3+) on a dataset split: ``cxrsam train-cnn``.

A run folder holds ``config.yaml`` (everything used), ``manifest.csv`` (the split), ``last.pt`` /
``best.pt`` (see :mod:`cxrsam.train.loop`), ``metrics.csv`` and ``curves.png``. The predictor
(:func:`cxrsam.baselines.predict.load_cnn_run`) needs only ``config.yaml`` and ``best.pt``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cxrsam.baselines.config import CnnTrainConfig
from cxrsam.train.loop import StepFn, Trainer, seed_everything, segmentation_dice
from cxrsam.train.runs import prepare_run


def cnn_step(in_channels: int) -> StepFn:
    """The CNN training step's loss, ``(model, (images (B, 1, S, S), masks (B, 1, S, S), _)) -> scalar``:
    Dice + BCE (MONAI ``DiceCELoss``) of the logits. Used by :func:`train_cnn` and ``bench/cnn_speed.py``."""
    from monai.losses import DiceCELoss

    from cxrsam.baselines.models import to_model_input

    loss_fn = DiceCELoss(sigmoid=True)

    def step_fn(net: nn.Module, batch: tuple) -> torch.Tensor:
        images, masks, _ = batch
        return loss_fn(net(to_model_input(images, in_channels)), masks)

    return step_fn


def train_cnn(config: CnnTrainConfig, out_dir: str | Path, resume: bool = False,
              on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train ``config.arch`` with Dice + BCE (MONAI ``DiceCELoss``) and return the run folder.

    With ``resume`` the run in ``out_dir`` continues from ``last.pt`` with its saved split; model and
    data settings must equal the saved ``config.yaml`` (loop settings are checked by the trainer).
    Without ``resume`` an ``out_dir`` that already holds ``last.pt`` is refused. ``on_epoch_end`` is
    passed to :class:`~cxrsam.train.loop.Trainer`.
    """
    from cxrsam.baselines.models import build_cnn, to_model_input
    from cxrsam.data.dataset import SegmentationDataset

    run_dir = Path(out_dir)
    splits = prepare_run(config, run_dir, resume, "CNN")

    loop = config.loop
    seed_everything(loop.seed, loop.deterministic)
    model = build_cnn(config.arch, config.encoder, config.in_channels, config.encoder_weights)
    train_data = SegmentationDataset(splits["train"], config.size, augment=True, seed=loop.seed,
                                     shift=config.shift_augment)
    val_data = SegmentationDataset(splits["val"], config.size, augment=False)
    step_fn = cnn_step(config.in_channels)

    def logits_fn(net, batch):
        images, masks, _ = batch
        return net(to_model_input(images, config.in_channels)), masks

    def validate_fn(net):
        return {"val_dice": segmentation_dice(net, val_data, logits_fn, batch_size=loop.batch_size)}

    Trainer(loop, run_dir, model, train_data, step_fn, validate_fn, on_epoch_end=on_epoch_end).fit(resume=resume)
    return run_dir
