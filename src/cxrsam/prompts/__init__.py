"""Point and box prompts for SAM derived from a draft lung mask."""

from cxrsam.prompts.prompts import BOX_MODES, MODES, PromptSet, Prompts, prompts_from_mask

__all__ = ["BOX_MODES", "MODES", "PromptSet", "Prompts", "prompts_from_mask"]
