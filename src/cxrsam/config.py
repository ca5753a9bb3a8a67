"""Settings shared by every stage: the data fields, the training loop, the device, and YAML configs with
dotted overrides (``cxrsam train-cnn --config FILE loop.lr=1e-3``). Validation errors become one line."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxrsam.errors import CxrsamError

if TYPE_CHECKING:
    import torch

Config = TypeVar("Config", bound=BaseModel)


def settings_error(exc: ValidationError, path: str | Path | None = None) -> CxrsamError:
    """One-line error for the first invalid setting of a pydantic validation error."""
    first = exc.errors()[0]
    return CxrsamError(f"invalid setting {'.'.join(map(str, first['loc'])) or 'config'}: {first['msg']}", path=path)


class SingleProcess:
    """The state of a process not started by a multi-process launcher: accelerate's ``PartialState`` interface
    for one process (what :func:`process_state` returns then, without importing accelerate and PyTorch)."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""

    @contextmanager
    def split_between_processes(self, inputs: Sequence[Any]) -> Iterator[Sequence[Any]]:
        """All of ``inputs``: this process's share."""
        yield inputs


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch``, ``torchrun``) started: ``WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_state():  # noqa: ANN201 - accelerate.PartialState or SingleProcess
    """This process's place in a job started by ``accelerate launch`` (or ``torchrun``): ``process_index``,
    ``num_processes``, ``is_main_process``, ``wait_for_everyone()``, ``split_between_processes()`` (accelerate's
    ``PartialState``; :class:`SingleProcess` when not launched as several). Without a GPU, or under
    ``accelerate launch --cpu``, the processes are CPU processes joined by gloo, else GPU processes joined by NCCL."""
    if launched_processes() == 1:
        return SingleProcess()
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def gather_objects(state, objects: list[Any]) -> list[Any]:  # noqa: ANN001 - a process_state()
    """Every process's ``objects`` joined, on every process (accelerate's ``gather_object``); one process's own."""
    if state.num_processes == 1:
        return objects
    from accelerate.utils import gather_object

    return gather_object(objects)


GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")
"""Files a Linux GPU driver makes (NVIDIA's, and ROCm's ``/dev/kfd``): without any of them PyTorch finds no GPU."""


def gpu_possible() -> bool:
    """Whether PyTorch could find a GPU here: False only on Linux without any of :data:`GPU_DRIVER_FILES`, where
    asking PyTorch (1-2 s to import) cannot say yes."""
    return sys.platform != "linux" or any(os.path.exists(path) for path in GPU_DRIVER_FILES)


def _cuda_available() -> bool:
    if not gpu_possible():
        return False
    import torch

    return torch.cuda.is_available()


def device_type(device: str | torch.device) -> str:
    """The kind of ``device``: ``cpu``, ``cuda``, ... (``"cuda:1"`` -> ``cuda``)."""
    return str(device).split(":", 1)[0]


def resolve_device(choice: str | torch.device | None = "auto") -> str:
    """The one device rule: ``auto``/None -> the process's accelerator device (``cuda`` when a GPU is present, the
    rank's own GPU under ``accelerate launch``), else ``cpu``; anything else as given, checked by PyTorch. Returned
    as PyTorch spells it (``cpu``, ``cuda``, ``cuda:1``); ``cpu``, and ``auto`` on a machine without a GPU driver
    (:func:`gpu_possible`), need no PyTorch."""
    if choice is None or str(choice) == "auto":
        if not _cuda_available():
            return "cpu"
        state = process_state()
        return "cuda" if isinstance(state, SingleProcess) else str(state.device)
    if str(choice) == "cpu":
        return "cpu"
    import torch

    try:
        return str(torch.device(choice))
    except RuntimeError:
        raise CxrsamError(f"unknown device {str(choice)!r} (use auto, cpu, cuda or cuda:N)") from None


INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""CPU flags of an int8 dot-product instruction (VNNI or AMX). Without one, ONNX Runtime's int8 kernels use
``VPMADDUBSW``, whose int16 sums saturate, so int8 results and speed differ between the two kinds of CPU."""


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo`` on Linux; empty where it cannot be read)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text(encoding="utf-8").split())
    except OSError:
        return frozenset()


def cpu_has_int8_dot_product() -> bool:
    """Whether this CPU has an int8 dot-product instruction (:data:`INT8_DOT_PRODUCT_FLAGS`)."""
    return bool(cpu_flags() & INT8_DOT_PRODUCT_FLAGS)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
"""glibc ``mallopt(3)`` parameter numbers (``malloc.h``)."""


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in the process for reuse: every block from its heap
    (``mallopt(M_MMAP_MAX, 0)``), and the heap never given back (``M_TRIM_THRESHOLD`` -1). For CPU training.

    By default glibc serves a block above its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it
    on free, so each training step's large activations (LiteMedSAM's 2 x 256 x 256 x 256 float32 MLP input at batch
    2: 128 MiB) are new pages that the kernel faults in and zeroes again: about 2 million page faults and 8 s
    of kernel time per step of ``configs/cpu.yaml``'s LoRA recipe on 2 cores. Kept, the heap's pages are reused,
    at the price of holding the peak memory until the process ends (docs/benchmarks.md, "Training steps and the
    allocator"). The same results, bit for bit. Returns whether both settings took (False without glibc); done
    once per process."""
    import ctypes

    if sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


