"""SamTransform's frame rules against segment_anything's own (which cxrsam no longer imports at run time)."""

import numpy as np
import pytest
from segment_anything.utils.transforms import ResizeLongestSide

from cxrsam.sam.transforms import SamTransform


@pytest.mark.parametrize("img_size", [64, 256, 1024])
def test_resized_shape_and_coords_equal_segment_anythings(img_size):
    ours, theirs = SamTransform(img_size, "minmax"), ResizeLongestSide(img_size)
    rng = np.random.default_rng(0)
    sizes = [(299, 299), (1005, 1223), (1223, 1005), (3, 5000), (5000, 3), (1, 1), (img_size, img_size + 1),
             *[tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(200)]]
    for size in sizes:
        assert ours.resized_shape(size) == ResizeLongestSide.get_preprocess_shape(*size, img_size), size
        coords = rng.uniform(0, max(size), (3, 4, 2))
        np.testing.assert_array_equal(ours.coords(coords, size), theirs.apply_coords(coords, size))
        boxes = rng.uniform(0, max(size), (2, 4))
        np.testing.assert_array_equal(ours.boxes(boxes, size), theirs.apply_boxes(boxes, size))
