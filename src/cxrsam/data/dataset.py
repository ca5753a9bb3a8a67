"""Loading cases into arrays and a map-style dataset for training (PyTorch is imported only to hand out tensors).

Images and masks are returned at the *image's* resolution by :func:`load_case`; the training
dataset resizes both to a square model size on the same pixel grid (:func:`resize_image`,
:func:`resize_mask_square`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cxrsam.data.io import XRay, read_image, read_mask
from cxrsam.data.layouts import Case
from cxrsam.errors import CxrsamError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_resized_groups: set[str] = set()


def load_case(case: Case, allow_empty: bool = False) -> tuple[XRay, np.ndarray]:
    """Read a case: the X-ray and its lung mask (bool, (H, W), the image's size).

    A mask of another size than its image is resized to the image by nearest neighbour; this is
    logged once per dataset group (the COVID-19 database ships 299x299 images with 256x256 masks).
    An empty mask raises unless ``allow_empty``.
    """
    xray = read_image(case.image)
    mask = np.zeros(xray.size, dtype=bool)
    for mask_path in case.masks:
        part = read_mask(mask_path)
        if part.shape != xray.size:
            if case.group not in _resized_groups:
                _resized_groups.add(case.group)
                log.warning("%s: masks (%dx%d) differ from images (%dx%d); resizing masks (nearest neighbour)",
                            case.group, part.shape[1], part.shape[0], xray.size[1], xray.size[0])
            part = read_mask(mask_path, size=xray.size)
        mask |= part
    if not allow_empty and not mask.any():
        raise CxrsamError("empty mask (no lung pixels)", path=case.masks[0])
    return xray, mask


def resize_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float image (H, W) to (size, size)."""
    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA if pixels.shape[0] > size
                      else cv2.INTER_LINEAR)


def resize_mask_square(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask (H, W) to (size, size) on the same pixel grid as :func:`resize_image`.

    The mask is resized as a float image (area average when shrinking, bilinear when enlarging) and
    thresholded at 0.5. OpenCV's nearest-neighbour resize maps pixel corners instead of centres and
    shifts a mask by up to half a source pixel against its image: on the COVID-19 data a model that
    reproduced such targets perfectly would score at most 0.982 Dice at 299 px from 256 px targets and
    0.967 from 128 px ones (0.996 and 0.986 with this resize).
    """
    return resize_image(np.asarray(mask, dtype=np.float32), size) >= 0.5


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, rotate_deg: float = 10.0,
            scale: float = 0.1, shift: float = 0.06, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy-respecting augmentation of an image/mask pair of any shape (H, W).

    Small rotation (+-``rotate_deg``) about the centre, isotropic scale (1+-``scale``), shift (+-``shift`` of
    each side), brightness/contrast (+-15 %) and gamma (0.7-1.5). No left-right flip unless ``flip`` (the heart
    is on the left). Shapes are kept: image float32 (H, W) in [0, 1], mask bool (H, W).
    """
    h, w = image.shape
    angle = rng.uniform(-rotate_deg, rotate_deg)
    zoom = rng.uniform(1 - scale, 1 + scale)
    tx, ty = rng.uniform(-shift, shift, size=2) * (w, h)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom)
    matrix[:, 2] += (tx, ty)
    image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    mask = cv2.warpAffine(mask.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT).astype(bool)
    if flip and rng.random() < 0.5:
        image, mask = image[:, ::-1].copy(), mask[:, ::-1].copy()
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-0.15, 0.15) * 0.5
    image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.5)
    return image.astype(np.float32), mask


class SegmentationDataset:
    """Cases as tensors at a square model size, for the CNN baselines (which stretch every image to S x S
    in training and prediction alike; SAM's letterboxing transform is :class:`cxrsam.sam.transforms.SamTransform`).

    Item ``i`` is ``(image, mask, index)`` with image float32 (1, S, S) in [0, 1] and mask float32
    (1, S, S) in {0, 1}. With ``augment=True`` the augmentation for item ``i`` in epoch ``e`` is drawn
    from ``seed, e, i``: reproducible and independent of worker order (call :meth:`set_epoch`).
    With ``shift`` > 0 that share of items is first turned into an imitated other-site case
    (:func:`cxrsam.data.shift.shift_pair`: aspect ratio, window, gamma, CLAHE, detector, collimation, text) at the
    image's own resolution, as the transfer check draws them, and then stretched to S x S like every input.
    Decoded, resized pairs are kept in memory after first use (a 256 px pair is ~0.3 MB); shifted items are
    decoded again each time.
    """

    def __init__(self, cases: Sequence[Case], size: int = 256, augment: bool = False, seed: int = 0,
                 shift: float = 0.0):
        if not 0 <= shift <= 1:
            raise CxrsamError(f"shift is a share of items in [0, 1], got {shift}")
        self.cases = list(cases)
        self.size = size
        self.augment = augment
        self.seed = seed
        self.shift = shift
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Resized (image float32 (S, S), mask bool (S, S)) of case ``index``, without augmentation."""
        if index not in self._cache:
            xray, mask = load_case(self.cases[index])
            image = resize_image(xray.pixels, self.size)
            self._cache[index] = (image.astype(np.float32), resize_mask_square(mask, self.size))
        return self._cache[index]

    def shifted(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Case ``index`` shifted like another site's (:func:`~cxrsam.data.shift.shift_pair` drawn from ``rng``,
        at the image's resolution), then resized like :meth:`pair`: (image float32 (S, S), mask bool (S, S))."""
        from cxrsam.data.shift import shift_pair

        xray, mask = load_case(self.cases[index])
        image, mask, _ = shift_pair(xray.pixels, mask, rng)
        return resize_image(image, self.size).astype(np.float32), resize_mask_square(mask, self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        import torch

        image, mask = self.pair(index)
        if self.shift > 0:
            rng = np.random.default_rng([self.seed, self.epoch, index, 2])
            if rng.random() < self.shift:
                image, mask = self.shifted(index, rng)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask = augment(image, mask, rng)
        return (torch.from_numpy(np.ascontiguousarray(image))[None],
                torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None], index)
