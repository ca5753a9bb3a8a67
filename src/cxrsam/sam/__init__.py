"""SAM backends, checkpoint loading and the zero-shot engine."""

from cxrsam.sam.engine import PromptBatch, SamEngine, decode, encode, postprocess, preprocess
from cxrsam.sam.registry import BACKENDS, BackendSpec, LoadedSam, build_sam, load_checkpoint_state

__all__ = ["BACKENDS", "BackendSpec", "LoadedSam", "PromptBatch", "SamEngine", "build_sam", "decode", "encode",
           "load_checkpoint_state", "postprocess", "preprocess"]
