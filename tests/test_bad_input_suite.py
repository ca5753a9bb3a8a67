"""Bad input x command, as a table (docs/reliability.md, "Files and commands").

Each case runs a command (``cxrsam.cli.main`` in this process) on a folder of good phantoms plus the bad input,
and checks the exit code, exactly one error line per file at fault naming it (and a closing count line where a
folder run goes on past it), that the good files of the folder were finished, and that no input file changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrsam.data.io import read_mask, write_mask
from cxrsam.prompts import prompts_from_mask

BOX = "8,8,88,88"  # covers the lungs of the 96 px phantoms
GOOD = ("good0", "good1")


@dataclass
class Workspace:
    """``in/`` holds every input (images, drafts, ground truth, predictions); outputs go beside it."""

    root: Path
    cnn_run: Path
    make_dicom: Callable[[Path, str], Path]
    deny_write: Callable[[Path], None]

    @property
    def inputs(self) -> Path:
        return self.root / "in"

    def folder(self, name: str) -> Path:
        return self.inputs / name

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    def args(self, command: str, out: Path | None = None, prompts: tuple[str, ...] = ("--box", BOX)) -> list:
        """The command line of ``command`` on this workspace; ``out`` replaces its --out, ``prompts`` the
        prompt options of ``predict``."""
        images = self.folder("images")
        if command == "evaluate":
            return ["evaluate", "--pred", self.folder("pred"), "--gt", self.folder("gt"), "--out", out or self.results]
        if command == "predict-cnn":
            return ["predict-cnn", "--run", self.cnn_run, "--images", images, "--out", out or self.out,
                    "--device", "cpu"]
        if command == "predict":
            return ["predict", "--images", images, *prompts, "--out", out or self.out, "--device", "cpu"]
        return ["zero-shot", "--images", images, "--drafts", self.folder("drafts"), "--out", out or self.out]

    def finished(self, command: str, stem: str) -> bool:
        """Whether ``command`` finished the good input ``stem`` (scored it Dice 1, or wrote its mask)."""
        if command == "evaluate":
            return self.results.is_file() and pd.read_csv(self.results).set_index("name")["dice"].get(stem) == 1.0
        return (self.out / f"{stem}_mask.png").is_file()  # every segmenting command writes <stem>_mask.png

    def written(self) -> bool:
        return self.results.exists() or (self.out.is_dir() and any(self.out.iterdir()))


@dataclass
class Expect:
    """What a case must end with."""

    code: int
    faults: list[tuple[Path | None, str]] = field(default_factory=list)
    """One error line each: the file it names (None: no file is at fault) and the problem it states."""
    closing: bool = False
    """A folder run that went on past the faults ends with one more error line counting them."""
    done: tuple[str, ...] = GOOD
    """Good inputs that must be finished; empty when the command must refuse before any work."""
    check: Callable[[], None] | None = None


@pytest.fixture()
def ws(tmp_path, phantoms, cnn_run, undecodable_dicom, deny_write) -> Workspace:
    """Two good phantoms as images, drafts, ground truth and (perfect) predictions."""
    ws = Workspace(tmp_path, cnn_run, undecodable_dicom, deny_write)
    images, masks = sorted((phantoms / "images").iterdir()), sorted((phantoms / "masks").iterdir())
    for name in ("images", "drafts", "gt", "pred"):
        ws.folder(name).mkdir(parents=True)
    for stem, image, mask in zip(GOOD, images, masks):
        shutil.copy(image, ws.folder("images") / f"{stem}.png")
        for name in ("drafts", "gt", "pred"):
            shutil.copy(mask, ws.folder(name) / f"{stem}.png")
    return ws


def _opaque_rgba(path: Path) -> None:
    lungs = read_mask(path).astype(np.uint8) * 255
    Image.fromarray(np.dstack([lungs] * 3 + [np.full_like(lungs, 255)]), mode="RGBA").save(path)


def _components(path: Path) -> int:
    return prompts_from_mask(read_mask(path)).components_found


# --- the cases: (workspace, command, monkeypatch) -> (command line, expected outcome) ----------------------------

def opaque_rgba_mask(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """A mask saved as RGBA with an opaque alpha channel: its colours are the lungs, not its alpha."""
    folder = {"evaluate": "pred", "predict": "drafts", "zero-shot": "drafts"}[command]
    grey = ws.folder(folder) / "good0.png"
    lungs = read_mask(grey)
    _opaque_rgba(grey)

    def check() -> None:
        if command in ("predict", "zero-shot"):
            boxes = [s["box"] for s in json.loads((ws.out / "good0.json").read_text())["prompts"]]
            assert boxes == [s.box.tolist() for s in prompts_from_mask(lungs).sets] and len(boxes) == 2

    prompts = ("--drafts", ws.folder("drafts"))
    return ws.args(command, prompts=prompts), Expect(0, check=check)


def markup_name(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """A broken file whose name holds console markup (``[nostyle]`` even makes rich raise)."""
    folder = "pred" if command == "evaluate" else "images"
    bad = ws.folder(folder) / "[nostyle]x [bold]y.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    if command == "evaluate":
        shutil.copy(ws.folder("gt") / "good0.png", ws.folder("gt") / bad.name)
    else:
        shutil.copy(ws.folder("drafts") / "good0.png", ws.folder("drafts") / bad.name)
    return ws.args(command), Expect(1, [(bad, "not an image")], closing=True)


def dicom_maker(syntax: str, named: str) -> Callable:
    def undecodable_dicom_case(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
        bad = ws.make_dicom(ws.folder("images") / "scan.dcm", syntax)
        shutil.copy(ws.folder("drafts") / "good0.png", ws.folder("drafts") / "scan.png")
        problem = f"unreadable DICOM (transfer syntax {named} cannot be decoded here: "
        return ws.args(command), Expect(1, [(bad, problem)], closing=True)

    return undecodable_dicom_case


def out_is_a_file(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """--out names an existing file (for evaluate, whose --out is a file: an existing folder)."""
    if command == "evaluate":
        return ws.args(command, out=ws.inputs), Expect(1, [(ws.inputs, "is a folder")], done=())
    notes = ws.inputs / "notes.txt"
    notes.write_text("the user's own file\n")
    return ws.args(command, out=notes), Expect(1, [(notes, "exists and is not a folder")], done=())


def out_under_a_file(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """--out inside a path whose parent is a file: it cannot be created."""
    notes = ws.inputs / "notes.txt"
    notes.write_text("the user's own file\n")
    out = notes / "sub" / ("results.csv" if command == "evaluate" else "out")
    return ws.args(command, out=out), Expect(1, [(out, f"cannot be created: {notes} is not a folder")], done=())


def out_not_writable(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """--out in a folder without write permission (simulated: chmod does not stop root)."""
    locked = ws.root / "locked"
    locked.mkdir()
    ws.deny_write(locked)
    if command == "evaluate":
        out = locked / "results.csv"
        return ws.args(command, out=out), Expect(1, [(out, f"no permission to write in {locked}")], done=())
    return ws.args(command, out=locked), Expect(1, [(locked, "not writable")], done=())


def other_aspect(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """A prediction of another aspect ratio than its ground truth (it was squashed to fit before)."""
    pred = ws.folder("pred") / "good0.png"
    write_mask(pred, read_mask(pred)[:, :48])
    return ws.args(command), Expect(1, [(pred, "but its ground truth")], closing=True, done=("good1",))


def shared_name(folder: str) -> Callable:
    def two_files_one_name(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
        first = ws.folder(folder) / "good0.png"
        second = ws.folder(folder) / "good0_mask.png"
        shutil.copy(first, second)
        expect = Expect(1, [(first, f"has the same name 'good0' as {second}")], closing=True, done=("good1",))
        return ws.args(command), expect

    return two_files_one_name


def box_outside(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """A box outside the 96 px phantoms but inside a 192 px image of the same folder."""
    big = np.asarray(Image.open(ws.folder("images") / "good0.png").resize((192, 192)))
    Image.fromarray(big).save(ws.folder("images") / "big.png")
    faults = [(ws.folder("images") / f"{stem}.png", "box 100,100,180,180 lies outside the 96x96 image")
              for stem in GOOD]
    return ws.args(command, prompts=("--box", "100,100,180,180")), Expect(1, faults, closing=True, done=("big",))


def box_reaching_out(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """A box that only partly overlaps the image is clipped, and the result says so."""

    def check() -> None:
        for stem in GOOD:
            record = json.loads((ws.out / f"{stem}.json").read_text())
            assert record["prompts"][0]["box"] == [0.0, 0.0, 60.0, 60.0]
            assert any("clipped to 0,0,60,60" in warning for warning in record["warnings"])

    return ws.args(command, prompts=("--box", "-20,-20,60,60")), Expect(0, check=check)


def nifti_without_nibabel(ws: Workspace, command: str, monkeypatch) -> tuple[list, Expect]:
    """--format nifti when the optional nibabel is not installed: refused before any image is read."""
    monkeypatch.setitem(sys.modules, "nibabel", None)
    expect = Expect(1, [(None, "--format nifti needs the optional package nibabel")], done=())
    return [*ws.args(command), "--format", "nifti"], expect


ALL = ("evaluate", "predict-cnn", "predict", "zero-shot")
CASES: dict[str, tuple[Callable, tuple]] = {
    "opaque RGBA mask": (opaque_rgba_mask, ("evaluate", "predict", "zero-shot")),
    "file name with console markup": (markup_name, ("evaluate", "predict-cnn", "predict",
                                                    "zero-shot")),
    "JPEG 2000 DICOM, no working decoder": (dicom_maker("jpeg2000", "JPEG 2000 Image Compression (Lossless Only)"),
                                            ("predict-cnn", "predict", "zero-shot")),
    "DICOM of an unknown transfer syntax": (dicom_maker("unknown", "1.2.3.4.5.6.7"), ("predict-cnn", "predict")),
    "--out is an existing file (evaluate: a folder)": (out_is_a_file, ALL),
    "--out under a file": (out_under_a_file, ALL),
    "--out not writable": (out_not_writable, ALL),
    "prediction of another aspect ratio": (other_aspect, ("evaluate",)),
    "two predictions with one name": (shared_name("pred"), ("evaluate",)),
    "two ground truths with one name": (shared_name("gt"), ("evaluate",)),
    "box outside the image": (box_outside, ("predict",)),
    "box partly outside the image": (box_reaching_out, ("predict",)),
    "--format nifti without nibabel": (nifti_without_nibabel, ("predict",)),
}


def _table() -> list:
    rows = []
    for case, (_make, commands) in CASES.items():
        for command in commands:
            if isinstance(command, str):
                rows.append(pytest.param(case, command, id=f"{case} | {command}"))
            else:
                rows.append(pytest.param(case, *command.values, marks=command.marks,
                                         id=f"{case} | {command.values[0]}"))
    return rows


def _hashes(*folders: Path) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case, command", _table())
def test_bad_input(case, command, ws, cli, monkeypatch):
    args, expect = CASES[case][0](ws, command, monkeypatch)
    before = _hashes(ws.inputs, ws.cnn_run)
    res = cli(*args)
    assert res.returncode == expect.code, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    for path, problem in expect.faults:
        [line] = [line for line in lines if line.startswith(f"error: {path}: " if path else f"error: {problem}")]
        assert problem in line, line
    assert len(lines) == len(expect.faults) + expect.closing, lines
    assert "Traceback" not in res.stderr
    for stem in expect.done:
        assert ws.finished(command, stem), stem
    if not expect.done:
        assert not ws.written()
    if expect.check is not None:
        expect.check()
    assert _hashes(ws.inputs, ws.cnn_run) == before
