"""SAM on the CPU: PyTorch vs ONNX Runtime, side by side in one process, same weights, same images.

Two measurements, each run interleaved (torch, onnx, torch, onnx, ...) so machine load hits both; the median
of ``--repeats`` runs is reported:

``encoder``
    milliseconds per image of the image encoder alone (model input (1, 3, S, S) -> embedding), one image per call
    (the CPU default), after one warm-up call.
``predict``
    images per second of the whole per-image pipeline that ``cxrsam predict`` runs (draft -> per-lung box prompts
    -> encode -> decode -> mask at the original size), with the ground-truth masks as drafts and no embedding
    kept between images (every image is encoded); disk reading and writing are excluded.

The ONNX export (once per model, cached under ``$CXRSAM_CACHE``; see docs/predict.md, "Runtimes") happens
before timing. The masks of the ONNX path are compared with PyTorch's (IoU per image; target >= 0.999).

    nice -n 10 python bench/onnx_speed.py --data ../shared/data/COVID-19_Radiography_Dataset --images 32
    nice -n 10 python bench/onnx_speed.py --run runs/lora --images 32     # a LoRA run (exported merged)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cxrsam.data.io import XRay
from cxrsam.evaluation.metrics import iou_score
from cxrsam.pipeline import Segmenter
from cxrsam.prompts import PromptSpec
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.registry import LoadedSam, build_sam
from zero_shot_speed import load_xrays, machine

RUNTIMES = ("torch", "onnx")


def encoder_ms(engine: SamEngine, inputs: list[np.ndarray]) -> float:
    """Milliseconds per image of ``engine``'s encoder call over preprocessed inputs (1, 3, S, S)."""
    started = time.perf_counter()
    for x in inputs:
        engine._encode(x)
    return 1000 * (time.perf_counter() - started) / len(inputs)


def predict_run(segmenter: Segmenter, xrays: list[XRay], drafts: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """Images per second of :meth:`Segmenter.segment` over all images, and the masks."""
    started = time.perf_counter()
    masks = [segmenter.segment(x, draft=d).mask for x, d in zip(xrays, drafts, strict=True)]
    return len(xrays) / (time.perf_counter() - started), masks


def compare(loaded: LoadedSam, xrays: list[XRay], truths: list[np.ndarray], repeats: int) -> list[str]:
    spec = PromptSpec(mode="box")
    segmenters = {rt: Segmenter(loaded, spec=spec, memory_items=0, runtime=rt) for rt in RUNTIMES}  # exports once
    inputs = [loaded.spec.transform.images([x.pixels]) for x in xrays]
    for segmenter in segmenters.values():  # warm-up: first calls build oneDNN primitives / ORT kernels
        encoder_ms(segmenter.engine, inputs[:1])
        predict_run(segmenter, xrays[:1], truths[:1])
    ms: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    rates: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    masks: dict[str, list[np.ndarray]] = {}
    for _ in range(repeats):
        for rt, segmenter in segmenters.items():
            ms[rt].append(encoder_ms(segmenter.engine, inputs))
            rate, masks[rt] = predict_run(segmenter, xrays, truths)
            rates[rt].append(rate)
    ious = [iou_score(a, b) for a, b in zip(masks["onnx"], masks["torch"], strict=True)]
    check = segmenters["onnx"].engine.onnx.check
    lines = [f"**{loaded.model_id}** ({loaded.spec.name}, {loaded.spec.img_size} px), {len(xrays)} images, "
             f"{repeats} interleaved runs (median):", "",
             "| runtime | encoder ms/image | predict images/s | runs (images/s) |", "|---|---|---|---|"]
    for rt in RUNTIMES:
        lines.append(f"| {rt} | {statistics.median(ms[rt]):.1f} | {statistics.median(rates[rt]):.3f} | "
                     f"{', '.join(f'{r:.3f}' for r in rates[rt])} |")
    encoder_speedup = statistics.median(ms["torch"]) / statistics.median(ms["onnx"])
    predict_speedup = statistics.median(rates["onnx"]) / statistics.median(rates["torch"])
    lines += ["", f"Speed-up (onnx / torch): encoder {encoder_speedup:.2f}x, predict {predict_speedup:.2f}x. "
              f"Mask IoU onnx vs torch: min {min(ious):.5f}, mean {statistics.fmean(ious):.5f}. Export check: "
              f"relative embedding difference {check['relative_embedding_diff']:.1e}, mask IoU "
              f"{check['min_mask_iou']:.5f}.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/COVID-19_Radiography_Dataset"))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--backend", default="litemedsam", help="Pretrained backend (without --run)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="Backend weights, or the base of --run")
    parser.add_argument("--run", type=Path, default=None, help="LoRA run folder (exported merged)")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved runs per runtime")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (ONNX Runtime follows it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run is not None:
        from cxrsam.sam.lora import load_run

        loaded = load_run(args.run, device="cpu", checkpoint=args.checkpoint)
    else:
        loaded = build_sam(args.backend, args.checkpoint, device="cpu")
    xrays, truths, source = load_xrays(args.data, args.images)
    started = time.perf_counter()
    print(f"Machine: {machine('cpu')}. Images: {source}.\n")
    print("\n".join(compare(loaded, xrays, truths, args.repeats)), flush=True)
    print(f"Total {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
