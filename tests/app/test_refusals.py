"""Client input the app refuses: malformed prompts and uploads get a 4xx with a JSON detail, never a 500,
and image bombs are refused from their headers without their pixels ever being allocated."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cxrsam.pipeline import Segmenter

SIDE = 256
"""The uploaded phantom is SIDE x SIDE pixels: coordinates 0..255 are inside."""


@pytest.fixture(scope="module")
def client(litemedsam) -> TestClient:
    from cxrsam.app.server import create_app

    return TestClient(create_app(Segmenter(litemedsam), max_upload_mb=1, max_sessions=4,
                                 allowed_hosts=["testserver"]), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def image_id(client, phantom_256) -> str:
    body = client.post("/api/images", files={"file": ("phantom.png", phantom_256[0].read_bytes())}).json()
    assert (body["width"], body["height"]) == (SIDE, SIDE)
    return body["id"]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


NAN_BOX = json.dumps({"box": [float("nan"), 0, 10, 10]})  # Python's json writes NaN, Infinity
SEGMENT_CASES = [  # (case, JSON text or object, expected status, text in the detail)
    ("NaN in box", NAN_BOX, 422, ""),
    ("Infinity in point", '{"points": [[Infinity, 1]], "labels": [1]}', 422, ""),
    ("1e400 overflows to inf", '{"box": [0, 0, 1e400, 10]}', 422, ""),
    ("huge box corner", {"box": [0, 0, 1e308, 10]}, 422, "inside the 256x256 image"),
    ("huge point", {"points": [[1e308, 1e308]], "labels": [1]}, 422, "inside the 256x256 image"),
    ("huge label", {"points": [[10, 10]], "labels": [10**30]}, 422, ""),
    ("label 2", {"points": [[10, 10]], "labels": [2]}, 422, ""),
    ("label -1", {"points": [[10, 10]], "labels": [-1]}, 422, ""),
    ("label 0.5", {"points": [[10, 10]], "labels": [0.5]}, 422, ""),
    ("label as text", {"points": [[10, 10]], "labels": ["lung"]}, 422, ""),
    ("box as text", {"box": "0,0,10,10"}, 422, ""),
    ("box of 3", {"box": [1, 2, 3]}, 422, ""),
    ("box of 5", {"box": [1, 2, 3, 4, 5]}, 422, ""),
    ("nested box", {"box": [[0, 0], [10, 10]]}, 422, ""),
    ("box x0 > x1", {"box": [100, 10, 50, 60]}, 422, "x0 < x1"),
    ("box y0 > y1", {"box": [10, 100, 50, 60]}, 422, "x0 < x1 and y0 < y1"),
    ("box without area", {"box": [10, 10, 10, 60]}, 422, "x0 < x1"),
    ("box left of the image", {"box": [-5, 0, 100, 100]}, 422, "inside the 256x256 image"),
    ("box past the right edge", {"box": [0, 0, SIDE, 100]}, 422, "inside the 256x256 image"),
    ("box below the image", {"box": [0, 300, 10, 400]}, 422, "inside the 256x256 image"),
    ("point past the edge", {"points": [[SIDE, 10]], "labels": [1]}, 422, "inside the 256x256 image"),
    ("negative point", {"points": [[-1, 10]], "labels": [0]}, 422, "inside the 256x256 image"),
    ("point of 3", {"points": [[1, 2, 3]], "labels": [1]}, 422, ""),
    ("point as number", {"points": [1, 2], "labels": [1]}, 422, ""),
    ("nested points", {"points": [[[1, 2]]], "labels": [1]}, 422, ""),
    ("labels missing", {"points": [[10, 10]]}, 422, "one label each"),
    ("points missing", {"labels": [1]}, 422, "one label each"),
    ("too many points", {"points": [[1, 1]] * 65, "labels": [1] * 65}, 422, ""),
    ("unknown field", {"box": [0, 0, 10, 10], "path": "/etc/passwd"}, 422, ""),
    ("JSON array", [], 422, ""),
    ("JSON null", None, 422, ""),
    ("not JSON", "box=0,0,10,10", 422, ""),
    ("empty body", "", 422, ""),
    ("invalid UTF-8", b"\xff\xfe{", 400, "error parsing the body"),
    ("deep nesting", "[" * 20000 + "]" * 20000, 400, "error parsing the body"),
    ("body over 64 KiB", {"points": [[1, 1]] * 20000}, 413, "64 KiB"),
]


@pytest.mark.parametrize("case, body, status, detail", SEGMENT_CASES, ids=[c[0] for c in SEGMENT_CASES])
def test_malformed_prompts_are_4xx_with_a_detail(client, image_id, case, body, status, detail):
    if isinstance(body, (str, bytes)):
        res = client.post(f"/api/images/{image_id}/segment", content=body,
                          headers={"Content-Type": "application/json"})
    else:
        res = client.post(f"/api/images/{image_id}/segment", json=body)
    assert res.status_code == status, (case, res.status_code, res.text[:300])
    assert detail in json.dumps(res.json()["detail"]), res.json()


def test_prompts_inside_the_image_edges_are_served(client, image_id):
    body = {"box": [0, 0, SIDE - 1, SIDE - 1], "points": [[0, 0], [SIDE - 1, SIDE - 1]], "labels": [1, 0]}
    res = client.post(f"/api/images/{image_id}/segment", json=body)
    assert res.status_code == 200 and res.json()["result"]["prompt_source"] == "box"


def _upload_cases(image_bombs: dict[str, bytes], dicom_bomb: bytes, png: bytes) -> list[tuple]:
    """(case, request keyword arguments, expected status, text in the detail)."""
    nan = np.full((64, 64), np.nan, np.float32)
    return [
        ("empty file", {"files": {"file": ("a.png", b"")}}, 400, "a.png: empty image file"),
        ("garbage", {"files": {"file": ("a.png", b"\x89PNG garbage" * 100)}}, 400, "not an image"),
        ("truncated PNG", {"files": {"file": ("a.png", png[: len(png) // 2])}}, 400, "unreadable image"),
        ("1x1 PNG", {"files": {"file": ("a.png", _png(np.zeros((1, 1), np.uint8)))}}, 400, "too small"),
        ("NaN float TIFF", {"files": {"file": ("a.tif", _tiff(nan))}}, 400, "NaN or infinite pixel values"),
        ("PNG bomb", {"files": {"file": ("bomb.png", image_bombs["png"])}}, 400, "too large (7000x7000 pixels"),
        ("TIFF bomb", {"files": {"file": ("bomb.tif", image_bombs["tiff"])}}, 400, "too large (7000x7000 pixels"),
        ("DICOM bomb", {"files": {"file": ("bomb.dcm", dicom_bomb)}}, 400, "too large (12000x12000 pixels"),
        ("DICOM cut in its header", {"files": {"file": ("a.dcm", dicom_bomb[:200])}}, 400, "unreadable DICOM"),
        ("DICOM magic only", {"files": {"file": ("a.dcm", b"\0" * 128 + b"DICM" + b"\xff" * 64)}}, 400, "DICOM"),
        ("upload over 1 MiB", {"files": {"file": ("a.png", b"\0" * (2 << 20))}}, 413, "larger than 1 MiB"),
        ("field not a file", {"content": b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nhi\r\n--x--\r\n',
                              "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 422, "multipart field 'file'"),
        ("wrong field name", {"files": {"image": ("a.png", png)}}, 422, "multipart field 'file'"),
        ("two files", {"files": [("file", ("a.png", png)), ("file", ("b.png", png))]}, 400, "malformed upload"),
        ("JSON instead of multipart", {"json": {"file": "a.png"}}, 415, "multipart/form-data"),
        ("no boundary", {"content": b"x", "headers": {"Content-Type": "multipart/form-data"}}, 400, "malformed"),
        ("broken multipart", {"content": b"--x\r\nnonsense", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
         422, "multipart field 'file'"),
    ]


def test_malformed_uploads_are_4xx_with_a_detail(client, image_bombs, dicom_bomb, phantom_256):
    for case, kwargs, status, detail in _upload_cases(image_bombs, dicom_bomb, phantom_256[0].read_bytes()):
        res = client.post("/api/images", **kwargs)
        assert res.status_code == status, (case, res.status_code, res.text[:300])
        assert detail in res.json()["detail"], (case, res.json())


MEASURE = """
import sys
from pathlib import Path
import pydicom, pydicom.filereader, pydicom.pixels  # imported up front: a first import is not a decode
from cxrsam.data.io import read_image_bytes
from cxrsam.errors import CxrsamError

