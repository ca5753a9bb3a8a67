"""Experiment configuration: one YAML file defines a whole study (see ``configs/``).

The training sections hold the same options as ``cxrsam train-cnn`` and ``cxrsam finetune`` (flat, e.g.
``epochs``, ``lr``, ``rank``); data and split come from the ``data`` section so every stage sees the
same split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from cxrsam.config import SplitFields, load_yaml
from cxrsam.prompts import BoxMode, NegativeKind, PointStrategy, PromptMode, PromptSpec
from cxrsam.sam.onnx_runtime import Runtime

DraftSource = str
"""A CNN architecture name (``unet``, ``deeplabv3plus``) or ``oracle`` (ground-truth masks as drafts)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticData(_Section):
    """Generated phantoms used when ``data.root`` is empty (the embedded default)."""

    n: int = Field(48, ge=6)
    size: int = Field(256, ge=32)
    seed: int = 0


class DataSection(SplitFields):
    """The study's data: a dataset folder (or generated phantoms) and its split (:class:`SplitFields`)."""

    root: Path | None = Field(None, description="Dataset folder; empty = synthetic phantoms")
    max_test_cases: int | None = Field(None, ge=1, description="Evaluate on the first N test cases only")
    synthetic: SyntheticData = SyntheticData()


class CnnSection(_Section):
    archs: list[Literal["unet", "deeplabv3plus"]] = ["unet", "deeplabv3plus"]
    train: dict[str, Any] = Field(default_factory=dict, description="train-cnn options (encoder, size, epochs, ...)")


class SamSection(_Section):
    backend: str = "litemedsam"
    checkpoint: Path | None = None
    batch_size: int | None = Field(None, ge=1, description="Images per encoder call (None: 1 on CPU, 4 on GPU)")
    runtime: Runtime = Field(Runtime.TORCH, description="What runs SAM: torch | onnx | auto (default torch, so "
                                                        "timings stay comparable with earlier runs)")


class PromptSection(_Section):
    """Which prompt kinds and draft sources a SAM method is evaluated with, and the prompt rules
    (:class:`~cxrsam.prompts.PromptSpec`'s fields, one spec per prompt kind)."""

    prompts: list[PromptMode] = [PromptMode.POINTS, PromptMode.BOX]
    draft_sources: list[DraftSource] = ["unet", "deeplabv3plus"]
    box_mode: BoxMode = BoxMode.PER_LUNG
    points_per_lung: int = Field(3, ge=1)
    strategy: PointStrategy = PointStrategy.DISTANCE
    points: int | None = Field(None, ge=1, description="Points per image of the probability strategy")
    negatives: list[NegativeKind] = []
    random_negatives: int = Field(0, ge=0, description="Negatives from the draft's low-probability region")
    margin: float = 0.0
    multimask: bool = False
    sweep_points: list[PositiveInt] = Field(
        [], description="Also score points-only prompts with N probability-weighted points per image for each N "
                        "(the paper: 15, 30, ..., 105)")

    @model_validator(mode="after")
    def _check_spec(self) -> PromptSection:
        for prompt in self.prompts:
            self.spec(prompt, 0)  # one validated spec per prompt kind (e.g. probability needs points)
        for n in self.sweep_points:
            self.sweep_spec(n, 0)
        return self

    def spec(self, prompt: PromptMode | str, seed: int) -> PromptSpec:
        """The prompt spec of this section for one prompt kind."""
        return PromptSpec(mode=prompt, box_mode=self.box_mode, points_per_lung=self.points_per_lung,
                          strategy=self.strategy, points=self.points, negatives=tuple(self.negatives),
                          random_negatives=self.random_negatives, margin=self.margin, multimask=self.multimask,
                          seed=seed)

    def sweep_spec(self, n: int, seed: int) -> PromptSpec:
        """The spec of one sweep point: points only, ``n`` per image by the probability strategy."""
        return PromptSpec.model_validate({**self.spec(PromptMode.POINTS, seed).model_dump(), "negatives": (),
                                          "strategy": PointStrategy.PROBABILITY, "points": n})

    @property
    def uses_probability(self) -> bool:
        """Whether any of this section's prompts draw points with the drafts' probability maps."""
        return bool(self.sweep_points) or any(self.spec(p, 0).uses_weight for p in self.prompts)


class LoraSection(PromptSection):
    enabled: bool = True
    prompts: list[PromptMode] = [PromptMode.BOX]
    draft_sources: list[DraftSource] = ["unet"]
    val_draft_source: DraftSource | None = Field(
        "unet", description="Draft source of the validation prompts (a CNN or oracle)")
    train: dict[str, Any] = Field(default_factory=dict, description="finetune options (rank, max_steps, lr, ...)")
    continue_train: dict[str, Any] | None = Field(
        None, description="finetune options of a second stage (lora-continued) that starts from the first stage's "
                          "weights (finetune --init-from), over train's; its model is the evaluated LoRA-SAM")
    scale: float | None = Field(None, ge=0, le=1, description="WiSE-FT scale of the LoRA-SAM methods (0: pretrained "
                                "SAM, 1: as trained; null: the run's recorded lora_scale), chosen on validation "
                                "with bench/transfer.py")


class ExperimentConfig(_Section):
    name: str = "cxrsam experiment"
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    data: DataSection = DataSection()
    cnn: CnnSection = CnnSection()
    sam: SamSection = SamSection()
    zero_shot: PromptSection = PromptSection()
    lora: LoraSection = LoraSection()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        from cxrsam.baselines.config import make_config as cnn_config
        from cxrsam.train.finetune import make_config as finetune_config

        for arch in self.cnn.archs:
            cnn_config(arch=arch, data=Path("."), **self.cnn.train)
        if self.lora.enabled:
            finetune_config(data=Path("."), backend=self.sam.backend, **self.lora.train)
            if self.lora.continue_train is not None:
                finetune_config(data=Path("."), backend=self.sam.backend,
                                **{**self.lora.train, **self.lora.continue_train})
        known = {*self.cnn.archs, "oracle"}
        for section in (self.zero_shot, self.lora):
            for source in [*section.draft_sources, *([self.lora.val_draft_source] if section is self.lora else [])]:
                if source is not None and source not in known:
                    raise ValueError(f"draft source {source!r} is neither a trained CNN ({', '.join(self.cnn.archs)}) "
                                     "nor 'oracle'")
        return self


def load_config(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML; ``overrides`` are dotted keys (``data.root``) set on top."""
    return load_yaml(path, ExperimentConfig, overrides)
