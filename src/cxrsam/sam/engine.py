"""The one place that runs SAM: encoding, prompt decoding and the inference engine.

Images, prompts and logits cross between the original image and the model input through the backend's
:class:`~cxrsam.sam.transforms.SamTransform` (``loaded.spec.transform``), never here by hand.
:func:`decode` is differentiable and free of ``inference_mode``, so a trainer can call
``model.image_encoder(spec.transform.images(...))`` and :func:`decode` with gradients; :func:`encode` is the
inference-only encoder call. :class:`SamEngine` adds embedding caches and the per-image prompt bookkeeping.

The engine works on NumPy arrays (embeddings, prompt batches, logits) and takes logits to the image with the
transform's NumPy arithmetic, for every runtime; only a runtime's model input and two model calls
(:meth:`SamEngine._model_input`, :meth:`SamEngine._encode`, :meth:`SamEngine._decode`) see its own tensors (PyTorch's
on the model's device, ONNX Runtime's NumPy). So this module imports PyTorch only when the PyTorch runtime runs, and
ONNX Runtime (:mod:`cxrsam.sam.onnx_runtime`) serves without it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrsam.config import cpu_has_int8_dot_product, device_type, keep_freed_memory
from cxrsam.data.io import XRay
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path
from cxrsam.prompts import Prompts, PromptSet, add_points, with_previous
from cxrsam.sam.registry import BackendSpec, LoadedSam

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"cpu": 1}
"""Default images per encoder call by device type (others: 4). On CPU one image per call is fastest
per image: batching LiteMedSAM's TinyViT 2-8 images made each image 6-77 % slower on a 2-core
EPYC (its memory-bound attention stages; docs/benchmarks.md, "Why batching was slower")."""


class Precision(StrEnum):
    """Arithmetic of the image encoder (the prompt decoder always runs in float32).

    ``fp32``: the reference. ``bf16``: PyTorch autocast to bfloat16 (a GPU, or a CPU with AVX512-BF16/AMX).
    ``fp16``: autocast to float16 (GPU only). ``int8``: the ONNX encoder with dynamically quantised int8 weights
    (ONNX Runtime on the CPU). The measured cost of each is in docs/benchmarks.md ("Reduced precision").
    """

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"


PRECISION_COSTS = Path(__file__).with_name("precision_costs.json")
"""Measured cost of each reduced precision, written by bench/precision.py (docs/benchmarks.md, "Reduced precision")."""


def precision_cost_key(precision: Precision | str, device: str | torch.device = "cpu") -> str:
    """The key of ``precision`` on this kind of machine in :data:`PRECISION_COSTS` (a measurement holds only for the
    kind of machine it was made on): ``bf16`` for the CPU; ``int8`` for a CPU without an int8 dot-product
    instruction and ``int8:vnni`` for one with it (:func:`~cxrsam.config.cpu_has_int8_dot_product`: their int8
    kernels differ); ``cuda:bf16`` or ``cuda:fp16`` for a GPU."""
    kind = device_type(device)
    precision = Precision(precision)
    if kind != "cpu":
        return f"{kind}:{precision}"
    return f"{precision}:vnni" if precision is Precision.INT8 and cpu_has_int8_dot_product() else str(precision)


def precision_cost(precision: Precision | str, device: str | torch.device = "cpu") -> str | None:
    """One line with the stored measurement of ``precision`` against fp32 on ``device``'s kind of machine (Dice
    change, mask IoU, encoder speed-up, data and command), a line saying it is unmeasured there, or None for fp32."""
    import json

    precision = Precision(precision)
    if precision is Precision.FP32:
        return None
    kind = device_type(device)
    key = precision_cost_key(precision, device)
    try:
        measured = json.loads(PRECISION_COSTS.read_text(encoding="utf-8"))[key]
    except (OSError, ValueError, KeyError):
        machine = kind.upper() + (" with VNNI" if key.endswith(":vnni") else "")
        return (f"{precision} has no stored measurement against fp32 on a {machine} (run bench/precision.py "
                f"--device {kind} --store); check its masks")
    return (f"{precision} vs fp32 on {measured['images']} {measured['data']}: Dice {measured['dice_change']:+.4f} "
            f"(mean; fp32 {measured['dice_fp32']:.4f}), mask IoU vs fp32 mean {measured['iou_mean']:.4f}, min "
            f"{measured['iou_min']:.4f}; encoder {measured['encoder_speedup']:.2f}x PyTorch fp32's speed "
            f"({measured['machine']}); "
            f"`{measured['command']}`")


def autocast_dtype(precision: Precision) -> torch.dtype:
    """The dtype PyTorch's autocast runs the encoder in for a reduced ``precision`` (bf16 or fp16)."""
    import torch

    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[precision]


