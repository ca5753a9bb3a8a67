"""LoRA fine-tuning of a SAM backend on lung masks: ``cxrsam finetune``.

Training (per image): the augmented ground-truth mask is split into lung components
(:func:`cxrsam.prompts.components.lung_components`); one prompt set per lung is sampled from it
(:func:`cxrsam.prompts.prompts_from_mask`: a jittered box, random interior points, or both; with
``train_prompt="mixed"`` each example draws its kind, point count and negatives from ``train_mix``,
:class:`cxrsam.prompts.PromptMixture`) and SAM predicts one mask per set, scored
against *that lung's* component with Dice + BCE (MONAI ``DiceCELoss``), optionally plus the MSE of
SAM's IoU head against the real IoU. This matches inference, where the engine decodes one set per
lung and merges the masks by union.

Transfer (issue 16): ``shift_augment`` imitates other sites on that share of training images
(:func:`cxrsam.data.shift.shift_pair`: aspect ratio, windows, gamma, CLAHE, detector, collimation, text);
``box_error`` moves the training boxes like CNN drafts (:func:`cxrsam.data.shift.perturb_box`, the U-Net's
measured error times ``box_error``) instead of the symmetric ``box_jitter``, so the adapters learn to fix draft
errors; ``consistency_weight`` adds the MSE of the adapted mask probabilities to the frozen base's (adapters
switched off, no gradient) on the same augmented images, keeping what transfers.

Validation: prompts derived (without jitter) from a draft source -- the ground truth (oracle boxes,
default), a folder of draft masks or a CNN run -- are decoded, the per-lung masks merged by union
(max of logits) and the Dice against the full ground-truth mask in the model-input frame is averaged;
``val_prompts`` is the ``main`` kind, ``val_extra`` adds named kinds (e.g. probability points), each
reported as ``val_dice_<name>``, and the kept checkpoint is the best ``val_dice`` = the ``select_weights``
combination of them (default: ``main`` alone).
Images and masks reach the model through the backend's transform, exactly as in inference.

The generic loop (:class:`cxrsam.train.loop.Trainer`) checkpoints only what trains (adapters and
opened weights). A run folder holds ``config.yaml``, ``manifest.csv``, ``last.pt``/``best.pt``
(trained weights only, with optimizer state in ``last.pt``), ``metrics.csv``, ``curves.png`` and,
when training ends, the best epoch's ``adapter.safetensors`` + ``adapter.json``
(:mod:`cxrsam.sam.lora`) -- never a copy of the frozen base.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator
from torch import nn
from torch.utils.data import Dataset

from cxrsam.config import DataFields, LoopConfig, resolve_device, settings_error
from cxrsam.data.dataset import augment, load_case
from cxrsam.data.layouts import Case
from cxrsam.data.shift import BoxError, perturb_box, shift_pair
from cxrsam.errors import CxrsamError
from cxrsam.prompts import Prompts, PromptSet, PromptSpec, add_points, prompts_from_mask, with_previous
from cxrsam.prompts.components import lung_components
from cxrsam.prompts.corrections import error_click
from cxrsam.prompts.modes import TrainPrompt
from cxrsam.prompts.spec import PromptMixture
from cxrsam.runs import ADAPTER_FILE, BEST, forget, load_checkpoint, read_run_config
from cxrsam.sam.engine import decode, mask_side, prompt_batch
from cxrsam.sam.lora import (
    MASK_PROMPT_LAYERS,
    LoraSettings,
    adapter_state,
    apply_lora,
    is_lora_key,
    load_adapter_state,
    read_adapter_info,
    read_adapter_state,
    save_adapter,
    trainable_summary,
)
from cxrsam.sam.registry import LoadedSam, build_sam
from cxrsam.sam.transforms import SamTransform
from cxrsam.train.loop import StepFn, Trainer, seed_everything, segmentation_dice
from cxrsam.train.runs import prepare_run

log = logging.getLogger(__name__)

EMPTY_LOGIT = -20.0
"""Logit of every pixel of an image without prompts (no lung found): an empty mask."""


class FinetuneConfig(DataFields):
    """Everything a LoRA fine-tuning run depends on (written to ``config.yaml``); data fields from
    :class:`~cxrsam.config.DataFields`."""

    backend: str = Field("litemedsam", description="SAM registry backend")
    checkpoint: Path | None = Field(None, description="Base checkpoint (None: the backend's default)")
    lora: LoraSettings = LoraSettings()
    init_from: Path | None = Field(None, description="Start from a finished LoRA run's weights (same backend, base, "
                                   "rank and targets; its opened weights must be trainable here); None: the base")
    train_prompt: TrainPrompt = Field(
        TrainPrompt.MIXED, description="Prompts sampled from the ground truth per lung; mixed draws each "
                                       "example's prompt from train_mix")
    train_mix: PromptMixture = Field(PromptMixture(), description="The prompt mixture of train_prompt=mixed")
    box_jitter: float = Field(0.05, ge=0, description="Training box noise std, fraction of the box side")
    points_per_lung: int = Field(3, ge=1, description="Random interior points per lung (training)")
    val_prompts: PromptSpec = Field(PromptSpec(), description="How validation drafts become prompts: the "
                                    "evaluation's spec, so model selection sees the prompts it is judged on")
    val_extra: dict[str, PromptSpec] = Field(
        {}, description="More validation prompt kinds by name (reported as val_dice_<name>; main = val_prompts)")
    select_weights: dict[str, float] = Field(
        {"main": 1.0}, description="The kept checkpoint maximises this weighted mean of the kinds' val Dice")
    val_drafts: Path | None = Field(None, description="Validation draft source: a mask folder (by stem) or a "
                                                      "CNN run folder; None = ground truth (oracle prompts)")
    iou_loss_weight: float = Field(0.0, ge=0, description="Weight of the IoU-head MSE term (0: off)")
    augment: bool = True
    shift_augment: float = Field(0.0, ge=0, le=1, description="Share of training images given an imitated "
                                 "other-site shift (cxrsam.data.shift; 0: off)")
    box_error: float = Field(0.0, ge=0, description="Training boxes moved like CNN drafts: the U-Net's measured "
                             "box error times this (cxrsam.data.shift.BoxError); 0: box_jitter instead")
    consistency_weight: float = Field(0.0, ge=0, description="Weight of the MSE between the adapted and the frozen "
                                      "base's mask probabilities on the training images (0: off)")
    gradient_checkpointing: bool = Field(False, description="Recompute encoder blocks in backward (less memory)")
    max_train_cases: int | None = Field(None, ge=1, description="Use only the first N training cases")
    max_val_cases: int | None = Field(None, ge=1, description="Validate on the first N validation cases")
    loop: LoopConfig = LoopConfig(lr=2e-4, batch_size=4, epochs=20, patience=5, warmup_fraction=0.05,
                                  validate_start=True)


    @model_validator(mode="after")
    def _check_selection(self) -> FinetuneConfig:
        kinds = {"main", *self.val_extra}
        unknown = sorted(set(self.select_weights) - kinds)
        if unknown:
            raise ValueError(f"select_weights names unknown validation kinds {unknown}; known: {sorted(kinds)}")
        if not self.select_weights or min(self.select_weights.values()) < 0 or sum(self.select_weights.values()) <= 0:
            raise ValueError("select_weights must be >= 0 with a positive sum")
        return self

    def val_kinds(self) -> dict[str, PromptSpec]:
        """Every validation prompt kind by name: ``main`` (``val_prompts``) and ``val_extra``."""
        return {"main": self.val_prompts, **self.val_extra}

    @property
    def mask_prompt(self) -> bool:
        """Whether the run learns to refine its previous result given back as a mask prompt (interactive ``mixed``
        examples with ``previous_mask``); it is then served with click rounds
        (:attr:`~cxrsam.sam.registry.LoadedSam.mask_prompt`)."""
        mix = self.train_mix
        return self.train_prompt == TrainPrompt.MIXED and mix.interactive > 0 and mix.previous_mask


def make_config(**options: Any) -> FinetuneConfig:
    """Build a config from flat options (loop and LoRA fields may be given flat); invalid -> CxrsamError."""
    loop = {k: options.pop(k) for k in list(options) if k in LoopConfig.model_fields}
    lora = {k: options.pop(k) for k in list(options) if k in LoraSettings.model_fields}
    if "val_prompt" in options:  # the CLI's --val-prompt sets the mode of the validation prompt spec
        options["val_prompts"] = {**dict(options.get("val_prompts") or {}), "mode": options.pop("val_prompt")}
    if "val_points" in options:  # the CLI's --val-points N adds the kind "points": N probability points per image
        main = dict(options.get("val_prompts") or {})
        options["val_extra"] = {**dict(options.get("val_extra") or {}), "points": {
            **main, "mode": "points", "strategy": "probability", "points": options.pop("val_points")}}
    try:
        defaults = FinetuneConfig.model_fields["loop"].default.model_dump()
        return FinetuneConfig.model_validate({**options, "lora": lora, "loop": {**defaults, **loop}})
    except ValidationError as exc:
        raise settings_error(exc) from None


def read_config(run_dir: str | Path) -> FinetuneConfig:
    """The ``config.yaml`` of a fine-tuning run folder."""
    return read_run_config(run_dir, FinetuneConfig, "fine-tuning")


def _frozen_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
        p.requires_grad for p in module.parameters())


class SamTrainee(nn.Module):
    """An adapted SAM as one module for the training loop (and ``accelerate``/DDP wrapping).

    ``forward(images, prompts)`` encodes with gradients (the adapters live in the encoder) and
    decodes each image's prompt sets with :func:`cxrsam.sam.engine.decode`. ``train(True)`` leaves
    frozen BatchNorm layers (TinyViT's convolutions) in eval mode, so their running statistics --
    part of the frozen base -- never change.
    """

    def __init__(self, loaded: LoadedSam):
        super().__init__()
        self.sam = loaded.model
        self.loaded = loaded

    def train(self, mode: bool = True) -> SamTrainee:
        super().train(mode)
        for module in self.sam.modules():
            if _frozen_batchnorm(module):
                module.eval()
        return self

    def forward(self, images: torch.Tensor, prompts: Sequence[Prompts], first: Sequence[Prompts] | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor]] | tuple[list, list]:
        """Per image: (logits (P, S, S) over the padded model input, predicted IoU (P,)) of its P prompt sets
        (in their order; sets with different point counts are decoded in separate groups). With ``first`` (B more
        prompt lists; empty ones for images without), the pair (outputs of ``prompts``, outputs of ``first``), both
        decoded from the one encoder pass, as DDP needs every output of a step from one forward call.

        Args:
            images: (B, 3, S, S) model input made by the backend's transform
                (:meth:`~cxrsam.sam.transforms.SamTransform.finish`), exactly what inference encodes.
            prompts: B prompt lists in model-input pixels (image size (S, S)); an image without sets
                gets empty tensors.
        """
        embeddings = self.sam.image_encoder(images)
        outputs = self.decode_sets(embeddings, prompts)
        return outputs if first is None else (outputs, self.decode_sets(embeddings, first))

    def decode_sets(self, embeddings: torch.Tensor, prompts: Sequence[Prompts]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` from image embeddings (B, C, h, w) of the encoder (differentiable)."""
        transform = self.loaded.spec.transform
        size = (transform.img_size, transform.img_size)
        side = mask_side(self.sam)
        out = []
        for b, image_prompts in enumerate(prompts):
            if image_prompts.empty:
                out.append((embeddings.new_zeros((0, *size)), embeddings.new_zeros((0,))))
                continue
            groups: dict[tuple[bool, int, bool], list[int]] = {}  # sets decode together when their signatures agree
            for i, prompt_set in enumerate(image_prompts.sets):
                groups.setdefault(prompt_set.signature, []).append(i)
            logits, iou = [], []
            for members in groups.values():
                batch = prompt_batch(self.loaded.spec, [image_prompts.sets[i] for i in members], size, side)
                group_logits, group_iou = decode(self.sam, embeddings[b:b + 1], batch)
                logits.append(group_logits[0, :, 0])
                iou.append(group_iou[0, :, 0])
            order = torch.tensor(np.argsort([i for members in groups.values() for i in members]),
                                 device=embeddings.device)
            out.append((transform.logits_to_input(torch.cat(logits)[order]), torch.cat(iou)[order]))
        return out


def enable_gradient_checkpointing(encoder: nn.Module) -> int:
    """Recompute each block of ``encoder`` during backward instead of keeping its activations (activation, or
    gradient, checkpointing: ``torch.utils.checkpoint`` with ``use_reentrant=False``).

    Blocks are the members of every ``blocks`` ModuleList: in TinyViT (LiteMedSAM) all four stages, the
    convolutional MBConv stage and the three attention stages (2 + 2 + 6 + 2 blocks); in segment_anything's ViT
    every transformer block. Patch embedding, patch merging and the neck are not checkpointed. Non-reentrant
    because with LoRA the input and the frozen first stage carry no gradient: reentrant checkpointing (TinyViT's
    own ``use_checkpoint``) would then give the adapters inside a block no gradient at all. Only in training mode
    with gradients on; frozen BatchNorm stays in eval mode (:class:`SamTrainee`), so the recomputation is exact.
    Module names and state-dict keys are unchanged. Returns the number of blocks.
    """
    from torch.utils.checkpoint import checkpoint

    count = 0
    for module in encoder.modules():
        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            continue
        for block in blocks:
            plain = block.forward

            @functools.wraps(plain)
            def forward(*args: Any, _plain=plain, _block=block) -> Any:
                if _block.training and torch.is_grad_enabled():
                    return checkpoint(_plain, *args, use_reentrant=False)
                return _plain(*args)

            block.forward = forward
            count += 1
    return count


class PromptedDataset(Dataset):
    """Cases in a SAM backend's model-input frame, with prompt sets and per-set targets.

    Each image and mask go through the backend's :class:`~cxrsam.sam.transforms.SamTransform` exactly as
    inference does (resize the longest side to S, then normalise and zero-pad), for any aspect ratio;
    augmentation (:func:`cxrsam.data.dataset.augment`) acts on the resized (h, w) pair before padding.

    Item ``i``: ``(image (3, S, S) model input, mask (1, S, S), i, prompts, targets, rounds)``. For training
    (``prompts=None``) prompts of kind ``prompt`` are sampled from the (augmented) mask, one set per lung, and
    ``targets`` (P, S, S) are the lungs' components (``mixed``: each example's prompt drawn from ``mixture``);
    for validation ``prompts[i]`` are given (model-input pixels, see :func:`_val_prompts`) and ``targets`` is
    the full mask (1, S, S). ``rounds``: the number of click rounds the example is refined by before the loss
    (0: none; for a ``mixture.interactive`` share of ``mixed`` training items, 1..``mixture.click_rounds``; see
    :func:`with_error_clicks`).
    With ``shift`` > 0 that share of training items is first shifted
    (:func:`~cxrsam.data.shift.shift_pair` on the resized pair, which is then resized again to the longest side S);
    with ``box_error`` > 0 each training box is moved like a CNN draft's (:func:`~cxrsam.data.shift.perturb_box`)
    instead of by ``jitter``. Randomness is drawn from
    ``(seed, epoch, i)``: reproducible and independent of worker order (call :meth:`set_epoch`). Resized pairs
    are kept in memory after first use.
    """

    def __init__(self, cases: Sequence[Case], transform: SamTransform, prompt: str = "box", jitter: float = 0.0,
                 points_per_lung: int = 3, prompts: Sequence[Prompts] | None = None, augment: bool = False,
                 seed: int = 0, mixture: PromptMixture | None = None, shift: float = 0.0,
                 box_error: float = 0.0):
        self.cases = list(cases)
        self.transform = transform
        self.prompt = prompt
        self.jitter = jitter
        self.points_per_lung = points_per_lung
        self.prompts = prompts
        self.augment = augment
        self.seed = seed
        self.mixture = mixture or PromptMixture()
        self.shift = shift
        self.box_error = box_error
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases)

    def resized(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Case ``index`` resized to (h, w) by the transform: (image float32 in [0, 1], mask bool)."""
        if index not in self._cache:
            xray, mask = load_case(self.cases[index])
            self._cache[index] = (self._resize(xray.pixels), self.transform.resize_mask(mask))
        return self._cache[index]

    def _resize(self, pixels: np.ndarray) -> np.ndarray:
        """An image float (H, W) resized by the transform's PyTorch arithmetic, as the PyTorch runtime's encoder
        input is made (bit-identical; ONNX Runtime's NumPy one agrees to float rounding): float32 (h, w)."""
        return self.transform.resize(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))).numpy()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, Prompts, torch.Tensor, int]:
        image, mask = self.resized(index)
        if self.prompts is None and self.shift > 0:
            rng = np.random.default_rng([self.seed, self.epoch, index, 2])
            if rng.random() < self.shift:
                image, mask, _ = shift_pair(image, mask, rng)
                image, mask = self._resize(image), self.transform.resize_mask(mask)
        if self.augment:
            image, mask = augment(image, mask, np.random.default_rng([self.seed, self.epoch, index]))
        model_input = self.transform.finish(torch.from_numpy(np.ascontiguousarray(image)))
        truth = self.transform.pad_mask(mask)
        full = torch.from_numpy(truth.astype(np.float32))[None]
        if self.prompts is not None:
            return model_input, full, index, self.prompts[index], full, 0
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        jitter = 0.0 if self.box_error else self.jitter
        if self.prompt == TrainPrompt.MIXED:
            prompts = self.mixture.draw(truth, rng, jitter=jitter)
        else:
            prompts = prompts_from_mask(truth, mode=self.prompt, points_per_lung=self.points_per_lung,
                                        strategy="random", jitter=jitter, rng=rng)
        if self.box_error:
            error = BoxError().scaled(self.box_error)
            prompts.sets = [PromptSet(None if p.box is None else perturb_box(p.box, truth.shape, error, rng),
                                      p.points, p.labels) for p in prompts.sets]
        lungs, _ = lung_components(truth)
        targets = torch.from_numpy(np.stack(lungs).astype(np.float32)) if lungs else full[:0]
        rounds = 0
        if self.prompt == TrainPrompt.MIXED:
            rng = np.random.default_rng([self.seed, self.epoch, index, 3])
            if rng.random() < self.mixture.interactive:
                rounds = int(rng.integers(1, self.mixture.click_rounds + 1))
        return model_input, full, index, prompts, targets, rounds


