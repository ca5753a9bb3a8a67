"""Export a SAM model to the ONNX graphs :mod:`cxrsam.sam.onnx_runtime` serves, and check them against PyTorch.

The graphs, their inputs and the check are described in :mod:`cxrsam.sam.onnx_runtime`; this module is the part that
needs PyTorch (the legacy TorchScript exporter, the reference model and ONNX Runtime's int8 quantiser), imported only
when an export is missing from the cache, so a run served from cached exports never imports PyTorch.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import get_rel_pos, window_partition, window_unpartition
from torch import nn

from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, atomic_write_text, sha256_file
from cxrsam.prompts import PromptSet
from cxrsam.sam.engine import decode, encode, mask_side, prompt_batch
from cxrsam.sam.onnx_cache import (
    CHECK_INT8,
    DECODER,
    ENCODER,
    ENCODER_INT8,
    INSTALL_HINT,
    OPSET,
    OnnxSam,
    decoder_inputs,
    export_key,
    inference_session,
    int8_settings,
    onnx_installed,
    record_check,
)
from cxrsam.sam.registry import BackendSpec, LoadedSam

log = logging.getLogger(__name__)

MAX_EMBEDDING_DIFF = 1e-3
"""Largest accepted max |embedding difference| / max |PyTorch embedding| at export."""
MIN_MASK_IOU = 0.999
"""Smallest accepted IoU between PyTorch's and ONNX Runtime's masks (logits > 0) of one prompt set at export."""


class EncoderGraph(nn.Module):
    """``image`` (B, 3, S, S) -> ``embedding`` (B, C, h, w): the image encoder alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


ATTENTION_CHUNK_BYTES = 32 * 2**20
"""Largest float32 attention matrix (bytes, at batch 1) that one step of a ViT global-attention block computes in the
exported encoder (:class:`ViTEncoderGraph`): ViT-B at 1024 px computes its 12 x 4096 x 4096 attention two query rows
of its 64 x 64 token grid at a time, 25 MB instead of 805 MB (docs/benchmarks.md, "ViT-B's attention in steps")."""


def _attention(attn: nn.Module, qkv: torch.Tensor, rows: int) -> torch.Tensor:
    """segment_anything's ``Attention.forward`` up to its output projection, from its qkv projection, ``rows`` rows
    of query tokens at a time: ``qkv`` (B, H, W, 3C) -> (B, H, W, C). Every element is computed by the same
    operations as in the original (decomposed relative positions included)."""
    batch, height, width, _ = qkv.shape
    heads = attn.num_heads
    q, k, v = qkv.reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4) \
        .reshape(3, batch * heads, height * width, -1).unbind(0)
    keys = k.transpose(-2, -1)
    if attn.use_rel_pos:
        grid_q = q.reshape(batch * heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, get_rel_pos(height, height, attn.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, get_rel_pos(width, width, attn.rel_pos_w))
    outputs = []
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        logits = (q[:, top * width:bottom * width] * attn.scale) @ keys
        if attn.use_rel_pos:
            logits = (logits.view(batch * heads, bottom - top, width, height, width)
                      + rel_h[:, top:bottom, :, :, None] + rel_w[:, top:bottom, :, None, :]) \
                .view(batch * heads, (bottom - top) * width, height * width)
        outputs.append(logits.softmax(dim=-1) @ v)
    out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    return out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)


