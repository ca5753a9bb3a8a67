"""How far a draft source's per-lung boxes are from the ground-truth boxes (to set the training box jitter).

LoRA fine-tuning samples jittered ground-truth boxes (``--box-jitter``: noise std as a fraction of the box side,
:func:`cxrsam.prompts.boxes.adjust_box`). This script measures the error the jitter should imitate: per lung and
coordinate, the draft's box minus the ground truth's, in pixels at the model size and as a fraction of the box
side, on the **validation** split by default (never choose settings on the test split). Images where the draft
or the ground truth does not have two lungs are counted and left out.

    python bench/prompt_error.py --data ../shared/data/COVID-19_Radiography_Dataset \\
        --drafts runs/cpu/stages/cnn-unet --split val
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cxrsam.baselines.drafts import drafts_from_path
from cxrsam.data.dataset import load_case, resize_mask_square
from cxrsam.data.layouts import discover, require_cases
from cxrsam.data.split import split_cases
from cxrsam.prompts.prompts import prompts_from_mask

COORDS = ("x0", "y0", "x1", "y1")


def box_errors(draft: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-lung box errors of a draft: (pixels (L, 4), fractions of the true box side (L, 4)); None if the
    draft and the truth do not both have two lungs."""
    drafted, true = prompts_from_mask(draft), prompts_from_mask(truth)
    if len(drafted.sets) != 2 or len(true.sets) != 2:
        return None
    pixels = np.stack([d.box - t.box for d, t in zip(drafted.sets, true.sets, strict=True)])
    sides = np.stack([np.tile([t.box[2] - t.box[0] + 1, t.box[3] - t.box[1] + 1], 2) for t in true.sets])
    return pixels, pixels / sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/COVID-19_Radiography_Dataset"))
    parser.add_argument("--drafts", type=Path, required=True, help="CNN run folder or a folder of draft masks")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--size", type=int, default=256, help="Model input size the boxes are measured at")
    args = parser.parse_args()

    draft_of = drafts_from_path(args.drafts)
    cases = split_cases(require_cases(discover(args.data)), seed=0)[args.split]
    pixels, fractions, skipped = [], [], 0
    for case in cases:
        xray, truth = load_case(case)
        errors = box_errors(resize_mask_square(draft_of(xray), args.size), resize_mask_square(truth, args.size))
        if errors is None:
            skipped += 1
            continue
        pixels.append(errors[0])
        fractions.append(errors[1])
    pixels, fractions = np.concatenate(pixels), np.concatenate(fractions)
    print(f"{args.split} split: {len(pixels)} lung boxes from {len(cases) - skipped} images "
          f"({skipped} left out: not two lungs); draft source {args.drafts}; {args.size} px")
    print("| coordinate | mean (px) | std (px) | median abs (px) | 90 % abs (px) | std (fraction of side) |")
    print("|---|---|---|---|---|---|")
    for i, name in enumerate(COORDS):
        px, frac = pixels[:, i], fractions[:, i]
        print(f"| {name} | {px.mean():+.2f} | {px.std():.2f} | {np.median(np.abs(px)):.1f} "
              f"| {np.quantile(np.abs(px), 0.9):.1f} | {frac.std():.3f} |")
    print(f"all coordinates: std {fractions.std():.3f} of the box side "
          f"(a --box-jitter of J gives std J, median abs 0.67 J)")


if __name__ == "__main__":
    main()
