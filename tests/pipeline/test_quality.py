"""Quality flags, prompt-perturbation uncertainty, lung measurements, the results.csv columns and DICOM-SEG output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrsam.data.io import read_image, read_mask
from cxrsam.errors import CxrsamError
from cxrsam.pipeline import Segmenter
from cxrsam.pipeline.outputs import lung_areas
from cxrsam.pipeline.quality import Flag, QualityStatus, QualityThresholds, assess, border_contact, quality_signals
from cxrsam.pipeline.uncertainty import prompt_uncertainty
from cxrsam.prompts import prompts_from_mask


def two_lungs(h: int = 100, w: int = 100) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[20:80, 10:40] = True    # image left: 60 x 30 = 1800 px
    mask[25:75, 60:90] = True    # image right: 50 x 30 = 1500 px
    return mask


def test_lung_measurements_boxes_and_sizes_in_px_and_mm():
    areas = lung_areas(two_lungs(), spacing_mm=(0.5, 0.25))
    left, right = areas["lungs"]["image_left"], areas["lungs"]["image_right"]
    assert left["bbox"] == [10, 20, 39, 79] and (left["height_px"], left["width_px"]) == (60, 30)
    assert (left["height_mm"], left["width_mm"]) == (30.0, 7.5) and left["mm2"] == pytest.approx(1800 * 0.125)
    assert right["bbox"] == [60, 25, 89, 74] and right["pixels"] == 1500
    bare = lung_areas(two_lungs(), spacing_mm=None)["lungs"]["image_left"]
    assert bare["mm2"] is None and bare["height_mm"] is None and bare["height_px"] == 60


STRICT = QualityThresholds(min_draft_dice=0.9, min_lung_ratio=0.45, max_border_contact=0.02, max_uncertainty=0.15)
"""Every rule on (the defaults turn off the ones that added nothing on validation)."""


def test_good_mask_is_ok_and_each_rule_fires_with_its_reason():
    good = two_lungs()
    quality = assess(quality_signals(good, draft=good, predicted_iou=[0.95, 0.93], uncertainty=0.01), STRICT)
    assert quality.status is QualityStatus.OK and quality.reasons == []

    one_lung = good.copy()
    one_lung[:, 50:] = False  # the image-right lung dropped
    quality = assess(quality_signals(one_lung, draft=good, predicted_iou=[0.95]), STRICT)
    assert quality.status is QualityStatus.REVIEW
    assert Flag.LUNG_COUNT in quality.flags and Flag.DRAFT_DISAGREEMENT in quality.flags
    assert "1 lung component(s), expected 2" in quality.to_json()["reasons"][1]["message"]

    small = np.zeros_like(good)
    small[40:60, 10:40] = small[40:60, 60:70] = True
    flags = assess(quality_signals(small, predicted_iou=[0.5, 0.9], uncertainty=0.4), STRICT).flags
    assert flags == [Flag.LOW_PREDICTED_IOU, Flag.AREA_OUT_OF_RANGE, Flag.LUNG_RATIO, Flag.UNCERTAIN]

    edge = good.copy()
    edge[0:90, 0:40] = True  # the image-left lung runs along the left and top edges
    assert Flag.TOUCHES_BORDER in assess(quality_signals(edge), STRICT).flags
    assert Flag.TOUCHES_BORDER not in assess(quality_signals(edge)).flags  # off by default
    assert border_contact(good) == 0.0
    with pytest.raises(ValueError):
        QualityThresholds(min_area_fraction=0.5, max_area_fraction=0.4)


@pytest.fixture(scope="module")
def real_case(shared_data):
    from cxrsam.sam.registry import build_sam

    folder = shared_data / "Viral Pneumonia"
    xray = read_image(folder / "images" / "Viral Pneumonia-1.png")
    return build_sam("litemedsam", device="cpu"), xray, read_mask(folder / "masks" / "Viral Pneumonia-1.png",
                                                                    size=xray.size)


def test_broken_drafts_are_flagged_on_a_real_image(real_case):
    """A good draft is ok; a draft with a lung dropped, or a box shifted off the lungs, comes out review."""
    sam, xray, gt = real_case
    segmenter = Segmenter(sam)
    good = segmenter.segment(xray, draft=gt)
    assert good.quality.status is QualityStatus.OK, good.quality.reasons
    assert len(good.quality.signals.predicted_iou) == 2 and min(good.quality.signals.predicted_iou) > 0.8

    dropped = gt.copy()
    dropped[:, xray.size[1] // 2:] = False
    broken = segmenter.segment(xray, draft=dropped)
    assert broken.quality.status is QualityStatus.REVIEW and Flag.LUNG_COUNT in broken.quality.flags

    shifted = segmenter.segment(xray, box=[200, 0, 298, 120])  # the top-right corner: no whole lung inside
    assert shifted.quality.status is QualityStatus.REVIEW
    assert {Flag.LUNG_COUNT, Flag.AREA_OUT_OF_RANGE} & set(shifted.quality.flags)


def test_uncertainty_is_zero_when_perturbations_agree_and_seeded(real_case):
    sam, xray, gt = real_case
    segmenter = Segmenter(sam)
    engine = segmenter.engine
    embedding = engine.embed([xray])[0]
    prompts = prompts_from_mask(gt)
    still = prompt_uncertainty(engine, embedding, prompts, samples=3, jitter=0.0)
    assert still.per_set == [0.0, 0.0] and not still.disagreement.any()
    first = prompt_uncertainty(engine, embedding, prompts, samples=3, jitter=0.1, seed=5, stem="a")
    again = prompt_uncertainty(engine, embedding, prompts, samples=3, jitter=0.1, seed=5, stem="a")
    np.testing.assert_array_equal(first.disagreement, again.disagreement)
    assert first.per_set == again.per_set and first.score > 0
    assert first.disagreement.shape == xray.size and 0 <= first.disagreement.min() <= first.disagreement.max() <= 1
    with pytest.raises(ValueError):
        prompt_uncertainty(engine, embedding, prompts, samples=1)
    with pytest.raises(CxrsamError, match="uncertainty-samples"):
        Segmenter(sam, uncertainty_samples=1)


def test_predict_writes_flags_uncertainty_and_measurements(real_pairs, cli, tmp_path):
    out = tmp_path / "out"
    res = cli("predict", "--images", real_pairs / "images" / "vp1.png", "--drafts", real_pairs / "masks",
              "--uncertainty-samples", "3", "--out", out)
    assert res.returncode == 0, res.stderr
    record = json.loads((out / "vp1.json").read_text())
    assert record["quality"]["status"] == "ok" and record["quality"]["signals"]["lung_components"] == 2
    assert record["quality"]["signals"]["draft_dice"] > 0.9 and record["quality"]["thresholds"]["lungs"] == 2
    assert record["uncertainty"]["samples"] == 3 and record["outputs"]["uncertainty"] == "vp1_uncertainty.png"
    assert read_image(out / "vp1_uncertainty.png").size == (299, 299)
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["quality"] == "ok" and row["lung_components"] == 2 and row["uncertainty"] >= 0
    left = record["area"]["lungs"]["image_left"]
    assert row["image_left_px"] == left["pixels"] and row["image_left_bbox"] == " ".join(map(str, left["bbox"]))
    # the output folder stays a valid draft folder: the uncertainty picture is not read as a mask
    res = cli("predict", "--images", real_pairs / "images" / "vp1.png", "--drafts", out, "--out", tmp_path / "again")
    assert res.returncode == 0, res.stderr


def _source_dicom(pixels: np.ndarray, path: Path, spacing=(0.4, 0.5)):
    """A DX radiograph with study, series and instance UIDs (what a DICOM-SEG references)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (DigitalXRayImageStorageForPresentation,
                                                                     generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "P1", "Test^Patient"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = list(spacing)
    ds.PixelData = np.round(pixels * 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_predict_dicom_seg_references_its_source(real_pairs, cli, tmp_path):
    import pydicom

    from cxrsam.prompts.components import lung_components

    folder = tmp_path / "dicom"
    folder.mkdir()
    source = _source_dicom(read_image(real_pairs / "images" / "vp1.png").pixels, folder / "vp1.dcm")
    drafts = real_pairs / "masks"  # vp1.png: per-lung boxes, so the two lungs come out apart
    res = cli("predict", "--images", folder / "vp1.dcm", "--drafts", drafts, "--format", "dicom-seg",
              "--out", tmp_path / "seg")
    assert res.returncode == 0, res.stderr
    res = cli("predict", "--images", folder / "vp1.dcm", "--drafts", drafts, "--out", tmp_path / "png")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "seg" / "vp1.json").read_text())["outputs"]["mask"] == "vp1_seg.dcm"
    seg = pydicom.dcmread(tmp_path / "seg" / "vp1_seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == "P1"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [0.4, 0.5]
    terms = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
              s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) for s in seg.SegmentSequence]
    assert terms == [("Right lung", "3341006", "SCT"), ("Left lung", "44029006", "SCT")]
    frames = seg.pixel_array.astype(bool)
    numbers = [f.SegmentIdentificationSequence[0].ReferencedSegmentNumber for f in seg.PerFrameFunctionalGroupsSequence]
    lungs, _ = lung_components(read_mask(tmp_path / "png" / "vp1_mask.png"))
    assert numbers == [1, 2] and len(lungs) == 2
    np.testing.assert_array_equal(frames[0], lungs[0])  # segment 1 = image-left = the patient's right lung
    np.testing.assert_array_equal(frames[1], lungs[1])


