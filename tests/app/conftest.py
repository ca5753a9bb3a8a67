"""Fixtures of the web app tests: pretrained LiteMedSAM, the tiny SAM, phantoms, a draft provider from their masks,
the app served on a loopback port, and decompression bombs (PNG, TIFF, JPEG, deflated DICOM)."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrsam.data.io import read_mask

BOMB_SIDE = 7000
"""Side of the image bombs (pixels): 49 MP, just under cxrsam.data.xray.MAX_PIXELS, over the app's limit."""
DICOM_BOMB_SIDE = 12000


class MaskDrafts:
    """Stands in for a CNN run: a :class:`~cxrsam.baselines.drafts.DraftSource` giving the reference lung mask
    of a known image as its draft, so the app's automatic path is tested with a known, good draft."""

    kind = "cnn-draft"

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def __call__(self, xray) -> np.ndarray:
        assert xray.size == self.mask.shape, "the tests upload the image these drafts belong to"
        return self.mask.copy()

    def probability(self, xray) -> np.ndarray:
        return self(xray).astype(np.float32)  # a plain mask draft is its own probability

    def describe(self) -> dict:
        return {"kind": self.kind, "test": "reference mask"}


@pytest.fixture(scope="session")
def litemedsam():
    """Pretrained LiteMedSAM on CPU (shared by the app tests)."""
    from cxrsam.sam.registry import build_sam

    return build_sam("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory):
    """The tiny segment_anything SAM of :mod:`cxrsam.sam.testing` (milliseconds per image on a CPU)."""
    from cxrsam.sam.registry import build_sam
    from cxrsam.sam.testing import tiny_spec, write_tiny_checkpoint

    return build_sam(tiny_spec(), checkpoint=write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny_sam.pth"))


@pytest.fixture(scope="session")
def phantom_256(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """One 256 px phantom X-ray: (image path, lung mask bool (256, 256))."""
    from cxrsam.data.synthetic import generate_phantoms

    root = generate_phantoms(tmp_path_factory.mktemp("phantom256"), n=1, size=256, seed=3, progress=False)
    image = sorted((root / "images").iterdir())[0]
    return image, read_mask(root / "masks" / image.name)


@pytest.fixture(scope="session")
def mask_drafts():
    """``mask_drafts(mask)``: a draft provider returning ``mask``."""
    return MaskDrafts


@pytest.fixture(scope="session")
def lung_point():
    """``lung_point(mask) -> (x, y)``: the pixel deepest inside the image-left lung of ``mask``."""
    from scipy import ndimage

    from cxrsam.prompts.components import lung_components

    def deepest(mask: np.ndarray) -> tuple[int, int]:
        left = lung_components(mask)[0][0]
        y, x = np.unravel_index(np.argmax(ndimage.distance_transform_edt(left)), left.shape)
        return int(x), int(y)

    return deepest


@pytest.fixture(scope="session")
def serve() -> Callable[..., contextlib.AbstractContextManager[str]]:
    """``with serve(app) as url``: ``app`` served by uvicorn in a thread on a free 127.0.0.1 port."""
    import uvicorn

    @contextlib.contextmanager
    def run(app) -> Iterator[str]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the app server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    return run


@pytest.fixture(scope="session")
def image_bombs() -> dict[str, bytes]:
    """All-zero 7000x7000 (49 MP) images compressed to a few KB: ``png``, ``tiff`` (deflate), ``jpeg``."""
    image = Image.new("L", (BOMB_SIDE, BOMB_SIDE))
    bombs = {}
    for name, options in (("png", {"format": "PNG", "compress_level": 9}),
                          ("tiff", {"format": "TIFF", "compression": "tiff_adobe_deflate"}),
                          ("jpeg", {"format": "JPEG", "quality": 10})):
        buffer = io.BytesIO()
        image.save(buffer, **options)
        bombs[name] = buffer.getvalue()
    return bombs


@pytest.fixture(scope="session")
def dicom_bomb() -> bytes:
    """A deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) declaring 12000x12000 16-bit pixels,
    all zero: about 280 KB that inflate to 288 MB. Streamed through zlib, never held whole."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows = ds.Columns = DICOM_BOMB_SIDE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_bytes = DICOM_BOMB_SIDE * DICOM_BOMB_SIDE * 2
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [head.getvalue(), deflate.compress(body.getvalue()),
             deflate.compress(b"\xe0\x7f\x10\x00OW\0\0" + pixel_bytes.to_bytes(4, "little"))]  # (7FE0,0010) OW
    chunk = bytes(1 << 20)
    for _ in range(pixel_bytes // len(chunk)):
        parts.append(deflate.compress(chunk))
    parts.append(deflate.compress(chunk[:pixel_bytes % len(chunk)]) + deflate.flush())
    return b"".join(parts)
