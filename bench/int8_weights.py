"""int8 encoder weights, 8 bit against 7 bit (``reduce_range``), on this CPU: masks against the fp32 ONNX masks.

CPUs without VNNI (AVX2 only) multiply u8 activations by s8 weights with ``VPMADDUBSW``, whose int16 pair sums
saturate; 7-bit weights avoid that (onnxruntime's quantisation docs). Each setting is quantised from the same cached
float32 export (:func:`cxrsam.sam.onnx_runtime.int8_settings` patched for each); prompts are per-lung boxes
of a CNN run's drafts on the first N test-split images; Dice is against the labels.

    PYTHONPATH=src:bench python bench/int8_weights.py --drafts-from runs/h18/stages/cnn-unet --images 30
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

from cxrsam.baselines.drafts import drafts_from_path
from cxrsam.evaluation.metrics import dice_score, iou_score
from cxrsam.prompts import PromptSpec
from cxrsam.sam import onnx_runtime as ort_sam
from cxrsam.sam.registry import build_sam
from zero_shot_speed import load_xrays, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/COVID-19_Radiography_Dataset"))
    parser.add_argument("--drafts-from", type=Path, required=True, help="CNN run whose drafts give the prompts")
    parser.add_argument("--images", type=int, default=30, help="First N test-split images")
    args = parser.parse_args()

    xrays, truths, source = load_xrays(args.data, args.images, "test")
    drafter = drafts_from_path(args.drafts_from, device="cpu")
    prompts = [PromptSpec(mode="box").prompts(drafter(x), x.path.stem) for x in xrays]
    loaded = build_sam("litemedsam", device="cpu")
    exported = ort_sam.load_onnx_sam(loaded).folder  # the cached float32 export, made once
    print(f"Machine: {machine('cpu')}. Images: {source}.")
    masks = {}
    chosen = ort_sam.int8_settings()  # this CPU's; each variant below sets reduce_range itself
    for name, reduce_range in (("fp32 (reference)", None), ("8 bit", False), ("7 bit (reduce_range)", True)):
        with tempfile.TemporaryDirectory() as root, \
                mock.patch.object(ort_sam, "int8_settings", lambda r=bool(reduce_range): {**chosen, "reduce_range": r}):
            folder = ort_sam.export_dir(loaded, root=root)
            folder.mkdir(parents=True)
            for file in (ort_sam.ENCODER, ort_sam.DECODER, ort_sam.CHECK):
                shutil.copy(exported / file, folder / file)
            precision = "fp32" if reduce_range is None else "int8"
            engine = ort_sam.OnnxSamEngine(loaded, onnx_root=root, precision=precision)
            masks[name] = engine.segment_many(xrays, prompts)
    reference = masks["fp32 (reference)"]
    print("\n| int8 weights | Dice | mask IoU vs fp32, mean / min |\n|---|---|---|")
    for name, found in masks.items():
        ious = [iou_score(a, b) for a, b in zip(found, reference, strict=True)]
        dice = [dice_score(a, t) for a, t in zip(found, truths, strict=True)]
        print(f"| {name} | {np.mean(dice):.5f} | {np.mean(ious):.5f} / {min(ious):.5f} |")


if __name__ == "__main__":
    main()
