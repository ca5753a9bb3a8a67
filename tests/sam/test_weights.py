"""Official checkpoint downloads: hash check, atomic rename, offline message (no network used)."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

import pytest

from cxrsam.errors import CxrsamError
from cxrsam.sam import weights
from cxrsam.sam.weights import OFFICIAL_WEIGHTS, OfficialWeights, download_weights, find_weights


def test_official_table_is_complete():
    assert set(OFFICIAL_WEIGHTS) == {"vit_b", "vit_l", "vit_h"}
    for name, entry in OFFICIAL_WEIGHTS.items():
        assert entry.url == f"https://dl.fbaipublicfiles.com/segment_anything/{entry.filename}"
        assert entry.filename.startswith(f"sam_{name}_") and len(entry.sha256) == 64
        int(entry.sha256, 16)


@pytest.fixture
def local_source(tmp_path, monkeypatch):
    """vit_b served from a local file:// URL with its true hash."""
    payload = b"not really sam weights " * 5000
    source = tmp_path / "src.pth"
    source.write_bytes(payload)
    entry = OfficialWeights("vit_b", "sam_vit_b_01ec64.pth", source.as_uri(), hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(OFFICIAL_WEIGHTS, "vit_b", entry)
    return entry, payload


def test_download_verifies_and_renames(local_source, tmp_path):
    entry, payload = local_source
    target = download_weights("vit_b", tmp_path / "w", progress=False)
    assert target == tmp_path / "w" / entry.filename and target.read_bytes() == payload
    assert find_weights("vit_b", tmp_path / "w") == target
    assert [p.name for p in (tmp_path / "w").iterdir()] == [entry.filename]


def test_hash_mismatch_leaves_nothing(local_source, tmp_path, monkeypatch):
    entry, _ = local_source
    monkeypatch.setitem(OFFICIAL_WEIGHTS, "vit_b", OfficialWeights("vit_b", entry.filename, entry.url, "0" * 64))
    with pytest.raises(CxrsamError, match="expected 0000"):
        download_weights("vit_b", tmp_path / "w", progress=False)
    assert list((tmp_path / "w").iterdir()) == []


def test_existing_good_file_is_kept_without_network(local_source, tmp_path, monkeypatch):
    entry, payload = local_source
    (tmp_path / entry.filename).write_bytes(payload)

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded although the file was present")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert download_weights("vit_b", tmp_path, progress=False) == tmp_path / entry.filename
    (tmp_path / entry.filename).write_bytes(b"partial")
    with pytest.raises(CxrsamError, match="does not match the published SHA-256"):
        download_weights("vit_b", tmp_path, progress=False)


def test_offline_gives_one_line_saying_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("CXRSAM_WEIGHTS", str(tmp_path / "cache"))
    with pytest.raises(CxrsamError) as err:
        download_weights("vit_h")
    message = str(err.value)
    assert "\n" not in message and "offline?" in message
    assert "put sam_vit_h_4b8939.pth" in message and str(tmp_path / "cache") in message
    with pytest.raises(CxrsamError, match="no official download for 'litemedsam'"):
        weights.official("litemedsam")
