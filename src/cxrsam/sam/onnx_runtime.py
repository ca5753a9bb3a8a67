"""ONNX Runtime for SAM on the CPU: which runtime runs SAM (:func:`resolve_runtime`), and the engine that serves a
model's checked, cached ONNX export (:class:`OnnxSamEngine`; the graphs and cache in :mod:`cxrsam.sam.onnx_cache`),
exporting it on first use (:mod:`cxrsam.sam.onnx_export`, the one step that imports PyTorch)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from cxrsam.config import device_type
from cxrsam.errors import CxrsamError
from cxrsam.sam.engine import Precision, PromptBatch, SamEngine
from cxrsam.sam.onnx_cache import (
    ENCODER_INT8,
    INSTALL_HINT,
    OPSET,
    OnnxSam,
    cached_export,
    cached_int8_encoder,
    decoder_inputs,
    export_dir,
    inference_session,
    onnx_installed,
)
from cxrsam.sam.registry import LoadedSam

log = logging.getLogger(__name__)


class Runtime(StrEnum):
    """What runs SAM: ``torch``, ``onnx`` (ONNX Runtime on CPU), or ``auto`` (onnx on CPU when installed)."""

    TORCH = "torch"
    ONNX = "onnx"
    AUTO = "auto"


def resolve_runtime(runtime: Runtime | str, device: str,
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
    cpu = device_type(device) == "cpu"
    onnx_precision = precision in (Precision.FP32, Precision.INT8)
    if runtime is Runtime.AUTO:
        return Runtime.ONNX if cpu and onnx_installed() and onnx_precision else Runtime.TORCH
    if runtime is Runtime.ONNX and not onnx_precision:
        raise CxrsamError(f"--precision {precision} runs in PyTorch autocast: pass --runtime torch (or auto)")
    if runtime is Runtime.ONNX and not cpu:
        raise CxrsamError(f"--runtime onnx runs SAM on the CPU, not {device}: pass --device cpu, "
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


def load_onnx_sam(loaded: LoadedSam, root: str | Path | None = None, opset: int = OPSET,
                  precision: Precision | str = Precision.FP32) -> OnnxSam:
    """The checked ONNX export of ``loaded`` from the cache (:func:`export_dir`), exported on first use
    (:func:`~cxrsam.sam.onnx_export.export_checked`, the one step that imports PyTorch); with ``precision`` int8 its
    encoder is the quantised one (:func:`~cxrsam.sam.onnx_export.quantize_encoder`, made once and cached)."""
    if not onnx_installed():
        raise CxrsamError(f"ONNX Runtime needs onnx and onnxruntime: {INSTALL_HINT}")
    folder = export_dir(loaded, opset, root)
    onnx_sam = cached_export(folder)
    if onnx_sam is None:
        from cxrsam.sam.onnx_export import export_checked

        onnx_sam = export_checked(loaded, folder, opset)
    if Precision(precision) is Precision.INT8:
        encoder = cached_int8_encoder(folder)
        if encoder is None:
            import copy

            from cxrsam.sam.lora import merge
            from cxrsam.sam.onnx_export import quantize_encoder

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
        if device_type(loaded.device) != "cpu":
            raise CxrsamError(f"--runtime onnx runs SAM on the CPU, not {loaded.device}: pass --device cpu, "
                              "or --runtime torch")
        super().__init__(loaded, cache_dir=cache_dir, model_id=model_id, batch_size=batch_size,
                         memory_items=memory_items, threshold=threshold, precision=precision)
        self.onnx = load_onnx_sam(loaded, onnx_root, precision=self.precision)

    @staticmethod
    def _check_precision(precision: Precision | str, device: str) -> Precision:
        resolve_runtime(Runtime.ONNX, device, precision)  # bf16/fp16 are refused in one line
        return Precision(precision)

    @property
    def prompt_mask_side(self) -> int:
        return int(self.onnx.check["mask_side"])

    def cache_key(self, pixels: np.ndarray) -> str:
        return hashlib.sha256(f"onnx|{super().cache_key(pixels)}".encode()).hexdigest()

    def _model_input(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        return self.loaded.spec.transform.images(pixels)  # the transform's NumPy arithmetic: no PyTorch

    def _encode(self, model_input: np.ndarray) -> np.ndarray:
        return self.onnx.encode(model_input)

    def _decode(self, embedding: np.ndarray, batch: PromptBatch, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        logits, iou = self.onnx.decode(embedding, decoder_inputs(batch, self.prompt_mask_side))
        chosen = slice(1, None) if multimask else slice(0, 1)  # MaskDecoder.forward's choice
        return logits[:, chosen][None], iou[:, chosen][None]
