"""Training the CNN baselines (U-Net, DeepLabv3+) on a dataset split: ``cxrsam train-cnn``.

A run folder holds ``config.yaml`` (everything used), ``manifest.csv`` (the split), ``last.pt`` /
``best.pt`` (see :mod:`cxrsam.train.loop`), ``metrics.csv`` and ``curves.png``. The predictor
(:func:`cxrsam.baselines.predict.load_cnn_run`) needs only ``config.yaml`` and ``best.pt``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cxrsam.train.loop import LoopConfig, Trainer, segmentation_dice, seed_everything
from cxrsam.train.runs import prepare_run, read_run_config, settings_error


class CnnTrainConfig(BaseModel):
    """Everything a CNN baseline run depends on (written to ``config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="unet | deeplabv3plus")
    encoder: str = Field("resnet18", description="segmentation_models_pytorch encoder name")
    encoder_weights: str | None = Field(None, description="None (offline) or e.g. 'imagenet'")
    in_channels: int = Field(1, description="1 (grey) or 3 (grey replicated)")
    size: int = Field(256, ge=32, description="Square model input side in pixels, a multiple of 32")
    data: Path = Field(description="Dataset root")
    layout: str = "auto"
    classes: list[str] | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    loop: LoopConfig = LoopConfig()

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from cxrsam.baselines.models import ARCHITECTURES

        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r} (choose from {', '.join(ARCHITECTURES)})")
        return value

    @field_validator("size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"size must be a multiple of 32 (the encoders downsample 5 times), got {value}")
        return value

    @field_validator("in_channels")
    @classmethod
    def _channels(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {value}")
        return value

    @field_validator("split")
    @classmethod
    def _ratios(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"split ratios must be non-negative and sum to 1, got {value}")
        return value


def make_config(**options: Any) -> CnnTrainConfig:
    """Build a config from flat options (loop fields may be given flat); invalid values -> CxrsamError."""
    loop_keys = set(LoopConfig.model_fields)
    loop = {k: options.pop(k) for k in list(options) if k in loop_keys}
    try:
        return CnnTrainConfig(**options, loop=LoopConfig(**loop))
    except ValidationError as exc:
        raise settings_error(exc) from None


def read_config(run_dir: str | Path) -> CnnTrainConfig:
    """The ``config.yaml`` of a CNN run folder."""
    return read_run_config(run_dir, CnnTrainConfig, "CNN")


def train_cnn(config: CnnTrainConfig, out_dir: str | Path, resume: bool = False,
              on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train ``config.arch`` with Dice + BCE (MONAI ``DiceCELoss``) and return the run folder.

    With ``resume`` the run in ``out_dir`` continues from ``last.pt`` with its saved split; model and
    data settings must equal the saved ``config.yaml`` (loop settings are checked by the trainer).
    Without ``resume`` an ``out_dir`` that already holds ``last.pt`` is refused. ``on_epoch_end`` is
    passed to :class:`~cxrsam.train.loop.Trainer`.
    """
    from monai.losses import DiceCELoss

    from cxrsam.baselines.models import build_cnn, to_model_input
    from cxrsam.data.dataset import SegmentationDataset

    run_dir = Path(out_dir)
    splits = prepare_run(config, run_dir, resume, "CNN")

    loop = config.loop
    seed_everything(loop.seed, loop.deterministic)
    model = build_cnn(config.arch, config.encoder, config.in_channels, config.encoder_weights)
    train_data = SegmentationDataset(splits["train"], config.size, augment=True, seed=loop.seed)
    val_data = SegmentationDataset(splits["val"], config.size, augment=False)
    loss_fn = DiceCELoss(sigmoid=True)

    def step_fn(net, batch):
        images, masks, _ = batch
        return loss_fn(net(to_model_input(images, config.in_channels)), masks)

    def logits_fn(net, batch):
        images, masks, _ = batch
        return net(to_model_input(images, config.in_channels)), masks

    def validate_fn(net):
        return {"val_dice": segmentation_dice(net, val_data, logits_fn, batch_size=loop.batch_size)}

    Trainer(loop, run_dir, model, train_data, step_fn, validate_fn, on_epoch_end=on_epoch_end).fit(resume=resume)
    return run_dir
