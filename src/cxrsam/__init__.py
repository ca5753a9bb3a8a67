"""cxrsam: lung segmentation in chest X-rays with SAM adapted by LoRA.

Pipeline: ``data`` (datasets, splits) -> ``baselines`` (U-Net, DeepLabv3+ draft masks)
-> ``prompts`` (boxes and points from drafts) -> ``sam`` (backends, zero-shot, LoRA)
-> ``evaluation`` (metrics, statistics) -> ``report``.
"""

import os

# OpenMP threads that spin while waiting waste the few cores of a shared CPU (measured in docs/benchmarks.md);
# this must be set before torch starts its thread pool, and an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
