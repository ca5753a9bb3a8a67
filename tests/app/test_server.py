"""The web app's HTTP API: upload, automatic mask, refinement, downloads, and what it refuses."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cxrsam.data.io import read_mask
from cxrsam.evaluation.metrics import dice_score
from cxrsam.pipeline import Segmenter


def decode_mask(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))) > 0


@pytest.fixture(scope="module")
def manual_client(litemedsam):
    """The app without a CNN run (the user draws a box), with small limits."""
    return TestClient(create(litemedsam, max_upload_mb=1, max_sessions=2))


def create(sam, drafter=None, **limits):
    """The app around ``sam``, serving TestClient's host (``testserver``)."""
    from cxrsam.app.server import create_app

    return create_app(Segmenter(sam, drafter=drafter), allowed_hosts=["testserver"], **limits)


def test_real_image_box_then_background_click_then_downloads(manual_client, shared_data, lung_point):
    image = shared_data / "Viral Pneumonia" / "images" / "Viral Pneumonia-3.png"
    gt = read_mask(shared_data / "Viral Pneumonia" / "masks" / "Viral Pneumonia-3.png", size=(299, 299))
    body = manual_client.post("/api/images", files={"file": ("Viral Pneumonia-3.png", image.read_bytes())}).json()
    assert (body["width"], body["height"], body["mask"], body["automatic"]) == (299, 299, None, False)
    assert "drag a box" in body["message"] and body["image"].startswith("data:image/png;base64,")
    both = manual_client.post(f"/api/images/{body['id']}/segment", json={"box": [10, 20, 290, 280]}).json()
    mask = decode_mask(both["mask"])
    assert both["mask_pixels"] == mask.sum() and dice_score(mask, gt) > 0.6
    assert both["result"]["prompt_source"] == "box" and both["result"]["image"] == "Viral_Pneumonia-3.png"
    click = {"box": [10, 20, 290, 280], "points": [lung_point(gt)], "labels": [0]}
    refined = manual_client.post(f"/api/images/{body['id']}/segment", json=click).json()
    assert refined["mask_pixels"] != both["mask_pixels"]
    assert refined["result"]["prompts"][0]["labels"] == [0]
    points_only = manual_client.post(f"/api/images/{body['id']}/segment",
                                     json={"points": [lung_point(gt)], "labels": [1]}).json()
    assert points_only["result"]["prompt_source"] == "points"  # LiteMedSAM, box-trained, may return little here
    assert points_only["result"]["prompts"] == [{"box": None, "points": [list(map(float, lung_point(gt)))], "labels": [1]}]
    refined = manual_client.post(f"/api/images/{body['id']}/segment", json=click).json()
    download = manual_client.get(f"/api/images/{body['id']}/mask.png")
    assert download.headers["content-disposition"] == 'attachment; filename="Viral_Pneumonia-3_mask.png"'
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(download.content))) > 0, decode_mask(refined["mask"]))
    record = json.loads(manual_client.get(f"/api/images/{body['id']}/result.json").content)
    assert record["area"]["total"]["pixels"] == refined["mask_pixels"]


def test_type_is_decided_by_content_not_name(manual_client, phantom_256):
    """PNG bytes named like a DICOM are read as the PNG they are."""
    image, _ = phantom_256
    body = manual_client.post("/api/images", files={"file": ("scan.dcm", image.read_bytes())}).json()
    assert (body["width"], body["height"], body["name"]) == (256, 256, "scan.dcm")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1]))))
    np.testing.assert_array_equal(shown, np.asarray(Image.open(image)))


def test_automatic_mask_from_drafts_and_click_refinement(litemedsam, mask_drafts, phantom_256, lung_point):
    image, lungs = phantom_256
    client = TestClient(create(litemedsam, drafter=mask_drafts(lungs)))
    body = client.post("/api/images", files={"file": ("phantom.png", image.read_bytes())}).json()
    assert body["automatic"] and body["result"]["prompt_source"] == "cnn-draft"
    auto = decode_mask(body["mask"])
    assert dice_score(auto, lungs) > 0.8 and len(body["result"]["prompts"]) == 2
    click = {"points": [lung_point(lungs)], "labels": [0]}
    refined = client.post(f"/api/images/{body['id']}/segment", json=click).json()
    assert refined["result"]["prompt_source"] == "cnn-draft+clicks"
    assert refined["result"]["prompts"][0]["labels"] == [0] and refined["result"]["prompts"][1]["labels"] is None
    assert refined["mask_pixels"] != body["mask_pixels"]
    back = client.post(f"/api/images/{body['id']}/segment", json={}).json()  # no prompts: the automatic mask
    np.testing.assert_array_equal(decode_mask(back["mask"]), auto)


