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


SIZES = [(299, 299), (1005, 1223), (120, 200), (2000, 1500), (7, 900)]


@pytest.mark.parametrize("img_size,normalisation", [(256, "minmax"), (1024, "sam_rgb")])
def test_numpy_arithmetic_equals_pytorchs(img_size, normalisation):
    """The ONNX runtime's NumPy path (Pillow, OpenCV) and PyTorch's give the same model input, logits and masks."""
    import torch

    transform = SamTransform(img_size, normalisation)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    for size in [*SIZES, (img_size, img_size)]:
        image = np.clip(rng.normal(0.5, 0.1, size) + np.linspace(0, 0.3, size[1]), 0, 1).astype(np.float32)
        got = transform.images([image])
        expected = transform.images([torch.from_numpy(image)]).numpy()
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
        # a smooth lung-like low-res result (the decoder's are) to the image's size, and back as a mask prompt
        low = np.stack([8 * np.exp(-((yy - 20) ** 2 + (xx - c) ** 2) / 150) - 2 for c in (18, 46)])
        low = transform.logits_to_input(low.astype(np.float32))[:, ::4, ::4].copy()  # side S / 4
        logits = transform.logits_to_image(low, size)
        reference = transform.logits_to_image(torch.from_numpy(low), size).numpy()
        assert logits.shape == (2, *size) and np.abs(logits - reference).max() < 1e-3
        assert ((logits > 0) != (reference > 0)).mean() < 1e-4
        for side in (64, 256):
            prompt = transform.mask_prompt(logits, size, side)
            assert prompt.shape == (2, 1, side, side)
            np.testing.assert_allclose(prompt, transform.mask_prompt(torch.from_numpy(logits), size, side).numpy(),
                                       atol=1e-3)
    assert transform.logits_to_frame(low, (img_size // 4, img_size // 4)).shape == (2, img_size, img_size)


def test_numpy_transform_never_imports_pytorch(fresh_imports):
    code = ("import numpy as np\nfrom cxrsam.sam.transforms import SamTransform\nt = SamTransform(256, 'minmax')\n"
            "x = t.images([np.random.rand(300, 200).astype(np.float32)])\n"
            "y = t.logits_to_image(np.random.rand(2, 64, 64).astype(np.float32), (300, 200))\n"
            "t.mask_prompt(y, (300, 200), 64)")
    assert fresh_imports(code, ["torch"]) == []
