"""Segmenting many files: every command that writes masks for a set of images (``predict``, ``zero-shot``,
``predict-cnn``) and the experiment's stages run :func:`segment_images`.

Rules: every good image is finished; each failure is one line (``<file>: <problem>``) in the report and in
``<out>/results.csv`` (one row per input: ``image, status, problem, outputs, prompt_sets, warnings``, then the
quality flags and lung measurements of :data:`cxrsam.pipeline.outputs.RESULT_COLUMNS`, empty for a failure); the output
folder may not be, or lie inside, an input folder, nor be an input file; two inputs that would share an output
name both fail (no silent overwrite). Outputs are named by :func:`cxrsam.pipeline.outputs.output_paths`.

Resume: after an image's files are written (each atomically), a line recording it is appended to a file in
``<out>/progress`` (:class:`Ledger`). A later run with the same settings (:func:`run_settings`) skips every
image whose record is there, whose input file has the recorded size and modification time and whose output files
all exist; so a killed run, started again, redoes no finished image. ``overwrite=True`` (``--overwrite``) redoes
every image; a run with other settings redoes every image and forgets the earlier records.

Scale-out: started by ``accelerate launch`` (or ``torchrun``), every process takes its own contiguous share of the
images (accelerate's ``split_between_processes`` over the input order) and writes its own files and records; the
main process then gathers the rows and writes ``results.csv`` (and the report) once every process has finished.

Pipelining: in each process one worker thread reads (decodes) and drafts the next :data:`PREFETCH` images while SAM
runs on the current one, and another writes the previous image's files; images are still segmented, written and
reported in input order, with the same results as one at a time (tests/pipeline/test_folder.py).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from cxrsam.config import gather_objects, process_state
from cxrsam.data.io import XRay, list_images, read_image
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, atomic_write_text, remove_stale_temps
from cxrsam.pipeline.outputs import OUTPUT_KINDS, RESULT_COLUMNS, OutputFormat, output_format, result_row, write_outputs
from cxrsam.pipeline.segmenter import Segmenter

RESULTS_CSV = "results.csv"
PROGRESS_DIR = "progress"
"""Folder in ``--out`` holding the records of finished images (:class:`Ledger`)."""
RECORD_KEYS = {"key", "stat", "at", "outputs", "row"}
PREFETCH = 2
"""Images read and drafted ahead of the one SAM is segmenting."""


@dataclass
class FolderReport:
    """What :func:`segment_images` did: output files per image (including the skipped ones), failures ``(image,
    one-line message)``, the images skipped because an earlier run finished them, the number of processes, and the
    per-run CSV (None on every process but the main one of a job started by ``accelerate launch``; their report
    covers their own share only)."""

    written: dict[Path, dict[str, Path]] = field(default_factory=dict)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    processes: int = 1
    results: Path | None = None


def run_settings(segmenter: Segmenter, box: Sequence[float] | None, format: OutputFormat,
                 kinds: Sequence[str]) -> dict[str, Any]:
    """Everything besides the image that decides its outputs, as JSON data: models (with their SHA-based ids,
    runtime and versions), draft source, prompt spec, quality thresholds, uncertainty, hand box, format and kinds.
    Records of finished images count only for a run with equal settings."""
    settings = {"models": segmenter.models, "spec": segmenter.spec.model_dump(mode="json"),
                "thresholds": segmenter.thresholds.model_dump(mode="json"),
                "uncertainty": [segmenter.uncertainty_samples, segmenter.uncertainty_jitter],
                "box": None if box is None else [float(v) for v in box], "format": format.value, "kinds": list(kinds)}
    return json.loads(json.dumps(settings))


def _input_stat(path: Path) -> list[int]:
    """What tells a changed input file: [size in bytes, modification time in ns]."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


