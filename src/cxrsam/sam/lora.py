"""Low-rank adapters (LoRA, through ``peft``) inside a SAM backend, their run files and merging.

The adapters go into the image encoder's transformer attention (``qkv`` by default) of any backend
of :mod:`cxrsam.sam.registry`; TinyViT's first stage (convolutional MBConv blocks) has no attention
and is never touched. Everything else is frozen except what :class:`LoraSettings` opens: the mask
decoder is trainable by default (as in SAMed), ``train_decoder=False`` is the strict variant;
``train_prompt_encoder=True`` opens the prompt encoder too (as the paper's LoRA model, for point prompts).

A trained run directory holds only what was trained, never a copy of the frozen base:

``adapter.safetensors``
    LoRA weights in ``peft``'s format (``get_peft_model_state_dict``: adapter name removed, e.g.
    ``image_encoder.layers.1.blocks.0.attn.qkv.lora_A.weight``) plus the opened weights under their
    plain names (``mask_decoder.*``, ``prompt_encoder.*``).
``adapter.json``
    backend name, base checkpoint path and SHA-256, the :class:`LoraSettings`, the trainable
    parameter summary and the ``lora_scale`` the run is served at (1 unless chosen otherwise,
    :func:`record_lora_scale`). :func:`load_run` rebuilds the named base, refuses a base with another
    SHA-256, re-applies the adapters and loads the weights at that scale.

Scale (WiSE-FT, Wortsman et al., CVPR 2022): every trained weight moves a fraction ``alpha`` in [0, 1] of
the way from the base to the fine-tuned value -- the LoRA update through peft's per-layer scaling
(``LoraLayer.set_scale``: ``alpha * lora_alpha / r``), each opened weight by ``torch.lerp(base, tuned,
alpha)`` -- so ``alpha = 0`` is exactly the pretrained model and ``alpha = 1`` the fine-tuned one
(:func:`interpolate`). Merging (:func:`merge`, ONNX export) folds the adapters in at the current scale.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, atomic_write_text
from cxrsam.runs import ADAPTER_FILE, ADAPTER_JSON, record_checksum, require_finite, verify_checksum
from cxrsam.sam.registry import LoadedSam, build_sam, get_backend

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


LoraTarget = Literal["qkv", "proj", "mlp", "decoder_attn"]
TARGET_PATTERNS: dict[str, str] = {
    "qkv": r"image_encoder\..*\.attn\.qkv",
    "proj": r"image_encoder\..*\.attn\.proj",
    "mlp": r"image_encoder\..*\.mlp\.(fc1|fc2|lin1|lin2)",
    "decoder_attn": r"mask_decoder\.transformer\..*\.(q_proj|k_proj|v_proj|out_proj)",
}
"""Module-name regexes (full match, as peft applies a string ``target_modules``) per target.
TinyViT (LiteMedSAM) names its MLP ``fc1``/``fc2``, segment_anything's ViT ``lin1``/``lin2``; both
name attention ``attn.qkv``/``attn.proj`` (segment_anything's ``patch_embed.proj`` is a conv and
does not match). ``decoder_attn``: the two-way transformer's q/k/v/out projections."""


MASK_PROMPT_LAYERS = "prompt_encoder.mask_downscaling."
"""The prompt encoder's layers that embed a mask prompt (used only when a previous result is given back)."""


