"""Phantom generator and the training dataset."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cxrsam.data.dataset import SegmentationDataset
from cxrsam.data.layouts import discover
from cxrsam.data.synthetic import make_phantom


def test_phantom_has_two_dark_lungs():
    image, lung = make_phantom(128, seed=5)
    labels, n = ndimage.label(lung)
    assert n == 2
    left, right = (labels == 1), (labels == 2)
    assert min(left.sum(), right.sum()) > 0.05 * lung.size
    assert image[lung].mean() < image[~lung].mean() - 40  # air in the lungs is dark on a CXR


def test_phantoms_deterministic(phantoms, tmp_path):
    from cxrsam.data.synthetic import generate_phantoms

    again = generate_phantoms(tmp_path, n=12, size=96, seed=1, progress=False)
    for name in ("images", "masks"):
        for p in sorted((phantoms / name).iterdir()):
            assert p.read_bytes() == (again / name / p.name).read_bytes()


def test_dataset_shapes_and_reproducible_augmentation(phantoms):
    cases = discover(phantoms).cases
    ds = SegmentationDataset(cases, size=64, augment=True, seed=7)
    img, mask, idx = ds[3]
    assert img.shape == mask.shape == (1, 64, 64) and idx == 3
    assert set(np.unique(mask.numpy())) <= {0.0, 1.0}
    again, _, _ = SegmentationDataset(cases, size=64, augment=True, seed=7)[3]
    assert np.array_equal(img.numpy(), again.numpy())
    ds.set_epoch(1)
    assert not np.array_equal(ds[3][0].numpy(), img.numpy())
    plain = SegmentationDataset(cases, size=64)[3][1]
    assert abs(float(mask.sum()) - float(plain.sum())) < 0.35 * float(plain.sum())  # geometry only mildly changed


def test_masks_reach_the_model_size_on_the_image_grid(phantoms):
    from cxrsam.data.dataset import load_case, resize_image, resize_mask_square

    # a disk centred in a 299 px image stays centred at the model size (OpenCV nearest moves it by 0.5 px)
    yy, xx = np.mgrid[:299, :299]
    disk = (yy - 149) ** 2 + (xx - 149) ** 2 < 80 ** 2
    for size in (128, 256):
        ys, xs = np.nonzero(resize_mask_square(disk, size))
        assert abs(xs.mean() - (size - 1) / 2) < 0.05 and abs(ys.mean() - (size - 1) / 2) < 0.05
        # and it lands where the image's own resize puts the disk's pixels
        assert np.array_equal(resize_mask_square(disk, size), resize_image(disk.astype(np.float32), size) >= 0.5)
    data = SegmentationDataset(discover(phantoms).cases[:2], 64)
    _, mask = load_case(data.cases[1])
    assert np.array_equal(data.pair(1)[1], resize_mask_square(mask, 64))


def test_shifted_items_are_other_site_cases_stretched_like_every_input(phantoms):
    from cxrsam.data.dataset import load_case, resize_image, resize_mask_square
    from cxrsam.data.shift import shift_pair
    from cxrsam.errors import CxrsamError

    cases = discover(phantoms).cases
    plain = SegmentationDataset(cases, size=64, seed=3)
    always = SegmentationDataset(cases, size=64, seed=3, shift=1.0)
    xray, truth = load_case(cases[2])
    rng = np.random.default_rng([3, 0, 2, 2])
    rng.random()  # the share draw
    image, mask, record = shift_pair(xray.pixels, truth, rng)  # at the image's own resolution
    got_image, got_mask, _ = always[2]
    assert np.array_equal(got_image[0].numpy(), resize_image(image, 64).astype(np.float32))
    assert np.array_equal(got_mask[0].numpy() > 0, resize_mask_square(mask, 64))
    assert not np.array_equal(got_image.numpy(), plain[2][0].numpy())
    assert np.array_equal(always[2][0].numpy(), got_image.numpy())  # reproducible
    always.set_epoch(1)
    assert not np.array_equal(always[2][0].numpy(), got_image.numpy())  # drawn anew each epoch
    half = SegmentationDataset(cases, size=64, seed=3, shift=0.5)
    shifted = [not np.array_equal(half[i][0].numpy(), plain[i][0].numpy()) for i in range(len(cases))]
    assert any(shifted) and not all(shifted)
    assert all(np.array_equal(SegmentationDataset(cases, size=64, seed=3, shift=0.0)[i][0].numpy(),
                              plain[i][0].numpy()) for i in range(3))
    with pytest.raises(CxrsamError, match="share"):
        SegmentationDataset(cases, size=64, shift=1.5)
