"""Point and box prompts for SAM derived from a draft lung mask."""

from cxrsam.prompts.prompts import BOX_MODES, MODES, Prompts, PromptSet, add_points, prompts_from_mask, with_previous
from cxrsam.prompts.spec import BoxMode, NegativeKind, PointStrategy, PromptMixture, PromptMode, PromptSpec, image_seed

__all__ = ["BOX_MODES", "MODES", "BoxMode", "NegativeKind", "PointStrategy", "PromptMixture", "PromptMode", "PromptSet",
           "PromptSpec", "Prompts", "add_points", "image_seed", "prompts_from_mask", "with_previous"]
