"""Chest X-ray data: reading images and masks, dataset layouts, splits, synthetic phantoms."""

from cxrsam.data.dataset import SegmentationDataset, load_case
from cxrsam.data.io import XRay, list_images, read_image, read_mask, write_mask
from cxrsam.data.layouts import LAYOUTS, Case, Discovery, discover, require_cases
from cxrsam.data.split import read_manifest, split_cases, write_manifest

__all__ = [
    "LAYOUTS", "Case", "Discovery", "SegmentationDataset", "XRay", "discover", "list_images", "load_case",
    "read_image", "read_manifest", "read_mask", "require_cases", "split_cases", "write_manifest", "write_mask",
]
