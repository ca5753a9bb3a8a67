"""Reading chest X-rays and lung masks from disk, and writing masks.

Every reader returns plain numpy arrays with documented shapes and raises
:class:`~cxrsam.errors.CxrsamError` (one line naming the file) on bad input.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrsam.data.dicom import has_dicom_magic, is_dicom, read_dicom, read_jsrt_raw
from cxrsam.data.xray import MAX_PIXELS, XRay, check_shape, normalize_intensity
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, require_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".img", ".gif"}
def _to_gray(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 3) or (H, W, 4) -> (H, W); RGB by luminance, alpha dropped."""
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[..., :3].astype(np.float64)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return array[..., 0]
        return rgb @ np.array([0.299, 0.587, 0.114])
    if array.ndim == 3 and array.shape[2] == 1:
        return array[..., 0]
    raise ValueError(f"unsupported array shape {array.shape}")


def _open_pil(path: Path, source: BinaryIO | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode the image file ``path`` (or its content ``source``; ``path`` then only names it) to an
    array, refusing it from its header size (see :func:`cxrsam.data.xray.check_shape`) before the pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if source is None else source) as img:
                check_shape((img.height, img.width), path, max_pixels)
                img.load()
                if img.mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                elif img.mode in ("LA", "PA"):
                    img = img.convert("L")
                elif img.mode == "CMYK" or img.mode == "YCbCr":
                    img = img.convert("RGB")
                elif img.mode == "1":
                    img = img.convert("L")
                return np.asarray(img)
    except CxrsamError:
        raise
    except UnidentifiedImageError:
        raise CxrsamError("not an image (content is not a known image format)", path=path) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise CxrsamError("image too large (decompression-bomb limit)", path=path) from None
    except Exception as exc:  # PIL raises many types for broken files
        raise CxrsamError(f"unreadable image ({exc})", path=path) from None


def read_image(path: str | Path) -> XRay:
    """Read a CXR from PNG/JPEG/TIFF/BMP/GIF, DICOM (.dcm or by content) or JSRT raw ``.IMG``.

    Returns an :class:`XRay` whose ``pixels`` are float32 (H, W) in [0, 1].
    """
    path = Path(path)
    require_file(path, "image file")
    if path.suffix.lower() in (".dcm", ".dicom") or is_dicom(path):
        return read_dicom(path)
    if path.suffix.lower() == ".img":
        return read_jsrt_raw(path)
    return _pil_xray(path)


def read_image_bytes(data: bytes, name: str | Path, max_pixels: int = MAX_PIXELS) -> XRay:
    """Read a CXR held in memory (an upload): DICOM when ``data`` carries the DICOM magic, else
    PNG/JPEG/TIFF/BMP/GIF, decided by content only.

    ``name`` only names the image (errors, ``XRay.path``). The same checks as :func:`read_image`
    apply, with ``max_pixels`` (the app passes a budget below :data:`MAX_PIXELS`) checked from the
    header before decoding.
    """
    name = Path(name)
    if not data:
        raise CxrsamError("empty image file (0 bytes)", path=name)
    if has_dicom_magic(data):
        return read_dicom(name, source=io.BytesIO(data), max_pixels=max_pixels)
    return _pil_xray(name, io.BytesIO(data), max_pixels)


