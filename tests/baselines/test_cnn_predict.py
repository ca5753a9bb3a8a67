"""Models, the predictor API, predict-cnn / train-cnn / eval-cnn from the command line and their errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cxrsam.baselines.models import ARCHITECTURES, build_cnn
from cxrsam.baselines.predict import load_cnn_run
from cxrsam.data.io import read_image, read_mask
from cxrsam.errors import CxrsamError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrsam", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(phantoms, tmp_path_factory, folder_digest):
    """A 2-epoch U-Net on the 96 px phantoms, trained through the CLI (which must leave the data as it was)."""
    run = tmp_path_factory.mktemp("cnn") / "run"
    before = folder_digest(phantoms)
    res = run_cli("train-cnn", "--arch", "unet", "--data", str(phantoms), "--size", "64", "--epochs", "2",
                  "--batch-size", "4", "--split", "0.75,0.25,0", "--out", str(run))
    assert res.returncode == 0, res.stderr
    assert folder_digest(phantoms) == before
    return run


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_build_cnn_maps_images_to_one_logit_channel(arch, in_channels):
    model = build_cnn(arch, "resnet18", in_channels=in_channels).eval()
    with torch.no_grad():
        assert model(torch.rand(2, in_channels, 64, 64)).shape == (2, 1, 64, 64)


def test_build_cnn_rejects_unknown_names():
    with pytest.raises(CxrsamError, match="architecture"):
        build_cnn("segformer")
    with pytest.raises(CxrsamError, match="encoder 'resnet9'"):
        build_cnn("unet", "resnet9")


def test_predict_cnn_writes_masks_at_original_size_and_lists_the_bad_file(trained_run, phantoms, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"wide": (80, 120), "tall": (130, 70), "same": (96, 96)}
    source = read_image(sorted((phantoms / "images").iterdir())[0]).pixels
    for stem, (h, w) in sizes.items():
        Image.fromarray((np.resize(source, (h, w)) * 255).astype(np.uint8)).save(images / f"{stem}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = run_cli("predict-cnn", "--run", str(trained_run), "--images", str(images), "--out", str(tmp_path / "masks"))
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "broken.png" in errors[0] and "not an image" in errors[0]
    assert "1 of 4 image(s) failed" in errors[1]
    for stem, size in sizes.items():
        raw = np.asarray(Image.open(tmp_path / "masks" / f"{stem}_mask.png"))
        assert raw.shape == size and set(np.unique(raw)) <= {0, 255}
    assert not (tmp_path / "masks" / "broken_mask.png").exists()


def test_predictor_api_matches_ground_truth_roughly_and_postprocess_is_optional(trained_run, phantoms):
    predictor = load_cnn_run(trained_run, device="cpu")
    image_path = sorted((phantoms / "images").iterdir())[0]
    pixels = read_image(image_path).pixels
    mask = predictor.predict(pixels)
    assert mask.dtype == bool and mask.shape == pixels.shape
    many = predictor.predict_many([pixels, pixels[:80, :90]], batch_size=2)
    assert [m.shape for m in many] == [(96, 96), (80, 90)]
    assert (many[0] == mask).all()
    raw = load_cnn_run(trained_run, device="cpu", postprocess=False).predict(pixels)
    from cxrsam.baselines.postprocess import clean_mask

    assert (clean_mask(raw) == mask).all()
    assert read_mask(phantoms / "masks" / image_path.name).shape == mask.shape


def test_load_cnn_run_errors_name_the_folder(tmp_path, trained_run):
    with pytest.raises(CxrsamError, match="run folder not found"):
        load_cnn_run(tmp_path / "missing")
    with pytest.raises(CxrsamError, match="not a CNN run folder"):
        load_cnn_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    (broken / "best.pt").write_bytes(b"truncated")
    with pytest.raises(CxrsamError, match="no SHA-256 recorded") as info:
        load_cnn_run(broken)
    assert str(broken / "best.pt") in str(info.value)
    (broken / "checksums.json").write_text((trained_run / "checksums.json").read_text())
    with pytest.raises(CxrsamError, match="altered after training"):
        load_cnn_run(broken)
    from cxrsam.runs import record_checksum

    record_checksum(broken / "best.pt")  # a damaged file whose checksum matches: still one line
    with pytest.raises(CxrsamError, match="unreadable checkpoint"):
        load_cnn_run(broken)


def test_cli_errors_are_one_line(tmp_path, trained_run):
    missing = run_cli("predict-cnn", "--run", str(tmp_path / "nope"), "--images", str(tmp_path), "--out",
                      str(tmp_path.parent / f"{tmp_path.name}-out"))
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: run folder not found"]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("predict-cnn", "--run", str(trained_run), "--images", str(empty), "--out",
                  str(tmp_path.parent / f"{tmp_path.name}-out"))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no images in this folder" in lines[0] and str(empty) in lines[0]
    bad_size = run_cli("train-cnn", "--arch", "unet", "--data", str(tmp_path), "--size", "100", "--out",
                       str(tmp_path / "r"))
    assert bad_size.returncode != 0 and "multiple of 32" in bad_size.stderr
    assert len(bad_size.stderr.strip().splitlines()) == 1


def test_cli_predict_and_eval_on_a_run(trained_run, phantoms, tmp_path):
    res = run_cli("predict-cnn", "--run", str(trained_run), "--images", str(phantoms / "images"), "--out",
                  str(tmp_path / "masks"), "--no-postprocess")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "masks").glob("*_mask.png")) == sorted(
        f"{p.stem}_mask.png" for p in (phantoms / "images").iterdir())
    res = run_cli("eval-cnn", "--run", str(trained_run), "--split", "val", "--out", str(tmp_path / "val.csv"))
    assert res.returncode == 0, res.stderr
    assert "dice" in res.stdout and (tmp_path / "val.csv").is_file()
