"""Run folders as data on disk (nnU-Net's rule): the one place that names their files, reads and writes their
config and checkpoints, records the SHA-256 of every weight file it writes and verifies it on loading.

A run folder (``cxrsam train-cnn`` or ``cxrsam finetune``) holds:

``config.yaml``      every setting the run depends on (validated by the trainer's config model);
``manifest.csv``     the split it trained on (:func:`cxrsam.data.split.write_manifest`);
``metrics.csv``, ``curves.png``  one row per epoch and its plot;
``best.pt``          CNN runs: the best epoch's weights (``{"model", "epoch", "metrics"}``);
``adapter.safetensors``, ``adapter.json``  LoRA runs: the best epoch's adapters and their description;
``checksums.json``   SHA-256 of each weight file above, checked whenever it is loaded;
``last.pt``          resume state (weights, optimizer, schedule, RNG): only while a run is unfinished, or kept
                     on request (``loop.keep_resume_state``).
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from cxrsam.config import Config
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, atomic_write_text, require_file, sha256_file

if TYPE_CHECKING:
    import pandas as pd
    import torch

CONFIG_YAML = "config.yaml"
MANIFEST_CSV = "manifest.csv"
METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
LAST = "last.pt"
BEST = "best.pt"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"
CHECKSUMS_JSON = "checksums.json"


@dataclass(frozen=True)
class RunFolder:
    """A training run folder on disk, typed: where each file is and what state the run is in.

    ``kind`` names it in messages (``"CNN"``, ``"fine-tuning"``). The weights themselves are opened by the
    predictor of the run's kind (:func:`cxrsam.baselines.predict.load_cnn_run`, :func:`cxrsam.sam.lora.load_run`).
    """

    path: Path
    kind: str = "training"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_YAML

    @property
    def manifest_file(self) -> Path:
        return self.path / MANIFEST_CSV

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_CSV

    @property
    def resume_file(self) -> Path:
        return self.path / LAST

    @property
    def unfinished(self) -> bool:
        """Whether the run holds resume state (it was started and not finished, or keeps its state on request)."""
        return self.resume_file.is_file()

    @property
    def finished(self) -> bool:
        """Whether the run has its final weights (``best.pt`` of a CNN run, the adapters of a LoRA run)."""
        return self.config_file.is_file() and any((self.path / n).is_file() for n in (BEST, ADAPTER_FILE))

    def config(self, model: type[Config]) -> Config:
        """``config.yaml`` validated into ``model``."""
        return read_run_config(self.path, model, self.kind)

    def metrics(self) -> pd.DataFrame:
        """One row per epoch (``epoch, step, train_loss, lr, val_*, epoch_s, ...``); empty before the first epoch."""
        import pandas as pd

        return pd.read_csv(self.metrics_file) if self.metrics_file.is_file() else pd.DataFrame(columns=["epoch_s"])

    def train_seconds(self) -> float:
        """Training wall time: the sum of the epochs' times (all sessions of a resumed run)."""
        return float(self.metrics()["epoch_s"].sum())


def read_run_config(run_dir: str | Path, model: type[Config], kind: str) -> Config:
    """The ``config.yaml`` of a ``kind`` run folder (e.g. ``"CNN"``), validated into ``model`` (one-line errors)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CxrsamError("run folder not found", path=run_dir)
    path = run_dir / CONFIG_YAML
    if not path.is_file():
        raise CxrsamError(f"not a {kind} run folder (no {CONFIG_YAML})", path=run_dir)
    try:
        return model.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(map(str, first["loc"])) or "config"
        raise CxrsamError(f"invalid run config: {field}: {first['msg']}", path=path) from None
    except (yaml.YAMLError, TypeError, UnicodeDecodeError, OSError) as exc:
        raise CxrsamError(f"invalid run config ({str(exc).splitlines()[0]})", path=path) from None


def write_run_config(run_dir: str | Path, config: Config) -> Path:
    """Write ``config.yaml`` atomically."""
    path = Path(run_dir) / CONFIG_YAML
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


@contextlib.contextmanager
def _defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C until the block is done (a checkpoint write), then raise KeyboardInterrupt."""
    try:
        previous = signal.getsignal(signal.SIGINT)
        received: list[int] = []
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, renamed onto it only when complete."""
    import torch

    path = Path(path)
    with _defer_sigint(), atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``, on CPU)."""
    import torch

    path = require_file(path, "checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise CxrsamError(f"unreadable checkpoint ({type(exc).__name__})", path=path) from None


def require_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse (one line naming the file and the tensor) weights holding NaN or infinity."""
    import torch

    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CxrsamError(f"weights {name!r} hold NaN or infinite values", path=path)


def _checksums(run_dir: Path) -> dict[str, str]:
    path = run_dir / CHECKSUMS_JSON
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CxrsamError(f"unreadable checksum list ({exc})", path=path) from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise CxrsamError("checksum list is not a mapping of file name to SHA-256", path=path)
    return table


def record_checksum(path: str | Path) -> str:
    """Record the SHA-256 of a weight file just written into its folder's ``checksums.json``; returns it."""
    path = Path(path)
    table = _checksums(path.parent)
    table[path.name] = sha256_file(path)
    atomic_write_text(path.parent / CHECKSUMS_JSON, json.dumps(table, indent=2, sort_keys=True) + "\n")
    return table[path.name]


def verify_checksum(path: str | Path) -> str:
    """SHA-256 of a weight file of a run folder, refused (one line) when it differs from the recorded one or when
    the folder records none for it (the file was not written by cxrsam, or was replaced)."""
    path = require_file(path, "weights file")
    digest = sha256_file(path)
    recorded = _checksums(path.parent).get(path.name)
    if recorded is None:
        raise CxrsamError(f"no SHA-256 recorded for this file in {CHECKSUMS_JSON} (not written by this run)",
                          path=path)
    if recorded != digest:
        raise CxrsamError(f"SHA-256 {digest[:16]}... differs from the one recorded when it was written "
                          f"({recorded[:16]}...): the file was altered after training", path=path)
    return digest


def forget(path: str | Path) -> None:
    """Delete a weight file of a run folder and its recorded checksum (e.g. resume state of a finished run)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    table = _checksums(path.parent)
    if table.pop(path.name, None) is not None:
        atomic_write_text(path.parent / CHECKSUMS_JSON, json.dumps(table, indent=2, sort_keys=True) + "\n")
