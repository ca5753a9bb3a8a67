"""Resume and scale-out of the folder pipeline: a killed run started again redoes no finished image, and
`accelerate launch` shares one folder among processes with the masks and results.csv of a single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrsam.baselines.drafts import MaskFolderDrafts
from cxrsam.data.io import list_images, read_mask
from cxrsam.pipeline import Segmenter, segment_images
from cxrsam.pipeline.folder import PROGRESS_DIR, Ledger
from cxrsam.prompts import PromptSpec
from cxrsam.sam.registry import build_sam

SEGMENT = Segmenter.segment


@pytest.fixture()
def inputs(phantom_folders) -> tuple[Path, Path]:
    """Six phantom images and their draft masks, in their own folders."""
    return phantom_folders(6)


def watch_segment(monkeypatch, stop_after: int | None = None) -> list[str]:
    """Record the name of every image :meth:`Segmenter.segment` is called on; with ``stop_after``, a Ctrl+C
    (KeyboardInterrupt) arrives instead of the next image after that many."""
    seen: list[str] = []

    def segment(self, xray, *args, **kwargs):
        if stop_after is not None and len(seen) == stop_after:
            raise KeyboardInterrupt
        seen.append(xray.path.name)
        return SEGMENT(self, xray, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment", segment)
    return seen


def test_a_killed_run_resumes_without_redoing_finished_images(monkeypatch, tiny_backend, inputs, tmp_path):
    images, drafts = inputs
    paths = list_images(images)
    names = [p.name for p in paths]
    segmenter = Segmenter(build_sam("tiny_sam", tiny_backend), MaskFolderDrafts(drafts))
    straight = segment_images(segmenter, paths, tmp_path / "straight", progress=False)
    out = tmp_path / "resumed"

    watch_segment(monkeypatch, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        segment_images(segmenter, paths, out, progress=False)
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert len(finished) == 2 * 3 and not (out / "results.csv").exists()  # mask, overlay, JSON of two images
    [part] = (out / PROGRESS_DIR).glob("part-*.jsonl")
    with part.open("a") as handle:  # a record cut short by a kill, and the temporary file of a killed write
        handle.write(json.dumps({"key": str(paths[2].resolve()), "stat": [1, 2]})[:30])
    (out / f".{paths[2].stem}_mask.png.abcd1234.tmp.png").write_bytes(b"half")

    seen = watch_segment(monkeypatch)
    report = segment_images(segmenter, paths, out, progress=False)
    assert seen == names[2:] and report.skipped == paths[:2] and not report.failed
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in finished} == finished  # untouched
    assert not list(out.glob(".*.tmp.png"))
    for path in paths:
        assert np.array_equal(read_mask(report.written[path]["mask"]), read_mask(straight.written[path]["mask"]))
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), pd.read_csv(straight.results))

    assert segment_images(segmenter, paths, out, progress=False).skipped == paths and seen == names[2:]
    os.utime(paths[0], ns=(1_000_000_000, 1_000_000_000))  # a changed input, and an output deleted by hand
    (out / f"{paths[3].stem}_mask.png").unlink()
    seen.clear()
    assert len(segment_images(segmenter, paths, out, progress=False).skipped) == 4 and seen == [names[0], names[3]]
    seen.clear()
    assert segment_images(segmenter, paths, out, progress=False, overwrite=True).skipped == [] and seen == names
    seen.clear()
    other = Segmenter(segmenter.sam, MaskFolderDrafts(drafts), spec=PromptSpec(margin=2.0))  # other settings
    assert segment_images(other, paths, out, progress=False).skipped == [] and seen == names


KILLED = """
    import os
    import signal
    from contextlib import contextmanager
    import cxrsam.pipeline.outputs as outputs
    from cxrsam.sam.registry import BACKENDS
    from cxrsam.sam.testing import tiny_spec

    BACKENDS["tiny_sam"] = tiny_spec("tiny_sam")
    plain, opened = outputs.atomic_path, []

    @contextmanager
    def atomic_path(path):  # SIGKILL half-way through the third image's overlay (the 8th file opened)
        with plain(path) as tmp:
            opened.append(path)
            if len(opened) == 8:
                tmp.write_bytes(b"half an overlay")
                os.kill(os.getpid(), signal.SIGKILL)
            yield tmp

    outputs.atomic_path = atomic_path
    from cxrsam.cli import main

    main()
