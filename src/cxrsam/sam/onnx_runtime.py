"""ONNX Runtime for SAM on CPU: export once per model, check against PyTorch, cache on disk, serve the engine.

Two graphs are exported from the (LoRA-merged) model, with the legacy TorchScript exporter:

``encoder.onnx``
    ``image`` (B, 3, S, S) float32 model input (:meth:`~cxrsam.sam.transforms.SamTransform.images`) ->
    ``embedding`` (B, C, h, w). B is declared dynamic, but an encoder that takes its batch size as a Python
    number (TinyViT's ``len(x)``) is traced with B = 1 baked in: the export check tries B = 2 and records
    ``dynamic_batch``; without it images are encoded one per call.
``decoder.onnx``
    prompt encoder + mask decoder: ``embedding`` (1, C, h, w), ``coords`` (P, N, 2) float32 xy in model-input
    pixels and ``labels`` (P, N) int64 -> ``logits`` (P, M, 4h, 4w) low-res mask logits and ``iou`` (P, M), with
    M = 1 + SAM's multimask outputs (all candidates; the engine slices them like ``MaskDecoder.forward``).
    Boxes travel as two points with labels 2 (top-left) and 3 (bottom-right) after the points, and a set without
    a box gets one padding point labelled -1: exactly the token sequence of SAM's ``PromptEncoder`` (as in
    segment_anything's ``SamOnnxModel``). P and N are dynamic, so boxes, points and box+points share one graph.
    ``mask_input`` (P, 1, m, m) and ``has_mask`` (1,) are SAM's mask prompt (the previous result's logits,
    :meth:`~cxrsam.sam.transforms.SamTransform.mask_prompt`) and whether it is given (1) or not (0: zeros, and the
    prompt encoder's no-mask embedding), as in ``SamOnnxModel``.
``encoder-int8.onnx``
    made from ``encoder.onnx`` on first use of ``--precision int8`` by ONNX Runtime's dynamic quantisation of its
    matrix products (:data:`INT8_OPS`; int8 weights per output channel, activations quantised per call); its
    SHA-256, the settings and its agreement with the float32 encoder on the check phantom go in ``int8.json``. It is
    not held to the float32 limits: its cost is measured on real images by bench/precision.py (docs/benchmarks.md)
    and printed when it is chosen.

Both go in ``<cache>/onnx/<backend>-<key>/`` (:func:`export_dir`; ``<cache>`` = ``$CXRSAM_CACHE`` or
``~/.cache/cxrsam``), keyed by the backend, checkpoint SHA-256, model id (a LoRA run's adapter hash), input size,
opset, the graphs' version (:data:`GRAPHS`) and the cxrsam and torch versions. At export, PyTorch and ONNX Runtime
run on a seeded phantom (a batch of two) and box, point and box+point prompts (one with a mask prompt); the largest
embedding difference (relative to the largest embedding value) and the smallest mask IoU go in ``check.json`` with
the files' SHA-256 and the mask prompt's side, so a cached export serves a lazily loaded model
(:func:`~cxrsam.sam.registry.build_sam`'s ``lazy``) without ever building it in PyTorch. An export that disagrees
(:data:`MAX_EMBEDDING_DIFF`, :data:`MIN_MASK_IOU`) is refused in one line; a cached export whose files no longer
match their recorded SHA-256 is exported again.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from cxrsam.config import cpu_has_int8_dot_product
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, atomic_write_text, cache_home, sha256_file
from cxrsam.prompts import PromptSet
from cxrsam.sam.engine import Precision, PromptBatch, SamEngine, decode, encode, mask_side, prompt_batch
from cxrsam.sam.registry import BackendSpec, LoadedSam

log = logging.getLogger(__name__)
T = TypeVar("T")

OPSET = 17
MAX_EMBEDDING_DIFF = 1e-3
"""Largest accepted max |embedding difference| / max |PyTorch embedding| at export."""
MIN_MASK_IOU = 0.999
"""Smallest accepted IoU between PyTorch's and ONNX Runtime's masks (logits > 0) of one prompt set at export."""
ENCODER, DECODER, CHECK = "encoder.onnx", "decoder.onnx", "check.json"
ENCODER_INT8, CHECK_INT8 = "encoder-int8.onnx", "int8.json"
INT8_OPS = ("MatMul", "Gemm")
"""Operators the int8 encoder quantises (per output channel): the attention and MLP matrix products. Quantising
TinyViT's convolutions too cost 0.05 Dice (mask IoU vs fp32 0.74-0.92 on 4 test images; these alone: 0.995-0.998)."""


