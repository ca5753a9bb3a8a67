"""Where draft lung masks come from: a trained CNN run, or a folder of mask files (hand-made or another
model's, named ``<stem>.png`` or ``<stem>_mask.png`` -- so ``cxrsam predict``'s output feeds back in)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cxrsam.baselines.predict import DraftPredictor, load_cnn_run
from cxrsam.data.io import XRay, index_masks, probability_file, read_draft, read_probability
from cxrsam.errors import CxrsamError
from cxrsam.files import sha256_file
from cxrsam.runs import ADAPTER_JSON, BEST, CHECKSUMS_JSON, CONFIG_YAML


class DraftSource(Protocol):
    """A draft source: ``kind`` names it in outputs; calling it gives the draft lung mask bool (H, W) of an X-ray
    at its own size, or raises :class:`CxrsamError` naming the image or draft file at fault."""

    kind: str

    def __call__(self, xray: XRay) -> np.ndarray: ...

    def probability(self, xray: XRay) -> np.ndarray:
        """The draft's foreground probability float32 (H, W) in [0, 1] at the image's size (point weights)."""
        ...

    def describe(self) -> dict[str, Any]: ...


class MaskFolderDrafts:
    """Drafts read from a folder by image stem (:func:`cxrsam.data.io.read_draft`: same aspect ratio, resized to
    the image; an empty draft is refused, naming the draft file)."""

    kind = "draft-file"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CxrsamError("draft mask folder not found", path=self.folder)
        self.files = index_masks(self.folder)
        if not self.files:
            raise CxrsamError("no draft masks (image files) in folder", path=self.folder)

    def __call__(self, xray: XRay) -> np.ndarray:
        path = self.files.get(xray.path.stem)
        if path is None:
            raise CxrsamError(f"no draft mask for this image in {self.folder}", path=xray.path)
        return read_draft(path, xray.size)

    def probability(self, xray: XRay) -> np.ndarray:
        """The stored probability map beside the draft (``<stem>_prob.png``,
        :func:`cxrsam.data.io.probability_file`), else the draft mask itself as 0/1."""
        path = self.files.get(xray.path.stem)
        if path is not None and probability_file(path).is_file():
            return read_probability(probability_file(path), xray.size)
        return self(xray).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder.resolve())}


class CnnDrafts:
    """Drafts predicted by a trained CNN baseline run, in PyTorch (:func:`cxrsam.baselines.predict.load_cnn_run`)
    or, when ``runtime`` resolves to ``onnx`` (:func:`~cxrsam.sam.onnx_runtime.resolve_runtime`: ``auto`` on the
    CPU with the extra installed), in ONNX Runtime (:func:`cxrsam.baselines.onnx_cnn.load_onnx_cnn`)."""

    kind = "cnn-draft"

    def __init__(self, run_dir: str | Path, device: str | None = None, postprocess: bool = True,
                 runtime: str = "torch"):
        from cxrsam.config import resolve_device
        from cxrsam.sam.onnx_runtime import Runtime, resolve_runtime

        self.run_dir = Path(run_dir)
        if resolve_runtime(runtime, resolve_device(device)) is Runtime.ONNX:
            from cxrsam.baselines.onnx_cnn import load_onnx_cnn

            self.predictor: DraftPredictor = load_onnx_cnn(self.run_dir, postprocess=postprocess)
        else:
            self.predictor = load_cnn_run(self.run_dir, device=device, postprocess=postprocess)

        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def probability(self, xray: XRay) -> np.ndarray:
        """The CNN's lung probability map float32 (H, W) (kept for the last pixel array, so the mask and the map
        of one image cost one pass)."""
        if self._last is None or self._last[0] is not xray.pixels:
            self._last = (xray.pixels, self.predictor.probabilities([xray.pixels])[0])
        return self._last[1]

    def __call__(self, xray: XRay) -> np.ndarray:
        return np.asarray(self.predictor.mask_of(self.probability(xray))) > 0

    def describe(self) -> dict[str, Any]:
        config = self.predictor.config
        return {"kind": self.kind, "run": str(self.run_dir.resolve()), "arch": config.arch, "encoder": config.encoder,
                "size": config.size, "postprocess": self.predictor.postprocess, "runtime": self.predictor.runtime,
                "checkpoint_sha256": self.checkpoint_sha256}

    @cached_property
    def checkpoint_sha256(self) -> str:
        """SHA-256 of the run's ``best.pt`` (hashed once per draft source, not per description)."""
        return sha256_file(self.run_dir / BEST)


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a run folder (it holds a run's config, adapters or checksums) rather than a folder of
    masks; :class:`CnnDrafts` then says whether it is a CNN run."""
    return any((Path(path) / name).is_file() for name in (CONFIG_YAML, ADAPTER_JSON, CHECKSUMS_JSON))


def drafts_from_path(source: str | Path, device: str | None = None,
                     runtime: str = "torch") -> DraftSource:
    """Drafts from a CNN run folder (:class:`CnnDrafts`, run by ``runtime``) or from a folder of mask files
    (:class:`MaskFolderDrafts`)."""
    return CnnDrafts(source, device, runtime=runtime) if is_run_folder(source) else MaskFolderDrafts(source)
