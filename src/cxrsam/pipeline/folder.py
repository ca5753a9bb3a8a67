"""Segmenting many files: every command that writes masks for a set of images (``predict``, ``zero-shot``,
``predict-cnn``) and the experiment's stages run :func:`segment_images`.

Rules: every good image is finished; each failure is one line (``<file>: <problem>``) in the report and in
``<out>/results.csv`` (one row per input: ``image, status, problem, outputs, prompt_sets, warnings``, then the
quality flags and lung measurements of :data:`cxrsam.pipeline.outputs.RESULT_COLUMNS`, empty for a failure); the output
folder may not be, or lie inside, an input folder, nor be an input file; two inputs that would share an output
name both fail (no silent overwrite). Outputs are named by :func:`cxrsam.pipeline.outputs.output_paths`.

Pipelining: one worker thread reads (decodes) and drafts the next :data:`PREFETCH` images while SAM runs on the
current one, and another writes the previous image's files; images are still segmented, written and reported in
input order, with the same results as one at a time (tests/pipeline/test_folder.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsam.data.io import XRay, list_images, read_image
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path
from cxrsam.pipeline.outputs import OUTPUT_KINDS, RESULT_COLUMNS, OutputFormat, output_format, result_row, write_outputs
from cxrsam.pipeline.segmenter import Segmenter

RESULTS_CSV = "results.csv"
PREFETCH = 2
"""Images read and drafted ahead of the one SAM is segmenting."""


@dataclass
class FolderReport:
    """What :func:`segment_images` did: output files per image, failures ``(image, one-line message)``, and the
    per-run CSV."""

    written: dict[Path, dict[str, Path]] = field(default_factory=dict)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    results: Path | None = None


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from ``paths``: files as given (their type is checked by content when read), folders by
    :func:`cxrsam.data.io.list_images`. A missing path or a folder without images raises."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise CxrsamError("no images in this folder (png, jpg, tif, bmp, dcm, ...)", path=path)
            found += images
        elif path.exists():
            found.append(path)
        else:
            raise CxrsamError("file or folder not found", path=path)
    return list(dict.fromkeys(found))


def check_output_folder(out_dir: str | Path, inputs: Sequence[str | Path]) -> Path:
    """``out_dir`` if writing there cannot touch an input: not an input file, not the folder holding an input file,
    not an input folder or a folder inside it, not an existing file; else :class:`CxrsamError` (checked before any
    work)."""
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise CxrsamError("--out exists and is not a folder", path=out_dir)
    for item in map(Path, inputs):
        source = item.resolve()
        inside = item.is_dir() and source in resolved.parents
        if resolved == source or inside or (not item.is_dir() and resolved == source.parent):
            raise CxrsamError(f"--out must not be an input file or folder, nor lie inside an input folder ({item}): "
                              "outputs would mix with, or overwrite, the inputs", path=out_dir)
    return out_dir


def _clashes(images: Sequence[Path]) -> dict[Path, str]:
    """Images whose stem another input shares (their outputs would overwrite each other) -> message."""
    by_stem: dict[str, list[Path]] = {}
    for path in images:
        by_stem.setdefault(path.stem, []).append(path)
    return {path: "another input has the same name (" + ", ".join(str(o) for o in group if o != path) +
            "); its outputs would overwrite these: rename one"
            for group in by_stem.values() if len(group) > 1 for path in group}


def _read_and_draft(segmenter: Segmenter, path: Path, box: Sequence[float] | None) -> tuple[XRay, np.ndarray | None]:
    """An image and its draft (None with a hand-given box or without a draft source); runs in the reader thread."""
    xray = read_image(path)
    return xray, (segmenter.draft(xray) if box is None else None)


def segment_images(segmenter: Segmenter, images: Sequence[Path], out_dir: str | Path,
                   box: Sequence[float] | None = None, format: OutputFormat | str = OutputFormat.PNG,
                   kinds: Sequence[str] = OUTPUT_KINDS, inputs: Sequence[str | Path] = (),
                   progress: bool = True) -> FolderReport:
    """Segment every image and write its outputs to ``out_dir``; see the module docstring for the rules.

    Args:
        segmenter: draft source, prompt spec and SAM model.
        images: image files (e.g. from :func:`collect_images`).
        out_dir: output folder (created).
        box: one hand-given box ``x0, y0, x1, y1`` for every image instead of draft prompts.
        format: mask file format; its optional dependency is checked before any work.
        kinds: which files to write per image (a subset of :data:`OUTPUT_KINDS`).
        inputs: the paths the user gave (files or folders), which ``out_dir`` must stay out of; default:
            the images and, when drafts come from a folder, that folder.
        progress: show a progress bar with images per second.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    format = output_format(format)
    guarded = [*(inputs or images), *([segmenter.drafter.folder] if hasattr(segmenter.drafter, "folder") else [])]
    out_dir = check_output_folder(out_dir, guarded)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = FolderReport()
    clashes = _clashes(images)
    rows = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with (Progress(*columns, disable=not progress, transient=True) as bar,
          ThreadPoolExecutor(1, thread_name_prefix="cxrsam-read") as reader,
          ThreadPoolExecutor(1, thread_name_prefix="cxrsam-write") as writer):
        task = bar.add_task("segment", total=len(images), rate="")
        started = time.perf_counter()
        upcoming = iter(images)
        ahead: deque[tuple[Path, Future]] = deque()
        writing: deque[tuple[Path, dict, Future | None]] = deque()

        def read_next() -> None:
            if (path := next(upcoming, None)) is not None:
                ahead.append((path, reader.submit(_read_and_draft, segmenter, path, box)))

        def finish(path: Path, row: dict, written: Future | None) -> None:
            try:
                if written is not None:
                    report.written[path] = written.result()
                    row.update(outputs=";".join(p.name for p in report.written[path].values()))
            except CxrsamError as exc:
                fail(path, row, exc)
            rows.append(row)
            bar.update(task, advance=1, rate=f"{len(rows) / (time.perf_counter() - started):.2f} img/s")

        def fail(path: Path, row: dict, exc: CxrsamError) -> None:
            message = str(exc) if exc.path is not None else f"{path}: {exc}"
            report.failed.append((path, message))
            row.update({key: "" for key in RESULT_COLUMNS}, status="failed", problem=message, prompt_sets=0,
                       warnings="")

        for _ in range(PREFETCH):
            read_next()
        while ahead:
            path, prepared = ahead.popleft()
            read_next()
            row = {"image": str(path), "status": "ok", "problem": "", "outputs": "", "prompt_sets": 0, "warnings": ""}
            written = None
            try:
                if path in clashes:
                    raise CxrsamError(clashes[path], path=path)
                xray, draft = prepared.result()
                seg = segmenter.segment(xray, box=box, draft=draft)
                written = writer.submit(write_outputs, seg, out_dir, path.stem, format, kinds)
                row.update(prompt_sets=len(seg.prompts.sets), warnings="; ".join(seg.warnings), **result_row(seg))
            except CxrsamError as exc:
                fail(path, row, exc)
            writing.append((path, row, written))
            while len(writing) > 1 or (writing and not ahead):
                finish(*writing.popleft())
    report.results = out_dir / RESULTS_CSV
    with atomic_path(report.results) as tmp:
        columns = ["image", "status", "problem", "outputs", "prompt_sets", "warnings", *RESULT_COLUMNS]
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    return report