def collate_prompted(items: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list, list, list]:
    """Stack images, masks and indices; keep prompts, per-image targets and click rounds as lists."""
    images, masks, indices, prompts, targets, rounds = zip(*items)
    return (torch.stack(images), torch.stack(masks), torch.tensor(indices), list(prompts), list(targets),
            list(rounds))


def union_logits(outputs: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int) -> torch.Tensor:
    """Per image the max over its sets' logits (= union of the masks at threshold 0): (B, 1, S, S)."""
    merged = []
    for logits, _ in outputs:
        merged.append(logits.amax(dim=0, keepdim=True) if len(logits)
                      else torch.full((1, size, size), EMPTY_LOGIT, device=logits.device))
    return torch.stack(merged)


def segmentation_loss(outputs: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[torch.Tensor],
                      iou_weight: float = 0.0) -> torch.Tensor:
    """Dice + BCE (MONAI ``DiceCELoss``, per set) over all prompt sets of the batch, plus IoU-head MSE.

    The IoU target is the IoU of the thresholded prediction with its lung (no gradient).
    """
    from monai.losses import DiceCELoss

    from cxrsam.evaluation.metrics import batch_iou

    logits = torch.cat([out[0] for out in outputs])[:, None]
    if len(logits) == 0:  # no lung in any image of the batch: nothing to learn from
        return sum(out[0].sum() for out in outputs) * 0.0
    target = torch.cat(list(targets)).to(logits)[:, None]
    loss = DiceCELoss(sigmoid=True, reduction="mean")(logits, target)
    predicted = torch.cat([out[1] for out in outputs])
    if iou_weight == 0:  # keep the IoU head in the graph: DDP needs a gradient for every trainable weight
        return loss + 0.0 * predicted.sum()
    with torch.no_grad():
        real_iou = batch_iou(logits, target)
    return loss + iou_weight * torch.nn.functional.mse_loss(predicted, real_iou)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Within the block every peft adapter layer of ``model`` is switched off (``enable_adapters(False)``):
    the frozen base encoder; opened (non-LoRA) weights stay as they are."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def consistency_loss(net: nn.Module, images: torch.Tensor, prompts: Sequence[Prompts],
                     outputs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """MSE between the adapted mask probabilities (sigmoid of ``outputs``' logits) and the same model's with
    adapters off (no gradient) for the same images (B, 3, S, S) and prompts; 0 when no image has a prompt set.

    Probabilities, not logits: LiteMedSAM's logits sit near +-25 far from the outline, so a logit MSE (about 83
    for the trained ``configs/cpu.yaml`` adapters, which flip 0.7 % of pixels) measures saturation rather than
    the mask; the probability MSE (0.0035 there) counts the pixels whose decision moved."""
    sam = net.module.sam if hasattr(net, "module") else net.sam  # DDP wraps the trainee
    with torch.no_grad(), adapters_off(sam):
        reference = net(images, prompts)
    adapted = [out[0] for out in outputs if len(out[0])]
    if not adapted:
        return sum(out[0].sum() for out in outputs) * 0.0
    base = torch.cat([ref[0] for ref in reference if len(ref[0])])
    return torch.nn.functional.mse_loss(torch.sigmoid(torch.cat(adapted)), torch.sigmoid(base))


