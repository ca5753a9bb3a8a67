"""The cost of a reduced-precision SAM encoder: Dice against ground truth and mask IoU against fp32, and speed.

Variants (same weights, same prompts from the CNN run's drafts, ``per_lung`` boxes): ``torch fp32`` (the
reference), ``onnx fp32``, ``torch bf16`` (autocast; needs AVX512-BF16/AMX on a CPU) and ``onnx int8`` (the
encoder dynamically quantised by onnxruntime). Per image all variants run in turn (so machine load hits them
alike); the encoder's milliseconds are the median over images. Reported per variant: mean Dice against the
labels, the mean paired Dice change against torch fp32, mask IoU against torch fp32 (mean, min, images below
0.999), encoder ms and speed-up. ``--store`` writes the reduced precisions' numbers to
src/cxrsam/sam/precision_costs.json, which ``cxrsam predict --precision`` prints.

    nice -n 10 python bench/precision.py --data ../shared/data/COVID-19_Radiography_Dataset \\
        --drafts-from ../main/runs/cpu/stages/cnn-unet --images 40 --store
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cxrsam.baselines.drafts import drafts_from_path
from cxrsam.evaluation.metrics import dice_score, iou_score
from cxrsam.files import atomic_write_text
from cxrsam.prompts import PromptSpec
from cxrsam.sam.engine import PRECISION_COSTS, Precision, SamEngine
from cxrsam.sam.onnx_runtime import make_engine
from cxrsam.sam.registry import build_sam
from onnx_speed import load_xrays
from zero_shot_speed import machine

VARIANTS = [("torch", Precision.FP32), ("onnx", Precision.FP32), ("torch", Precision.BF16), ("onnx", Precision.INT8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/COVID-19_Radiography_Dataset"))
    parser.add_argument("--drafts-from", type=Path, required=True, help="CNN run whose drafts give the prompts")
    parser.add_argument("--images", type=int, default=40, help="First N test-split images")
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--store", action="store_true", help=f"Write {PRECISION_COSTS.name} for cxrsam predict")
    args = parser.parse_args()
    loaded = build_sam(args.backend, device="cpu")
    engines: dict[str, SamEngine] = {f"{rt} {p}": make_engine(loaded, rt, precision=p, memory_items=0)
                                     for rt, p in VARIANTS}
    xrays, truths, source = load_xrays(args.data, args.images)
    drafter = drafts_from_path(args.drafts_from, device="cpu")
    spec = PromptSpec(mode="box")
    prompts = [spec.prompts(drafter(x), x.path.stem) for x in xrays]
    print(f"Machine: {machine('cpu')}. Images: {source}; prompts: per-lung boxes of {args.drafts_from}'s drafts.",
          flush=True)
    started = time.perf_counter()
    for engine in engines.values():  # warm-up (kernels, oneDNN primitives)
        engine.segment(xrays[0], prompts[0])
    ms: dict[str, list[float]] = {name: [] for name in engines}
    masks: dict[str, list[np.ndarray]] = {name: [] for name in engines}
    for xray, prompt in zip(xrays, prompts, strict=True):
        model_input = loaded.spec.transform.images([xray.pixels])
        for name, engine in engines.items():
            tick = time.perf_counter()
            engine._encode(model_input)
            ms[name].append(1000 * (time.perf_counter() - tick))
            masks[name].append(engine.segment(xray, prompt))
    reference = "torch fp32"
    ref_dice = [dice_score(m, t) for m, t in zip(masks[reference], truths, strict=True)]
    ref_ms = statistics.median(ms[reference])
    lines = ["", "| variant | Dice (mean) | Dice change vs torch fp32 | mask IoU vs torch fp32 mean / min | images "
             "IoU < 0.999 | encoder ms (median) | encoder speed-up |", "|---|---|---|---|---|---|---|"]
    stored = {}
    for name in engines:
        dice = [dice_score(m, t) for m, t in zip(masks[name], truths, strict=True)]
        ious = [iou_score(m, r) for m, r in zip(masks[name], masks[reference], strict=True)]
        change = float(np.mean(np.subtract(dice, ref_dice)))
        speedup = ref_ms / statistics.median(ms[name])
        lines.append(f"| {name} | {np.mean(dice):.4f} | {change:+.5f} | {np.mean(ious):.5f} / {min(ious):.5f} | "
                     f"{sum(i < 0.999 for i in ious)} of {len(ious)} | {statistics.median(ms[name]):.0f} | "
                     f"{speedup:.2f}x |")
        precision = engines[name].precision
        if precision is not Precision.FP32:
            stored[str(precision)] = {
                "runtime": name.split()[0], "backend": loaded.spec.name, "images": len(xrays),
                "data": f"test-split images of {args.data.name} (prompts: {args.drafts_from.name} drafts)",
                "dice_fp32": float(np.mean(ref_dice)), "dice_change": change, "iou_mean": float(np.mean(ious)),
                "iou_min": float(min(ious)), "encoder_speedup": speedup,
                "machine": f"{os.cpu_count()}-core CPU, load {os.getloadavg()[0]:.1f}",
                "command": "python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print("\n".join(lines))
    print(f"\nTotal {time.perf_counter() - started:.0f} s; load average at the end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; torch threads {torch.get_num_threads()}.")
    if args.store:
        atomic_write_text(PRECISION_COSTS, json.dumps(stored, indent=2) + "\n")
        print(f"stored: {PRECISION_COSTS}")


if __name__ == "__main__":
    main()