def _block(block: nn.Module, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """segment_anything's ``Block.forward`` on ``x`` (B, H, W, C) with :func:`_attention`: a global block in steps of
    at most ``chunk_bytes`` of attention; a windowed block projects qkv on the H x W tokens before padding them to
    whole windows (a padding token's qkv is that of a zero token, as in the original, where the zero-padded tokens
    are projected) and its output after removing the padding, instead of projecting the padding too."""
    shortcut = x
    x = block.norm1(x)
    attn = block.attn
    qkv = attn.qkv(x)
    height, width = x.shape[1], x.shape[2]
    size = block.window_size
    if size > 0:
        pad_h, pad_w = -height % size, -width % size
        if pad_h or pad_w:
            padded = (torch.arange(height + pad_h)[:, None] >= height) | (torch.arange(width + pad_w)[None, :] >= width)
            qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h)) \
                + padded[None, :, :, None].to(qkv.dtype) * attn.qkv(x.new_zeros(1, x.shape[-1]))
        windows, padded_hw = window_partition(qkv, size)
        out = window_unpartition(_attention(attn, windows, size), size, padded_hw, (height, width))
    else:
        row_bytes = 4 * attn.num_heads * width * height * width
        out = _attention(attn, qkv, max(1, chunk_bytes // row_bytes))
    x = shortcut + attn.proj(out)
    return x + block.mlp(block.norm2(x))


class ViTEncoderGraph(nn.Module):
    """``image`` (B, 3, S, S) -> ``embedding`` (B, C, h, w) of segment_anything's ``ImageEncoderViT`` (ViT-B/L/H and
    LoRA-merged ones), computed as its ``forward`` with :func:`_block`: the same values (checked at export like every
    graph), in an eighth of the working memory under ONNX Runtime (its time unchanged within noise)."""

    def __init__(self, model: nn.Module, chunk_bytes: int = ATTENTION_CHUNK_BYTES):
        super().__init__()
        self.image_encoder = model.image_encoder
        self.chunk_bytes = chunk_bytes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        encoder = self.image_encoder
        x = encoder.patch_embed(image)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks:
            x = _block(block, x, self.chunk_bytes)
        return encoder.neck(x.permute(0, 3, 1, 2))


def encoder_graph(model: nn.Module) -> nn.Module:
    """The graph exported for ``model``'s image encoder: :class:`ViTEncoderGraph` for segment_anything's ViT,
    :class:`EncoderGraph` (the encoder as it is) for any other, such as LiteMedSAM's TinyViT."""
    return ViTEncoderGraph(model) if isinstance(model.image_encoder, ImageEncoderViT) else EncoderGraph(model)


class PromptDecoderGraph(nn.Module):
    """SAM's prompt encoder + mask decoder on one point tensor (see the module docstring for the labels) and a mask
    prompt: ``(embedding (1, C, h, w), coords (P, N, 2), labels (P, N), mask_input (P, 1, 4h, 4w), has_mask (1,))
    -> (logits (P, M, 4h, 4w), iou (P, M))``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder

    def forward(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.prompt_encoder
        h, w = encoder.input_image_size
        scale = torch.tensor([w, h], dtype=coords.dtype, device=coords.device)
        sparse = encoder.pe_layer._pe_encoding((coords + 0.5) / scale)
        labels = labels[..., None]
        sparse = sparse * (labels != -1) + encoder.not_a_point_embed.weight * (labels == -1)
        for i in range(encoder.num_point_embeddings):
            sparse = sparse + encoder.point_embeddings[i].weight * (labels == i)
        dense = has_mask * encoder.mask_downscaling(mask_input) \
            + (1 - has_mask) * encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self.mask_decoder.predict_masks(image_embeddings=embedding, image_pe=encoder.get_dense_pe(),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)


def _export(graph: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
            output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notes on SAM's constants
        torch.onnx.export(graph, inputs, str(tmp), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes)


def export_encoder(graph: nn.Module, size: int, path: Path, opset: int = OPSET) -> None:
    """Write an encoder graph (:func:`encoder_graph`) of a model with input side ``size`` to ``path``: ``image``
    (B, 3, size, size) -> ``embedding``, B dynamic."""
    _export(graph.eval(), (torch.zeros(1, 3, size, size),), path, ["image"], ["embedding"],
            {"image": {0: "batch"}, "embedding": {0: "batch"}}, opset)


def export_graphs(model: nn.Module, spec: BackendSpec, folder: str | Path, opset: int = OPSET) -> None:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``model`` (a plain SAM, LoRA already merged) into ``folder``."""
    folder = Path(folder)
    size = spec.img_size
    image = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        embedding = model.image_encoder(image)
    coords = torch.tensor([[[0.3, 0.5], [0.1, 0.1], [0.45, 0.9]], [[0.7, 0.5], [0.55, 0.1], [0.9, 0.9]]]) * size
    labels = torch.tensor([[1, 2, 3], [1, 2, 3]])
    side = mask_side(model)
    mask_input, has_mask = torch.zeros(2, 1, side, side), torch.ones(1)
    try:
        export_encoder(encoder_graph(model), size, folder / ENCODER, opset)
        _export(PromptDecoderGraph(model).eval(), (embedding, coords, labels, mask_input, has_mask),
                folder / DECODER, ["embedding", "coords", "labels", "mask_input", "has_mask"], ["logits", "iou"],
                {"coords": {0: "sets", 1: "points"}, "labels": {0: "sets", 1: "points"}, "mask_input": {0: "sets"},
                 "logits": {0: "sets"}, "iou": {0: "sets"}}, opset)
    except Exception as exc:  # the exporter raises many types for unsupported operators
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CxrsamError(f"backend {spec.name} could not be exported to ONNX ({type(exc).__name__}: {first})",
                          path=folder) from None


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def check_export(model: nn.Module, spec: BackendSpec, onnx_sam: OnnxSam) -> dict[str, Any]:
    """Compare PyTorch and ONNX Runtime on a seeded phantom and its mirror image with two boxes, two point sets,
    a box+points set and a box+points set with a previous result as its mask prompt: the largest embedding
    difference (absolute and relative to the largest PyTorch embedding value), the largest low-res logit difference
    and the smallest mask IoU of any set and candidate (logits > 0 over the model input). ``dynamic_batch``: the two
    images as one batch of 2 run and agree too."""
    from cxrsam.data.synthetic import make_phantom

    size = spec.img_size
    image = make_phantom(size=max(size, 64), seed=0)[0].astype(np.float32) / 255
    model_input = spec.transform.images([image, image[:, ::-1].copy()])
    reference = encode(model, torch.from_numpy(model_input))
    got = np.concatenate([onnx_sam.encoder.run(None, {"image": x[None]})[0] for x in model_input])
    scale = float(reference.abs().max())
    diff = float(np.abs(got - reference.numpy()).max())
    import onnxruntime

    quiet = onnxruntime.RunOptions()
    quiet.log_severity_level = 4  # a refused batch size is an expected outcome here, not an error to print
    try:
        batched = onnx_sam.encoder.run(None, {"image": model_input}, quiet)[0]
        dynamic_batch = bool(np.abs(batched - reference.numpy()).max() <= MAX_EMBEDDING_DIFF * scale)
    except Exception:  # noqa: BLE001 - ONNX Runtime refuses a batch size the trace baked in
        dynamic_batch = False
    left, right = np.array([0.1, 0.1, 0.45, 0.9], np.float32), np.array([0.55, 0.1, 0.9, 0.9], np.float32)
    point = np.array([[0.28, 0.5]], np.float32)
    groups = [[PromptSet(box=left * size), PromptSet(box=right * size)],
              [PromptSet(points=np.array([[0.28, 0.5], [0.5, 0.5]], np.float32) * size, labels=np.array([1, 0])),
               PromptSet(points=np.array([[0.72, 0.5], [0.5, 0.5]], np.float32) * size, labels=np.array([1, 0]))],
              [PromptSet(box=left * size, points=point * size, labels=np.array([1]))]]
    side = mask_side(model)
    with torch.inference_mode():  # a previous result of the first group as the mask prompt of a box + click
        previous = decode(model, reference[:1], prompt_batch(spec, groups[0], (size, size)))[0][0, :, 0]
    groups.append([PromptSet(box=left * size, points=point * size, labels=np.array([1]),
                             logits=spec.transform.logits_to_input(previous[0]).numpy())])
    ious, logit_diff = [], 0.0
    for group in groups:
        batch = prompt_batch(spec, group, (size, size), side=side)
        with torch.inference_mode():  # every candidate: the single mask (M = 0), then the multimask ones
            ref_logits = torch.cat([decode(model, reference[:1], batch, multi)[0][0] for multi in (False, True)], dim=1)
        logits = torch.from_numpy(onnx_sam.decode(got[:1], decoder_inputs(batch, side))[0])
        logit_diff = max(logit_diff, float((logits - ref_logits).abs().max()))
        for ref, new in zip(spec.transform.logits_to_input(ref_logits) > 0, spec.transform.logits_to_input(logits) > 0):
            ious += [_mask_iou(r.numpy(), n.numpy()) for r, n in zip(ref, new)]
    relative = diff / max(scale, 1e-12)
    return {"max_abs_embedding_diff": diff, "embedding_scale": scale, "relative_embedding_diff": relative,
            "max_abs_logit_diff": logit_diff, "min_mask_iou": min(ious), "masks_compared": len(ious),
            "dynamic_batch": dynamic_batch,
            "limits": {"relative_embedding_diff": MAX_EMBEDDING_DIFF, "min_mask_iou": MIN_MASK_IOU},
            "passed": bool(relative <= MAX_EMBEDDING_DIFF and min(ious) >= MIN_MASK_IOU)}


def export_checked(loaded: LoadedSam, folder: str | Path, opset: int = OPSET) -> OnnxSam:
    """Export ``loaded`` (a LoRA run merged, on a copy) into ``folder``, check it against PyTorch and write
    ``check.json``; a disagreeing export is refused (:class:`CxrsamError` naming its ``check.json``) and its ONNX
    files are removed."""
    from cxrsam.sam.lora import merge

    folder = Path(folder)
    model = merge(copy.deepcopy(loaded.model)).cpu().eval()
    log.info("exporting %s to ONNX (opset %d) in %s", loaded.model_id, opset, folder)
    export_graphs(model, loaded.spec, folder, opset)
    onnx_sam = OnnxSam(inference_session(folder / ENCODER), inference_session(folder / DECODER), folder, {})
    check = {"key": export_key(loaded, opset), "mask_side": mask_side(model),
             **check_export(model, loaded.spec, onnx_sam)}
    onnx_sam.check = record_check(
        folder, check, (ENCODER, DECODER),
        f"ONNX export of {loaded.model_id} disagrees with PyTorch (embedding difference "
        f"{check['relative_embedding_diff']:.2e} of its scale, limit {MAX_EMBEDDING_DIFF:g}; mask IoU "
        f"{check['min_mask_iou']:.4f}, limit {MIN_MASK_IOU:g})")
    return onnx_sam


def export_onnx(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                scale: float | None = None) -> Path:
    """Export a LoRA run, merged at its WiSE-FT ``scale`` (None: the recorded one), into the folder ``out``
    (``encoder.onnx``, ``decoder.onnx``, ``check.json``: the graphs the ONNX runtime uses, checked against
    PyTorch); ``checkpoint`` and ``scale`` as in :func:`~cxrsam.sam.lora.load_run`. Returns ``out``."""
    from cxrsam.files import require_output_dir
    from cxrsam.sam.lora import load_run

    if not onnx_installed():
        raise CxrsamError(f"ONNX export needs onnx and onnxruntime: {INSTALL_HINT}")
    out = require_output_dir(out)
    return export_checked(load_run(run_dir, device="cpu", checkpoint=checkpoint, scale=scale), out).folder


def quantize_encoder(folder: str | Path, model: nn.Module, spec: BackendSpec) -> dict[str, Any]:
    """Write ``encoder-int8.onnx`` (:data:`INT8_OPS` with int8 weights as :func:`int8_settings` says, by
    ``onnxruntime.quantization``'s ``quantize_dynamic``) next to a checked ``encoder.onnx`` and ``int8.json``: its
    SHA-256, the settings and its embedding difference from PyTorch's float32 encoder on the check phantom (relative
    to the largest embedding value). Returns that record."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cxrsam.data.synthetic import make_phantom

    folder = Path(folder)
    settings = int8_settings()
    with atomic_path(folder / ENCODER_INT8) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # the quantiser logs advice (pre-process the graph first) to the root logger
        try:
            quantize_dynamic(folder / ENCODER, tmp, weight_type=QuantType[settings["weight_type"]],
                             per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                             op_types_to_quantize=settings["op_types"])
        finally:
            logging.disable(logging.NOTSET)
    image = make_phantom(size=max(spec.img_size, 64), seed=0)[0].astype(np.float32) / 255
    model_input = spec.transform.images([image])
    reference = encode(model, torch.from_numpy(model_input)).numpy()
    got = inference_session(folder / ENCODER_INT8).run(None, {"image": model_input})[0]
    scale = float(np.abs(reference).max())
    record = {"relative_embedding_diff": float(np.abs(got - reference).max()) / max(scale, 1e-12),
              **settings, "onnxruntime": onnxruntime.__version__,
              "files": {ENCODER_INT8: sha256_file(folder / ENCODER_INT8)}}
    atomic_write_text(folder / CHECK_INT8, json.dumps(record, indent=2) + "\n")
    return record