def with_error_clicks(net: nn.Module, images: torch.Tensor, masks: torch.Tensor, prompts: Sequence[Prompts],
                      rounds: Sequence[int], previous_mask: bool = False) -> list[Prompts]:
    """Interactive training's prompts: each image with ``rounds[i]`` = k > 0 is refined as a user refines a result,
    k times: decoded by the current model (no gradient; the image encoded once), given the click a user would add on
    that result's largest error (:func:`error_click` against its full mask, joined to its lung set by
    :func:`add_points`), and, with ``previous_mask``, every set given that result's logits as its mask prompt (SAM's
    interactive loop; :meth:`~cxrsam.sam.engine.SamEngine.decode_clicks` replays clicks the same way). Other images
    keep their prompts. The loss is then taken on the returned prompts.

    Args:
        images: (B, 3, S, S) model inputs; masks: (B, 1, S, S) full truth masks; prompts, rounds: B of each.
    """
    out = list(prompts)
    chosen = [i for i, k in enumerate(rounds) if k > 0 and not prompts[i].empty]
    if not chosen:
        return out
    plain = net.module if hasattr(net, "module") else net  # past DDP: ranks may differ in flagged images
    with torch.no_grad():
        embeddings = plain.sam.image_encoder(images[chosen])
        for step in range(max(rounds[i] for i in chosen)):
            active = [row for row, i in enumerate(chosen) if rounds[i] > step]
            results = plain.decode_sets(embeddings[active], [out[chosen[row]] for row in active])
            for row, (logits, _) in zip(active, results):
                i = chosen[row]
                click = error_click(masks[i, 0].cpu().numpy() > 0.5, (logits > 0).any(dim=0).cpu().numpy())
                if click is None:  # nothing left to correct: this example's rounds end here
                    continue
                out[i] = add_points(out[i], click.point[None], np.array([click.label], np.int64))
                if previous_mask:
                    out[i] = with_previous(out[i], logits.float().cpu().numpy())
    return out