"""


def test_a_run_killed_with_sigkill_mid_write_resumes_with_the_masks_of_a_straight_run(monkeypatch, cli, tiny_backend,
                                                                                      inputs, tmp_path):
    """A real ``kill -9`` (no ``finally``, no flush) while the write-behind thread writes the third image: the
    resumed run redoes exactly the images without a record (the killed one among them, none recorded before),
    leaves no temporary file, and ends with the masks and results.csv of an uninterrupted run."""
    images, drafts = inputs
    paths = list_images(images)
    common = ["--images", images, "--drafts", drafts, "--backend", "tiny_sam", "--checkpoint", tiny_backend]
    straight = cli("zero-shot", *common, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    script, out = tmp_path / "killed.py", tmp_path / "killed"
    script.write_text(textwrap.dedent(KILLED))
    res = subprocess.run([sys.executable, str(script), "zero-shot", *map(str, common), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == -9, res.stderr
    third = paths[2].stem
    assert [p.name for p in out.glob(f".{third}_overlay.png.*.tmp.png")] and not (out / f"{third}_overlay.png").exists()
    assert not (out / "results.csv").exists()
    recorded = set(Ledger(out).records(json.loads((out / PROGRESS_DIR / "settings.json").read_text())))
    assert str(paths[0].resolve()) in recorded and str(paths[2].resolve()) not in recorded

    seen = watch_segment(monkeypatch)
    resumed = cli("zero-shot", *common, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert seen == [p.name for p in paths if str(p.resolve()) not in recorded]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    for path in paths:
        assert np.array_equal(read_mask(out / f"{path.stem}_mask.png"),
                              read_mask(tmp_path / "straight" / f"{path.stem}_mask.png"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), pd.read_csv(tmp_path / "straight" / "results.csv"))


LAUNCHED = """
    import os
    from pathlib import Path
    from cxrsam.pipeline.segmenter import Segmenter
    from cxrsam.sam.registry import BACKENDS
    from cxrsam.sam.testing import tiny_spec

    BACKENDS["tiny_sam"] = tiny_spec("tiny_sam")
    plain = Segmenter.segment

    def segment(self, xray, *args, **kwargs):  # each process lists the images it segments
        with open(Path(os.environ["SEGMENT_LOG"]) / os.environ["RANK"], "a") as log:
            log.write(xray.path.name + "\\n")
        return plain(self, xray, *args, **kwargs)

    Segmenter.segment = segment
    from cxrsam.cli import main

    main()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_finish_a_killed_run_with_the_masks_of_one(monkeypatch, cli, tiny_backend, inputs, tmp_path):
    """`accelerate launch` with two CPU processes resumes a run killed after two images: the other images are each
    segmented once, shared by both processes, and the masks and results.csv equal a single-process run's."""
    images, drafts = inputs
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a failure reported once, by the main process
    names = [p.name for p in list_images(images)]
    common = ["--images", images, "--drafts", drafts, "--backend", "tiny_sam", "--checkpoint", tiny_backend]
    single = cli("zero-shot", *common, "--out", tmp_path / "single")
    assert single.returncode == 1 and "1 of 7 image(s) failed" in single.stderr

    watch_segment(monkeypatch, stop_after=2)
    cli("zero-shot", *common, "--out", tmp_path / "shared")  # Ctrl+C after two images
    assert len(list((tmp_path / "shared").glob("*.json"))) == 2 and not (tmp_path / "shared" / "results.csv").exists()
    script, log = tmp_path / "launched.py", tmp_path / "log"
    script.write_text(textwrap.dedent(LAUNCHED))
    log.mkdir()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
              "--dynamo_backend", "no", str(script)]
    res = subprocess.run([*launch, "zero-shot", *map(str, common), "--out", str(tmp_path / "shared")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "SEGMENT_LOG": str(log),
                                                                             "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0, res.stderr  # the broken image
    assert res.stdout.count("wrote 4 of 7 image(s)") == 1 and "in 2 processes" in res.stdout
    assert "2 finished by an earlier run" in res.stdout
    assert res.stderr.count(f"error: {images / 'broken.png'}:") == 1
    logged = {rank.name: rank.read_text().split() for rank in log.iterdir()}
    assert sorted(logged) == ["0", "1"] and all(logged.values())  # both processes worked
    done = sorted(logged["0"] + logged["1"])
    good = [n for n in names if n != "broken.png"]
    assert done == good[2:]  # every unfinished image exactly once, no finished one again
    for name in good:
        stem = Path(name).stem
        assert np.array_equal(read_mask(tmp_path / "shared" / f"{stem}_mask.png"),
                              read_mask(tmp_path / "single" / f"{stem}_mask.png"))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "shared" / "results.csv"),
                                  pd.read_csv(tmp_path / "single" / "results.csv"))
    assert sorted(p.name for p in (tmp_path / "shared" / PROGRESS_DIR).iterdir()) == ["done.jsonl", "settings.json"]
