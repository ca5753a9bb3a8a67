"""The component rules (OpenCV's labelling) against SciPy's, whose numbering and hole filling they reproduce."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cxrsam.prompts.components import fill_holes, label_components, lung_components


def random_masks(count: int = 60):
    rng = np.random.default_rng(0)
    for _ in range(count):
        shape = tuple(int(v) for v in rng.integers(5, 90, 2))
        noise = ndimage.uniform_filter(rng.random(shape), size=int(rng.integers(1, 5)))
        yield noise > np.quantile(noise, rng.uniform(0.3, 0.9))  # blobs, specks, holes and diagonal contacts


@pytest.mark.parametrize("connectivity", [4, 8])
def test_labels_are_numbered_and_sized_as_scipys(connectivity):
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    for mask in random_masks():
        labels, areas = label_components(mask, connectivity)
        expected, count = ndimage.label(mask, structure=structure)
        assert labels.dtype == np.int32 and np.array_equal(labels, expected)
        assert areas.tolist() == np.bincount(expected.ravel(), minlength=count + 1)[1:].tolist()
    assert label_components(np.zeros((4, 6), bool))[1].size == 0


def test_fill_holes_equals_scipys():
    for mask in random_masks():
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    ring = np.pad(np.ones((5, 5), bool), 2)
    ring[3:6, 3:6] = False  # a hole
    ring[4, 0:4] = False  # ... opened to the border: not a hole any more
    assert np.array_equal(fill_holes(ring), ndimage.binary_fill_holes(ring))


def test_lung_components_keep_the_two_largest_left_to_right():
    mask = np.zeros((50, 60), bool)
    mask[5:45, 35:55] = True  # right, larger
    mask[5:40, 5:25] = True  # left
    mask[47:49, 2:4] = True  # speck below the area limit
    lungs, found = lung_components(mask)
    assert found == 2 and [int(lung.sum()) for lung in lungs] == [700, 800]


def test_box_prompts_never_import_scipy(fresh_imports):
    code = ("import numpy as np\nfrom cxrsam.prompts import PromptSpec\nm = np.zeros((80, 80), bool)\n"
            "m[10:70, 5:35] = True\nm[10:70, 45:75] = True\nassert len(PromptSpec().prompts(m, 'x').sets) == 2")
    assert fresh_imports(code, ["scipy"]) == []