def check_reduced_embeddings(reduced: np.ndarray, reference: np.ndarray, precision: Precision) -> float:
    """The reduced-precision embeddings (B, C, h, w) against fp32's of the same input: the largest absolute
    difference relative to the largest fp32 value (LiteMedSAM in bf16 on a CPU: about 0.06, with Dice -0.0001).
    Raises :class:`CxrsamError` in one line when the reduced ones are not finite (fp16 overflows above 65504: the
    masks would silently be empty) while fp32's are."""
    if not np.isfinite(reduced).all() and np.isfinite(reference).all():
        raise CxrsamError(f"--precision {precision}: the image encoder's output is not finite in {precision} "
                          f"({'values overflow float16' if precision is Precision.FP16 else 'overflow'}) while fp32's "
                          f"is; use {'bf16 or ' if precision is Precision.FP16 else ''}fp32 for this model")
    return float(np.abs(reduced - reference).max() / max(float(np.abs(reference).max()), 1e-12))


def check_torch_precision(precision: Precision | str, device: str | torch.device) -> Precision:
    """``precision`` if PyTorch can run the encoder in it on ``device``, else :class:`CxrsamError` in one line
    (int8 is ONNX Runtime's, fp16 needs a GPU, bf16 on a CPU needs AVX512-BF16 or AMX)."""
    try:
        precision = Precision(precision)
    except ValueError:
        raise CxrsamError(f"unknown precision {str(precision)!r} (use fp32, bf16, fp16 or int8)") from None
    cpu = device_type(device) == "cpu"
    if precision is Precision.INT8:
        raise CxrsamError("--precision int8 runs in ONNX Runtime on the CPU: pass --runtime onnx (or auto) and "
                          "--device cpu")
    if precision is Precision.FP16 and cpu:
        raise CxrsamError("--precision fp16 needs a GPU; on the CPU use bf16 or int8")
    if precision is Precision.BF16 and cpu and not _cpu_runs_bf16():
        raise CxrsamError("--precision bf16 on the CPU needs AVX512-BF16 or AMX, which this CPU lacks; use int8 "
                          "(--runtime onnx) or fp32")
    return precision


def _cpu_runs_bf16() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


ImageLike = XRay | np.ndarray
"""An :class:`~cxrsam.data.io.XRay` or its pixels: float (H, W) in [0, 1]."""


@dataclass
class PromptBatch:
    """Prompts of B images with P prompt sets each, in model-input coordinates: NumPy arrays from
    :func:`prompt_batch` (float32; labels int64), or tensors; :func:`decode` takes either.

    Attributes:
        boxes: (B, P, 4) ``x0, y0, x1, y1``, or None.
        points: (B, P, N, 2) ``x, y``, or None; pad shorter sets with label -1 (SAM's "not a point").
        labels: (B, P, N) 1 = lung, 0 = background, -1 = padding; None exactly when points is None.
        masks: (B, P, 1, m, m) previous results' logits as SAM's mask prompt (m: the prompt encoder's
            ``mask_input_size``; :meth:`~cxrsam.sam.transforms.SamTransform.mask_prompt`), or None.
    """

    boxes: np.ndarray | torch.Tensor | None = None
    points: np.ndarray | torch.Tensor | None = None
    labels: np.ndarray | torch.Tensor | None = None
    masks: np.ndarray | torch.Tensor | None = None


