"""Run folders: checksums recorded and verified, non-finite weights refused, malformed run files in one line,
stale temporary files, and the typed RunFolder state. CLI cases go through `cxrsam predict --run` and `export`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cxrsam.errors import CxrsamError
from cxrsam.runs import (
    ADAPTER_FILE,
    ADAPTER_JSON,
    CHECKSUMS_JSON,
    RunFolder,
    forget,
    record_checksum,
    require_finite,
    verify_checksum,
)
from cxrsam.sam import lora
from cxrsam.sam.registry import BACKENDS, build_sam
from cxrsam.sam.testing import tiny_spec


@pytest.fixture()
def tiny_run(tmp_path, monkeypatch, tiny_checkpoint):
    """A LoRA run on the tiny SAM (registered as ``tiny_sam``) as finetune writes it."""
    monkeypatch.setitem(BACKENDS, "tiny_sam", tiny_spec("tiny_sam"))
    loaded = build_sam("tiny_sam", tiny_checkpoint)
    settings = lora.LoraSettings(rank=2)
    run = tmp_path / "run"
    lora.save_adapter(run, lora.apply_lora(loaded.model, settings), loaded, settings)
    return run


def test_checksums_are_recorded_verified_and_forgotten(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, weights)
    digest = record_checksum(weights)
    assert json.loads((tmp_path / CHECKSUMS_JSON).read_text()) == {"w.pt": digest}
    assert verify_checksum(weights) == digest
    torch.save({"a": torch.zeros(2)}, weights)
    with pytest.raises(CxrsamError, match="altered after training"):
        verify_checksum(weights)
    forget(weights)
    assert not weights.exists() and json.loads((tmp_path / CHECKSUMS_JSON).read_text()) == {}
    (tmp_path / CHECKSUMS_JSON).write_text("[1, 2]")
    torch.save({}, weights)
    with pytest.raises(CxrsamError, match="not a mapping"):
        verify_checksum(weights)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    require_finite({"ok": torch.ones(3), "ints": torch.arange(3)}, tmp_path / "x")
    with pytest.raises(CxrsamError, match="'bad' hold NaN or infinite"):
        require_finite({"ok": torch.ones(3), "bad": torch.tensor([1.0, float("inf")])}, tmp_path / "x")


def tamper(run, how: str) -> None:
    """Damage a LoRA run folder in one of the ways users and disks do."""
    adapter = run / ADAPTER_FILE
    state = load_file(str(adapter))
    first = sorted(state)[0]
    if how == "altered":  # same keys and shapes, other values, checksum left as it was
        state[first] = state[first] + 1
        save_file(state, str(adapter))
    elif how == "nan":  # re-recorded checksum: only the values give it away
        state[first] = torch.full_like(state[first], float("nan"))
        save_file(state, str(adapter))
        record_checksum(adapter)
    elif how == "wrong shape":
        state[first] = torch.zeros(3, 3)
        save_file(state, str(adapter))
        record_checksum(adapter)
    elif how == "malformed json":
        (run / ADAPTER_JSON).write_text('{"backend": "tiny_sam", "lora": ')
    elif how == "missing field":
        info = json.loads((run / ADAPTER_JSON).read_text())
        del info["base_sha256"]
        (run / ADAPTER_JSON).write_text(json.dumps(info))
    elif how == "no checksum":
        (run / CHECKSUMS_JSON).unlink()


CASES = {"altered": f"{ADAPTER_FILE}: SHA-256", "nan": "hold NaN or infinite values",
         "wrong shape": "adapter weights do not fit the model", "malformed json": f"{ADAPTER_JSON}: unreadable",
         "missing field": f"{ADAPTER_JSON}: invalid adapter description: base_sha256",
         "no checksum": f"{ADAPTER_FILE}: no SHA-256 recorded"}


@pytest.mark.parametrize("how", sorted(CASES))
def test_a_damaged_lora_run_is_refused_in_one_line_by_predict_and_export(tiny_run, tmp_path, cli, phantoms, how):
    tamper(tiny_run, how)
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir()}
    for args in (["predict", "--run", tiny_run, "--images", phantoms / "images", "--box", "5,5,90,90",
                  "--out", tmp_path / "out"],
                 ["export", "--run", tiny_run, "--merged", tmp_path / "merged.pth"]):
        res = cli(*args)
        assert res.returncode == 1, (how, args[0])
        [line] = [line for line in res.stderr.splitlines() if line.strip()]
        assert line.startswith("error: ") and CASES[how] in line, (how, args[0], line)
    assert not (tmp_path / "merged.pth").exists() and not (tmp_path / "out" / "results.csv").exists()
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir()} == before  # the run was not "repaired" either


def test_run_folder_state(tmp_path, tiny_run):
    folder = RunFolder(tmp_path / "new", "CNN")
    assert not folder.unfinished and not folder.finished and folder.train_seconds() == 0.0
    shutil.copy(tiny_run / ADAPTER_FILE, tmp_path / ADAPTER_FILE)
    (tmp_path / "config.yaml").write_text("a: 1\n")
    (tmp_path / "metrics.csv").write_text("epoch,epoch_s\n1,2.5\n2,3.0\n")
    done = RunFolder(tmp_path)
    assert done.finished and not done.unfinished and done.train_seconds() == 5.5
