"""Fixtures of the new-image pipeline tests: real image pairs and a LoRA run (the CLI and the tiny CNN run
are in ../conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


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


@pytest.fixture()
def tiny_backend(monkeypatch, tiny_checkpoint) -> Path:
    """The tiny SAM registered as backend ``tiny_sam``; returns its checkpoint."""
    from cxrsam.sam.registry import BACKENDS
    from cxrsam.sam.testing import tiny_spec

    monkeypatch.setitem(BACKENDS, "tiny_sam", tiny_spec("tiny_sam"))
    return tiny_checkpoint


@pytest.fixture()
def phantom_folders(phantoms, tmp_path):
    """``make(n) -> (images, drafts)``: the first n phantom images and their draft masks in their own folders."""
    from cxrsam.data.io import list_images

    def make(n: int) -> tuple[Path, Path]:
        images, drafts = tmp_path / "images", tmp_path / "drafts"
        images.mkdir()
        drafts.mkdir()
        for path in list_images(phantoms / "images")[:n]:
            shutil.copy(path, images / path.name)
            shutil.copy(phantoms / "masks" / path.name, drafts / path.name)
        return images, drafts

    return make
