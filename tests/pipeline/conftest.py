"""Fixtures of the new-image pipeline tests: real image pairs, a tiny CNN run, a LoRA run, the CLI."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


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
    ~10 s of imports a subprocess costs on a busy CPU; returns code, stdout and stderr like ``run_cli``."""
    from cxrsam.cli import main

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        argv = ["cxrsam", *map(str, args)]
        monkeypatch.setattr(sys, "argv", argv)
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
def real_pairs(shared_data, tmp_path_factory) -> Path:
    """Two real CXR (299 px PNG) in ``images/`` with their lung masks (256 px) in ``masks/``."""
    root = tmp_path_factory.mktemp("real")
    source = shared_data / "Viral Pneumonia"
    for folder in ("images", "masks"):
        (root / folder).mkdir()
        for index in (1, 2):
            shutil.copy(source / folder / f"Viral Pneumonia-{index}.png", root / folder / f"vp{index}.png")
    return root


@pytest.fixture(scope="session")
def cnn_run(phantoms, tmp_path_factory) -> Path:
    """A U-Net trained for 2 epochs at 64 px on the phantoms (a real train-cnn run folder)."""
    from cxrsam.baselines.config import make_config
    from cxrsam.train.cnn import train_cnn

    config = make_config(arch="unet", data=phantoms, size=64, epochs=2, batch_size=4, split=(0.75, 0.25, 0.0),
                         lr=3e-3)
    return train_cnn(config, tmp_path_factory.mktemp("cnn") / "run")


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory) -> Path:
    """A LoRA run folder on pretrained LiteMedSAM as finetune writes it, before any training step
    (peft initialises B = 0, so it segments exactly like the base)."""
    from cxrsam.sam.lora import LoraSettings, apply_lora, save_adapter
    from cxrsam.sam.registry import build_sam

    loaded = build_sam("litemedsam")
    settings = LoraSettings(rank=4)
    run = tmp_path_factory.mktemp("lora") / "run"
    save_adapter(run, apply_lora(loaded.model, settings), loaded, settings)
    return run
