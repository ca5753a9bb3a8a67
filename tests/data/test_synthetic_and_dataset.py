"""Phantom generator and the training dataset."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cxrsam.data import SegmentationDataset, discover
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