class LoraSettings(BaseModel):
    """Where the adapters go, their size, and which base weights are opened for training."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch input")
    targets: list[LoraTarget] = Field(default_factory=lambda: ["qkv"], min_length=1,
                                      description="Layers that get adapters (see TARGET_PATTERNS)")
    train_decoder: bool = Field(True, description="Train the whole mask decoder too (False: adapters only)")
    train_prompt_encoder: bool = Field(False, description="Train the prompt encoder's point, box and no-mask "
                                                          "embeddings too")
    train_mask_prompt: bool = Field(False, description="Train the prompt encoder's mask-prompt layers "
                                                       "(mask_downscaling) too: for interactive training with the "
                                                       "previous result as a mask prompt (train_mix.previous_mask)")

    def target_regex(self) -> str:
        """One regex matching every targeted module name (for ``LoraConfig.target_modules``)."""
        return "|".join(f"(?:{TARGET_PATTERNS[t]})" for t in dict.fromkeys(self.targets))


def is_lora_key(name: str) -> bool:
    """Whether a parameter/state-dict name belongs to a LoRA adapter."""
    return ".lora_" in name


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers into ``model`` in place (``peft.inject_adapter_in_model``) and set what trains.

    Afterwards only the adapters (and the mask decoder when ``settings.train_decoder``, the prompt
    encoder's embeddings when ``settings.train_prompt_encoder``, its mask-prompt layers when
    ``settings.train_mask_prompt``) have
    ``requires_grad``; module names and the ``.image_encoder/.prompt_encoder/.mask_decoder``
    interface are unchanged (targeted ``nn.Linear`` become ``peft`` LoRA ``Linear`` wrapping them).

    Returns:
        ``model`` itself.
    """
    from peft import LoraConfig, inject_adapter_in_model

    regex = settings.target_regex()
    if not any(re.fullmatch(regex, name) for name, _ in model.named_modules()):
        raise CxrsamError(f"LoRA targets {settings.targets} match no layer of {type(model).__name__}")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=regex, bias="none")
    model = inject_adapter_in_model(config, model)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, param in model.named_parameters():
        if (is_lora_key(name) or (settings.train_decoder and name.startswith("mask_decoder."))
                or (settings.train_prompt_encoder and name.startswith("prompt_encoder.")
                    and not name.startswith(MASK_PROMPT_LAYERS))
                or (settings.train_mask_prompt and name.startswith(MASK_PROMPT_LAYERS))):
            param.requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Parameter counts: ``trainable``, ``total`` (with adapters), ``lora``, ``opened`` and ``share_percent``."""
    total = trainable = lora = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            lora += param.numel() if is_lora_key(name) else 0
    return {"trainable": trainable, "total": total, "lora": lora, "opened": trainable - lora,
            "share_percent": 100.0 * trainable / max(total, 1)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What was trained, on CPU: peft's adapter state dict plus the opened (trainable, non-LoRA) weights."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    for name, param in model.named_parameters():
        if param.requires_grad and not is_lora_key(name):
            state[name] = param.detach().cpu().clone()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path | None = None) -> None:
    """Put :func:`adapter_state` back into a model prepared by :func:`apply_lora` with the same settings.

    Raises:
        CxrsamError: a key of ``state`` has no place in the model, or an adapter is missing.
    """
    from peft import set_peft_model_state_dict

    lora_state = {k: v for k, v in state.items() if is_lora_key(k)}
    opened = {k: v for k, v in state.items() if not is_lora_key(k)}
    try:
        result = set_peft_model_state_dict(model, lora_state)
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        wrong = next((k for k, v in opened.items() if k in shapes and tuple(v.shape) != shapes[k]), None)
        if wrong is not None:
            raise RuntimeError(f"{wrong!r} has shape {tuple(opened[wrong].shape)}, the model {shapes[wrong]}")
    except RuntimeError as exc:  # size mismatches
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line or "shape" in line),
                      str(exc).splitlines()[0] if str(exc) else "")
        raise CxrsamError(f"adapter weights do not fit the model ({detail})", path=source) from None
    expected_lora = {n for n, _ in model.named_parameters() if is_lora_key(n)}
    missing_lora = sorted(k for k in result.missing_keys if k in expected_lora)
    unknown = sorted(set(opened) - set(model.state_dict()))
    problems = [f"unexpected key {k!r}" for k in [*result.unexpected_keys, *unknown]]
    problems += [f"missing adapter {k!r}" for k in missing_lora]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CxrsamError(f"adapter weights do not fit the model: {problems[0]}{more}", path=source)
    if opened:
        model.load_state_dict(opened, strict=False)


@dataclass
class LoraSam(LoadedSam):
    """A base :class:`LoadedSam` with trained adapters applied (see :func:`load_run`).

    ``model_id`` is ``lora:<first 16 hex of the adapter file's SHA-256>`` (with ``@<scale>`` below scale 1)
    so embedding caches and ONNX exports never mix base, adapted and interpolated encoders. ``scale`` is the
    WiSE-FT interpolation it was loaded at (:func:`interpolate`).
    """

    run_dir: Path = Path()
    adapter_sha256: str = ""
    settings: LoraSettings | None = None
    scale: float = 1.0

    @property
    def model_id(self) -> str:
        suffix = "" if self.scale == 1 else f"@{self.scale:g}"
        return f"lora:{self.adapter_sha256[:16]}{suffix}"


def check_scale(scale: float) -> float:
    """``scale`` as a float if it lies in [0, 1], else :class:`CxrsamError` (the ``--lora-scale`` rule)."""
    value = float(scale)
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise CxrsamError(f"--lora-scale must be in [0, 1] (0: the pretrained model, 1: the fine-tuned one), "
                          f"got {scale}")
    return value


def interpolate(model: nn.Module, scale: float, base: dict[str, torch.Tensor],
                tuned: dict[str, torch.Tensor]) -> None:
    """Move every trained weight of an adapted ``model`` to ``scale`` of the way from the base, in place.

    LoRA layers get peft's scaling ``scale * lora_alpha / r`` (``LoraLayer.set_scale``; exactly the trained
    scaling at 1, a zero update at 0); each opened weight ``name`` becomes ``torch.lerp(base[name],
    tuned[name], scale)``, which is exactly ``base`` at 0 and ``tuned`` at 1. Calling it again with another
    scale re-interpolates from the same ``base``/``tuned``.

    Args:
        model: a model prepared by :func:`apply_lora` holding the trained adapters.
        scale: alpha in [0, 1].
        base: the pretrained values of the opened weights (may be empty: adapters only).
        tuned: their fine-tuned values (same keys as ``base``).
    """
    from peft.tuners.lora import LoraLayer

    scale = check_scale(scale)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                module.set_scale(adapter, scale)
    if base:
        import torch

        state = {name: torch.lerp(base[name], tuned[name].to(base[name]), scale) for name in base}
        model.load_state_dict(state, strict=False)


def save_adapter(run_dir: str | Path, model: nn.Module, loaded: LoadedSam, settings: LoraSettings,
                 state: dict[str, torch.Tensor] | None = None, mask_prompt: bool = False) -> Path:
    """Write ``adapter.safetensors`` (``state`` or :func:`adapter_state` of ``model``) and ``adapter.json``.

    Args:
        run_dir: the run directory.
        model: the adapted model (for the state and the trainable summary).
        loaded: the base it was built from (backend, checkpoint path and SHA-256 are recorded).
        settings: the LoRA settings used.
        state: weights to write instead of the model's current ones (e.g. the best epoch's).
        mask_prompt: the model was trained with its previous result as a mask prompt
            (:attr:`~cxrsam.sam.registry.LoadedSam.mask_prompt`).

    Returns:
        the adapter file's path.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    state = adapter_state(model) if state is None else state
    with atomic_path(run_dir / ADAPTER_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"format": "pt", "backend": loaded.spec.name, "base_sha256": loaded.checkpoint_sha256})
    record_checksum(run_dir / ADAPTER_FILE)
    info = {"backend": loaded.spec.name, "base_checkpoint": str(loaded.checkpoint_path),
            "base_sha256": loaded.checkpoint_sha256, "lora": settings.model_dump(),
            "trainable": trainable_summary(model), "lora_scale": 1.0, "mask_prompt": mask_prompt}
    atomic_write_text(run_dir / ADAPTER_JSON, json.dumps(info, indent=2) + "\n")
    return run_dir / ADAPTER_FILE


