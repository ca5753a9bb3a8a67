"""The exported encoder graph of segment_anything's ViT: its attention in steps, the values of the encoder's own
forward, in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from cxrsam.sam.onnx_cache import inference_session
from cxrsam.sam.onnx_export import EncoderGraph, ViTEncoderGraph, encoder_graph, export_encoder
from cxrsam.sam.registry import build_sam
from cxrsam.sam.testing import tiny_spec

GRID, HEADS = 16, 2
"""The small ViT's token grid side (64 px, patch 4) and heads: an attention row of the grid is HEADS x GRID x GRID**2
float32 numbers."""
ROW_BYTES = 4 * HEADS * GRID * GRID**2


@pytest.fixture(scope="module")
def windowed_vit():
    """A small ViT with what ViT-B has: windowed blocks whose 16 x 16 grid needs padding to windows of 6, a global
    block between them, relative positions (drawn non-zero) and qkv biases (so a padding token's qkv is not zero)."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=64, patch_size=4, embed_dim=32, depth=3, num_heads=HEADS, out_chans=16,
                              mlp_ratio=2.0, use_rel_pos=True, window_size=6, global_attn_indexes=(1,)).eval()
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    return SimpleNamespace(image_encoder=encoder)


@pytest.mark.parametrize("rows", [1, 3, GRID])
def test_the_vit_graph_gives_the_values_of_the_encoder_with_its_attention_in_steps(windowed_vit, rows):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = windowed_vit.image_encoder(images)
        got = ViTEncoderGraph(windowed_vit, chunk_bytes=rows * ROW_BYTES)(images)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_the_exported_vit_graph_runs_in_steps_in_onnx_runtime_for_any_batch(windowed_vit, tmp_path):
    rows = 3
    path = tmp_path / "encoder.onnx"
    export_encoder(ViTEncoderGraph(windowed_vit, chunk_bytes=rows * ROW_BYTES), 64, path)
    softmaxes = sum(node.op_type == "Softmax" for node in onnx.load(str(path)).graph.node)
    assert softmaxes == 2 + math.ceil(GRID / rows)  # one per windowed block, one per step of the global one
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = windowed_vit.image_encoder(images).numpy()
    got = inference_session(path).run(None, {"image": images.numpy()})[0]
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()


def test_segment_anything_vits_export_the_stepwise_graph_and_other_encoders_themselves(tiny_checkpoint):
    assert isinstance(encoder_graph(build_sam(tiny_spec(), checkpoint=tiny_checkpoint).model), ViTEncoderGraph)
    other = SimpleNamespace(image_encoder=nn.Conv2d(3, 8, 4, stride=4))
    graph = encoder_graph(other)
    assert type(graph) is EncoderGraph
    image = torch.randn(1, 3, 16, 16)
    assert torch.equal(graph(image), other.image_encoder(image))
