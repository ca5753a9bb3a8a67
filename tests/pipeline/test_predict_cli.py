"""The new-image pipeline: areas, outputs, prompt rules, and `cxrsam predict` on real images, DICOM, runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrsam.data.io import XRay, read_image, read_mask
from cxrsam.errors import CxrsamError
from cxrsam.evaluation.metrics import dice_score
from cxrsam.files import sha256_file
from cxrsam.pipeline.outputs import Segmentation, lung_areas, output_format, output_paths, write_outputs
from cxrsam.pipeline.segmenter import parse_box, validate_box
from cxrsam.prompts import Prompts, PromptSet


def two_lungs(h: int = 60, w: int = 80) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[10:50, 5:30] = True     # image left: 40 x 25 = 1000 px
    mask[15:45, 50:70] = True    # image right: 30 x 20 = 600 px
    return mask


def test_lung_areas_split_by_image_side_with_mm2():
    areas = lung_areas(two_lungs(), spacing_mm=(0.5, 0.2))
    assert areas["total"] == {"pixels": 1600, "mm2": pytest.approx(160.0)}
    assert areas["lungs"]["image_left"]["pixels"] == 1000 and areas["lungs"]["image_left"]["mm2"] == pytest.approx(100.0)
    assert areas["lungs"]["image_right"]["pixels"] == 600
    assert "right lung" in areas["lungs"]["image_left"]["anatomical"]


def test_lung_areas_without_spacing_or_second_lung():
    mask = np.zeros((60, 80), bool)
    mask[10:50, 5:70] = True
    areas = lung_areas(mask, spacing_mm=None)
    assert areas["total"] == {"pixels": 40 * 65, "mm2": None}
    assert areas["lungs"] is None and "not separable" in areas["lungs_note"]


def test_parse_box_rules():
    assert parse_box("1,2,30,40").tolist() == [1, 2, 30, 40]
    for bad in ("1,2,3", "a,b,c,d", "30,2,1,40"):
        with pytest.raises(CxrsamError, match="--box"):
            parse_box(bad)


def test_validate_box_refuses_a_box_outside_the_image_and_clips_one_reaching_out():
    size = (60, 80)  # H, W
    box, warning = validate_box([5, 10, 29, 49], size)
    assert box.tolist() == [5, 10, 29, 49] and warning is None
    box, warning = validate_box([29, 49, 5, 10], size)  # corners in any order
    assert box.tolist() == [5, 10, 29, 49] and warning is None
    box, warning = validate_box([-10, 50, 100, 70], size)
    assert box.tolist() == [0, 50, 79, 59] and "reaches outside the 80x60 image; clipped to 0,50,79,59" in warning
    for outside in ([100, 10, 120, 40], [10, -40, 40, -5], [79, 10, 120, 40], [-30, 10, 0, 40]):
        with pytest.raises(CxrsamError, match="lies outside the 80x60 image"):
            validate_box(outside, size)
    for malformed in ([1, 2, 3], [0, 0, float("nan"), 5]):
        with pytest.raises(CxrsamError, match="four numbers"):
            validate_box(malformed, size)


def test_nifti_without_nibabel_is_refused_before_any_image_is_read(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    from cxrsam.pipeline import segment_images

    output_format("png")
    with pytest.raises(CxrsamError, match="unknown output format 'jpeg'"):
        output_format("jpeg")
    with pytest.raises(CxrsamError) as info:
        # an image that does not exist would be reported as failed if any image were looked at
        segment_images(None, [tmp_path / "absent.png"], tmp_path / "out", box=np.zeros(4), format="nifti")
    assert str(info.value) == "--format nifti needs the optional package nibabel (pip install 'cxrsam[nifti]')"
    assert not (tmp_path / "out").exists()


def _segmentation(spacing=(0.4, 0.4)) -> Segmentation:
    pixels = np.linspace(0, 1, 60 * 80, dtype=np.float32).reshape(60, 80)
    xray = XRay(pixels=pixels, path=Path("case7.dcm"), spacing_mm=spacing, bit_depth=12)
    prompts = Prompts([PromptSet(box=np.array([5, 10, 29, 49], np.float32),
                                 points=np.array([[10, 20]], np.float32), labels=np.array([1]))], (60, 80), "box+points", 1)
    return Segmentation(xray, two_lungs(), None, prompts, "box", {"sam": {"model_id": "test"}})


def test_write_outputs_png_overlay_json(tmp_path):
    paths = write_outputs(_segmentation(), tmp_path, "case7")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case7.json", "case7_mask.png", "case7_overlay.png"]
    np.testing.assert_array_equal(read_mask(paths["mask"]), two_lungs())
    assert set(np.unique(np.asarray(Image.open(paths["mask"])))) == {0, 255}
    overlay = np.asarray(Image.open(paths["overlay"]))
    assert overlay.shape == (60, 80, 3) and not np.array_equal(overlay[..., 0], overlay[..., 2])
    record = json.loads(paths["json"].read_text())
    assert record["area"]["total"]["mm2"] == pytest.approx(1600 * 0.16)
    assert record["prompts"][0] == {"box": [5.0, 10.0, 29.0, 49.0], "points": [[10.0, 20.0]], "labels": [1]}
    assert record["image"] == "case7.dcm" and record["spacing_mm"] == [0.4, 0.4]


def test_write_outputs_nifti(tmp_path):
    nib = pytest.importorskip("nibabel", reason="nibabel (optional, for --format nifti) is not installed")
    paths = write_outputs(_segmentation(spacing=(0.5, 0.25)), tmp_path, "case7", format="nifti")
    assert paths["mask"].name == "case7_mask.nii.gz"
    image = nib.load(paths["mask"])
    assert image.shape == (80, 60, 1) and image.header.get_zooms() == (0.25, 0.5, 1.0)
    np.testing.assert_array_equal(np.asarray(image.dataobj)[:, :, 0].T, two_lungs())
    with pytest.raises(CxrsamError, match="format"):
        output_paths(tmp_path, "x", "jpeg")


# --- the command, on real images -------------------------------------------------------------------


def test_predict_with_draft_masks_on_real_images_matches_ground_truth(real_pairs, run_cli, cli, tmp_path):
    """Issue-5 form with ground-truth masks as drafts (256 px masks for 299 px images are resized)."""
    out = tmp_path / "out"
    res = run_cli("predict", "--images", real_pairs / "images", "--drafts", real_pairs / "masks", "--out", out)
    assert res.returncode == 0, res.stderr
    for stem in ("vp1", "vp2"):
        mask = read_mask(out / f"{stem}_mask.png")
        assert mask.shape == (299, 299)
        gt = read_mask(real_pairs / "masks" / f"{stem}.png", size=(299, 299))
        assert dice_score(mask, gt) > 0.9
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["prompt_source"] == "draft-file" and len(record["prompts"]) == 2
        assert record["area"]["total"]["pixels"] == int(mask.sum()) and record["area"]["total"]["mm2"] is None
        lungs = record["area"]["lungs"]
        assert lungs["image_left"]["pixels"] + lungs["image_right"]["pixels"] <= mask.sum()
        assert record["models"]["sam"]["kind"] == "pretrained" and record["models"]["sam"]["backend"] == "litemedsam"
    res = cli("evaluate", "--pred", out, "--gt", real_pairs / "masks", "--out", tmp_path / "scores.csv")
    assert res.returncode == 0 and "missing" not in res.stderr


def _dicom_from(pixels: np.ndarray, path, spacing=(0.5, 0.5)) -> None:
    """A 12-bit MONOCHROME1 radiograph (bone dark in storage) with a VOI window covering the data."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    stored = np.round((1.0 - pixels) * 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = list(spacing)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_predict_dicom_made_from_a_real_image(real_pairs, cli, tmp_path):
    """MONOCHROME1 inversion, 12-bit samples, VOI window and pixel spacing, through predict."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    _dicom_from(read_image(real_pairs / "images" / "vp1.png").pixels, folder / "vp1.dcm")
    out = tmp_path / "out"
    res = cli("predict", "--images", folder / "vp1.dcm", real_pairs / "images" / "vp2.png",
                  "--drafts", real_pairs / "masks", "--out", out)
    assert res.returncode == 0, res.stderr
    record = json.loads((out / "vp1.json").read_text())
    assert record["spacing_mm"] == [0.5, 0.5] and record["bit_depth"] == 12
    mask = read_mask(out / "vp1_mask.png")
    assert record["area"]["total"] == {"pixels": int(mask.sum()), "mm2": pytest.approx(mask.sum() * 0.25)}
    gt = read_mask(real_pairs / "masks" / "vp1.png", size=(299, 299))
    assert dice_score(mask, gt) > 0.9  # inverted back correctly: a non-inverted X-ray segments poorly
    assert (out / "vp2_mask.png").is_file()


def test_predict_hand_box_lora_run_and_nifti(real_pairs, lora_run, cli, tmp_path):
    """Issue-8 forms: --box for every image, --run with a LoRA run, --format nifti."""
    nifti = importlib.util.find_spec("nibabel") is not None  # optional dependency
    box = "20,30,280,260"
    base, lora = tmp_path / "base", tmp_path / "lora"
    res = cli("predict", "--images", real_pairs / "images" / "vp1.png", "--box", box, "--out", base)
    assert res.returncode == 0, res.stderr
    res = cli("predict", "--images", real_pairs / "images" / "vp1.png",
              "--run", lora_run, "--box", box, "--out", lora, "--format", "nifti" if nifti else "png")
    assert res.returncode == 0, res.stderr
    record = json.loads((lora / "vp1.json").read_text())
    assert record["prompt_source"] == "box" and record["prompts"][0]["box"] == [20.0, 30.0, 280.0, 260.0]
    assert record["models"]["sam"]["kind"] == "lora"
    assert record["models"]["sam"]["model_id"] == f"lora:{sha256_file(lora_run / 'adapter.safetensors')[:16]}"
    if nifti:
        import nibabel

        assert record["outputs"]["mask"] == "vp1_mask.nii.gz" and (lora / "vp1_overlay.png").is_file()
        lora_mask = np.asarray(nibabel.load(lora / "vp1_mask.nii.gz").dataobj)[:, :, 0].T.astype(bool)
    else:
        lora_mask = read_mask(lora / "vp1_mask.png")
    np.testing.assert_array_equal(lora_mask, read_mask(base / "vp1_mask.png"))  # B = 0: same as the base


def test_predict_with_cnn_drafts(cnn_run, phantoms, cli, tmp_path):
    from cxrsam.baselines.predict import load_cnn_run

    image = sorted((phantoms / "images").iterdir())[0]
    res = cli("predict", "--images", image, "--drafts-from", cnn_run, "--prompt", "box+points", "--out", tmp_path)
    draft = load_cnn_run(cnn_run, device="cpu").predict(read_image(image).pixels)
    if not draft.any():
        assert res.returncode == 1 and "no lung found" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    record = json.loads((tmp_path / f"{image.stem}.json").read_text())
    assert record["prompt_source"] == "cnn-draft" and record["prompt_mode"] == "box+points"
    assert record["draft_pixels"] == int(draft.sum())
    assert record["models"]["drafts"]["checkpoint_sha256"] == sha256_file(cnn_run / "best.pt")
    assert record["models"]["drafts"]["arch"] == "unet"


def test_lora_scale_needs_a_run_and_is_recorded_in_each_result(lora_run, phantoms, cli, tmp_path):
    image = sorted((phantoms / "images").iterdir())[0]
    res = cli("zero-shot", "--images", image, "--box", "10,10,80,80", "--lora-scale", "0.5", "--out", tmp_path / "a")
    assert res.returncode != 0 and "drop --lora-scale" in res.stderr and "Traceback" not in res.stderr
    res = cli("predict", "--images", image, "--box", "10,10,80,80", "--lora-scale", "0.5", "--out", tmp_path / "b")
    assert res.returncode != 0 and "--lora-scale needs a LoRA run" in res.stderr
    res = cli("predict", "--images", image, "--run", lora_run, "--box", "10,10,80,80", "--lora-scale", "2",
              "--out", tmp_path / "c")
    assert res.returncode != 0 and "must be in [0, 1]" in res.stderr and "Traceback" not in res.stderr
    res = cli("predict", "--images", image, "--run", lora_run, "--box", "10,10,80,80", "--lora-scale", "0.5",
              "--out", tmp_path / "d")
    assert res.returncode == 0, res.stderr
    sam = json.loads((tmp_path / "d" / f"{image.stem}.json").read_text())["models"]["sam"]
    assert sam["lora_scale"] == 0.5 and sam["model_id"].endswith("@0.5")


def test_predict_with_probability_points_from_the_cnn(cnn_run, phantoms, cli, tmp_path):
    """``--strategy probability --points N``: N positives per image, drawn where the CNN's probability is > 0."""
    from cxrsam.baselines.drafts import CnnDrafts

    image = sorted((phantoms / "images").iterdir())[0]
    res = cli("predict", "--images", image, "--drafts-from", cnn_run, "--prompt", "points", "--strategy",
              "probability", "--points", "12", "--random-negatives", "2", "--out", tmp_path / "out")
    source = CnnDrafts(cnn_run, device="cpu")
    xray = read_image(image)
    draft, probability = source(xray), source.probability(xray)
    if not draft.any():
        assert res.returncode == 1 and "no lung found" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    record = json.loads((tmp_path / "out" / f"{image.stem}.json").read_text())
    assert record["prompt_spec"]["strategy"] == "probability" and record["prompt_spec"]["points"] == 12
    points = [(p, label) for s in record["prompts"] for p, label in zip(s["points"], s["labels"])]
    positives = [p for p, label in points if label == 1]
    assert len(positives) == 12
    assert all(probability[int(y), int(x)] > 0 for x, y in positives)
    assert all(probability[int(y), int(x)] < 0.5 for (x, y), label in points if label == 0)
    res = cli("predict", "--images", image, "--drafts-from", cnn_run, "--prompt", "points", "--points", "12",
              "--out", tmp_path / "bad")
    assert res.returncode != 0 and "probability strategy" in res.stderr and "Traceback" not in res.stderr
