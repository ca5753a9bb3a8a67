"""Shared fixtures: the real data in ../shared/data (skipped when absent), small phantom datasets, the CLI
(in a subprocess or in this process), a tiny CNN run and undecodable DICOM files."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_COVID = REPO.parent / "shared" / "data" / "COVID-19_Radiography_Dataset"

os.environ.setdefault("MPLBACKEND", "Agg")
# the CLI's default --runtime auto would export every test's SAM to ONNX on first use; tests run PyTorch unless they
# pass --runtime (tests/sam/test_precision.py checks the default itself)
os.environ.setdefault("CXRSAM_RUNTIME", "torch")


SHARED_DATA_PRESENT = (SHARED_COVID / "Viral Pneumonia" / "images").is_dir()
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA_PRESENT,
    reason=f"real CXR data not present at {SHARED_COVID} (../shared/data is provided to developers and CI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses the real data (directly or through another fixture) skips, with the reason, without it."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(needs_shared_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real COVID-19 Radiography Database subset beside the repo (tests using it skip when absent)."""
    return SHARED_COVID


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """12 synthetic phantoms at 96 px in the generic layout (images/ + masks/)."""
    from cxrsam.data.synthetic import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), n=12, size=96, seed=1, progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """state_dict of a seeded tiny SAM (:mod:`cxrsam.sam.testing`) saved with torch.save (the official files' format)."""
    from cxrsam.sam.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny_sam.pth", seed=0)


@pytest.fixture(scope="session")
def undecodable_dicom() -> Callable[[Path, str], Path]:
    """``undecodable_dicom(path, syntax)``: a 64x64 DICOM whose pixel data cannot be decoded here: ``jpeg2000``
    (a JPEG 2000 transfer syntax with a broken codestream) or ``unknown`` (a transfer syntax UID nobody knows)."""

    def make(path: Path, syntax: str = "jpeg2000") -> Path:
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.encaps import encapsulate
        from pydicom.uid import UID, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = {"jpeg2000": JPEG2000Lossless, "unknown": UID("1.2.3.4.5.6.7")}[syntax]
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", 64, 64, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(100)])  # a JPEG 2000 start, then nothing
        ds["PixelData"].VR = "OB"
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
        return path

    return make


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args)``: ``python -m cxrsam ARGS`` in a subprocess, exactly as a user runs it."""

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cxrsam", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    return run


@pytest.fixture()
def cli(monkeypatch) -> Callable[..., subprocess.CompletedProcess]:
    """``cli(*args)``: the same entry point (``cxrsam.cli.main``) in this process, which saves the
    ~10 s of imports a subprocess costs on a busy CPU; returns code, stdout and stderr like ``run_cli``
    (log records included: pytest's own log handlers are set aside so that ``main`` installs its handler)."""
    from cxrsam.cli import main

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        argv = ["cxrsam", *map(str, args)]
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setattr(logging.root, "handlers", [])
        monkeypatch.setattr(logging.root, "level", logging.root.level)  # restored after the test
        stdout, stderr = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())

    return run


@pytest.fixture(scope="session")
def cnn_run(phantoms, tmp_path_factory) -> Path:
    """A U-Net trained for 2 epochs at 64 px on the phantoms (a real train-cnn run folder)."""
    from cxrsam.baselines.config import make_config
    from cxrsam.train.cnn import train_cnn

    config = make_config(arch="unet", data=phantoms, size=64, epochs=2, batch_size=4, split=(0.75, 0.25, 0.0),
                         lr=3e-3)
    return train_cnn(config, tmp_path_factory.mktemp("cnn") / "run")


@pytest.fixture()
def deny_write(monkeypatch) -> Callable[[Path], None]:
    """``deny_write(folder)``: ``os.access`` reports no write permission for ``folder`` for the rest of the test
    (chmod does not stop root, who runs the tests in many containers)."""

    def deny(folder: Path) -> None:
        allowed = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: not (Path(path) == folder and mode & os.W_OK)
                            and allowed(path, mode))

    return deny


@pytest.fixture(scope="session")
def folder_digest() -> Callable[[Path], dict[str, str]]:
    """``folder_digest(folder)``: SHA-256 of every file under ``folder`` by relative path, to prove that a command
    left its inputs as they were."""
    import hashlib

    def digest(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(Path(folder).rglob("*")) if p.is_file()}

    return digest


@pytest.fixture(scope="session")
def fresh_imports() -> Callable[..., list[str]]:
    """``fresh_imports(code, modules, env=None)``: run ``code`` in a fresh interpreter (failing the test with its
    stderr when it fails) and return which of ``modules`` it imported, sorted."""

    def run(code: str, modules: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        script = f"{code}\nimport sys\nprint(sorted(name for name in {list(modules)!r} if name in sys.modules))\n"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                env={**os.environ, **(env or {})})
        assert result.returncode == 0, result.stderr[-2000:]
        return eval(result.stdout.strip().splitlines()[-1])  # noqa: S307 - a list of names printed by the script

    return run