class Ledger:
    """The records of finished images in ``<out>/progress``.

    ``settings.json`` holds the :func:`run_settings` the records were made with; ``*.jsonl`` files hold one JSON
    line per finished image, ``{"key": resolved input path, "stat": [size, mtime_ns], "at": time_ns,
    "outputs": {kind: file name}, "row": results.csv row}``, appended (and flushed) after its output files were
    written: ``done.jsonl`` (all records, compacted at the end of a run) and ``part-<process>-*.jsonl`` (one per
    process and run). A line cut short by a kill is ignored; the latest record of an image wins.
    """

    def __init__(self, out_dir: Path):
        self.folder = out_dir / PROGRESS_DIR

    def records(self, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The latest record per input key, or none when the records were made with other settings."""
        try:
            saved = json.loads((self.folder / "settings.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if saved != settings:
            return {}
        latest: dict[str, dict[str, Any]] = {}
        for path in sorted(self.folder.glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # the last line of a killed process
                    continue
                if (isinstance(record, dict) and RECORD_KEYS <= record.keys()
                        and record["at"] > latest.get(record["key"], {}).get("at", -1)):
                    latest[record["key"]] = record
        return latest

    def start(self, settings: dict[str, Any], keep: bool) -> None:
        """Before any image is done (main process only): remove the temporary files of killed writes in ``--out``,
        forget every record unless ``keep``, and write ``settings``."""
        remove_stale_temps(self.folder.parent)
        remove_stale_temps(self.folder)
        if not keep:
            for path in self.folder.glob("*.jsonl"):
                path.unlink()
        atomic_write_text(self.folder / "settings.json", json.dumps(settings, indent=1) + "\n")

    @contextmanager
    def part(self, process: int) -> Iterator[TextIO]:
        """A new record file of this process (line-buffered, so each record is on disk when written)."""
        fd, _ = tempfile.mkstemp(prefix=f"part-{process}-", suffix=".jsonl", dir=self.folder)
        with os.fdopen(fd, "w", encoding="utf-8", buffering=1) as handle:
            yield handle

    def compact(self, settings: dict[str, Any]) -> None:
        """After every process finished (main process only): all latest records into ``done.jsonl``, part files
        removed."""
        parts = list(self.folder.glob("part-*.jsonl"))
        records = self.records(settings)
        atomic_write_text(self.folder / "done.jsonl", "".join(json.dumps(r) + "\n" for r in records.values()))
        for path in parts:
            path.unlink()


def _finished(record: dict[str, Any] | None, path: Path, out_dir: Path) -> bool:
    """Whether an earlier run's record still stands: same input file, every output file present."""
    return (record is not None and record["stat"] == _input_stat(path)
            and all((out_dir / name).is_file() for name in record["outputs"].values()))


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
                   progress: bool = True, overwrite: bool = False) -> FolderReport:
    """Segment every image and write its outputs to ``out_dir``; see the module docstring for the rules, resume and
    scale-out.

    Args:
        segmenter: draft source, prompt spec and SAM model.
        images: image files (e.g. from :func:`collect_images`), the same list in every process.
        out_dir: output folder (created).
        box: one hand-given box ``x0, y0, x1, y1`` for every image instead of draft prompts.
        format: mask file format; its optional dependency is checked before any work.
        kinds: which files to write per image (a subset of :data:`OUTPUT_KINDS`).
        inputs: the paths the user gave (files or folders), which ``out_dir`` must stay out of; default:
            the images and, when drafts come from a folder, that folder.
        progress: show a progress bar with images per second.
        overwrite: redo images an earlier run with the same settings finished (default: skip them).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    format = output_format(format)
    guarded = [*(inputs or images), *([segmenter.drafter.folder] if hasattr(segmenter.drafter, "folder") else [])]
    out_dir = check_output_folder(out_dir, guarded)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = process_state()
    settings = run_settings(segmenter, box, format, kinds)
    ledger = Ledger(out_dir)
    earlier = {} if overwrite else ledger.records(settings)
    state.wait_for_everyone()  # every process has read the records before the main process changes them
    if state.is_main_process:
        ledger.start(settings, keep=bool(earlier))
    state.wait_for_everyone()
    clashes = _clashes(images)
    with state.split_between_processes(list(enumerate(images))) as share:
        share = list(share)
    done: list[tuple[int, dict[str, Any], bool]] = []  # (input index, record, skipped) of this process's share
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    name = "segment" if state.num_processes == 1 else f"segment ({state.process_index + 1}/{state.num_processes})"
    pending = []  # (input index, image) of this process's share that an earlier run did not finish
    for index, path in share:
        record = earlier.get(str(path.resolve()))
        if _finished(record, path, out_dir):
            done.append((index, {**record, "row": {**record["row"], "image": str(path)}}, True))
        else:
            pending.append((index, path))
    with (Progress(*columns, disable=not progress, transient=True) as bar,
          ledger.part(state.process_index) as records,
          ThreadPoolExecutor(1, thread_name_prefix="cxrsam-read") as reader,
          ThreadPoolExecutor(1, thread_name_prefix="cxrsam-write") as writer):
        task = bar.add_task(name, total=len(share), completed=len(share) - len(pending), rate="")
        started, segmented = time.perf_counter(), 0
        upcoming = iter(pending)
        ahead: deque[tuple[int, Path, Future]] = deque()
        writing: deque[tuple[int, Path, dict, Future | None]] = deque()

        def read_next() -> None:
            if (item := next(upcoming, None)) is not None:
                ahead.append((*item, reader.submit(_read_and_draft, segmenter, item[1], box)))

        def finish(index: int, path: Path, row: dict, written: Future | None) -> None:
            nonlocal segmented
            outputs: dict[str, str] = {}
            try:
                if written is not None:
                    outputs = {kind: file.name for kind, file in written.result().items()}
                    row.update(outputs=";".join(outputs.values()))
            except CxrsamError as exc:
                fail(path, row, exc)
            record = {"key": str(path.resolve()), "stat": _input_stat(path), "at": time.time_ns(),
                      "outputs": outputs, "row": row}
            if row["status"] == "ok":
                records.write(json.dumps(record) + "\n")
            done.append((index, record, False))
            segmented += 1
            bar.update(task, advance=1, rate=f"{segmented / (time.perf_counter() - started):.2f} img/s")

        def fail(path: Path, row: dict, exc: CxrsamError) -> None:
            row.update({key: "" for key in RESULT_COLUMNS}, status="failed", prompt_sets=0, warnings="",
                       problem=str(exc) if exc.path is not None else f"{path}: {exc}")

        for _ in range(PREFETCH):
            read_next()
        try:
            while ahead:
                index, path, prepared = ahead.popleft()
                read_next()
                row = {"image": str(path), "status": "ok", "problem": "", "outputs": "", "prompt_sets": 0,
                       "warnings": ""}
                written = None
                try:
                    if path in clashes:
                        raise CxrsamError(clashes[path], path=path)
                    xray, draft = prepared.result()
                    seg = segmenter.segment(xray, box=box, draft=draft)
                    written = writer.submit(write_outputs, seg, out_dir, path.stem, format, kinds)
                    row.update(prompt_sets=len(seg.prompts.sets), warnings="; ".join(seg.warnings),
                               **result_row(seg))
                except CxrsamError as exc:
                    fail(path, row, exc)
                writing.append((index, path, row, written))
                while len(writing) > 1:
                    finish(*writing.popleft())
        finally:  # also when interrupted: an image whose files are being written is recorded, not lost
            while writing:
                finish(*writing.popleft())
    mine = _report(done, images, out_dir, state.num_processes)
    done = gather_objects(state, done)  # every process's share, once all have finished
    if not state.is_main_process:
        return mine
    report = _report(done, images, out_dir, state.num_processes)
    ledger.compact(settings)
    report.results = out_dir / RESULTS_CSV
    with atomic_path(report.results) as tmp:
        columns = ["image", "status", "problem", "outputs", "prompt_sets", "warnings", *RESULT_COLUMNS]
        with open(tmp, "w", newline="", encoding="utf-8") as file:
            table = csv.DictWriter(file, columns, extrasaction="ignore")
            table.writeheader()
            table.writerows(record["row"] for _, record, _ in sorted(done, key=lambda item: item[0]))
    return report


def _report(done: Sequence[tuple[int, dict[str, Any], bool]], images: Sequence[Path], out_dir: Path,
            processes: int) -> FolderReport:
    """The :class:`FolderReport` of ``(input index, record, skipped)`` items, in input order."""
    report = FolderReport(processes=processes)
    for index, record, skipped in sorted(done, key=lambda item: item[0]):
        path = images[index]
        if record["row"]["status"] == "ok":
            report.written[path] = {kind: out_dir / name for kind, name in record["outputs"].items()}
        else:
            report.failed.append((path, record["row"]["problem"]))
        if skipped:
            report.skipped.append(path)
    return report