def finetune_step(iou_weight: float = 0.0, consistency_weight: float = 0.0, previous_mask: bool = False,
                  first_round_loss: bool = False) -> StepFn:
    """The fine-tuning step's loss, ``(SamTrainee, (images, masks, indices, prompts, targets, rounds)) -> scalar``
    (:func:`segmentation_loss` after :func:`with_error_clicks` with ``previous_mask``; with ``first_round_loss`` plus
    that of the interactive examples' drawn prompts alone; plus ``consistency_weight`` x :func:`consistency_loss`);
    used by :func:`finetune` and ``bench/lora_vs_full.py``."""

    def step_fn(net: nn.Module, batch: tuple) -> torch.Tensor:
        images, masks, _, prompts, targets, rounds = batch
        first = None
        if any(rounds):
            refined = with_error_clicks(net, images, masks, prompts, rounds, previous_mask)
            if first_round_loss:
                first = [p if k else Prompts([], p.image_size, p.mode, 0) for p, k in zip(prompts, rounds)]
            prompts = refined
        if first is None:
            outputs = net(images, prompts)
            loss = segmentation_loss(outputs, targets, iou_weight)
        else:
            outputs, first_outputs = net(images, prompts, first)
            loss = segmentation_loss(outputs, targets, iou_weight) + segmentation_loss(
                first_outputs, [t if k else t[:0] for t, k in zip(targets, rounds)], iou_weight)
        unused = [p for name, p in net.named_parameters() if p.requires_grad and MASK_PROMPT_LAYERS in name]
        if unused:  # keep the mask-prompt layers in the graph when no example had one: DDP needs every gradient
            loss = loss + 0.0 * sum(p.sum() for p in unused)
        if consistency_weight:
            loss = loss + consistency_weight * consistency_loss(net, images, prompts, outputs)
        return loss

    return step_fn