def _pil_xray(path: Path, source: BinaryIO | None = None, max_pixels: int = MAX_PIXELS) -> XRay:
    """An :class:`XRay` from a PIL-readable image (arguments as :func:`_open_pil`)."""
    array = _open_pil(path, source, max_pixels)
    try:
        gray = _to_gray(array)
    except ValueError as exc:
        raise CxrsamError(f"unsupported image ({exc})", path=path) from None
    if gray.dtype.kind == "f" and not np.isfinite(gray).all():
        raise CxrsamError("unsupported image (NaN or infinite pixel values)", path=path)
    bit_depth = 8 if array.dtype == np.uint8 else 16
    return XRay(pixels=normalize_intensity(gray, bit_depth), path=path, bit_depth=bit_depth)


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a lung mask as a bool array (H, W); any non-zero grey or colour value is lung.

    Accepts {0,1}, {0,255}, multi-valued label maps and colour masks (any colour channel non-zero
    counts) in every image mode (1, L, LA, P, RGB, RGBA, I;16, I, F). An alpha channel or palette
    transparency never decides: an opaque RGBA mask is read from its colours. With ``size=(H, W)``
    the mask is resized by nearest neighbour.
    """
    path = Path(path)
    require_file(path, "mask file")
    array = _open_pil(path)
    mask = array[..., :3].any(axis=2) if array.ndim == 3 else array != 0
    if size is not None and mask.shape != tuple(size):
        mask = resize_mask(mask, size)
    return mask


ASPECT_TOLERANCE = 0.02
"""Largest relative aspect-ratio difference between two masks (or a mask and its image) that is still resized."""


def aspect_differs(shape: tuple[int, ...], other: tuple[int, ...]) -> bool:
    """True when (H, W) ``shape`` and ``other`` differ in aspect ratio by more than :data:`ASPECT_TOLERANCE`."""
    (h, w), (oh, ow) = shape[:2], other[:2]
    return abs((w / h) / (ow / oh) - 1) > ASPECT_TOLERANCE


def read_draft(path: str | Path, size: tuple[int, int], allow_empty: bool = False) -> np.ndarray:
    """A draft lung mask file (a CNN's output, a hand mask) as bool (H, W) at the image ``size``.

    {0, 1}, {0, 255} and label masks are read as lung = non-zero. A draft of another size with the
    same aspect ratio (e.g. 256x256 masks for 299x299 images) is resized by nearest neighbour; a
    different aspect ratio, or an empty draft unless ``allow_empty``, raises :class:`CxrsamError`
    naming the file.
    """
    mask = read_mask(path)
    (mh, mw), (h, w) = mask.shape, size
    if aspect_differs(mask.shape, size):
        raise CxrsamError(f"draft mask is {mw}x{mh} but the image is {w}x{h} (different aspect ratio)", path=path)
    if not allow_empty and not mask.any():
        raise CxrsamError("draft mask is empty: no lung to prompt SAM with", path=path)
    return resize_mask(mask, size) if mask.shape != tuple(size) else mask


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (H, W) to ``size=(H', W')``."""
    import cv2

    out = cv2.resize(mask.astype(np.uint8), (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)
    return out.astype(bool)


def write_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a bool/0-1 mask (H, W) as an 8-bit PNG with values {0, 255}, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(tmp, format="PNG")
    return path


MASK_SUFFIX = "_mask"
"""Mask files are named ``<image stem>_mask.<ext>`` (what every cxrsam command writes); ``<image stem>.<ext>``
is read too (ground-truth and draft folders of public datasets)."""
OVERLAY_SUFFIX = "_overlay"
"""``<image stem>_overlay.png``: the picture cxrsam writes beside each mask; never read as a mask."""
UNCERTAINTY_SUFFIX = "_uncertainty"
"""``<image stem>_uncertainty.png``: the prompt-disagreement map cxrsam writes beside each mask; never a mask."""
SEG_SUFFIX = "_seg"
"""``<image stem>_seg.dcm``: the DICOM Segmentation cxrsam writes for a DICOM input; never read as a mask."""
PROBABILITY_SUFFIX = "_prob"
"""``<image stem>_prob.png``: a CNN draft's foreground probability beside its mask (:func:`write_probability`,
uint8 = round(255 p) at the draft's size); never read as a mask."""
NOT_MASK_SUFFIXES = (OVERLAY_SUFFIX, UNCERTAINTY_SUFFIX, SEG_SUFFIX, PROBABILITY_SUFFIX)


def probability_file(mask_path: str | Path) -> Path:
    """The one name of the probability map that belongs to a draft mask file: ``<stem>_prob.png`` beside it."""
    mask_path = Path(mask_path)
    return mask_path.with_name(f"{mask_path.stem.removesuffix(MASK_SUFFIX)}{PROBABILITY_SUFFIX}.png")


def write_probability(path: str | Path, probability: np.ndarray) -> Path:
    """Write a foreground probability map float (H, W) in [0, 1] as an 8-bit PNG (round(255 p)), atomically."""
    path = Path(path)
    quantised = np.round(np.clip(np.asarray(probability, dtype=np.float32), 0, 1) * 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(quantised).save(tmp, format="PNG")
    return path


def read_probability(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A probability map written by :func:`write_probability` as float32 (H, W) in [0, 1] at the image ``size``
    (bilinear resize; another aspect ratio raises :class:`CxrsamError` naming the file)."""
    import cv2

    path = Path(path)
    require_file(path, "probability map")
    array = _open_pil(path)
    if array.ndim != 2:
        raise CxrsamError(f"probability map must be one grey channel, got shape {array.shape}", path=path)
    if aspect_differs(array.shape, size):
        raise CxrsamError(f"probability map is {array.shape[1]}x{array.shape[0]} but the image is "
                          f"{size[1]}x{size[0]} (different aspect ratio)", path=path)
    prob = array.astype(np.float32) / 255.0
    if prob.shape != tuple(size):
        prob = cv2.resize(prob, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
    return np.clip(prob, 0.0, 1.0)


def mask_file_name(stem: str, extension: str = ".png") -> str:
    """The one output name of an image's mask: ``<stem>_mask<extension>``."""
    return f"{stem}{MASK_SUFFIX}{extension}"


def index_masks(folder: str | Path) -> dict[str, Path]:
    """Mask files of ``folder`` by the image stem they belong to (``x.png`` and ``x_mask.png`` both -> ``x``;
    the ``x_overlay.png``, ``x_uncertainty.png`` and ``x_seg.dcm`` files cxrsam writes beside masks are skipped).

    Two files claiming one image (``x.png`` and ``x_mask.png``, or ``x.png`` and ``x.tif``) raise
    :class:`CxrsamError` naming both, never a silent choice.
    """
    found: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem.endswith(NOT_MASK_SUFFIXES):
            continue
        stem = path.stem.removesuffix(MASK_SUFFIX)
        if stem in found:
            raise CxrsamError(f"two mask files for image {stem!r}: {found[stem].name} and {path.name} "
                              "(keep one)", path=folder)
        found[stem] = path
    return found


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted by name), by suffix; hidden files skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CxrsamError("not a folder", path=folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)
