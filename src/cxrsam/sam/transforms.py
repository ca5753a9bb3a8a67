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
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F

from cxrsam.prompts import Prompts, PromptSet

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

    def resize(self, pixels: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """Intensities float (H, W) in [0, 1] -> (h, w) float32 (bilinear, antialiased; differentiable)."""
        x = pixels if torch.is_tensor(pixels) else torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        x = x.to(device, torch.float32, non_blocking=x.is_pinned())[None, None]  # pinned: async copy
        return F.interpolate(x, self.resized_shape(tuple(x.shape[-2:])), mode="bilinear", align_corners=False,
                             antialias=True)[0, 0]

    def finish(self, resized: torch.Tensor) -> torch.Tensor:
        """A resized image (h, w) in [0, 1] -> model input (3, S, S): normalised, then zero-padded."""
        x = resized[None, None]
        if self.normalisation is Normalisation.MINMAX:
            lo, hi = x.amin(), x.amax()
            x = ((x - lo) / (hi - lo).clamp_min(1e-8)).expand(-1, 3, -1, -1)
        else:
            mean = torch.tensor(SAM_PIXEL_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(SAM_PIXEL_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * 255.0 - mean) / std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))[0]

    def images(self, pixels_list: Sequence[np.ndarray | torch.Tensor], device: str | torch.device = "cpu"
               ) -> torch.Tensor:
        """Images float (H, W) in [0, 1] (sizes may differ) -> model input (B, 3, S, S) on ``device``."""
        return torch.stack([self.finish(self.resize(pixels, device)) for pixels in pixels_list])

    def resize_mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool mask (H, W) -> bool (h, w) on the same pixel grid as :meth:`resize` (threshold 0.5)."""
        return self.resize(np.asarray(mask, dtype=np.float32)).numpy() >= 0.5

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
                              torch.from_numpy(np.asarray(s.logits, np.float32)), size).numpy())
                          for s in prompts.sets]
        return Prompts(sets, (self.img_size, self.img_size), prompts.mode, prompts.components_found,
                       list(prompts.warnings))

    def logits_to_input(self, logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits (..., h', w') -> (..., S, S) over the padded model input (bilinear; differentiable)."""
        lead = logits.shape[:-2]
        x = logits.reshape(-1, 1, *logits.shape[-2:])
        x = F.interpolate(x, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, self.img_size, self.img_size)

    def logits_to_frame(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits (..., H, W) at an image's ``size`` -> (..., S, S) over the padded model input: resized like the
        image (bilinear, antialiased), padded with :data:`PAD_LOGIT`; the inverse of :meth:`logits_to_image` up to
        interpolation (exactly the identity when ``size`` is (S, S))."""
        lead = logits.shape[:-2]
        x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
        h, w = self.resized_shape(size)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h), value=PAD_LOGIT)
        return x.reshape(*lead, self.img_size, self.img_size)

    def mask_prompt(self, logits: torch.Tensor, size: tuple[int, int], side: int) -> torch.Tensor:
        """Previous results' logits (P, H, W) at an image's ``size`` -> SAM's mask prompt (P, 1, side, side):
        :meth:`logits_to_frame`, then :meth:`frame_to_mask_prompt`."""
        return self.frame_to_mask_prompt(self.logits_to_frame(logits, size), side)

    @staticmethod
    def frame_to_mask_prompt(logits: torch.Tensor, side: int) -> torch.Tensor:
        """Logits (P, s, s) over the whole padded model input (at S, or the decoder's low-res s = 4x the embedding
        grid) -> SAM's mask prompt (P, 1, side, side): resized to the prompt encoder's ``mask_input_size`` (bilinear,
        antialiased; unchanged when s = side, as for the decoder's own low-res output)."""
        x = logits.float()[:, None]
        if x.shape[-1] != side:
            x = F.interpolate(x, (side, side), mode="bilinear", align_corners=False, antialias=True)
        return x

    def logits_to_image(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits (..., h', w') -> (..., H, W) at the original ``size``: upsample to S x S, crop the
        unpadded (h, w) region, resize to (H, W) (segment_anything's ``Sam.postprocess_masks``)."""
        full = self.logits_to_input(logits)
        lead = full.shape[:-2]
        h, w = self.resized_shape(size)
        x = full.reshape(-1, 1, self.img_size, self.img_size)[..., :h, :w]
        x = F.interpolate(x, tuple(size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *size)
