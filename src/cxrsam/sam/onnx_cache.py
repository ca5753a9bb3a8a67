"""The ONNX exports of SAM on disk: their graphs, cache folders and check records, and ONNX Runtime sessions.

Two graphs are exported from the (LoRA-merged) model, with the legacy TorchScript exporter:

``encoder.onnx``
    ``image`` (B, 3, S, S) float32 model input (:meth:`~cxrsam.sam.transforms.SamTransform.images`) ->
    ``embedding`` (B, C, h, w). B is declared dynamic, but an encoder that takes its batch size as a Python
    number (TinyViT's ``len(x)``) is traced with B = 1 baked in: the export check tries B = 2 and records
    ``dynamic_batch``; without it images are encoded one per call. segment_anything's ViTs (ViT-B/L/H) are exported
    with the same values but their global attention computed a few query rows at a time
    (:class:`~cxrsam.sam.onnx_export.ViTEncoderGraph`: ViT-B's working memory at 1024 px is 8.5x smaller).
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
(``MAX_EMBEDDING_DIFF``, ``MIN_MASK_IOU``) is refused in one line; a cached export whose files no longer match their
recorded SHA-256 is exported again.

This module and the engine that serves the graphs (:mod:`cxrsam.sam.onnx_runtime`) need NumPy and ONNX Runtime
alone; exporting, checking and quantising them (:mod:`cxrsam.sam.onnx_export`) is the one part that imports PyTorch,
and only when the cache lacks them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cxrsam.config import cpu_has_int8_dot_product
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, atomic_write_text, cache_home, sha256_file
from cxrsam.sam.engine import PromptBatch
from cxrsam.sam.registry import LoadedSam

log = logging.getLogger(__name__)
T = TypeVar("T")

OPSET = 17
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
GRAPHS = 4
"""Version of the exported graphs and their record (2: the decoder takes a mask prompt; 3: ``check.json`` names the
mask prompt's side, so a cached export serves without the PyTorch model; 4: a ViT encoder computes its global
attention in steps, :class:`~cxrsam.sam.onnx_export.ViTEncoderGraph`); part of the cache key."""


def onnx_installed() -> bool:
    """Whether the ``onnx`` extra (``onnx`` for export, ``onnxruntime`` to run) is importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


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
def decoder_inputs(batch: PromptBatch, side: int) -> dict[str, np.ndarray]:
    """A prompt group with B = 1 -> the prompt inputs of ``decoder.onnx``: ``coords``, ``labels``
    (:func:`point_tensors`), ``mask_input`` (P, 1, side, side) float32 and ``has_mask`` (1,) float32 (zeros and 0
    without a mask prompt)."""
    coords, labels = point_tensors(batch)
    if batch.masks is None:
        masks, has_mask = np.zeros((len(coords), 1, side, side), np.float32), np.zeros(1, np.float32)
    else:
        masks, has_mask = np.asarray(batch.masks[0], np.float32), np.ones(1, np.float32)
    return {"coords": coords, "labels": labels, "mask_input": masks, "has_mask": has_mask}