def record_lora_scale(run_dir: str | Path, scale: float, evidence: dict | None = None) -> Path:
    """Store the scale a run is served at (and how it was chosen) in its ``adapter.json``, atomically.

    Args:
        run_dir: a finished LoRA run.
        scale: alpha in [0, 1] (:func:`interpolate`); :func:`load_run` uses it unless told another.
        evidence: what the choice rests on (e.g. validation Dice per scale), kept as ``lora_scale_choice``.

    Returns:
        the ``adapter.json`` path.
    """
    read_adapter_info(run_dir)  # a finished, valid run
    path = Path(run_dir) / ADAPTER_JSON
    info = json.loads(path.read_text(encoding="utf-8"))
    info["lora_scale"] = check_scale(scale)
    if evidence is not None:
        info["lora_scale_choice"] = evidence
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    return path


class AdapterInfo(BaseModel):
    """The validated ``adapter.json`` of a LoRA run."""

    model_config = ConfigDict(extra="allow")

    backend: str
    base_checkpoint: Path
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    lora: LoraSettings
    trainable: dict[str, float] = Field(default_factory=dict)
    lora_scale: float = Field(1.0, ge=0, le=1, description="WiSE-FT scale the run is served at (1: as trained)")
    mask_prompt: bool = Field(False, description="Trained to refine its previous result given back as SAM's mask "
                                                 "prompt: clicks are replayed one round each")


