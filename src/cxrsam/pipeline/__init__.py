"""The one segmentation pipeline: inputs -> draft source -> prompts (a PromptSpec) -> SAM -> outputs."""

from cxrsam.pipeline.folder import FolderReport, collect_images, segment_images
from cxrsam.pipeline.outputs import OutputFormat, Segmentation, result_dict, write_outputs
from cxrsam.pipeline.segmenter import Segmenter, build_segmenter

__all__ = ["FolderReport", "OutputFormat", "Segmentation", "Segmenter", "build_segmenter", "collect_images",
           "result_dict", "segment_images", "write_outputs"]
