"""The cost of a reduced-precision SAM encoder: Dice against ground truth and mask IoU against fp32, and speed.

Variants (same weights, same prompts from the CNN run's drafts, ``per_lung`` boxes): on the CPU ``torch fp32`` (the
reference), ``onnx fp32``, ``torch bf16`` (autocast; needs AVX512-BF16/AMX) and ``onnx int8`` (the encoder dynamically
quantised by onnxruntime); on a GPU ``torch fp32``, ``torch bf16`` and ``torch fp16`` (autocast), the encoder
timed per ``--batch-size`` images (synchronised). Per image all variants run in turn (so machine load hits them
alike); the encoder's milliseconds are the median over images. Reported per variant: mean Dice against the
labels, the mean paired Dice change against torch fp32, mask IoU against torch fp32 (mean, min, images below
0.999), encoder ms and speed-up. ``--store`` writes the reduced precisions' numbers to
src/cxrsam/sam/precision_costs.json, which ``cxrsam predict --precision`` prints.

    nice -n 10 python bench/precision.py --data ../shared/data/COVID-19_Radiography_Dataset \\
        --drafts-from ../main/runs/cpu/stages/cnn-unet --images 40 --store
    python bench/precision.py --device cuda --backend vit_b --checkpoint runs/vit_b_random.pt --images 16 \
        --batch-size 8 --drafts-from ../main/runs/cpu/stages/cnn-unet       # GPU (bench/gpu.sh)
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
from cxrsam.config import device_type
from cxrsam.evaluation.metrics import dice_score, iou_score
from cxrsam.files import atomic_write_text
from cxrsam.prompts import PromptSpec
from cxrsam.sam.engine import PRECISION_COSTS, Precision, SamEngine, precision_cost_key
from cxrsam.sam.onnx_runtime import make_engine
from cxrsam.sam.registry import build_sam
from zero_shot_speed import SPLITS, cpu_features, load_xrays, machine

VARIANTS = {"cpu": [("torch", Precision.FP32), ("onnx", Precision.FP32), ("torch", Precision.BF16),
                    ("onnx", Precision.INT8)],
            "cuda": [("torch", Precision.FP32), ("torch", Precision.BF16), ("torch", Precision.FP16)]}


def encode_ms(engine: SamEngine, model_input: np.ndarray) -> float:
    """Milliseconds of one encoder call on ``model_input`` (B, 3, S, S), synchronised on a GPU."""
    cuda = device_type(engine.loaded.device) == "cuda"
    if cuda:
        torch.cuda.synchronize()
    tick = time.perf_counter()
    engine._encode(model_input)
    if cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/COVID-19_Radiography_Dataset"))
    parser.add_argument("--drafts-from", type=Path, required=True, help="CNN run whose drafts give the prompts")
    parser.add_argument("--images", type=int, default=40, help="First N images of --split")
    parser.add_argument("--split", choices=SPLITS, default="test", help="Images of --data to read")
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--checkpoint", type=Path, default=None, help="Weights of --backend [default: official]")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=1, help="Images per timed encoder call")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="Variants to run as RUNTIME:PRECISION (e.g. torch:fp32 onnx:int8); the first is the "
                             "reference [default: all of the device's]")
    parser.add_argument("--store", action="store_true", help=f"Write {PRECISION_COSTS.name} for cxrsam predict")
    args = parser.parse_args()
    loaded = build_sam(args.backend, args.checkpoint, device=args.device)
    kind = device_type(args.device)
    engines: dict[str, SamEngine] = {f"{rt} {p}": make_engine(loaded, rt, precision=p, memory_items=0,
                                                              batch_size=args.batch_size)
                                     for rt, p in ([v.split(":") for v in args.variants] if args.variants
                                                   else VARIANTS[kind])}
    xrays, truths, source = load_xrays(args.data, args.images, args.split)
    drafter = drafts_from_path(args.drafts_from, device=args.device)
    spec = PromptSpec(mode="box")
    prompts = [spec.prompts(drafter(x), x.path.stem) for x in xrays]
    print(f"Machine: {machine(args.device)}. Images: {source}; prompts: per-lung boxes of {args.drafts_from}'s drafts.",
          flush=True)
    started = time.perf_counter()
    for engine in engines.values():  # warm-up (kernels, oneDNN primitives)
        engine.segment(xrays[0], prompts[0])
    ms: dict[str, list[float]] = {name: [] for name in engines}
    masks: dict[str, list[np.ndarray]] = {name: [] for name in engines}
    for start in range(0, len(xrays), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        model_input = loaded.spec.transform.images([x.pixels for x in xrays[chunk]])  # the engine moves it
        for name, engine in engines.items():
            ms[name].append(encode_ms(engine, model_input) / len(model_input))
            masks[name] += engine.segment_many(xrays[chunk], prompts[chunk])
    reference = next(iter(engines))
    ref_dice = [dice_score(m, t) for m, t in zip(masks[reference], truths, strict=True)]
    ref_ms = statistics.median(ms[reference])
    lines = ["", f"| variant | Dice (mean) | Dice change vs {reference} | mask IoU vs {reference} mean / min | images "
             "IoU < 0.999 | encoder ms (median) | encoder speed-up |", "|---|---|---|---|---|---|---|"]
    stored = {}
    for name in engines:
        dice = [dice_score(m, t) for m, t in zip(masks[name], truths, strict=True)]
        ious = [iou_score(m, r) for m, r in zip(masks[name], masks[reference], strict=True)]
        change = float(np.mean(np.subtract(dice, ref_dice)))
        speedup = ref_ms / statistics.median(ms[name])
        lines.append(f"| {name} | {np.mean(dice):.4f} | {change:+.5f} | {np.mean(ious):.5f} / {min(ious):.5f} | "
                     f"{sum(i < 0.999 for i in ious)} of {len(ious)} | {statistics.median(ms[name]):.1f} | "
                     f"{speedup:.2f}x |")
        precision = engines[name].precision
        if precision is not Precision.FP32:
            stored[precision_cost_key(precision, args.device)] = {
                "runtime": name.split()[0], "backend": loaded.spec.name, "images": len(xrays),
                "data": f"{args.split} images of {args.data.name} (prompts: {args.drafts_from.name} drafts)",
                "dice_fp32": float(np.mean(ref_dice)), "dice_change": change, "iou_mean": float(np.mean(ious)),
                "iou_min": float(min(ious)), "encoder_speedup": speedup,
                "machine": (torch.cuda.get_device_name(args.device) if kind == "cuda"
                            else f"{os.cpu_count()}-core CPU ({cpu_features()}), load {os.getloadavg()[0]:.1f}"),
                "command": "python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print("\n".join(lines))
    print(f"\nTotal {time.perf_counter() - started:.0f} s; load average at the end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; torch threads {torch.get_num_threads()}.")
    if args.store:
        kept = json.loads(PRECISION_COSTS.read_text(encoding="utf-8")) if PRECISION_COSTS.is_file() else {}
        atomic_write_text(PRECISION_COSTS, json.dumps({**kept, **stored}, indent=2) + "\n")
        print(f"stored: {PRECISION_COSTS}")


if __name__ == "__main__":
    main()