class SplitFields(BaseModel):
    """How cases are found and split: the one declaration of these fields, shared by the CNN and LoRA run
    configs (:class:`DataFields`) and the experiment's ``data`` section."""

    model_config = ConfigDict(extra="forbid")

    layout: str = Field("auto", description="covid19 | montgomery | shenzhen | jsrt | folder | auto")
    classes: list[str] | None = Field(None, description="COVID-19 layout: class folders to use")
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train, val, test ratios")
    split_seed: int = 0

    @field_validator("split")
    @classmethod
    def _ratios(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"split ratios must be non-negative and sum to 1, got {value}")
        return value


class DataFields(SplitFields):
    """A training run's data: a dataset root, or a split manifest handed over (the experiment passes its own,
    so every stage trains and evaluates on one split)."""

    data: Path | None = Field(None, description="Dataset root")
    manifest: Path | None = Field(None, description="A split manifest.csv to use instead of splitting data")

    @model_validator(mode="after")
    def _source(self) -> DataFields:
        if self.data is None and self.manifest is None:
            raise ValueError("give the dataset root (data) or a split manifest (manifest)")
        return self


class LoopConfig(BaseModel):
    """Optimisation and bookkeeping settings of :class:`Trainer` (model-independent)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=1, description="Maximum number of epochs")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (all epochs)")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="End an epoch (validate, checkpoint) after this many optimizer steps, each epoch "
                                "a new shuffle (nnU-Net style); None: one pass over the training data")
    validate_start: bool = Field(
        False, description="Validate the untouched model as epoch 0, so the best checkpoint is never worse on "
                           "validation than the start (for fine-tuning a pretrained model)")
    batch_size: int = Field(8, ge=1, description="Samples per process and micro-batch")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps (overrides warmup_fraction)")
    warmup_fraction: float = Field(0.05, ge=0, le=1, description="Warm-up as a fraction of all optimizer steps")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Cosine decay floor, as a fraction of lr")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None: off)")
    patience: int | None = Field(10, ge=1, description="Early stopping: epochs without val_dice gain (None: off)")
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU, none on CPU "
                            "(an `accelerate launch --mixed_precision` setting wins)")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    deterministic: bool = Field(True, description="torch.use_deterministic_algorithms (warn only)")
    progress: bool = Field(True, description="Show a rich progress bar on a terminal")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: a GPU when present; under "
                                           "`accelerate launch` the process's own device)")
    keep_resume_state: bool = Field(False, description="Keep last.pt (optimizer and RNG state) after the run "
                                                       "finishes; by default a finished run holds each weight once")

    @model_validator(mode="after")
    def _check(self) -> LoopConfig:
        if self.mixed_precision == "fp16" and not _cuda_available():
            raise ValueError("mixed_precision 'fp16' needs a GPU (use 'bf16' or 'no' on CPU)")
        return self

    def schedule_fields(self) -> dict[str, Any]:
        """Settings that shape the weights; a resumed run must use the same ones."""
        runtime = {"patience", "num_workers", "progress", "mixed_precision", "keep_resume_state", "device"}
        return {k: v for k, v in self.model_dump().items() if k not in runtime}


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """``raw`` with dotted keys set on top: a dict ``{"loop.lr": 1e-3}`` or ``["loop.lr=1e-3", ...]`` (values
    parsed as YAML scalars)."""
    if isinstance(overrides, list):
        parsed = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CxrsamError(f"override {item!r} is not KEY=VALUE (e.g. loop.lr=1e-3)")
            parsed[key.strip()] = yaml.safe_load(value)
        overrides = parsed
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CxrsamError(f"override {dotted!r}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"setting {key!r} given twice (line "
                                                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping of settings, unvalidated (one-line errors; a setting given twice in one
    section is refused)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except FileNotFoundError:
        raise CxrsamError("config file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CxrsamError(f"unreadable config ({exc})", path=path) from None
    except yaml.YAMLError as exc:
        raise CxrsamError(f"invalid YAML ({str(exc).splitlines()[0]})", path=path) from None
    if not isinstance(raw, dict):
        raise CxrsamError(f"a config must be a mapping of settings, not {type(raw).__name__}", path=path)
    return raw


def load_yaml(path: str | Path, model: type[Config], overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Read a YAML config, apply dotted ``overrides`` and validate it into ``model`` (errors: one line)."""
    raw = read_yaml(path)
    try:
        return model.model_validate(apply_overrides(raw, overrides))
    except ValidationError as exc:
        raise settings_error(exc, path) from None
    except CxrsamError as exc:
        raise CxrsamError(exc.problem, path=path) from None
