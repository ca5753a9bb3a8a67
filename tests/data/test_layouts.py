"""Discovery of every supported dataset layout from tiny fixtures built here."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrsam.data.dataset import load_case
from cxrsam.data.layouts import detect_layout, discover
from cxrsam.errors import CxrsamError


def _png(path, shape=(32, 32), value=128, box=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(shape, value, np.uint8) if box is None else np.zeros(shape, np.uint8)
    if box is not None:
        arr[box[0]:box[1], box[2]:box[3]] = 255
    Image.fromarray(arr).save(path)


def test_covid19_layout_with_spaces_and_mask_resize(tmp_path, caplog):
    for cls in ("Viral Pneumonia", "COVID"):
        for i in (1, 2):
            _png(tmp_path / cls / "images" / f"{cls}-{i}.png", shape=(40, 40))
            _png(tmp_path / cls / "masks" / f"{cls}-{i}.png", shape=(20, 20), box=(2, 10, 2, 8))
    _png(tmp_path / "COVID" / "images" / "COVID-3.png")  # image without mask
    found = discover(tmp_path)
    assert found.layout == "covid19"
    assert sorted(c.case_id for c in found.cases) == ["COVID/COVID-1", "COVID/COVID-2",
                                                      "Viral Pneumonia/Viral Pneumonia-1",
                                                      "Viral Pneumonia/Viral Pneumonia-2"]
    assert [(p.name, msg) for p, msg in found.problems] == [("COVID-3.png", "image without mask")]
    assert len(discover(tmp_path, classes=["COVID"]).cases) == 2
    with caplog.at_level("WARNING"):
        xray, mask = load_case(found.cases[0])
        load_case(found.cases[1])
    assert mask.shape == xray.size == (40, 40) and mask.sum() == 16 * 12  # nearest-neighbour x2
    assert sum("resizing masks" in r.message for r in caplog.records) <= 1  # once per dataset group


def test_montgomery_left_right_union(tmp_path):
    _png(tmp_path / "CXR_png" / "MCUCXR_0001_0.png")
    _png(tmp_path / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png", box=(4, 20, 2, 10))
    _png(tmp_path / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png", box=(4, 20, 20, 30))
    found = discover(tmp_path)
    assert found.layout == "montgomery"
    case = found.cases[0]
    assert case.sides == ["left", "right"]
    _, mask = load_case(case)
    assert mask.sum() == 16 * 8 + 16 * 10
    # a one-sided case is reported, never scored against half a ground truth
    _png(tmp_path / "CXR_png" / "MCUCXR_0002_1.png")
    _png(tmp_path / "ManualMask" / "rightMask" / "MCUCXR_0002_1.png", box=(4, 20, 20, 30))
    found = discover(tmp_path)
    assert [c.case_id for c in found.cases] == ["MCUCXR_0001_0"]
    assert [(p.name, m) for p, m in found.problems] == [("MCUCXR_0002_1.png", "image without left lung mask")]


def test_shenzhen_mask_suffix(tmp_path):
    _png(tmp_path / "CXR_png" / "CHNCXR_0001_0.png")
    _png(tmp_path / "mask" / "CHNCXR_0001_0_mask.png", box=(2, 6, 2, 6))
    _png(tmp_path / "CXR_png" / "CHNCXR_0002_0.png")
    found = discover(tmp_path)
    assert found.layout == "shenzhen"
    assert [c.case_id for c in found.cases] == ["CHNCXR_0001_0"]
    assert found.problems[0][1] == "image without mask"


def test_jsrt_raw_with_scr_gif_masks(tmp_path, monkeypatch):
    import cxrsam.data.dicom as dicom

    monkeypatch.setattr(dicom, "JSRT_SHAPE", (32, 32))
    monkeypatch.setattr(dicom.read_jsrt_raw, "__defaults__", ((32, 32),))
    np.zeros((32, 32), dtype=">u2").tofile(tmp_path / "JPCLN001.IMG")
    for side, box in (("left lung", (4, 28, 2, 14)), ("right lung", (4, 28, 18, 30))):
        path = tmp_path / "masks" / side / "JPCLN001.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.zeros((16, 16), np.uint8)
        arr[box[0] // 2:box[1] // 2, box[2] // 2:box[3] // 2] = 255
        Image.fromarray(arr).save(path)
    found = discover(tmp_path)
    assert found.layout == "jsrt" and found.cases[0].sides == ["left", "right"]
    xray, mask = load_case(found.cases[0])
    assert xray.size == (32, 32) and mask.sum() == 24 * 12 + 24 * 12


def test_generic_folder_and_orphans(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "masks" / "a.png", box=(1, 5, 1, 5))
    _png(tmp_path / "masks" / "b.png", box=(1, 5, 1, 5))
    found = discover(tmp_path, layout="folder")
    assert [c.case_id for c in found.cases] == ["a"]
    assert [(p.name, m) for p, m in found.problems] == [("b.png", "mask without image")]


def test_empty_mask_is_an_error(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "masks" / "a.png", value=0)
    with pytest.raises(CxrsamError, match="empty mask"):
        load_case(discover(tmp_path).cases[0])


def test_unknown_layout_and_missing_root(tmp_path):
    with pytest.raises(CxrsamError, match="unknown dataset layout"):
        detect_layout(tmp_path)
    with pytest.raises(CxrsamError, match="dataset folder not found"):
        discover(tmp_path / "nope")
    with pytest.raises(CxrsamError, match="unknown layout"):
        discover(tmp_path, layout="nifti")