def point_tensors(batch: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
    """A prompt group with B = 1 -> (coords (P, N', 2) float32, labels (P, N') int64) for ``decoder.onnx``: the
    points, then each box as two corners labelled 2 and 3, or one padding point labelled -1 without a box."""
    parts, labels = [], []
    sets = (batch.boxes if batch.boxes is not None else batch.points).shape[1]
    if batch.points is not None:
        parts.append(np.asarray(batch.points[0], np.float32))
        labels.append(np.asarray(batch.labels[0], np.int64))
    if batch.boxes is not None:
        parts.append(np.asarray(batch.boxes[0], np.float32).reshape(sets, 2, 2))
        labels.append(np.tile(np.array([[2, 3]], np.int64), (sets, 1)))
    else:
        parts.append(np.zeros((sets, 1, 2), np.float32))
        labels.append(np.full((sets, 1), -1, np.int64))
    return np.concatenate(parts, axis=1).astype(np.float32), np.concatenate(labels, axis=1)


# ---------------------------------------------------------------------------------------------------- runtime
def session_threads() -> int:
    """Threads of an ONNX Runtime session: PyTorch's count once PyTorch is imported (so the two never run more
    threads than the process asked for), else ``OMP_NUM_THREADS``, else 0: ONNX Runtime's default, one per physical
    core, which is PyTorch's default too."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def optimization_key() -> str:
    """What a graph optimised by ONNX Runtime depends on besides its source: the onnxruntime version and this CPU
    (its architecture and feature flags: the layout transformer writes kernels for the CPU it runs on), as 12 hex."""
    import platform

    import onnxruntime

    from cxrsam.config import cpu_flags

    machine = f"{onnxruntime.__version__}|{platform.machine()}|{' '.join(sorted(cpu_flags()))}"
    return hashlib.sha256(machine.encode()).hexdigest()[:12]


def inference_session(path: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
    """A CPU session of the graph at ``path``: all graph optimisations, :func:`session_threads`, one graph branch at a
    time, and no spinning waits when the process asks for passive ones (``OMP_WAIT_POLICY=PASSIVE``, cxrsam's default
    for shared CPUs).

    The optimised graph is kept beside the source (ONNX Runtime's offline mode: ``optimized_model_filepath``) as
    ``<stem>-<optimization_key>.onnx``, with ``.json`` holding the SHA-256 of it and of its source; later sessions load
    it with optimisation off, which halves their set-up (LiteMedSAM's three sessions: 0.76 s -> 0.4 s on 2 cores). An
    optimised file whose source or own SHA-256 no longer matches, or that ONNX Runtime refuses, is made again."""
    import onnxruntime as ort

    def options(level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
        made = ort.SessionOptions()
        made.graph_optimization_level = level
        made.intra_op_num_threads = session_threads()
        made.inter_op_num_threads = 1
        passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
        made.add_session_config_entry("session.intra_op.allow_spinning", "0" if passive else "1")
        made.log_severity_level = 3  # not the notice that an optimised graph is for this CPU only: it is keyed so
        return made

    path = Path(path)
    optimized = path.with_name(f"{path.stem}-{optimization_key()}.onnx")
    record = optimized.with_suffix(".json")
    source = sha256_file(path)
    try:
        kept = json.loads(record.read_text(encoding="utf-8"))
        if kept["source"] == source and kept["sha256"] == sha256_file(optimized):
            return ort.InferenceSession(str(optimized), options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                        providers=["CPUExecutionProvider"])
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - a damaged optimised graph is made again, never fatal
        log.warning("%s: unusable optimised graph (%s); optimising again", optimized, type(exc).__name__)
    optimizing = options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    try:
        with atomic_path(optimized) as tmp:
            optimizing.optimized_model_filepath = str(tmp)
            session = ort.InferenceSession(str(path), optimizing, providers=["CPUExecutionProvider"])
        atomic_write_text(record, json.dumps({"source": source, "sha256": sha256_file(optimized),
                                              "onnxruntime": ort.__version__}, indent=2) + "\n")
        return session
    except Exception as exc:  # noqa: BLE001 - a read-only cache, a graph too large to save: optimise each time
        log.info("%s: optimised graph not kept (%s)", path, str(exc).splitlines()[0] if str(exc) else exc)
        return ort.InferenceSession(str(path), options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                                    providers=["CPUExecutionProvider"])


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


def cached_export(folder: Path) -> OnnxSam | None:
    """The sessions of a checked export in ``folder``, or None (:func:`load_checked`)."""
    return load_checked(folder, lambda check: OnnxSam(inference_session(folder / ENCODER),
                                                      inference_session(folder / DECODER), folder, check))


def cached_int8_encoder(folder: Path) -> Any | None:  # noqa: ANN401 - onnxruntime.InferenceSession
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
