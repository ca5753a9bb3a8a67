"""Run folders shared by the CNN and LoRA trainers: ``config.yaml``, ``manifest.csv`` and the resume rules."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_write_text
from cxrsam.train.loop import LAST

CONFIG_YAML = "config.yaml"
MANIFEST_CSV = "manifest.csv"

Config = TypeVar("Config", bound=BaseModel)


def settings_error(exc: ValidationError, path: str | Path | None = None) -> CxrsamError:
    """One-line error for the first invalid setting of a pydantic validation error."""
    first = exc.errors()[0]
    return CxrsamError(f"invalid setting {'.'.join(map(str, first['loc'])) or 'config'}: {first['msg']}", path=path)


def read_run_config(run_dir: str | Path, model: type[Config], kind: str) -> Config:
    """The ``config.yaml`` of a ``kind`` run folder (e.g. ``"CNN"``), validated into ``model``."""
    path = Path(run_dir) / CONFIG_YAML
    if not path.is_file():
        raise CxrsamError(f"not a {kind} run folder (no {CONFIG_YAML})", path=run_dir)
    try:
        return model.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError, TypeError) as exc:
        raise CxrsamError(f"invalid run config ({str(exc).splitlines()[0]})", path=path) from None


def prepare_run(config: BaseModel, run_dir: str | Path, resume: bool, kind: str) -> dict[str, list]:
    """Check a new or resumed run folder, write its config and manifest, and return its split.

    ``config`` needs the data fields ``data, layout, classes, split, split_seed``. A new run refuses a folder
    that already holds ``last.pt``; a resumed run needs ``last.pt`` and the same settings (loop settings are
    checked by the trainer) and keeps its saved split.
    """
    from accelerate import PartialState

    from cxrsam.data.layouts import discover, require_cases
    from cxrsam.data.split import read_manifest, split_cases, write_manifest

    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / LAST).is_file():
            raise CxrsamError(f"nothing to resume (no {LAST})", path=run_dir)
        saved = read_run_config(run_dir, type(config), kind).model_dump(exclude={"loop"})
        changed = [k for k, v in config.model_dump(exclude={"loop"}).items() if saved[k] != v]
        if changed:
            raise CxrsamError("cannot resume with changed settings: " + ", ".join(
                f"{k} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed), path=run_dir / CONFIG_YAML)
        splits = read_manifest(run_dir / MANIFEST_CSV)
    else:
        if (run_dir / LAST).exists():
            raise CxrsamError("folder already holds a training run; add --resume to continue it or choose another "
                              "--out", path=run_dir)
        splits = split_cases(require_cases(discover(config.data, config.layout, config.classes)), config.split,
                             config.split_seed)
        for part in ("train", "val"):
            if not splits[part]:
                raise CxrsamError(f"the {part} split is empty (split {config.split}); use more data or other ratios",
                                  path=config.data)
    run_dir.mkdir(parents=True, exist_ok=True)
    if PartialState().is_main_process:
        if not resume:
            write_manifest(run_dir / MANIFEST_CSV, splits)
        atomic_write_text(run_dir / CONFIG_YAML, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return splits
