"""SAM backends, checkpoint loading and the zero-shot engine."""

from cxrsam.sam.engine import PromptBatch, SamEngine, decode, encode
from cxrsam.sam.registry import BACKENDS, BackendSpec, LoadedSam, build_sam, load_checkpoint_state
from cxrsam.sam.transforms import Normalisation, SamTransform

__all__ = ["BACKENDS", "BackendSpec", "LoadedSam", "Normalisation", "PromptBatch", "SamEngine", "SamTransform",
           "build_sam", "decode", "encode", "load_checkpoint_state"]
