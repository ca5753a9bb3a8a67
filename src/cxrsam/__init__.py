"""cxrsam: lung segmentation in chest X-rays with SAM adapted by LoRA.

Pipeline: ``data`` (datasets, splits) -> ``baselines`` (U-Net, DeepLabv3+ draft masks)
-> ``prompts`` (boxes and points from drafts) -> ``sam`` (backends, zero-shot, LoRA)
-> ``evaluation`` (metrics, statistics) -> ``report``.
"""

__version__ = "0.1.0"