def int8_settings() -> dict[str, Any]:
    """How the int8 encoder is quantised on this CPU (recorded in ``int8.json``; a cached one made otherwise is
    quantised again): :data:`INT8_OPS` with int8 weights per output channel, 8-bit on a CPU with an int8
    dot-product instruction (VNNI or AMX) and 7-bit (``reduce_range``) on one without. There ONNX Runtime multiplies
    u8 activations by s8 weights with ``VPMADDUBSW``, whose int16 pair sums saturate with 8-bit weights
    (onnxruntime's quantisation docs, "When and why do I need to try U8U8?"): the tiny test model's int8 masks fell
    to IoU 0.87 against fp32 on an AVX2-only EPYC. With VNNI, 8-bit weights are closer to fp32 (30 test images:
    mask IoU 0.9971 against 0.9952 with 7-bit; docs/benchmarks.md, "int8 on a CPU with VNNI")."""
    return {"weight_type": "QInt8", "per_channel": True, "reduce_range": not cpu_has_int8_dot_product(),
            "op_types": list(INT8_OPS)}


INSTALL_HINT = "pip install 'cxrsam[onnx]'"
GRAPHS = 3
"""Version of the exported graphs and their record (2: the decoder takes a mask prompt; 3: ``check.json`` names the
mask prompt's side, so a cached export serves without the PyTorch model); part of the cache key."""


class Runtime(StrEnum):
    """What runs SAM: ``torch``, ``onnx`` (ONNX Runtime on CPU), or ``auto`` (onnx on CPU when installed)."""

    TORCH = "torch"
    ONNX = "onnx"
    AUTO = "auto"


