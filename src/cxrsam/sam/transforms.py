"""The one transform between an X-ray and a SAM backend's input, owned by the backend spec.

Frames of reference:

* *original*: the image as read, (H, W) pixels; prompts (:mod:`cxrsam.prompts`) and output masks live here.
* *model input*: (S, S) with S = ``img_size``. The image is resized so its longest side is S (bilinear,
  antialiased), keeping the aspect ratio, to (h, w) = :meth:`SamTransform.resized_shape`, normalised,
  then zero-padded at the bottom and right (segment_anything's ``ResizeLongestSide`` and ``Sam.preprocess``).
  Coordinates scale by (w / W, h / H).
* *low-res*: the decoder's logits, 4x the embedding grid, covering the whole padded model input. A previous
  result given back as SAM's mask prompt (an interactive round) is taken from the original frame into this one by
  :meth:`SamTransform.mask_prompt`; the engine's click rounds hand the decoder's low-res output straight back
  (:meth:`SamTransform.frame_to_mask_prompt`, SAM's own loop).

Fine-tuning (:mod:`cxrsam.train.finetune`), the inference engine (:mod:`cxrsam.sam.engine`) and ONNX export
all go through :class:`SamTransform`, so a model is trained on exactly the tensors inference gives it, for any
image size and aspect ratio (micro-sam's and segment_anything's rule).

Arrays: every method that takes an array returns the same kind. A ``torch.Tensor`` is transformed by PyTorch on its
device (differentiable: training, and the PyTorch runtime); a NumPy array by Pillow and OpenCV on the CPU (the ONNX
runtime, which never imports PyTorch). The two agree to float rounding: the antialiased bilinear resize is Pillow's
float resize, which PyTorch's ``antialias=True`` reproduces; the plain bilinear one is OpenCV's ``INTER_LINEAR``
(tests/sam/test_transforms.py). PyTorch is imported only for tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from cxrsam.prompts import Prompts, PromptSet

if TYPE_CHECKING:
    import torch

Array = TypeVar("Array", np.ndarray, "torch.Tensor")
"""A NumPy array or a ``torch.Tensor``; a method returns the kind it was given."""


def is_tensor(x: object) -> bool:
    """Whether ``x`` is a ``torch.Tensor`` (without importing PyTorch when nothing has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _each_plane(x: np.ndarray, resize: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``resize`` applied to every (H, W) plane of float32 (..., H, W)."""
    planes = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, *x.shape[-2:])
    out = [resize(plane) for plane in planes]
    return np.stack(out).reshape(*x.shape[:-2], *out[0].shape) if out else planes.reshape(*x.shape[:-2], 0, 0)


def resize_antialiased(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Float (..., H, W) -> float32 (..., h, w): bilinear, antialiased when shrinking (Pillow's float resize; PyTorch's
    ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)``)."""
    from PIL import Image

    h, w = int(shape[0]), int(shape[1])
    if tuple(x.shape[-2:]) == (h, w):
        return np.array(x, dtype=np.float32)
    return _each_plane(x, lambda plane: np.asarray(Image.fromarray(plane).resize((w, h), Image.Resampling.BILINEAR)))


def resize_bilinear(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Float (..., H, W) -> float32 (..., h, w): plain bilinear, half-pixel centres, edges repeated (OpenCV's
    ``INTER_LINEAR``; PyTorch's ``F.interpolate(..., mode="bilinear", align_corners=False)``)."""
    import cv2

    h, w = int(shape[0]), int(shape[1])
    if tuple(x.shape[-2:]) == (h, w):
        return np.array(x, dtype=np.float32)
    return _each_plane(x, lambda plane: cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR))


SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class Normalisation(StrEnum):
    """How resized intensities in [0, 1] become model input.

    ``minmax``: per image (x - min) / (max - min) over the resized (unpadded) image (LiteMedSAM / MedSAM).
    ``sam_rgb``: x * 255, then (x - mean) / std with SAM's ImageNet RGB statistics.
    """

    MINMAX = "minmax"
    SAM_RGB = "sam_rgb"


PAD_LOGIT = -20.0
"""Logit given to the padding of a mask prompt (:meth:`SamTransform.logits_to_frame`): surely not lung."""


class SamTransform:
    """Resize-longest-side, normalise and pad images; map prompts in and logits back out.

    Every array method returns the kind of array it was given (module docstring): NumPy arrays stay NumPy,
    tensors stay on their device.

    Args:
        img_size: side S of the square model input in pixels.
        normalisation: a :class:`Normalisation`.
    """

    def __init__(self, img_size: int, normalisation: Normalisation | str):
        self.img_size = int(img_size)
        self.normalisation = Normalisation(normalisation)

    def resized_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an image of ``size=(H, W)`` inside the model input (longest side = S, each side rounded half
        up: segment_anything's ``ResizeLongestSide.get_preprocess_shape``, whose import would cost torchvision's)."""
        scale = self.img_size / max(int(size[0]), int(size[1]))
        return int(int(size[0]) * scale + 0.5), int(int(size[1]) * scale + 0.5)

    def resize(self, pixels: Array) -> Array:
        """Intensities float (H, W) in [0, 1] -> (h, w) float32 (bilinear, antialiased; differentiable for
        tensors)."""
        if not is_tensor(pixels):
            return resize_antialiased(np.asarray(pixels), self.resized_shape(pixels.shape))
        import torch.nn.functional as F

        x = pixels.float()[None, None]
        return F.interpolate(x, self.resized_shape(tuple(x.shape[-2:])), mode="bilinear", align_corners=False,
                             antialias=True)[0, 0]

    def finish(self, resized: Array) -> Array:
        """A resized image (h, w) in [0, 1] -> model input (3, S, S) float32: normalised, then zero-padded."""
        h, w = resized.shape[-2:]
        if not is_tensor(resized):
            x = np.asarray(resized, dtype=np.float32)
            if self.normalisation is Normalisation.MINMAX:
                lo, hi = x.min(), x.max()
                x = np.broadcast_to((x - lo) / max(hi - lo, np.float32(1e-8)), (3, h, w))
            else:
                mean = np.array(SAM_PIXEL_MEAN, np.float32)[:, None, None]
                std = np.array(SAM_PIXEL_STD, np.float32)[:, None, None]
                x = (x * np.float32(255.0) - mean) / std
            return np.pad(x, ((0, 0), (0, self.img_size - h), (0, self.img_size - w))).astype(np.float32, copy=False)
        import torch
        import torch.nn.functional as F

        x = resized[None, None]
        if self.normalisation is Normalisation.MINMAX:
            lo, hi = x.amin(), x.amax()
            x = ((x - lo) / (hi - lo).clamp_min(1e-8)).expand(-1, 3, -1, -1)
        else:
            mean = torch.tensor(SAM_PIXEL_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(SAM_PIXEL_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * 255.0 - mean) / std
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))[0]

    def images(self, pixels_list: Sequence[Array]) -> Array:
        """Images float (H, W) in [0, 1] (sizes may differ) -> model input (B, 3, S, S) float32: a NumPy array of
        NumPy images, a tensor (on their device) of tensors."""
        if not pixels_list or not is_tensor(pixels_list[0]):
            return np.stack([self.finish(self.resize(pixels)) for pixels in pixels_list])
        import torch

        return torch.stack([self.finish(self.resize(pixels)) for pixels in pixels_list])

    def resize_mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool mask (H, W) -> bool (h, w) on the same pixel grid as :meth:`resize` (threshold 0.5)."""
        return self.resize(np.asarray(mask, dtype=np.float32)) >= 0.5

    def pad_mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool mask (h, w) in the resized frame -> bool (S, S), zero-padded at the bottom and right."""
        h, w = mask.shape
        return np.pad(np.asarray(mask, dtype=bool), ((0, self.img_size - h), (0, self.img_size - w)))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool mask (H, W) at the original size -> bool (S, S) in the model-input frame."""
        return self.pad_mask(self.resize_mask(mask))

    def coords(self, coords: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``(..., 2)`` xy in original pixels of an image of ``size=(H, W)`` -> model-input pixels float64 (x scaled by
        w / W, y by h / H: segment_anything's ``ResizeLongestSide.apply_coords``)."""
        h, w = self.resized_shape(size)
        return np.asarray(coords, dtype=np.float64) * np.array([w / size[1], h / size[0]])

    def boxes(self, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``(..., 4)`` xyxy boxes in original pixels -> model-input pixels."""
        boxes = np.asarray(boxes, dtype=np.float64)
        return self.coords(boxes.reshape(*boxes.shape[:-1], 2, 2), size).reshape(boxes.shape)

    def prompts(self, prompts: Prompts) -> Prompts:
        """Prompt sets of an image in original pixels -> the same sets in model-input pixels (image size (S, S))."""
        size = prompts.image_size
        sets = [PromptSet(box=None if s.box is None else self.boxes(s.box, size).astype(np.float32),
                          points=None if s.points is None else self.coords(s.points, size).astype(np.float32),
                          labels=s.labels,
                          logits=None if s.logits is None else self.logits_to_frame(
                              np.asarray(s.logits, np.float32), size))
                          for s in prompts.sets]
        return Prompts(sets, (self.img_size, self.img_size), prompts.mode, prompts.components_found,
                       list(prompts.warnings))

    def logits_to_input(self, logits: Array) -> Array:
        """Low-res logits (..., h', w') -> (..., S, S) over the padded model input (bilinear; differentiable)."""
        size = (self.img_size, self.img_size)
        if not is_tensor(logits):
            return resize_bilinear(np.asarray(logits), size)
        import torch.nn.functional as F

        lead = logits.shape[:-2]
        x = F.interpolate(logits.reshape(-1, 1, *logits.shape[-2:]), size, mode="bilinear", align_corners=False)
        return x.reshape(*lead, *size)

    def logits_to_frame(self, logits: Array, size: tuple[int, int]) -> Array:
        """Logits (..., H, W) at an image's ``size`` -> (..., S, S) over the padded model input: resized like the
        image (bilinear, antialiased), padded with :data:`PAD_LOGIT`; the inverse of :meth:`logits_to_image` up to
        interpolation (exactly the identity when ``size`` is (S, S))."""
        h, w = self.resized_shape(size)
        pad = (0, self.img_size - h), (0, self.img_size - w)
        if not is_tensor(logits):
            x = resize_antialiased(np.asarray(logits), (h, w))
            return np.pad(x, ((0, 0),) * (x.ndim - 2) + pad, constant_values=PAD_LOGIT)
        import torch.nn.functional as F

        lead = logits.shape[:-2]
        x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, (0, pad[1][1], 0, pad[0][1]), value=PAD_LOGIT)
        return x.reshape(*lead, self.img_size, self.img_size)

    def mask_prompt(self, logits: Array, size: tuple[int, int], side: int) -> Array:
        """Previous results' logits (P, H, W) at an image's ``size`` -> SAM's mask prompt (P, 1, side, side):
        :meth:`logits_to_frame`, then :meth:`frame_to_mask_prompt`."""
        return self.frame_to_mask_prompt(self.logits_to_frame(logits, size), side)

    @staticmethod
    def frame_to_mask_prompt(logits: Array, side: int) -> Array:
        """Logits (P, s, s) over the whole padded model input (at S, or the decoder's low-res s = 4x the embedding
        grid) -> SAM's mask prompt (P, 1, side, side) float32: resized to the prompt encoder's ``mask_input_size``
        (bilinear, antialiased; unchanged when s = side, as for the decoder's own low-res output)."""
        if not is_tensor(logits):
            return resize_antialiased(np.asarray(logits), (side, side))[:, None]
        import torch.nn.functional as F

        x = logits.float()[:, None]
        if x.shape[-1] != side:
            x = F.interpolate(x, (side, side), mode="bilinear", align_corners=False, antialias=True)
        return x

    def logits_to_image(self, logits: Array, size: tuple[int, int]) -> Array:
        """Low-res logits (..., h', w') -> (..., H, W) at the original ``size``: upsample to S x S, crop the
        unpadded (h, w) region, resize to (H, W) (segment_anything's ``Sam.postprocess_masks``)."""
        h, w = self.resized_shape(size)
        full = self.logits_to_input(logits)[..., :h, :w]
        if not is_tensor(full):
            return resize_bilinear(full, size)
        import torch.nn.functional as F

        lead = full.shape[:-2]
        x = F.interpolate(full.reshape(-1, 1, h, w), tuple(size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *size)
