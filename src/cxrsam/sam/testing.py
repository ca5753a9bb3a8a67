"""A tiny segment_anything SAM as a registry backend, for fast tests of everything built on SAM.

It has the real architecture (``ImageEncoderViT`` with ``attn.qkv``/``attn.proj``, ``PromptEncoder``,
``MaskDecoder`` with a two-way transformer) at toy width: 64 px input, 8x8 embedding grid, 32
channels, about 0.1 M parameters; a forward and backward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cxrsam.sam.registry import BackendSpec

if TYPE_CHECKING:
    from torch import nn

TINY_SIZE = 64


def build_tiny_sam() -> nn.Module:
    """A segment_anything ``Sam`` with a 2-block ViT encoder (64 px input, patch 8, width 32)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    width, grid = 32, TINY_SIZE // 8
    encoder = ImageEncoderViT(img_size=TINY_SIZE, patch_size=8, embed_dim=width, depth=2, num_heads=2,
                              out_chans=width, mlp_ratio=2.0)
    prompt_encoder = PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                                   input_image_size=(TINY_SIZE, TINY_SIZE), mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=width, iou_head_depth=2, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=64, num_heads=2))
    return Sam(encoder, prompt_encoder, decoder)


def tiny_spec(name: str = "tiny_sam") -> BackendSpec:
    """A :class:`BackendSpec` for :func:`build_tiny_sam` (SAM normalisation; no default checkpoint)."""
    return BackendSpec(name=name, img_size=TINY_SIZE, normalisation="sam_rgb", builder=build_tiny_sam,
                       default_checkpoint=lambda: None, description="tiny segment_anything SAM for tests")


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save the state dict of a tiny SAM with weights drawn from ``seed`` to ``path``."""
    import torch

    torch.manual_seed(seed)
    path = Path(path)
    torch.save(build_tiny_sam().state_dict(), path)
    return path
