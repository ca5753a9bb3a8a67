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
        _export(EncoderGraph(model).eval(), (image,), folder / ENCODER, ["image"], ["embedding"],
                {"image": {0: "batch"}, "embedding": {0: "batch"}}, opset)
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
