"""Starting and resuming a training run folder (shared by the CNN and LoRA trainers); file names and config
I/O live in :mod:`cxrsam.runs`."""

from __future__ import annotations

from pathlib import Path

from cxrsam.config import DataFields
from cxrsam.errors import CxrsamError
from cxrsam.files import require_output_dir
from cxrsam.runs import CONFIG_YAML, LAST, MANIFEST_CSV, RunFolder, read_run_config, write_run_config


def prepare_run(config: DataFields, run_dir: str | Path, resume: bool, kind: str) -> dict[str, list]:
    """Check a new or resumed run folder, write its config and manifest, and return its split.

    The split comes from ``config.manifest`` when given (e.g. the experiment's own), else from discovering and
    splitting ``config.data``. A new run refuses a folder that holds a run (finished, or unfinished with
    ``last.pt``); a resumed run needs ``last.pt`` and the same settings (loop settings are checked by the
    trainer) and keeps its saved split.
    """
    from accelerate import PartialState

    from cxrsam.data.layouts import discover, require_cases
    from cxrsam.data.split import read_manifest, split_cases, write_manifest

    run_dir = require_output_dir(run_dir)  # an existing file or an unwritable place: one line, before any work
    folder = RunFolder(run_dir, kind)
    finished = folder.finished
    if resume:
        if not folder.unfinished:
            why = "the run has finished" if finished else f"no {LAST}"
            raise CxrsamError(f"nothing to resume ({why})", path=run_dir)
        saved = read_run_config(run_dir, type(config), kind).model_dump(exclude={"loop"})
        changed = [k for k, v in config.model_dump(exclude={"loop"}).items() if saved[k] != v]
        if changed:
            raise CxrsamError("cannot resume with changed settings: " + ", ".join(
                f"{k} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed), path=run_dir / CONFIG_YAML)
        splits = read_manifest(run_dir / MANIFEST_CSV)
    else:
        if folder.unfinished or finished:
            raise CxrsamError("folder already holds a training run; add --resume to continue an unfinished one or "
                              "choose another --out", path=run_dir)
        if config.manifest is not None:
            splits = read_manifest(config.manifest)
        else:
            splits = split_cases(require_cases(discover(config.data, config.layout, config.classes)), config.split,
                                 config.split_seed)
        for part in ("train", "val"):
            if not splits[part]:
                raise CxrsamError(f"the {part} split is empty (split {config.split}); use more data or other ratios",
                                  path=config.manifest or config.data)
    run_dir.mkdir(parents=True, exist_ok=True)
    if PartialState().is_main_process:
        if not resume:
            write_manifest(run_dir / MANIFEST_CSV, splits)
        write_run_config(run_dir, config)
    return splits