def _val_prompts(config: FinetuneConfig, cases: Sequence[Case], transform: SamTransform) -> dict[str, list[Prompts]]:
    """Validation prompts in model-input pixels per kind (:meth:`FinetuneConfig.val_kinds`): each kind's spec
    applied to each case's draft (from ``config.val_drafts`` with its probability map, else its ground truth)
    at the image's own size, then mapped by the transform, exactly as inference prompts that image."""
    from cxrsam.baselines.drafts import drafts_from_path

    draft_of = None if config.val_drafts is None else drafts_from_path(config.val_drafts)
    kinds = config.val_kinds()
    prompts: dict[str, list[Prompts]] = {name: [] for name in kinds}
    for case in cases:
        xray, truth = load_case(case)
        draft = truth if draft_of is None else draft_of(xray)
        weight = None if draft_of is None else draft_of.probability(xray)
        for name, spec in kinds.items():
            prompts[name].append(transform.prompts(spec.prompts(draft, xray.path.stem,
                                                                weight if spec.uses_weight else None)))
    return prompts


def init_weights(model: nn.Module, loaded: LoadedSam, settings: LoraSettings, run_dir: str | Path) -> None:
    """Put a finished LoRA run's adapters and opened weights into ``model`` (prepared by :func:`apply_lora` with
    ``settings``) as the starting point of another run: a warm start, e.g. a box-trained run continued with mixed
    prompts. The new run's WiSE-FT scale and consistency term still refer to the pretrained base.

    Raises:
        CxrsamError: the run is not a finished LoRA run, was trained on another backend or base checkpoint, has
            other adapters (rank, alpha, targets), or opened weights that stay frozen here (the new run's adapter
            file would not hold them, so it could not be rebuilt).
    """
    run_dir = Path(run_dir)
    info = read_adapter_info(run_dir)
    if info.backend != loaded.spec.name or info.base_sha256 != loaded.checkpoint_sha256:
        raise CxrsamError(f"init_from was trained on another base ({info.backend}, SHA-256 {info.base_sha256[:16]}...)"
                          f" than this run ({loaded.spec.name}, {loaded.checkpoint_sha256[:16]}...)", path=run_dir)
    mine, theirs = settings.model_dump(), info.lora.model_dump()
    differ = [k for k in ("rank", "alpha", "targets") if mine[k] != theirs[k]]
    if differ:
        detail = ", ".join(f"{k} {theirs[k]}, here {mine[k]}" for k in differ)
        raise CxrsamError(f"init_from has other adapters ({detail})", path=run_dir)
    _, state = read_adapter_state(run_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = sorted(k for k in state if not is_lora_key(k) and k not in trainable)
    if frozen:
        raise CxrsamError(f"init_from opened weights that this run keeps frozen ({frozen[0]!r} and {len(frozen) - 1} "
                          "more); open the same parts (train_decoder, train_prompt_encoder)", path=run_dir)
    load_adapter_state(model, state, source=run_dir / ADAPTER_FILE)
    log.info("started from %s (%d trained tensors)", run_dir, len(state))


def finetune(config: FinetuneConfig, out_dir: str | Path, resume: bool = False,
             on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train LoRA adapters (and the opened weights) of ``config.backend``; return the run folder.

    Args:
        config: the run's settings.
        out_dir: run folder (created). Without ``resume`` a folder holding ``last.pt`` is refused.
        resume: continue ``out_dir`` from ``last.pt`` with its saved split; settings must be unchanged.
        on_epoch_end: called as ``(epoch, metrics row)`` after each epoch's checkpoint (main process).

    The base checkpoint's SHA-256, the LoRA settings and the trainable parameter count go to
    ``adapter.json``; the count is also logged.
    """
    from accelerate import PartialState

    run_dir = Path(out_dir)
    splits = prepare_run(config, run_dir, resume, "fine-tuning")
    state = PartialState()

    loop = config.loop
    seed_everything(loop.seed, loop.deterministic)
    loaded = build_sam(config.backend, checkpoint=config.checkpoint, device=resolve_device(config.loop.device))
    model = apply_lora(loaded.model, config.lora)
    summary = trainable_summary(model)
    log.info("trainable parameters: %d of %d (%.2f %%; LoRA %d, opened %d)", summary["trainable"], summary["total"],
             summary["share_percent"], summary["lora"], summary["opened"])
    if config.init_from is not None and not resume:  # a resumed run continues from its own last.pt
        init_weights(model, loaded, config.lora, config.init_from)
    if config.gradient_checkpointing:
        log.info("gradient checkpointing on %d encoder blocks", enable_gradient_checkpointing(model.image_encoder))
    trainee = SamTrainee(loaded)

    transform = loaded.spec.transform
    size = transform.img_size
    train_cases = splits["train"][:config.max_train_cases]
    val_cases = splits["val"][:config.max_val_cases]
    train_data = PromptedDataset(train_cases, transform, config.train_prompt, config.box_jitter,
                                 config.points_per_lung, augment=config.augment, seed=loop.seed,
                                 mixture=config.train_mix, shift=config.shift_augment, box_error=config.box_error)
    val_data = {name: PromptedDataset(val_cases, transform, prompts=prompts)
                for name, prompts in _val_prompts(config, val_cases, transform).items()}

    step_fn = finetune_step(config.iou_loss_weight, config.consistency_weight, config.mask_prompt,
                            config.train_mix.first_round_loss)  # rounds are drawn for mixed examples only

    def logits_fn(net: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks, _, prompts, _, _ = batch
        return union_logits(net(images, prompts), size), masks

    def validate_fn(net: nn.Module) -> dict[str, float]:
        dice = {name: segmentation_dice(net, data, logits_fn, batch_size=loop.batch_size,
                                        collate_fn=collate_prompted) for name, data in val_data.items()}
        weights = config.select_weights
        combined = sum(w * dice[name] for name, w in weights.items()) / sum(weights.values())
        return {"val_dice": combined, **({f"val_dice_{n}": d for n, d in dice.items()} if len(dice) > 1 else {})}

    trainer = Trainer(loop, run_dir, trainee, train_data, step_fn, validate_fn,
                      state_fn=lambda net: adapter_state(net.sam),
                      load_state_fn=lambda net, weights: load_adapter_state(net.sam, weights),
                      collate_fn=collate_prompted, on_epoch_end=on_epoch_end)
    result = trainer.fit(resume=resume)
    if state.is_main_process and (run_dir / BEST).is_file():  # else: a finished run resumed, adapters written
        best = load_checkpoint(run_dir / BEST)["model"]
        save_adapter(run_dir, model, loaded, config.lora, state=best, mask_prompt=config.mask_prompt)
        forget(run_dir / BEST)  # the adapter file holds the best epoch's weights: keep them once
        log.info("best val Dice %.4f at epoch %d; adapters in %s", result.best_dice, result.best_epoch, run_dir)
        if result.best_epoch == 0:
            log.warning("no epoch validated better than the untouched %s: the saved adapters are the identity "
                        "(train longer, or with another learning rate)", config.backend)
    return run_dir
