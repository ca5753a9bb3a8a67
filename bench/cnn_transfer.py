"""CNN drafts under imitated dataset shift: CNN runs compared on the plain and the shifted images of one split.

Images: one split (``val`` by default; ``test`` only once, at the end) of the first ``--cnn-run``'s
``manifest.csv`` (every run must hold the same split), each in two versions as in ``bench/transfer.py``: **plain**
and **shifted** (:func:`cxrsam.data.shift.shifted_case`, seeded per image by its place in the split: another
aspect ratio, window, gamma, CLAHE or not, detector, collimation, burned-in text). Per image, version and CNN run:
the CNN draft's Dice (the CNN sees the shifted image), and zero-shot SAM's Dice with that draft's per-lung boxes
(the pretrained ``--backend``; each image encoded once). Every run after the first is compared with the first per
image (bootstrap CI of the mean difference, images better / worse, two-sided Wilcoxon p;
:func:`cxrsam.evaluation.stats.paired_comparison`). Dice at the (shifted) image's size.

    python bench/cnn_transfer.py --cnn-run runs/cpu/stages/cnn-unet --cnn-run runs/cnn-shift \\
        --csv runs/bench/cnn-transfer-val.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsam.baselines.drafts import CnnDrafts
from cxrsam.data.dataset import load_case
from cxrsam.data.shift import shifted_case
from cxrsam.data.split import read_manifest
from cxrsam.evaluation.evaluate import write_csv
from cxrsam.evaluation.metrics import dice_score
from cxrsam.evaluation.stats import paired_comparison
from cxrsam.prompts import prompts_from_mask
from cxrsam.runs import RunFolder
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.registry import build_sam

SAM = "zero-shot SAM, its boxes"


def split_cases(runs: list[Path], split: str, limit: int | None) -> list:
    """The ``split`` cases of the first run's manifest (the first ``limit``); every run must hold the same ones."""
    manifests = [read_manifest(RunFolder(run).manifest_file)[split] for run in runs]
    ids = [[case.case_id for case in cases] for cases in manifests]
    if any(other != ids[0] for other in ids[1:]):
        sys.exit(f"the CNN runs hold different {split} splits; compare runs trained on the same split")
    return manifests[0][:limit]


def evaluate(runs: list[Path], cases: list, seed: int, backend: str) -> pd.DataFrame:
    """Rows ``stem, version, run, model, dice`` (model: ``cnn`` or :data:`SAM`) for every case, version and run."""
    cnns = {run: CnnDrafts(run) for run in runs}
    engine = SamEngine(build_sam(backend), memory_items=2)
    rows = []
    for index, case in enumerate(cases):
        xray, truth = load_case(case)
        versions = {"plain": (xray, truth), "shifted": shifted_case(xray, truth, index, seed)[:2]}
        for version, (image, mask) in versions.items():
            for run, drafts in cnns.items():
                draft = drafts(image)
                prompts = prompts_from_mask(draft)
                sam = engine.segment(image, prompts) if not prompts.empty else np.zeros_like(mask)
                for model, pred in (("cnn", draft), (SAM, sam)):
                    rows.append({"stem": image.path.stem, "version": version, "run": str(run), "model": model,
                                 "dice": dice_score(pred, mask)})
        if (index + 1) % 10 == 0:
            print(f"{index + 1}/{len(cases)} images", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def compare(frame: pd.DataFrame, runs: list[Path]) -> pd.DataFrame:
    """Per (version, model): each run's mean Dice, and every later run minus the first, paired per image."""
    rows = []
    for (version, model), cell in frame.groupby(["version", "model"], sort=False):
        wide = cell.pivot(index="stem", columns="run", values="dice")
        first = wide[str(runs[0])].to_numpy()
        for run in runs[1:]:
            c = paired_comparison(wide[str(run)].to_numpy(), first)
            rows.append({"version": version, "model": model, "run": str(run), "dice": wide[str(run)].mean(),
                         "dice_first": first.mean(), "diff": c.mean_diff, "ci_low": c.ci_low, "ci_high": c.ci_high,
                         "better": c.n_better, "worse": c.n_worse, "p": c.p, "n": c.n})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, runs: list[Path], split: str, n: int, command: str, seconds: float) -> str:
    lines = [f"{split} split, {n} images in two versions (plain, shifted); first run `{runs[0]}`.", "", "```",
             command, "```", "",
             "| images | model | run | Dice | first run | run - first (95 % CI) | better / worse | p |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.version} | {row.model} | `{row.run}` | {row.dice:.4f} | {row.dice_first:.4f} | "
                     f"{row.diff:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}] | {row.better} / {row.worse} | "
                     f"{row.p:.2g} |")
    lines += ["", f"Wall time {seconds / 60:.1f} min.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn-run", type=Path, action="append", required=True,
                        help="CNN run folder (repeat; the first is the reference)")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shifted images (as bench/transfer.py)")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N images")
    parser.add_argument("--backend", default="litemedsam", help="Pretrained SAM backend for the zero-shot column")
    parser.add_argument("--csv", type=Path, default=None, help="Per-image CSV [default: none]")
    parser.add_argument("--rescore", type=Path, default=None, help="Compare from a finished call's per-image CSV")
    args = parser.parse_args()
    if len({run.resolve() for run in args.cnn_run}) != len(args.cnn_run) or len(args.cnn_run) < 2:
        parser.error("give at least two different --cnn-run folders to compare")
    started = time.perf_counter()
    if args.rescore is not None:
        frame = pd.read_csv(args.rescore)
    else:
        frame = evaluate(args.cnn_run, split_cases(args.cnn_run, args.split, args.limit), args.seed, args.backend)
        if args.csv is not None:
            write_csv(frame, args.csv)
    command = "python bench/cnn_transfer.py " + " ".join(
        [f"--cnn-run {run}" for run in args.cnn_run] + [f"--split {args.split}"]
        + [f"--limit {args.limit}"] * (args.limit is not None) + [f"--csv {args.csv}"] * (args.csv is not None))
    print(markdown(compare(frame, args.cnn_run), args.cnn_run, args.split, frame.stem.nunique(), command,
                   time.perf_counter() - started))


if __name__ == "__main__":
    main()