def read_adapter_info(run_dir: str | Path) -> AdapterInfo:
    """The ``adapter.json`` of a run directory (one-line :class:`CxrsamError` naming the file and the field when
    absent, unreadable or malformed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CxrsamError("run directory not found", path=run_dir)
    path = run_dir / ADAPTER_JSON
    if not path.is_file() or not (run_dir / ADAPTER_FILE).is_file():
        raise CxrsamError(f"not a finished LoRA run (no {ADAPTER_JSON} and {ADAPTER_FILE}; "
                          "train it with `cxrsam finetune` or resume it)", path=run_dir)
    try:
        return AdapterInfo.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            raise CxrsamError(f"invalid adapter description: {'.'.join(map(str, first['loc']))}: {first['msg']}",
                              path=path) from None
        raise CxrsamError(f"unreadable adapter description ({str(exc).splitlines()[0]})", path=path) from None


def read_adapter_state(run_dir: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The SHA-256 and the tensors of a finished run's ``adapter.safetensors`` (adapters and opened weights),
    checked against ``checksums.json`` and for non-finite values (one-line :class:`CxrsamError` naming the file)."""
    from safetensors.torch import load_file

    path = Path(run_dir) / ADAPTER_FILE
    sha256 = verify_checksum(path)
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CxrsamError(f"unreadable adapter file ({type(exc).__name__}: {first})", path=path) from None
    require_finite(state, path)
    return sha256, state


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
             scale: float | None = None, lazy: bool = False) -> LoraSam:
    """Rebuild a trained LoRA model: the run's base checkpoint with its adapters and opened weights.

    Args:
        run_dir: a run directory written by :func:`cxrsam.train.finetune.finetune`.
        device: the model's device.
        checkpoint: base checkpoint to use instead of the recorded path (e.g. the run was moved to
            another machine); it must have the recorded SHA-256.
        scale: WiSE-FT alpha in [0, 1] (:func:`interpolate`; ``--lora-scale``); None: the run's
            recorded ``lora_scale``.
        lazy: check the files and their hashes now; read the weights and build the model when it is first used
            (:func:`~cxrsam.sam.registry.build_sam`'s ``lazy``), so no PyTorch is imported before then.

    Raises:
        CxrsamError: missing files, or a base whose SHA-256 differs from the one trained on.
    """
    run_dir = Path(run_dir)
    info = read_adapter_info(run_dir)
    adapter_path = run_dir / ADAPTER_FILE
    # lazy: the adapter file's checksum now, its tensors (and their finiteness) when the model is built
    adapter_sha256, eager_state = (verify_checksum(adapter_path), None) if lazy else read_adapter_state(run_dir)
    spec = get_backend(info.backend)
    recorded = info.base_checkpoint
    base = checkpoint if checkpoint is not None else (recorded if recorded.is_file() else None)
    loaded = build_sam(spec, checkpoint=base, device="cpu", lazy=True)
    if loaded.checkpoint_sha256 != info.base_sha256:
        raise CxrsamError(f"base checkpoint SHA-256 {loaded.checkpoint_sha256[:16]}... differs from the one this run "
                          f"was trained on ({info.base_sha256[:16]}...); pass the original base checkpoint",
                          path=loaded.checkpoint_path)
    settings = info.lora
    scale = check_scale(info.lora_scale if scale is None else scale)
    device = str(device)

    def build() -> nn.Module:
        state = read_adapter_state(run_dir)[1] if eager_state is None else eager_state
        model = apply_lora(loaded.model, settings)
        current = model.state_dict()
        base = {k: current[k].clone() for k in state if not is_lora_key(k) and k in current}
        load_adapter_state(model, state, source=adapter_path)
        if scale != 1:
            interpolate(model, scale, base, {k: state[k] for k in base})
        for param in model.parameters():
            param.requires_grad_(False)
        return model.to(device).eval()

    run = LoraSam(spec=loaded.spec, checkpoint_path=loaded.checkpoint_path, checkpoint_sha256=loaded.checkpoint_sha256,
                  device=device, run_dir=run_dir, adapter_sha256=adapter_sha256, settings=settings, scale=scale,
                  mask_prompt=info.mask_prompt, builder=build)
    if not lazy:
        run.model  # noqa: B018 - build now: a bad run is refused before any image
    return run


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer (``W + B A * alpha/r``) and remove the peft layers, in place.

    The result has exactly the base architecture and state-dict keys, so it loads without peft.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def export_merged(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                  scale: float | None = None) -> Path:
    """Write the run's adapters merged into its base as a plain state dict in the backend's own format.

    The file loads with ``build_sam(backend, checkpoint=out)`` (no peft) and gives the same logits as
    the adapted model at ``scale`` (None: the run's recorded ``lora_scale``) up to float rounding.
    """
    import torch

    lora = load_run(run_dir, device="cpu", checkpoint=checkpoint, scale=scale)
    merged = merge(lora.model)
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save({k: v.contiguous() for k, v in merged.state_dict().items()}, tmp)
    log.info("merged %s into %s (%s) -> %s", run_dir, lora.spec.name, lora.checkpoint_path.name, out)
    return out
