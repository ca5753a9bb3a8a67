"""Bad input through `cxrsam predict`: one line naming the file and the problem, a non-zero exit where
the command cannot go on, no partial output files, and the other images of a folder still done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrsam.data.io import read_image, read_mask

BOX = "8,8,88,88"  # covers the lungs of the 96 px phantoms


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted atomic write would leave."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp")


def _phantom(phantoms: Path, index: int = 0) -> np.ndarray:
    """A phantom X-ray as uint8 (96, 96)."""
    return (read_image(sorted((phantoms / "images").iterdir())[index]).pixels * 255).round().astype(np.uint8)


def test_folder_with_bad_files_finishes_the_others(phantoms, run_cli, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    grey = _phantom(phantoms)
    Image.fromarray(grey).save(images / "good.png")
    Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)])).save(images / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 16 + 100).save(images / "deep16.png")  # 12-bit data, 16-bit PNG
    (images / "truncated.png").write_bytes((images / "good.png").read_bytes()[:300])
    (images / "zero.png").write_bytes(b"")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(images / "one_pixel.png")
    Image.new("L", (10000, 10000)).save(images / "huge.png")
    (images / "report.png").write_text("this is a text file with an image name\n")
    out = tmp_path / "out"
    res = run_cli("predict", "--images", images, "--box", BOX, "--out", out)
    assert res.returncode == 1
    expected = {"truncated.png": "unreadable image", "zero.png": "empty image file", "one_pixel.png": "too small",
                "huge.png": "too large", "report.png": "not an image"}
    lines = error_lines(res.stderr)
    for name, problem in expected.items():
        [line] = [line for line in lines if f"{images / name}:" in line]
        assert problem in line
    assert len(lines) == len(expected) + 1 and "5 of 8 image(s) failed" in lines[-1]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["progress", "results.csv", *(f"{stem}{suffix}" for stem in ("good", "rgba", "deep16")
                                               for suffix in (".json", "_mask.png", "_overlay.png"))])
    results = pd.read_csv(out / "results.csv").set_index("image")
    assert (results.status == "failed").sum() == 5 and results.loc[str(images / "good.png"), "status"] == "ok"
    assert expected["huge.png"] in results.loc[str(images / "huge.png"), "problem"]
    assert read_mask(out / "rgba_mask.png").sum() == read_mask(out / "good_mask.png").sum() > 0
    assert "wrote 3 of 8" in res.stdout and not leftovers(tmp_path)


def test_single_bad_image_stops_with_one_line_and_no_output(phantoms, cli, tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"GIF89a not really")
    res = cli("predict", "--images", bad, "--box", BOX, "--out", tmp_path / "out")
    assert res.returncode == 1
    [line] = error_lines(res.stderr)
    assert line.startswith(f"error: {bad}: ") and ("unreadable image" in line or "not an image" in line)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["progress", "results.csv"]  # the failure, recorded


def test_draft_masks_values_sizes_empty_and_missing(phantoms, cli, tmp_path):
    images, drafts, out = tmp_path / "images", tmp_path / "drafts", tmp_path / "out"
    images.mkdir()
    drafts.mkdir()
    grey = _phantom(phantoms)
    lungs = read_mask(sorted((phantoms / "masks").iterdir())[0])
    for stem in ("ones", "twofivefive", "wrong_shape", "empty", "no_draft"):
        Image.fromarray(grey).save(images / f"{stem}.png")
    Image.fromarray(lungs.astype(np.uint8)).save(drafts / "ones.png")              # {0, 1}
    Image.fromarray(lungs.astype(np.uint8) * 255).save(drafts / "twofivefive.png")  # {0, 255}
    Image.fromarray(np.full((96, 40), 255, np.uint8)).save(drafts / "wrong_shape.png")
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(drafts / "empty.png")
    res = cli("predict", "--images", images, "--drafts", drafts, "--out", out)
    assert res.returncode == 1
    lines = error_lines(res.stderr)
    assert any(f"{drafts / 'wrong_shape.png'}: draft mask is 40x96 but the image is 96x96" in line for line in lines)
    assert any(f"{drafts / 'empty.png'}: draft mask is empty" in line for line in lines)
    assert any(f"{images / 'no_draft.png'}: no draft mask" in line for line in lines)
    assert len(lines) == 4
    np.testing.assert_array_equal(read_mask(out / "ones_mask.png"), read_mask(out / "twofivefive_mask.png"))
    assert sorted(p.name for p in out.glob("*.json")) == ["ones.json", "twofivefive.json"]
    assert json.loads((out / "ones.json").read_text())["prompt_source"] == "draft-file"


def test_no_prompt_source_lists_the_options(phantoms, cli, tmp_path):
    res = cli("predict", "--images", phantoms / "images", "--out", tmp_path / "out")
    assert res.returncode == 1
    [line] = error_lines(res.stderr)
    assert "--drafts-from" in line and "--box" in line and "--run" in line
    assert not (tmp_path / "out").exists()


class RunsCode:
    """Pickles to a call of ``os.system``: what a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["corrupt", "pickled_code"])
def test_bad_sam_checkpoint_is_refused(phantoms, cli, tmp_path, kind):
    checkpoint, marker = tmp_path / "sam.pth", tmp_path / "code_ran"
    if kind == "corrupt":
        torch.save({"image_encoder.w": torch.zeros(64)}, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    else:
        torch.save({"model": {"image_encoder.w": RunsCode(marker)}}, checkpoint)
    res = cli("predict", "--images", phantoms / "images", "--box", BOX, "--checkpoint", checkpoint,
              "--out", tmp_path / "out")
    assert res.returncode == 1
    [line] = error_lines(res.stderr)
    assert f"{checkpoint}:" in line
    assert ("corrupt" in line) if kind == "corrupt" else ("refused" in line and "weights_only" in line)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_bad_run_folders_are_refused(cnn_run, lora_run, phantoms, cli, tmp_path):
    other_base = tmp_path / "other_base"
    shutil.copytree(lora_run, other_base)
    info = json.loads((other_base / "adapter.json").read_text())
    info["base_sha256"] = "0" * 64  # trained on another base checkpoint
    (other_base / "adapter.json").write_text(json.dumps(info))
    broken_cnn = tmp_path / "broken_cnn"
    shutil.copytree(cnn_run, broken_cnn)
    (broken_cnn / "best.pt").write_bytes((cnn_run / "best.pt").read_bytes()[:1000])
    cases = [
        (["--run", other_base, "--box", BOX], "differs from the one this run was trained on"),
        (["--run", cnn_run, "--box", BOX], f"{cnn_run}: not a finished LoRA run"),
        (["--drafts-from", lora_run], f"{lora_run}: not a CNN run folder"),
        (["--drafts-from", broken_cnn], f"{broken_cnn / 'best.pt'}: SHA-256"),
    ]
    for options, problem in cases:
        res = cli("predict", "--images", phantoms / "images", *options, "--out", tmp_path / "out")
        assert res.returncode == 1, options
        [line] = error_lines(res.stderr)
        assert problem in line, (options, line)
    assert not (tmp_path / "out").exists()
