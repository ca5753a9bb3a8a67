"""The settings of a CNN baseline run (``config.yaml`` of ``cxrsam train-cnn``), read by trainer and predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from cxrsam.config import DataFields, LoopConfig, settings_error
from cxrsam.runs import read_run_config


class CnnTrainConfig(DataFields):
    """Everything a CNN baseline run depends on (written to ``config.yaml``); data fields from :class:`DataFields`."""

    arch: str = Field(description="unet | deeplabv3plus")
    encoder: str = Field("resnet18", description="segmentation_models_pytorch encoder name")
    encoder_weights: str | None = Field(None, description="None (offline) or e.g. 'imagenet'")
    in_channels: int = Field(1, description="1 (grey) or 3 (grey replicated)")
    size: int = Field(256, ge=32, description="Square model input side in pixels, a multiple of 32")
    shift_augment: float = Field(0.0, ge=0, le=1, description="Share of training images given an imitated "
                                 "other-site shift (cxrsam.data.shift; 0: off)")
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


def make_config(**options: Any) -> CnnTrainConfig:
    """Build a config from flat options (loop fields may be given flat); invalid values -> CxrsamError."""
    loop_keys = set(LoopConfig.model_fields)
    loop = {k: options.pop(k) for k in list(options) if k in loop_keys}
    try:
        return CnnTrainConfig.model_validate({**options, "loop": loop})
    except ValidationError as exc:
        raise settings_error(exc) from None


def read_config(run_dir: str | Path) -> CnnTrainConfig:
    """The ``config.yaml`` of a CNN run folder."""
    return read_run_config(run_dir, CnnTrainConfig, "CNN")