def test_dicom_seg_for_a_png_input_fails_that_image_in_one_line(real_pairs, cli, tmp_path):
    out = tmp_path / "out"
    res = cli("predict", "--images", real_pairs / "images" / "vp1.png", "--box", "10,20,290,280",
              "--format", "dicom-seg", "--out", out)
    assert res.returncode == 1 and "vp1.png: --format dicom-seg needs DICOM input" in res.stderr
    assert not (out / "vp1.json").exists() and pd.read_csv(out / "results.csv")["status"].tolist() == ["failed"]


def test_uncertainty_decodes_its_copies_together_as_one_at_a_time_would(tiny_checkpoint, phantoms, monkeypatch):
    from cxrsam.pipeline import uncertainty
    from cxrsam.prompts.spec import image_seed
    from cxrsam.sam.engine import SamEngine
    from cxrsam.sam.registry import build_sam
    from cxrsam.sam.testing import tiny_spec

    engine = SamEngine(build_sam(tiny_spec(), checkpoint=tiny_checkpoint))
    path = sorted((phantoms / "images").iterdir())[0]
    xray, mask = read_image(path), read_mask(phantoms / "masks" / path.name)
    embedding = engine.embed([xray])[0]
    prompts = prompts_from_mask(mask)
    rng = np.random.default_rng(image_seed(3, "a"))
    votes = np.zeros(xray.size, np.int32)
    for _ in range(5):  # the rule, one decoder call per copy
        votes += (engine.decode_logits(embedding, uncertainty.perturb(prompts, 0.1, rng)) > 0).any(axis=0)
    together = prompt_uncertainty(engine, embedding, prompts, samples=5, jitter=0.1, seed=3, stem="a")
    monkeypatch.setattr(uncertainty, "DECODE_PIXELS", 1)  # one copy per call
    one_by_one = prompt_uncertainty(engine, embedding, prompts, samples=5, jitter=0.1, seed=3, stem="a")
    expected = uncertainty._disagreement(votes, 5)
    assert expected.any()  # the jitter moved some mask borders
    np.testing.assert_array_equal(together.disagreement, expected)
    np.testing.assert_array_equal(one_by_one.disagreement, expected)
    assert together.per_set == one_by_one.per_set