def test_refused_uploads_and_requests(manual_client, phantom_256):
    png = phantom_256[0].read_bytes()
    res = manual_client.post("/api/images", files={"file": ("../../etc/scan.png", b"%PDF-1.4 not an image")})
    assert res.status_code == 400 and res.json()["detail"] == "scan.png: not an image (content is not a known image format)"
    res = manual_client.post("/api/images", files={"file": ("big.png", b"\0" * (2 << 20))})
    assert res.status_code == 413

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(20):
            yield b"\0" * (128 << 10)

    res = manual_client.post("/api/images", content=chunks(),
                             headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert res.status_code == 413
    ids = [manual_client.post("/api/images", files={"file": ("p.png", png)}).json()["id"] for _ in range(3)]
    assert manual_client.get(f"/api/images/{ids[0]}/result.json").status_code == 404  # dropped: 2 sessions kept
    assert manual_client.get(f"/api/images/{ids[2]}/mask.png").status_code == 404  # no mask yet
    for bad in ({"points": [[300, 10]], "labels": [1]}, {"points": [[10, 10]], "labels": [2]},
                {"points": [[10, 10]], "labels": []}, {"box": [1, 2, 3]}, {"box": [0, 0, 10, 10], "path": "/etc"}):
        assert manual_client.post(f"/api/images/{ids[2]}/segment", json=bad).status_code == 422, bad
    assert manual_client.post("/api/images/..%2F..%2Fetc/segment", json={}).status_code in (404, 422)
    assert manual_client.get("/api/images/" + "0" * 32 + "/mask.png").status_code == 404


def test_uploads_stay_in_memory(litemedsam, monkeypatch):
    """A 1.2 MB upload (over Starlette's 1 MiB spool size) is parsed and decoded without a temporary file."""
    import tempfile

    def no_temp_files(*args, **kwargs):
        raise AssertionError("the upload went to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp", "TemporaryDirectory"):
        monkeypatch.setattr(tempfile, name, no_temp_files)
    noise = (np.random.default_rng(0).random((1100, 1100)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 1.1 * 2**20
    client = TestClient(create(litemedsam, max_upload_mb=4))
    body = client.post("/api/images", files={"file": ("noise.png", buffer.getvalue())}).json()
    assert (body["width"], body["height"]) == (1100, 1100)


def test_sessions_and_cached_embeddings_capped_at_max_sessions(tiny_sam, phantom_256):
    from cxrsam.app.server import create_app

    segmenter = Segmenter(tiny_sam)
    client = TestClient(create_app(segmenter, max_sessions=2, allowed_hosts=["testserver"]))
    pixels = np.asarray(Image.open(phantom_256[0]))
    ids = []
    for k in range(4):  # four different images
        buffer = io.BytesIO()
        Image.fromarray(np.rot90(pixels, k).copy()).save(buffer, format="PNG")
        ids.append(client.post("/api/images", files={"file": (f"r{k}.png", buffer.getvalue())}).json()["id"])
    assert segmenter.engine.memory_items == 2 and len(segmenter.engine._memory) == 2
    assert [client.get(f"/api/images/{i}/result.json").status_code for i in ids] == [404, 404, 404, 404]
    assert client.post(f"/api/images/{ids[0]}/segment", json={}).status_code == 404  # dropped
    assert client.post(f"/api/images/{ids[3]}/segment", json={"box": [0, 0, 255, 255]}).status_code == 200
    assert client.get("/api/info").json()["max_pixels"] == 25_000_000


def _dicom_bytes(pixels: np.ndarray) -> bytes:
    """A DX DICOM of ``pixels`` (float (H, W) in [0, 1]) with the UIDs a DICOM-SEG references, as file bytes."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (DigitalXRayImageStorageForPresentation,
                                                                     generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("upload.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = np.round(pixels * 4095).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_quality_flags_uncertainty_and_dicom_seg(litemedsam, mask_drafts, shared_data):
    """A good draft comes back ok with an uncertainty map; a draft missing a lung comes back review with the
    reason; a DICOM upload downloads a DICOM-SEG referencing it, a PNG upload gets 409."""
    import pydicom

    from cxrsam.app.server import create_app
    from cxrsam.data.io import read_image

    folder = shared_data / "Viral Pneumonia"
    image = folder / "images" / "Viral Pneumonia-3.png"
    gt = read_mask(folder / "masks" / "Viral Pneumonia-3.png", size=(299, 299))
    broken = gt.copy()
    broken[:, 150:] = False  # the image-right lung dropped from the draft

    def client(draft: np.ndarray) -> TestClient:
        segmenter = Segmenter(litemedsam, drafter=mask_drafts(draft), uncertainty_samples=3)
        return TestClient(create_app(segmenter, allowed_hosts=["testserver"]))

    good = client(gt).post("/api/images", files={"file": ("vp3.png", image.read_bytes())}).json()
    assert good["quality"] == "ok" and good["result"]["quality"]["reasons"] == [] and not good["dicom"]
    uncertainty = np.asarray(Image.open(io.BytesIO(base64.b64decode(good["uncertainty"].split(",", 1)[1]))))
    assert uncertainty.shape == (299, 299) and good["result"]["uncertainty"]["samples"] == 3
    no_seg = client(gt).get(f"/api/images/{good['id']}/seg.dcm")
    assert no_seg.status_code == 404  # another app: the id is unknown there

    app = client(broken)
    bad = app.post("/api/images", files={"file": ("vp3.png", image.read_bytes())}).json()
    assert bad["quality"] == "review"
    assert "lung_count" in [r["flag"] for r in bad["result"]["quality"]["reasons"]]
    assert app.get(f"/api/images/{bad['id']}/seg.dcm").status_code == 409

    source = _dicom_bytes(read_image(image).pixels)
    dicom = app.post("/api/images", files={"file": ("vp3.dcm", source)}).json()
    assert dicom["dicom"] and dicom["mask"] is not None
    refined = app.post(f"/api/images/{dicom['id']}/segment", json={"box": [10, 20, 290, 280]}).json()
    download = app.get(f"/api/images/{dicom['id']}/seg.dcm")
    assert download.status_code == 200 and download.headers["content-type"] == "application/dicom"
    seg = pydicom.dcmread(io.BytesIO(download.content))
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert seg.Modality == "SEG" and referenced == pydicom.dcmread(io.BytesIO(source)).SOPInstanceUID
    segments = np.asarray(seg.pixel_array, bool).reshape(-1, 299, 299).any(axis=0)
    assert 0 < segments.sum() <= refined["mask_pixels"]
