"""CNN baselines (U-Net, DeepLabv3+): models, mask post-processing and draft-mask prediction."""

from cxrsam.baselines.models import ARCHITECTURES, build_cnn
from cxrsam.baselines.postprocess import clean_mask, fill_holes, keep_largest_components, label_components

__all__ = ["ARCHITECTURES", "build_cnn", "clean_mask", "fill_holes", "keep_largest_components", "label_components"]
