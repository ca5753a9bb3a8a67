"""Zero-shot SAM Dice on real CXR for every prompt variant, with drafts from ground truth and CNN runs.

Test split of the default split (seed 0, ratios 0.8/0.1/0.1, :func:`cxrsam.data.split.split_cases`).
Each image is encoded once; all prompt variants and draft sources are decoded from its cached
embedding (:func:`cxrsam.sam.zeroshot.dice_by_prompt_variant`). Writes the per-image CSV and, with
``--docs``, replaces the "Zero-shot SAM (oracle prompts)" section of docs/results.md.

    nice -n 10 python bench/zero_shot_oracle.py --data ../shared/data/COVID-19_Radiography_Dataset \\
        --cnn-run runs/unet-r18-128-e3 --docs docs/results.md
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from cxrsam.baselines.drafts import CnnDrafts
from cxrsam.data.dataset import load_case
from cxrsam.data.layouts import discover, require_cases
from cxrsam.data.split import split_cases
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.registry import build_sam
from cxrsam.sam.zeroshot import dice_by_prompt_variant
from results_md import replace_section

ORACLE_VARIANTS = {
    "box, per lung": {"mode": "box"},
    "box, enclosing": {"mode": "box", "box_mode": "enclosing"},
    "points N=1": {"mode": "points", "points_per_lung": 1},
    "points N=3": {"mode": "points", "points_per_lung": 3},
    "points N=5": {"mode": "points", "points_per_lung": 5},
    "box+points N=3": {"mode": "box+points", "points_per_lung": 3},
}
"""Prompt variants scored with ground-truth drafts (``distance`` point strategy, per-lung sets)."""
CNN_VARIANTS = ("box, per lung", "points N=3", "box+points N=3")
"""Variants also scored with CNN drafts."""
SECTION = "## Zero-shot SAM (oracle prompts)"


def markdown(frame: pd.DataFrame, command: str, backend: str, n_images: int, seconds: float) -> str:
    table = frame.groupby(["source", "variant"], sort=False)["dice"].agg(["mean", "std", "min", "count"])
    lines = [SECTION, "",
             f"Backend `{backend}`, zero-shot (no training). Images: the **test split** ({n_images} images) of the "
             "default split (`cxrsam.data.split.split_cases`, seed 0, ratios 0.8/0.1/0.1) of "
             "`../shared/data/COVID-19_Radiography_Dataset` (Viral Pneumonia, 299x299; 256x256 masks resized to "
             "the image by nearest neighbour). Prompts from the draft named in *source* (rules: docs/prompts.md; "
             "points by the `distance` strategy); per-lung masks merged by union; Dice at the original image size.",
             "", "```", command, "```", "",
             "| source | prompt | Dice mean ± std | min | n |", "|---|---|---|---|---|"]
    for (source, variant), row in table.iterrows():
        lines.append(f"| {source} | {variant} | {row['mean']:.4f} ± {row['std']:.4f} | {row['min']:.4f} "
                     f"| {int(row['count'])} |")
    per_lung = frame[frame.variant == "box, per lung"]
    single = per_lung.groupby("source")["components"].apply(lambda c: int((c < 2).sum()))
    lines += ["", "Drafts with fewer than two lung components (then one prompt set covers what was found): "
              + ", ".join(f"{source}: {count}" for source, count in single.items()) + ".",
              "", f"Run time {seconds / 60:.1f} min on {platform.processor() or platform.machine()} "
              f"({torch.get_num_threads()} threads, CPU shared with other jobs).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/COVID-19_Radiography_Dataset"))
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--cnn-run", type=Path, action="append", default=[], help="CNN run folder (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N test images")
    parser.add_argument("--csv", type=Path, default=Path("runs/bench/zero_shot_oracle.csv"))
    parser.add_argument("--docs", type=Path, default=None, help="Update this results.md")
    args = parser.parse_args()

    started = time.perf_counter()
    cases = split_cases(require_cases(discover(args.data)), seed=0)["test"][:args.limit]
    pairs = [load_case(case) for case in cases]
    xrays, truths = [x for x, _ in pairs], [m for _, m in pairs]
    drafts = {"ground truth": truths}
    for run in args.cnn_run:
        predictor = CnnDrafts(run)
        drafts[f"CNN `{run.name}`"] = [predictor(x) for x in xrays]
    engine = SamEngine(build_sam(args.backend, args.checkpoint), memory_items=8)
    only = {source: CNN_VARIANTS for source in drafts if source != "ground truth"}
    frame = dice_by_prompt_variant(engine, xrays, truths, drafts, ORACLE_VARIANTS, only=only)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.csv, index=False)
    command = "nice -n 10 python bench/zero_shot_oracle.py " + " ".join(
        [f"--data {args.data}"] + [f"--backend {args.backend}"] * (args.backend != "litemedsam")
        + [f"--cnn-run {r}" for r in args.cnn_run] + [f"--limit {args.limit}"] * (args.limit is not None)
        + [f"--docs {args.docs}"] * (args.docs is not None))
    section = markdown(frame, command, args.backend, len(xrays), time.perf_counter() - started)
    print(section)
    print(f"per-image CSV: {args.csv} (images encoded: {engine.images_encoded})")
    if args.docs:
        replace_section(args.docs, SECTION, section)


if __name__ == "__main__":
    main()