def status_mb(key):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024

for path in sys.argv[2:]:
    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    before = status_mb("VmRSS")
    try:
        read_image_bytes(data, path, int(sys.argv[1]))
        outcome = "accepted"
    except CxrsamError as exc:
        outcome = exc.problem
    print(f"{status_mb('VmHWM') - before:.1f}\t{outcome}")
"""
PEAK_GROWTH_MB = 16.0
"""Largest peak-memory growth (MB) of refusing a bomb; decoding one takes 49 MB (images) or 288 MB (DICOM)."""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from Linux /proc")
def test_bombs_are_refused_from_the_header_without_decoding(image_bombs, dicom_bomb, tmp_path):
    """In a fresh process, refusing each bomb at the app's pixel limit raises the peak RSS by under
    PEAK_GROWTH_MB: the pixels were never decoded (nor the DICOM inflated)."""
    from cxrsam.app.server import APP_MAX_PIXELS

    paths = []
    for name, data in {**image_bombs, "dcm": dicom_bomb}.items():
        paths.append(tmp_path / f"bomb.{name}")
        paths[-1].write_bytes(data)
    run = subprocess.run([sys.executable, "-c", MEASURE, str(APP_MAX_PIXELS), *map(str, paths)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        growth, outcome = line.split("\t")
        assert outcome.startswith("image too large"), (path.name, outcome)
        assert float(growth) < PEAK_GROWTH_MB, (path.name, growth)
