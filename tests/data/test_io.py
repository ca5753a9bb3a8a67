"""Image and mask reading: every mode, DICOM, JSRT raw, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrsam.data.io import read_draft, read_image, read_mask, write_mask
from cxrsam.errors import CxrsamError

RAMP = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))


def test_8bit_gray(tmp_path):
    Image.fromarray(RAMP).save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png")
    assert x.pixels.dtype == np.float32 and x.size == (64, 64)
    np.testing.assert_allclose(x.pixels, RAMP / 255.0, atol=1e-6)


def test_16bit_png_is_min_max_scaled(tmp_path):
    arr = (np.tile(np.arange(64), (64, 1)) * 64 + 100).astype(np.uint16)  # 12-bit values in 16-bit container
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png")
    assert x.bit_depth == 16
    assert x.pixels.min() == 0.0 and x.pixels.max() == 1.0
    np.testing.assert_allclose(x.pixels[0], np.arange(64) / 63, atol=1e-6)


def test_rgb_equal_channels_and_rgba(tmp_path):
    rgb = np.stack([RAMP] * 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full_like(RAMP, 255)])).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png").pixels, RAMP / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png").pixels, RAMP / 255.0, atol=1e-6)


def test_rgb_colour_uses_luminance(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").pixels.mean() == pytest.approx(0.587 * 200 / 255, abs=1e-3)


def test_jpeg_and_tiff(tmp_path):
    Image.fromarray(RAMP).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(RAMP).save(tmp_path / "a.tif")
    assert abs(read_image(tmp_path / "a.jpg").pixels - RAMP / 255).max() < 0.05
    np.testing.assert_allclose(read_image(tmp_path / "a.tif").pixels, RAMP / 255.0, atol=1e-6)


@pytest.mark.parametrize("values", [(0, 1), (0, 255), (0, 3)])
def test_mask_values(tmp_path, values):
    m = np.zeros((32, 32), np.uint8)
    m[8:20, 4:12] = values[1]
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.sum() == 12 * 8


LUNG = np.zeros((24, 40), bool)
LUNG[4:20, 5:17] = LUNG[4:20, 23:35] = True


def _palette(colours: list[int], transparent: int | None = None):
    """A P-mode maker: index 1 = lung, index 0 = background, the palette given as flat RGB."""

    def make(path):
        img = Image.fromarray(LUNG.astype(np.uint8), mode="P")
        img.putpalette(colours)
        img.save(path, **({} if transparent is None else {"transparency": transparent}))

    return make


def _channels(*planes):
    return np.dstack([np.where(LUNG, lung, back).astype(np.uint8) for lung, back in planes])


@pytest.mark.parametrize("name, suffix, mode, make", [
    ("1", ".png", "1", lambda p: Image.fromarray(LUNG).save(p)),
    ("L", ".png", "L", lambda p: Image.fromarray(LUNG.astype(np.uint8) * 255).save(p)),
    ("LA opaque", ".png", "LA", lambda p: Image.fromarray(_channels((255, 0), (255, 255)), mode="LA").save(p)),
    ("P", ".png", "P", _palette([0, 0, 0, 255, 255, 255])),
    ("P red lung, transparent background", ".png", "P", _palette([0, 0, 0, 255, 0, 0], transparent=0)),
    ("P transparent lung", ".png", "P", _palette([0, 0, 0, 255, 255, 255], transparent=1)),
    ("RGB red", ".png", "RGB", lambda p: Image.fromarray(_channels((255, 0), (0, 0), (0, 0))).save(p)),
    ("RGBA opaque", ".png", "RGBA", lambda p: Image.fromarray(_channels((255, 0), (255, 0), (255, 0), (255, 255))).save(p)),
    ("RGBA transparent lung", ".png", "RGBA", lambda p: Image.fromarray(_channels((0, 0), (200, 0), (0, 0), (0, 255))).save(p)),
    ("I;16", ".png", "I;16", lambda p: Image.fromarray(LUNG.astype(np.uint16) * 1000).save(p)),
    ("I", ".tif", "I", lambda p: Image.fromarray(LUNG.astype(np.int32) * 70000).save(p)),
    ("F", ".tif", "F", lambda p: Image.fromarray(LUNG.astype(np.float32) * 0.5).save(p)),
])
def test_mask_lung_comes_from_grey_or_colour_in_every_mode_never_alpha(tmp_path, name, suffix, mode, make):
    path = tmp_path / f"mask{suffix}"
    make(path)
    with Image.open(path) as img:
        assert img.mode == mode
    np.testing.assert_array_equal(read_mask(path), LUNG)


def test_rgb_mask_and_resize(tmp_path):
    m = np.zeros((32, 32, 3), np.uint8)
    m[:16] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png", size=(64, 64))
    assert mask.shape == (64, 64) and mask[:32].all() and not mask[32:].any()


def test_read_draft_resizes_same_aspect_and_refuses_other_aspect_or_empty(tmp_path):
    lungs = np.zeros((60, 80), np.uint8)
    lungs[10:50, 6:30] = 1
    lungs[16:44, 50:70] = 1
    Image.fromarray(lungs[::2, ::2]).save(tmp_path / "half.png")  # {0, 1} at half size
    draft = read_draft(tmp_path / "half.png", (60, 80))
    assert draft.shape == (60, 80) and np.array_equal(draft, lungs > 0)
    with pytest.raises(CxrsamError, match="aspect ratio") as info:
        read_draft(tmp_path / "half.png", (60, 60))
    assert "half.png" in str(info.value)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(CxrsamError, match="empty") as info:
        read_draft(tmp_path / "empty.png", (60, 80))
    assert "empty.png" in str(info.value)
    assert not read_draft(tmp_path / "empty.png", (60, 80), allow_empty=True).any()


def test_write_mask_roundtrip(tmp_path):
    m = np.zeros((20, 30), bool)
    m[5:10, 3:7] = True
    write_mask(tmp_path / "o.png", m)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "o.png")))) == {0, 255}
    np.testing.assert_array_equal(read_mask(tmp_path / "o.png"), m)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]  # no temp files left behind


def _dicom(path, arr, photometric="MONOCHROME2", spacing=(0.2, 0.3), window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = list(spacing)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_monochrome2_and_spacing(tmp_path):
    arr = np.tile(np.arange(64) * 60, (64, 1)).astype(np.uint16)
    x = read_image(_dicom(tmp_path / "a.dcm", arr))
    assert x.spacing_mm == (0.2, 0.3) and x.bit_depth == 12
    assert x.pixels[0, 0] == 0.0 and x.pixels[0, -1] == 1.0


def test_dicom_monochrome1_inverted_and_detected_by_content(tmp_path):
    arr = np.tile(np.arange(64) * 60, (64, 1)).astype(np.uint16)
    path = _dicom(tmp_path / "no_suffix", arr, photometric="MONOCHROME1")
    x = read_image(path)
    assert x.pixels[0, 0] == 1.0 and x.pixels[0, -1] == 0.0


def test_dicom_window_applied(tmp_path):
    arr = np.tile(np.arange(64) * 60, (64, 1)).astype(np.uint16)  # 0..3780
    x = read_image(_dicom(tmp_path / "w.dcm", arr, window=(1000, 400)))
    # Values below 800 clip to black, above 1200 to white: most of the ramp saturates.
    assert (x.pixels[0] == 0).sum() >= 13 and (x.pixels[0] == 1).sum() >= 43


@pytest.mark.parametrize("syntax, named", [("jpeg2000", "JPEG 2000 Image Compression (Lossless Only)"),
                                            ("unknown", "1.2.3.4.5.6.7")])
def test_undecodable_dicom_is_one_line_naming_the_transfer_syntax(tmp_path, undecodable_dicom, syntax, named,
                                                                  recwarn):
    path = undecodable_dicom(tmp_path / "x.dcm", syntax)
    with pytest.raises(CxrsamError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unreadable DICOM (transfer syntax {named} cannot be decoded here: ")
    assert "\n" not in message and message.endswith(")")
    assert not recwarn.list


def test_jsrt_raw(tmp_path):
    from cxrsam.data.dicom import read_jsrt_raw

    raw = np.zeros((32, 32), dtype=">u2")
    raw[:, 16:] = 4095
    raw.tofile(tmp_path / "JPCLN001.IMG")
    x = read_jsrt_raw(tmp_path / "JPCLN001.IMG", shape=(32, 32))
    assert x.spacing_mm == (0.175, 0.175)
    assert x.pixels[0, 0] == 1.0 and x.pixels[0, -1] == 0.0  # inverted: high raw values are dark


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b""), "empty image file"),
    (lambda p: p.write_bytes(b"this is not an image"), "not an image"),
    (lambda p: p.write_bytes(_png_bytes()[:200]), "unreadable image"),
    (lambda p: Image.fromarray(np.zeros((1, 1), np.uint8)).save(p), "too small"),
])
def test_bad_images_one_line_naming_the_file(tmp_path, make, problem):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(CxrsamError) as info:
        read_image(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and problem in message


def test_huge_image_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (10000, 10000)).save(path)
    with pytest.raises(CxrsamError, match="too large"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(CxrsamError, match="file not found"):
        read_image(tmp_path / "nope.png")


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((128, 128)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_index_masks_reads_both_names_skips_overlays_and_refuses_two_candidates(tmp_path):
    from cxrsam.data.io import index_masks

    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    write_mask(tmp_path / "a.png", mask)
    write_mask(tmp_path / "b_mask.png", mask)
    write_mask(tmp_path / "b_overlay.png", mask)
    assert {k: p.name for k, p in index_masks(tmp_path).items()} == {"a": "a.png", "b": "b_mask.png"}
    write_mask(tmp_path / "a_mask.png", mask)
    with pytest.raises(CxrsamError, match="two mask files for image 'a': a.png and a_mask.png"):
        index_masks(tmp_path)


def test_a_malformed_split_manifest_is_one_line(tmp_path):
    from cxrsam.data.split import read_manifest

    bad = tmp_path / "manifest.csv"
    bad.write_text("name,part\nx,train\n")
    with pytest.raises(CxrsamError, match="not a split manifest") as info:
        read_manifest(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