def onnx_installed() -> bool:
    """Whether the ``onnx`` extra (``onnx`` for export, ``onnxruntime`` to run) is importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def resolve_runtime(runtime: Runtime | str, device: str | torch.device,
                    precision: Precision | str = Precision.FP32) -> Runtime:
    """The one runtime rule: ``auto`` -> ``onnx`` when the device is the CPU, the extra is installed and the
    precision is fp32 or int8 (bf16/fp16 autocast is PyTorch's), else ``torch``; ``onnx`` on another device, without
    the extra, or with bf16/fp16 is refused in one line (and int8 with ``torch`` by the engine)."""
    try:
        runtime = Runtime(runtime)
    except ValueError:
        raise CxrsamError(f"unknown runtime {str(runtime)!r} (use torch, onnx or auto)") from None
    try:
        precision = Precision(precision)
    except ValueError:
        raise CxrsamError(f"unknown precision {str(precision)!r} (use fp32, bf16, fp16 or int8)") from None
    cpu = torch.device(device).type == "cpu"
    onnx_precision = precision in (Precision.FP32, Precision.INT8)
    if runtime is Runtime.AUTO:
        return Runtime.ONNX if cpu and onnx_installed() and onnx_precision else Runtime.TORCH
    if runtime is Runtime.ONNX and not onnx_precision:
        raise CxrsamError(f"--precision {precision} runs in PyTorch autocast: pass --runtime torch (or auto)")
    if runtime is Runtime.ONNX and not cpu:
        raise CxrsamError(f"--runtime onnx runs SAM on the CPU, not {torch.device(device)}: pass --device cpu, "
                          "or --runtime torch")
    if runtime is Runtime.ONNX and not onnx_installed():
        raise CxrsamError(f"--runtime onnx needs onnx and onnxruntime: {INSTALL_HINT}")
    return runtime


def make_engine(loaded: LoadedSam, runtime: Runtime | str = Runtime.TORCH, **options: Any) -> SamEngine:
    """A :class:`~cxrsam.sam.engine.SamEngine` (``torch``) or :class:`OnnxSamEngine` for ``loaded`` by
    :func:`resolve_runtime`; ``options`` go to the engine (``cache_dir``, ``batch_size``, ...)."""
    if resolve_runtime(runtime, loaded.device, options.get("precision", Precision.FP32)) is Runtime.ONNX:
        return OnnxSamEngine(loaded, **options)
    return SamEngine(loaded, **options)


# ---------------------------------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """Folder of the exported models: ``$CXRSAM_CACHE/onnx``, else ``~/.cache/cxrsam/onnx``
    (:func:`~cxrsam.files.cache_home`)."""
    return cache_home() / "onnx"


def exporter_versions() -> dict[str, str]:
    """The package versions every export is keyed by: cxrsam's and torch's (the exporter; read from the installed
    package's metadata, without importing it)."""
    import cxrsam

    return {"cxrsam": cxrsam.__version__, "torch": version("torch")}


def export_key(loaded: LoadedSam, opset: int = OPSET) -> dict[str, Any]:
    """What an export depends on: weights (checkpoint SHA-256 and model id), input size, opset, graph and package
    versions (:func:`exporter_versions`)."""
    return {"backend": loaded.spec.name, "checkpoint_sha256": loaded.checkpoint_sha256, "model_id": loaded.model_id,
            "img_size": loaded.spec.img_size, "opset": opset, "graphs": GRAPHS, **exporter_versions()}


def export_dir(loaded: LoadedSam, opset: int = OPSET, root: str | Path | None = None) -> Path:
    """``<root>/<backend>-<first 16 hex of the SHA-256 of export_key>`` (root default :func:`cache_root`)."""
    digest = hashlib.sha256(json.dumps(export_key(loaded, opset), sort_keys=True).encode()).hexdigest()
    return Path(root or cache_root()) / f"{loaded.spec.name}-{digest[:16]}"


# ---------------------------------------------------------------------------------------------------- graphs
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


def decoder_inputs(batch: PromptBatch, side: int) -> dict[str, np.ndarray]:
    """A prompt group with B = 1 -> the prompt inputs of ``decoder.onnx``: ``coords``, ``labels``
    (:func:`point_tensors`), ``mask_input`` (P, 1, side, side) float32 and ``has_mask`` (1,) float32 (zeros and 0
    without a mask prompt)."""
    coords, labels = point_tensors(batch)
    if batch.masks is None:
        masks, has_mask = np.zeros((len(coords), 1, side, side), np.float32), np.zeros(1, np.float32)
    else:
        masks, has_mask = batch.masks[0].float().cpu().numpy(), np.ones(1, np.float32)
    return {"coords": coords, "labels": labels, "mask_input": masks, "has_mask": has_mask}


def point_tensors(batch: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
    """A prompt group with B = 1 -> (coords (P, N', 2) float32, labels (P, N') int64) for ``decoder.onnx``: the
    points, then each box as two corners labelled 2 and 3, or one padding point labelled -1 without a box."""
    parts, labels = [], []
    sets = (batch.boxes if batch.boxes is not None else batch.points).shape[1]
    if batch.points is not None:
        parts.append(batch.points[0].float().cpu().numpy())
        labels.append(batch.labels[0].cpu().numpy().astype(np.int64))
    if batch.boxes is not None:
        parts.append(batch.boxes[0].float().cpu().numpy().reshape(sets, 2, 2))
        labels.append(np.tile(np.array([[2, 3]], np.int64), (sets, 1)))
    else:
        parts.append(np.zeros((sets, 1, 2), np.float32))
        labels.append(np.full((sets, 1), -1, np.int64))
    return np.concatenate(parts, axis=1).astype(np.float32), np.concatenate(labels, axis=1)


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


# ---------------------------------------------------------------------------------------------------- runtime
def inference_session(path: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
    """A CPU session: all graph optimisations, torch's thread count (so the two never run more threads than the
    process asked for), one graph branch at a time, and no spinning waits when the process asks for passive ones
    (``OMP_WAIT_POLICY=PASSIVE``, cxrsam's default for shared CPUs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if passive else "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxSam:
    """The two ONNX Runtime sessions of one exported model and its ``check.json``."""

    encoder: Any
    decoder: Any
    folder: Path
    check: dict[str, Any]

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Embeddings (B, C, h, w) float32 of model input (B, 3, S, S) float32 (one image per call unless the
        check found the encoder's batch dynamic)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.check.get("dynamic_batch") or len(images) == 1:
            return self.encoder.run(None, {"image": images})[0]
        return np.concatenate([self.encoder.run(None, {"image": image[None]})[0] for image in images])

    def decode(self, embedding: np.ndarray, prompts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(logits (P, M, 4h, 4w), iou (P, M)) of an embedding (1, C, h, w) and :func:`decoder_inputs`."""
        logits, iou = self.decoder.run(None, {"embedding": np.ascontiguousarray(embedding, dtype=np.float32),
                                              **prompts})
        return logits, iou


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
    reference = encode(model, model_input)
    got = np.concatenate([onnx_sam.encoder.run(None, {"image": x[None]})[0] for x in model_input.numpy()])
    scale = float(reference.abs().max())
    diff = float(np.abs(got - reference.numpy()).max())
    import onnxruntime

    quiet = onnxruntime.RunOptions()
    quiet.log_severity_level = 4  # a refused batch size is an expected outcome here, not an error to print
    try:
        batched = onnx_sam.encoder.run(None, {"image": model_input.numpy()}, quiet)[0]
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


def load_checked(folder: Path, open_sessions: Callable[[dict[str, Any]], T]) -> T | None:
    """``open_sessions(check)`` for the export in ``folder`` whose ``check.json`` passed and whose files all still
    have their recorded SHA-256; None when it is absent, refused or altered, and (with a warning) when it is
    unreadable: the caller exports again. Shared by the SAM graphs and the CNN drafts
    (:mod:`cxrsam.baselines.onnx_cnn`)."""
    try:
        check = json.loads((folder / CHECK).read_text(encoding="utf-8"))
        if not check.get("passed") or any(sha256_file(folder / name) != digest
                                          for name, digest in check["files"].items()):
            return None
        return open_sessions(check)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry is exported again, never fatal
        log.warning("%s: unusable ONNX export (%s); exporting again", folder, str(exc).splitlines()[0] if str(exc)
                    else type(exc).__name__)
        return None


def record_check(folder: Path, check: dict[str, Any], files: Sequence[str], refusal: str) -> dict[str, Any]:
    """Write ``check`` with the ONNX Runtime version and the SHA-256 of ``files`` as ``folder``'s ``check.json``
    and return it; when it did not pass, remove ``files`` and raise :class:`CxrsamError` naming the ``check.json``:
    ``"<refusal>; use --runtime torch"``."""
    import onnxruntime

    check = {**check, "onnxruntime": onnxruntime.__version__,
             "files": {name: sha256_file(folder / name) for name in files}}
    atomic_write_text(folder / CHECK, json.dumps(check, indent=2) + "\n")
    if not check["passed"]:
        for name in files:
            (folder / name).unlink(missing_ok=True)
        raise CxrsamError(f"{refusal}; use --runtime torch", path=folder / CHECK)
    return check


def _cached(folder: Path) -> OnnxSam | None:
    """The sessions of a checked export in ``folder``, or None (:func:`load_checked`)."""
    return load_checked(folder, lambda check: OnnxSam(inference_session(folder / ENCODER),
                                                      inference_session(folder / DECODER), folder, check))


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
    reference = encode(model, model_input).numpy()
    got = inference_session(folder / ENCODER_INT8).run(None, {"image": model_input.numpy()})[0]
    scale = float(np.abs(reference).max())
    record = {"relative_embedding_diff": float(np.abs(got - reference).max()) / max(scale, 1e-12),
              **settings, "onnxruntime": onnxruntime.__version__,
              "files": {ENCODER_INT8: sha256_file(folder / ENCODER_INT8)}}
    atomic_write_text(folder / CHECK_INT8, json.dumps(record, indent=2) + "\n")
    return record


def _cached_int8(folder: Path) -> Any | None:  # noqa: ANN401 - onnxruntime.InferenceSession
    """The int8 encoder session of ``folder`` if ``int8.json`` vouches for its file and settings, else None."""
    try:
        record = json.loads((folder / CHECK_INT8).read_text(encoding="utf-8"))
        if any(record.get(name) != value for name, value in int8_settings().items()):
            return None  # quantised otherwise (an earlier version's settings, or another kind of CPU's)
        if any(sha256_file(folder / name) != digest for name, digest in record["files"].items()):
            return None
        return inference_session(folder / ENCODER_INT8)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry is quantised again, never fatal
        log.warning("%s: unusable int8 encoder (%s); quantising again", folder, type(exc).__name__)
        return None


def load_onnx_sam(loaded: LoadedSam, root: str | Path | None = None, opset: int = OPSET,
                  precision: Precision | str = Precision.FP32) -> OnnxSam:
    """The checked ONNX export of ``loaded`` from the cache (:func:`export_dir`), exported on first use; with
    ``precision`` int8 its encoder is the quantised one (:func:`quantize_encoder`, made once and cached)."""
    if not onnx_installed():
        raise CxrsamError(f"ONNX Runtime needs onnx and onnxruntime: {INSTALL_HINT}")
    folder = export_dir(loaded, opset, root)
    onnx_sam = _cached(folder) or export_checked(loaded, folder, opset)
    if Precision(precision) is Precision.INT8:
        encoder = _cached_int8(folder)
        if encoder is None:
            from cxrsam.sam.lora import merge

            log.info("quantising the encoder of %s to int8 in %s", loaded.model_id, folder)
            quantize_encoder(folder, merge(copy.deepcopy(loaded.model)).cpu().eval(), loaded.spec)
            encoder = inference_session(folder / ENCODER_INT8)
        onnx_sam.encoder = encoder
    return onnx_sam


class OnnxSamEngine(SamEngine):
    """:class:`~cxrsam.sam.engine.SamEngine` whose encoder and prompt decoder run in ONNX Runtime on the CPU.

    Same API, caches and transforms; the embedding cache key also names the runtime (its embeddings differ from
    PyTorch's by float rounding). ``onnx_root`` overrides :func:`cache_root`; ``precision``: fp32 or int8.
    """

    runtime = Runtime.ONNX

    def __init__(self, loaded: LoadedSam, cache_dir: str | Path | None = None, model_id: str | None = None,
                 batch_size: int | None = None, memory_items: int = 256, threshold: float = 0.0,
                 onnx_root: str | Path | None = None, precision: Precision | str = Precision.FP32):
        if torch.device(loaded.device).type != "cpu":
            raise CxrsamError(f"--runtime onnx runs SAM on the CPU, not {loaded.device}: pass --device cpu, "
                              "or --runtime torch")
        super().__init__(loaded, cache_dir=cache_dir, model_id=model_id, batch_size=batch_size,
                         memory_items=memory_items, threshold=threshold, precision=precision)
        self.onnx = load_onnx_sam(loaded, onnx_root, precision=self.precision)

    @staticmethod
    def _check_precision(precision: Precision | str, device: str | torch.device) -> Precision:
        resolve_runtime(Runtime.ONNX, device, precision)  # bf16/fp16 are refused in one line
        return Precision(precision)

    @property
    def prompt_mask_side(self) -> int:
        return int(self.onnx.check["mask_side"])

    def cache_key(self, pixels: np.ndarray) -> str:
        return hashlib.sha256(f"onnx|{super().cache_key(pixels)}".encode()).hexdigest()

    def _encode(self, model_input: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.onnx.encode(model_input.cpu().numpy()))

    def _decode(self, embedding: torch.Tensor, batch: PromptBatch, multimask: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, iou = self.onnx.decode(embedding.cpu().numpy(), decoder_inputs(batch, self.prompt_mask_side))
        chosen = slice(1, None) if multimask else slice(0, 1)  # MaskDecoder.forward's choice
        return torch.from_numpy(logits[:, chosen])[None], torch.from_numpy(iou[:, chosen])[None]
