"""U-Net and DeepLabv3+ from ``segmentation_models_pytorch`` with one output channel (lung logits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxrsam.errors import CxrsamError

if TYPE_CHECKING:
    import torch
    from torch import nn

ARCHITECTURES: dict[str, str] = {
    "unet": "Unet",
    "deeplabv3plus": "DeepLabV3Plus",
}
"""``--arch`` name -> the ``segmentation_models_pytorch`` model class's name (smp, with timm and torchvision, is
imported only when a CNN is built: a cached ONNX export of the drafts needs none of them)."""


def build_cnn(arch: str, encoder: str = "resnet18", in_channels: int = 1,
              encoder_weights: str | None = None) -> nn.Module:
    """A segmentation CNN: ``forward(x (B, in_channels, S, S)) -> logits (B, 1, S, S)``.

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        encoder: any smp encoder name (``resnet18``, ``resnet34``, ``efficientnet-b0``, ``mobilenet_v2``, ...).
        in_channels: 1 (grey X-ray) or 3 (grey replicated, e.g. to use ImageNet weights unchanged).
        encoder_weights: ``None`` (random init, works offline) or e.g. ``"imagenet"`` (downloads once).
        S must be a multiple of 32 (the encoders downsample 5 times).
    """
    import segmentation_models_pytorch as smp

    if arch not in ARCHITECTURES:
        raise CxrsamError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    if encoder not in smp.encoders.get_encoder_names() and not encoder.startswith("tu-"):
        raise CxrsamError(f"unknown encoder {encoder!r} (any segmentation_models_pytorch encoder, e.g. resnet18, "
                          "resnet34, efficientnet-b0, mobilenet_v2, or tu-<timm name>)")
    try:
        return getattr(smp, ARCHITECTURES[arch])(encoder_name=encoder, encoder_weights=encoder_weights,
                                                 in_channels=in_channels, classes=1)
    except (OSError, RuntimeError, ValueError) as exc:  # e.g. no internet for pretrained weights
        raise CxrsamError(f"cannot build {arch} with encoder {encoder!r} and weights {encoder_weights!r}: "
                          f"{str(exc).splitlines()[0]}") from None


def to_model_input(images: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Grey images (B, 1, S, S) -> (B, in_channels, S, S) by replicating the channel."""
    return images if in_channels == 1 else images.expand(-1, in_channels, -1, -1)