def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings (B, C, h, w) of preprocessed images (B, 3, S, S), without autograd.

    Runs under ``torch.inference_mode``; the result is returned as an ordinary tensor (usable as
    input to a differentiable :func:`decode` when training only the decoder).
    """
    import torch

    with torch.inference_mode():
        embeddings = model.image_encoder(images)
    return embeddings.clone()


def decode(model: nn.Module, embeddings: torch.Tensor, prompts: PromptBatch,
           multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode prompt sets against image embeddings (differentiable).

    Args:
        model: a SAM-like module (``.prompt_encoder``, ``.mask_decoder``).
        embeddings: (B, C, h, w) from the image encoder.
        prompts: :class:`PromptBatch` with B images x P sets, in model-input coordinates (arrays are put on the
            embeddings' device).
        multimask: return SAM's 3 candidate masks per set instead of its single-mask output.

    Returns:
        (logits (B, P, M, h', w'), iou (B, P, M)) with M = 3 if ``multimask`` else 1: low-res mask
        logits over the padded model input (h' = w' = 4 h) and SAM's predicted IoU.
    """
    import torch

    if prompts.boxes is None and prompts.points is None:
        raise ValueError("a prompt batch needs boxes or points")

    def on_device(x: np.ndarray | torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if x is None else torch.as_tensor(x, dtype=dtype, device=embeddings.device)

    prompts = PromptBatch(on_device(prompts.boxes, torch.float32), on_device(prompts.points, torch.float32),
                          on_device(prompts.labels, torch.int64), on_device(prompts.masks, torch.float32))
    dense_pe = model.prompt_encoder.get_dense_pe()
    logits, ious = [], []
    for b in range(embeddings.shape[0]):  # segment_anything's decoder takes one image per call
        points = None if prompts.points is None else (prompts.points[b], prompts.labels[b])
        boxes = None if prompts.boxes is None else prompts.boxes[b]
        masks = None if prompts.masks is None else prompts.masks[b]
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low_res, iou = model.mask_decoder(image_embeddings=embeddings[b:b + 1], image_pe=dense_pe,
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=multimask)
        logits.append(low_res)
        ious.append(iou)
    return torch.stack(logits), torch.stack(ious)


def select_best(logits: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Pick, per prompt set, the candidate with the highest predicted IoU: (B, P, M, h, w) -> (B, P, h, w)."""
    return np.take_along_axis(logits, iou.argmax(axis=-1)[..., None, None, None], axis=2)[:, :, 0]


def mask_side(model: nn.Module) -> int:
    """Side m of the mask prompt ``model``'s prompt encoder takes (its ``mask_input_size``: 4x the embedding grid)."""
    return int(model.prompt_encoder.mask_input_size[0])


def prompt_batch(spec: BackendSpec, sets: Sequence[PromptSet], size: tuple[int, int],
                 side: int | None = None) -> PromptBatch:
    """One image's prompt sets (original pixels) -> a :class:`PromptBatch` of NumPy arrays with B = 1,
    P = len(sets).

    All sets must have the same :attr:`~cxrsam.prompts.PromptSet.signature` (box or not, number of
    points, previous logits or not); the engine groups sets that way. Sets with logits need ``side``
    (:func:`mask_side` of the model).
    """
    if len({s.signature for s in sets}) != 1:
        raise ValueError("prompt sets of one batch must all have a box or not, the same number of points and "
                         "logits or not")

    batch = PromptBatch()
    if sets[0].box is not None:
        batch.boxes = spec.transform.boxes(np.stack([s.box for s in sets]), size).astype(np.float32)[None]
    if sets[0].points is not None:
        batch.points = spec.transform.coords(np.stack([s.points for s in sets]), size).astype(np.float32)[None]
        batch.labels = np.stack([s.labels for s in sets]).astype(np.int64)[None]
    if sets[0].logits is not None:
        if side is None:
            raise ValueError("prompt sets with logits need the model's mask prompt side")
        batch.masks = spec.transform.mask_prompt(np.stack([s.logits for s in sets]).astype(np.float32), size,
                                                 side)[None]
    return batch


def _pixels(image: ImageLike) -> np.ndarray:
    pixels = image.pixels if isinstance(image, XRay) else np.asarray(image)
    if pixels.ndim != 2:
        raise ValueError(f"expected a gray image (H, W), got shape {pixels.shape}")
    return np.ascontiguousarray(pixels, dtype=np.float32)


class SamEngine:
    """Zero-shot SAM inference with cached image embeddings, run by PyTorch (:class:`SamEngine`) or another
    runtime (a subclass overriding :meth:`_encode` and :meth:`_decode`).

    Each image is encoded once (in batches of ``batch_size``); its embedding is kept in an LRU
    memory cache of ``memory_items`` entries and, with ``cache_dir``, in ``<cache_dir>/<key>.npz``.
    The key is the SHA-256 of ``model_id``, the backend's input size and normalisation, and the
    image's shape and float32 pixel bytes, so re-prompting an image never re-encodes it, and
    different weights never share embeddings. Embeddings, prompt batches and logits are NumPy arrays.

    Args:
        loaded: from :func:`~cxrsam.sam.registry.build_sam`.
        cache_dir: folder for on-disk embeddings, or None for memory only.
        model_id: identity of the weights; default ``loaded.model_id`` (backend + checkpoint hash).
            A fine-tuned (e.g. LoRA) model that is not saved to a file must pass its own id.
        batch_size: images per encoder call; None: :data:`DEFAULT_BATCH` for the model's device.
        memory_items: embeddings kept in memory.
        threshold: logit threshold of the final masks (0 = probability 0.5).
        precision: the encoder's arithmetic (:class:`Precision`; checked by :func:`check_torch_precision`); a reduced
            one encodes its first batch in fp32 too (:func:`check_reduced_embeddings`, :attr:`precision_check`).

    PyTorch on a CPU: the process then keeps freed memory for reuse (:func:`cxrsam.config.keep_freed_memory`;
    ``cxrsam predict --runtime torch`` 1.52x the images per second on 2 cores, 1.2x the peak memory).
    """

    runtime = "torch"
    """What runs the model (a subclass: ``onnx``)."""

    def __init__(self, loaded: LoadedSam, cache_dir: str | Path | None = None, model_id: str | None = None,
                 batch_size: int | None = None, memory_items: int = 256, threshold: float = 0.0,
                 precision: Precision | str = Precision.FP32):
        self.precision = self._check_precision(precision, loaded.device)
        self.loaded = loaded
        self.model_id = model_id or loaded.model_id
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if batch_size is None:
            batch_size = DEFAULT_BATCH.get(device_type(loaded.device), 4)
        self.batch_size = max(1, batch_size)
        self.memory_items = memory_items
        self.threshold = threshold
        self.images_encoded = 0
        self.precision_check: float | None = None
        """:func:`check_reduced_embeddings` of the first batch a reduced-precision PyTorch encoder ran; None before."""
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        if self.runtime == "torch" and device_type(loaded.device) == "cpu":
            keep_freed_memory()  # PyTorch's large activations reuse the heap's pages (ONNX Runtime has its arena)

    @staticmethod
    def _check_precision(precision: Precision | str, device: str | torch.device) -> Precision:
        """The precision this runtime accepts on ``device`` (one-line error otherwise)."""
        return check_torch_precision(precision, device)

    @property
    def prompt_mask_side(self) -> int:
        """Side m of the mask prompt the model takes (:func:`mask_side`; a runtime may know it without the model)."""
        return mask_side(self.loaded.model)

    def cache_key(self, pixels: np.ndarray) -> str:
        """Embedding key of float32 pixels (H, W) for this engine's weights, preprocessing and (other than fp32)
        precision."""
        spec = self.loaded.spec
        precision = "" if self.precision is Precision.FP32 else f"|{self.precision}"
        digest = hashlib.sha256(
            f"{self.model_id}|{spec.img_size}|{spec.normalisation}|{pixels.shape}{precision}".encode())
        digest.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def _remember(self, key: str, embedding: np.ndarray) -> None:
        self._memory[key] = embedding
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def _from_disk(self, key: str) -> np.ndarray | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["key"]) != key:
                    raise ValueError("key mismatch")
                return stored["embedding"]
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is recomputed, never fatal
            log.warning("%s: unusable cached embedding (%s); recomputing", path, exc)
            return None

    def _to_disk(self, key: str, embedding: np.ndarray) -> None:
        if self.cache_dir is not None:
            with atomic_path(self.cache_dir / f"{key}.npz") as tmp, open(tmp, "wb") as file:
                np.savez(file, key=np.array(key), model_id=np.array(self.model_id), embedding=embedding)

    def _model_input(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """Model input (B, 3, S, S) of images float32 (H, W) where the encoder runs: the transform's PyTorch
        arithmetic on the model's device, from page-locked copies on a GPU (a runtime overrides it)."""
        import torch

        cuda = device_type(self.loaded.device) == "cuda"
        tensors = [torch.from_numpy(p) for p in pixels]
        tensors = [(t.pin_memory() if cuda else t).to(self.loaded.device, non_blocking=cuda) for t in tensors]
        return self.loaded.spec.transform.images(tensors)

    def _encode(self, model_input: torch.Tensor | np.ndarray) -> np.ndarray:
        """Embeddings (B, C, h, w) float32 of model input (B, 3, S, S) (:meth:`_model_input`); the one encoder call, in
        PyTorch on the model's device, under autocast for bf16/fp16 (a runtime overrides it)."""
        import torch

        x = torch.as_tensor(model_input).to(self.loaded.device)
        if self.precision is Precision.FP32:
            return encode(self.loaded.model, x).cpu().numpy()
        with torch.autocast(device_type(self.loaded.device), dtype=autocast_dtype(self.precision)):
            reduced = encode(self.loaded.model, x).float().cpu().numpy()
        if self.precision_check is None:  # the first batch once more in fp32: the check against the reference
            self.precision_check = check_reduced_embeddings(reduced, encode(self.loaded.model, x).cpu().numpy(),
                                                            self.precision)
            log.info("%s encoder vs fp32 on the first batch: largest embedding difference %.3g of the largest value",
                     self.precision, self.precision_check)
        return reduced

    def _decode(self, embedding: np.ndarray, batch: PromptBatch, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """(logits (1, P, M, h', w'), iou (1, P, M)) float32 of one image's embedding (1, C, h, w) and a prompt group
        (B = 1); the one decoder call, in PyTorch (a runtime overrides it)."""
        import torch

        with torch.inference_mode():
            logits, iou = decode(self.loaded.model, torch.from_numpy(embedding).to(self.loaded.device), batch,
                                 multimask)
            return logits.float().cpu().numpy(), iou.float().cpu().numpy()

    def embed(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """Embeddings float32 (C, h, w) of ``images``, encoding only those not cached."""
        pixels = [_pixels(image) for image in images]
        keys = [self.cache_key(p) for p in pixels]
        found: dict[str, np.ndarray] = {}
        for key in keys:
            if key in self._memory:
                self._memory.move_to_end(key)
                found[key] = self._memory[key]
            elif (cached := self._from_disk(key)) is not None:
                found[key] = cached
                self._remember(key, cached)
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in found:
                first_index.setdefault(key, i)
        todo = list(first_index.values())
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            embeddings = self._encode(self._model_input([pixels[i] for i in chunk]))
            self.images_encoded += len(chunk)
            for i, embedding in zip(chunk, embeddings):
                found[keys[i]] = embedding
                self._remember(keys[i], embedding)
                self._to_disk(keys[i], embedding)
        return [found[key] for key in keys]

    def _decode_low_res(self, embedding: np.ndarray, prompts: Prompts, multimask: bool,
                        previous: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-set low-res logits float32 (P, h', w') over the padded model input and SAM's predicted IoU (P,) of
        each kept mask, for one image's embedding (C, h, w). Sets with the same signature are decoded in one call;
        with ``multimask`` each set keeps the candidate with the highest predicted IoU. ``previous`` (P, h', w'):
        each set's previous low-res result as its mask prompt (replacing the sets' own logits), as SAM's interactive
        loop hands it back."""
        spec = self.loaded.spec
        side = self.prompt_mask_side
        sets = prompts.sets if previous is None else [PromptSet(s.box, s.points, s.labels) for s in prompts.sets]
        groups: dict[tuple[bool, int, bool], list[int]] = {}
        for index, prompt_set in enumerate(sets):
            groups.setdefault(prompt_set.signature, []).append(index)
        low = None
        ious = np.empty(len(sets), np.float32)
        for indices in groups.values():
            batch = prompt_batch(spec, [sets[i] for i in indices], prompts.image_size, side)
            if previous is not None:
                batch.masks = spec.transform.frame_to_mask_prompt(previous[indices], side)[None]
            logits, iou = self._decode(embedding[None], batch, multimask)
            chosen = (select_best(logits, iou) if multimask else logits[:, :, 0])[0]
            if low is None:
                low = np.empty((len(sets), *chosen.shape[-2:]), np.float32)
            low[indices] = chosen
            ious[indices] = iou[0].max(axis=-1)
        return (np.empty((0, side, side), np.float32) if low is None else low), ious

    def _to_image(self, low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Low-res logits (P, h', w') -> float32 (P, H, W) at the original ``size``."""
        return self.loaded.spec.transform.logits_to_image(low, size)

    def decode_logits(self, embedding: np.ndarray, prompts: Prompts, multimask: bool = False,
                      return_iou: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Per-set mask logits float32 (P, H, W) at the original size for one image's embedding (C, h, w).

        Sets with the same signature are decoded in one call; with ``multimask`` each set keeps
        the candidate with the highest predicted IoU. With ``return_iou``: (logits, iou (P,)), SAM's
        predicted IoU of each set's kept mask.
        """
        low, ious = self._decode_low_res(embedding, prompts, multimask)
        out = self._to_image(low, prompts.image_size)
        return (out, ious) if return_iou else out

    def decode_clicks(self, embedding: np.ndarray, prompts: Prompts, points: np.ndarray | None,
                      labels: np.ndarray | None, multimask: bool = False) -> tuple[Prompts, np.ndarray, np.ndarray]:
        """``prompts`` refined by hand-given clicks ``points`` (N, 2) xy with ``labels`` (N,), in their order; each
        click joins the lung set it falls in (:func:`~cxrsam.prompts.add_points`).

        A model trained with its previous result as a mask prompt (:attr:`LoadedSam.mask_prompt`) gets the clicks as
        an interactive session does (SAM's loop): ``prompts`` decoded alone, then one round per click, each round
        decoding the prompts so far with every set's previous low-res logits, as the decoder gave them, as its mask
        prompt (only the last round is taken to the image's size), so the result depends only on the clicks and their
        order. Other models decode ``prompts`` with all the clicks once.

        Returns: (the last round's prompts, with the logits it was given at the image's size; per-set logits
        (P, H, W); iou (P,)).
        """
        if points is None or len(points) == 0:
            return prompts, *self.decode_logits(embedding, prompts, multimask, return_iou=True)
        if not self.loaded.mask_prompt:
            prompts = add_points(prompts, points, labels)
            return prompts, *self.decode_logits(embedding, prompts, multimask, return_iou=True)
        low, iou = self._decode_low_res(embedding, prompts, multimask)
        for point, label in zip(np.asarray(points, np.float32), np.asarray(labels, np.int64)):
            prompts, previous = add_points(prompts, point[None], label[None]), low
            low, iou = self._decode_low_res(embedding, prompts, multimask, previous)
        size = prompts.image_size
        return with_previous(prompts, self._to_image(previous, size)), self._to_image(low, size), iou

    def segment_many(self, images: Sequence[ImageLike], prompts: Sequence[Prompts],
                     multimask: bool = False) -> list[np.ndarray]:
        """Masks bool (H, W) at each image's original size: the union of its per-set masks.

        An image whose prompts are empty (no lung in the draft) gets an empty mask and is not encoded.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt lists")
        masks: list[np.ndarray | None] = [None] * len(images)
        todo = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            size = _pixels(image).shape
            if tuple(prompt.image_size) != tuple(size):
                raise CxrsamError(f"prompts are for a {prompt.image_size} image, the image is {size}",
                                  path=getattr(image, "path", None))
            if prompt.empty:
                masks[i] = np.zeros(size, dtype=bool)
            else:
                todo.append(i)
        embeddings = self.embed([images[i] for i in todo])
        for i, embedding in zip(todo, embeddings):
            masks[i] = self.union_mask(self.decode_logits(embedding, prompts[i], multimask))
        return masks

    def union_mask(self, logits: np.ndarray) -> np.ndarray:
        """Per-set logits (P, H, W) -> the image's mask bool (H, W): the union of the thresholded sets."""
        return (logits > self.threshold).any(axis=0)

    def segment(self, image: ImageLike, prompts: Prompts, multimask: bool = False) -> np.ndarray:
        """Mask bool (H, W) of one image at its original size (per-set masks merged by union)."""
        return self.segment_many([image], [prompts], multimask)[0]
