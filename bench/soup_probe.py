"""Can one set of weights keep both the box run's box accuracy and the mixed run's point accuracy? (issue 18)

Task arithmetic between two LoRA runs of the same backend: each run is merged into plain weights
(:func:`cxrsam.sam.lora.export_merged`), and for each ``--combo A,B`` the weights

    W = W_base + A (W_box - W_base) + B (W_mixed - W_base)

are scored on the first ``--limit`` validation images of the run's manifest, with per-lung boxes and with
``--points`` probability-weighted points from the CNN run's drafts (the prompts of bench/point_sweep.py). ``0,0`` is
the untouched backend, ``1,0`` the box run, ``0,1`` the mixed run. Validation images only: a probe for the next
recipe, not a result on the test split.

    nice -n 10 python bench/soup_probe.py --box-run runs/cpu/stages/lora --mixed-run runs/lora-mixed \\
        --cnn-run runs/cpu/stages/cnn-unet --limit 24 --combo 0,0 1,0 0,1 1,1 1,0.5 1,0.25
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cxrsam.baselines.drafts import CnnDrafts
from cxrsam.data.dataset import load_case
from cxrsam.data.split import read_manifest
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.lora import export_merged, read_adapter_info
from cxrsam.sam.registry import build_sam, load_checkpoint_state
from cxrsam.sam.zeroshot import dice_by_prompt_variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box-run", type=Path, required=True, help="LoRA run trained with box prompts")
    parser.add_argument("--mixed-run", type=Path, required=True, help="LoRA run trained with mixed prompts")
    parser.add_argument("--cnn-run", type=Path, required=True, help="CNN run: drafts and probability maps")
    parser.add_argument("--limit", type=int, default=24, help="First N validation images of the box run's manifest")
    parser.add_argument("--points", type=int, default=30, help="Probability points per image")
    parser.add_argument("--combo", nargs="+", default=["0,0", "1,0", "0,1", "1,0.5"], help="A,B weights")
    args = parser.parse_args()
    started = time.perf_counter()
    info = read_adapter_info(args.box_run)
    with tempfile.TemporaryDirectory(prefix="soup-") as folder:  # merged and mixed weights, ~40 MB each
        work = Path(folder)
        base = load_checkpoint_state(Path(info.base_checkpoint))
        box, mixed = (load_checkpoint_state(export_merged(run, work / f"{name}.pt", scale=1.0))
                      for name, run in (("box", args.box_run), ("mixed", args.mixed_run)))
        cases = read_manifest(args.box_run / "manifest.csv")["val"][:args.limit]
        pairs = [load_case(case) for case in cases]
        xrays, truths = [x for x, _ in pairs], [m for _, m in pairs]
        drafts = CnnDrafts(args.cnn_run)
        masks, weights = [drafts(x) for x in xrays], [drafts.probability(x) for x in xrays]
        variants = {f"points {args.points}": {"mode": "points", "strategy": "probability", "points": args.points},
                    "box": {"mode": "box"}}
        print(f"| A (box run) | B (mixed run) | Dice, per-lung boxes | Dice, {args.points} points |\n|---|---|---|---|")
        for combo in args.combo:
            a, b = (float(v) for v in combo.split(","))
            soup = {k: v + a * (box[k] - v) + b * (mixed[k] - v) if v.is_floating_point() else v
                    for k, v in base.items()}
            path = work / f"soup-{a}-{b}.pt"
            torch.save(soup, path)
            engine = SamEngine(build_sam(info.backend, checkpoint=path), memory_items=0)
            path.unlink()  # loaded: the next mix needs the space, not this file
            frame = dice_by_prompt_variant(engine, xrays, truths, {args.cnn_run.name: masks}, variants,
                                           weights={args.cnn_run.name: weights}, progress=False)
            dice = frame.groupby("variant").dice.mean()
            print(f"| {a:g} | {b:g} | {dice['box']:.4f} | {dice[f'points {args.points}']:.4f} |", flush=True)
    print(f"\n{len(xrays)} validation images; {(time.perf_counter() - started) / 60:.1f} min.")


if __name__ == "__main__":
    main()
