"""Transfer check: LoRA-SAM at WiSE-FT scales against zero-shot SAM on plain and shifted images (validation).

Images: one split (``val`` by default; ``test`` only once, at the end) of the LoRA run's ``manifest.csv``, each in
two versions: **plain** (as stored) and **shifted** (:func:`cxrsam.data.shift.shifted_case`, seeded per image:
another aspect ratio, intensity window, gamma, CLAHE or not, detector blur/sharpening and noise, collimation,
burned-in text). Per version, three box sources, per-lung boxes without jitter: the ground truth
(``oracle``), each ``--cnn-run``'s draft of *that* image (the CNN sees the shifted image too), and ``weak CNN``:
the oracle boxes moved like a CNN ``--weak-strength`` times worse than the U-Net
(:func:`cxrsam.data.shift.perturb_box`, the U-Net's measured error as unit). Models: the run loaded at each
``--scales`` alpha (:func:`cxrsam.sam.lora.load_run`); alpha 0 *is* zero-shot SAM (bit-identical, tested in
tests/sam/test_lora.py), so every alpha is compared with it per image (paired Wilcoxon, bootstrap CI of the
mean difference; :func:`cxrsam.evaluation.stats.paired_comparison`). Dice at the (shifted) image's size.

``--zero-shot-from CSV`` takes the scale-0 rows from an earlier run's per-image CSV of the same split, seed,
strength and images (zero-shot does not depend on the run: its base is the same), so a second run costs only its
own scales.

``--choose`` writes the chosen scale into the run's ``adapter.json`` (:func:`cxrsam.sam.lora.record_lora_scale`):
among scales that are not significantly worse (p < 0.05 with a negative mean difference) than zero-shot on any
(version, source) cell, the one with the highest Dice averaged over all cells; allowed on the validation split
only.

    nice -n 10 python bench/transfer.py --run runs/lora --cnn-run runs/cpu/stages/cnn-unet --choose \\
        --docs docs/results.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsam.baselines.drafts import CnnDrafts
from cxrsam.data.dataset import load_case
from cxrsam.data.shift import BoxError, perturb_box, shifted_case
from cxrsam.data.split import read_manifest
from cxrsam.evaluation.evaluate import write_csv
from cxrsam.evaluation.metrics import dice_score
from cxrsam.evaluation.stats import paired_comparison
from cxrsam.prompts import Prompts, PromptSet, prompts_from_mask
from cxrsam.runs import RunFolder
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.lora import load_run, record_lora_scale
from results_md import replace_section

SECTION = "## Transfer"
WEAK = "weak CNN"


def weak_prompts(truth: np.ndarray, error: BoxError, rng: np.random.Generator) -> Prompts:
    """The oracle per-lung boxes of ``truth``, each moved by :func:`perturb_box`."""
    oracle = prompts_from_mask(truth)
    sets = [PromptSet(box=perturb_box(s.box, truth.shape, error, rng)) for s in oracle.sets]
    return Prompts(sets, oracle.image_size, "box", oracle.components_found, list(oracle.warnings))


def build_sets(run: Path, split: str, cnn_runs: list[Path], limit: int | None, seed: int, strength: float,
               skip: int = 0) -> dict[str, list[tuple]]:
    """version -> [(xray, truth, {source: prompts})] for the plain and shifted images of ``split`` (``limit`` of
    them after the first ``skip``; each image's shift and weak boxes seeded by its place in the whole split)."""
    cases = read_manifest(RunFolder(run).manifest_file)[split][skip:None if limit is None else skip + limit]
    cnns = {cnn.name: CnnDrafts(cnn) for cnn in cnn_runs}
    error = BoxError().scaled(strength)
    out: dict[str, list[tuple]] = {"plain": [], "shifted": []}
    for index, case in enumerate(cases, start=skip):
        xray, truth = load_case(case)
        versions = {"plain": (xray, truth), "shifted": shifted_case(xray, truth, index, seed)[:2]}
        for version, (image, mask) in versions.items():
            prompts = {"oracle": prompts_from_mask(mask)}
            prompts |= {name: prompts_from_mask(draft(image)) for name, draft in cnns.items()}
            prompts[WEAK] = weak_prompts(mask, error, np.random.default_rng([seed, index, 7]))
            out[version].append((image, mask, prompts))
    print(f"{len(cases)} images in two versions with their prompts", file=sys.stderr, flush=True)
    return out


def evaluate(run: Path, sets: dict[str, list[tuple]], scales: list[float], csv: Path | None = None) -> pd.DataFrame:
    """Per-image Dice rows ``stem, version, source, scale, dice``; each image encoded once per scale. The rows
    so far are written to ``csv`` after each scale (a stopped call keeps its finished scales)."""
    rows = []
    for scale in scales:
        started = time.perf_counter()
        engine = SamEngine(load_run(run, scale=scale), memory_items=2)
        for version, items in sets.items():
            for image, truth, prompts in items:
                for source, prompt in prompts.items():
                    mask = engine.segment(image, prompt) if not prompt.empty else np.zeros_like(truth)
                    rows.append({"stem": image.path.stem, "version": version, "source": source, "scale": scale,
                                 "dice": dice_score(mask, truth)})
        print(f"scale {scale:g}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if csv is not None:
            write_csv(pd.DataFrame(rows), csv)
    return pd.DataFrame(rows)


def compare(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (version, source, scale > 0): mean Dice and the paired comparison with scale 0 (zero-shot)."""
    rows = []
    for (version, source), cell in frame.groupby(["version", "source"], sort=False):
        wide = cell.pivot(index="stem", columns="scale", values="dice")
        for scale in wide.columns:
            c = paired_comparison(wide[scale].to_numpy(), wide[0.0].to_numpy())
            rows.append({"version": version, "source": source, "scale": scale, "dice": wide[scale].mean(),
                         "diff": c.mean_diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "better": c.n_better,
                         "worse": c.n_worse, "p": c.p, "n": c.n})
    return pd.DataFrame(rows)


def compare_runs(frame: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Per (version, source) and scale > 0 scored in both: this run's Dice minus ``other``'s (another recipe's
    per-image CSV on the same images), paired per image."""
    rows = []
    joined = frame.merge(other, on=["stem", "version", "source", "scale"], suffixes=("", "_other"))
    for (version, source, scale), cell in joined[joined.scale > 0].groupby(["version", "source", "scale"], sort=False):
        c = paired_comparison(cell.dice.to_numpy(), cell.dice_other.to_numpy())
        rows.append({"version": version, "source": source, "scale": scale, "dice": cell.dice.mean(),
                     "dice_other": cell.dice_other.mean(), "diff": c.mean_diff, "ci_low": c.ci_low,
                     "ci_high": c.ci_high, "better": c.n_better, "worse": c.n_worse, "p": c.p, "n": c.n})
    return pd.DataFrame(rows)


def choose(table: pd.DataFrame) -> tuple[float, dict]:
    """The scale not significantly worse than zero-shot anywhere with the highest mean Dice over all cells."""
    worse = table[(table["diff"] < 0) & (table["p"] < 0.05)].groupby("scale").size()
    means = table.groupby("scale").dice.mean()
    eligible = [s for s in means.index if worse.get(s, 0) == 0]
    best = float(max(eligible, key=lambda s: (means[s], -s)))
    return best, {"rule": "highest mean Dice over plain/shifted x box sources among scales not significantly "
                          "worse (p < 0.05) than zero-shot in any cell",
                  "mean_dice": {f"{s:g}": round(float(means[s]), 5) for s in means.index},
                  "significantly_worse_cells": {f"{s:g}": int(worse.get(s, 0)) for s in means.index}}


def markdown(table: pd.DataFrame, run: Path, split: str, n: int, command: str, seconds: float,
             chosen: float | None, versus: pd.DataFrame | None = None, other: Path | None = None) -> str:
    scales = sorted(table.scale.unique())
    lines = [SECTION, "", f"Run `{run}`, {split} split, {n} images in two versions (plain, shifted), per-lung boxes. "
             "Scale 0 is zero-shot LiteMedSAM (bit-identical), 1 the run as trained.", "", "```", command, "```", "",
             "Mean Dice per scale:", "",
             "| images | boxes from | " + " | ".join(f"{s:g}" for s in scales) + " |",
             "|---|---|" + "---|" * len(scales)]
    for (version, source), cell in table.groupby(["version", "source"], sort=False):
        by = cell.set_index("scale").dice
        lines.append(f"| {version} | {source} | " + " | ".join(f"{by[s]:.4f}" for s in scales) + " |")
    lines += ["", "LoRA-SAM at each scale minus zero-shot (paired per image: mean difference, 95 % bootstrap CI, "
              "images better / worse, two-sided Wilcoxon p):", "",
              "| images | boxes from | scale | difference | 95 % CI | better / worse | p |",
              "|---|---|---|---|---|---|---|"]
    for row in table[table.scale > 0].itertuples():
        lines.append(f"| {row.version} | {row.source} | {row.scale:g} | {row.diff:+.4f} | [{row.ci_low:+.4f}, "
                     f"{row.ci_high:+.4f}] | {row.better} / {row.worse} | {row.p:.2g} |")
    if versus is not None and len(versus):
        lines += ["", f"This run minus `{other}` at the same scale, paired per image:", "",
                  "| images | boxes from | scale | this run | other | difference | 95 % CI | better / worse | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in versus.itertuples():
            lines.append(f"| {row.version} | {row.source} | {row.scale:g} | {row.dice:.4f} | {row.dice_other:.4f} | "
                         f"{row.diff:+.4f} | [{row.ci_low:+.4f}, {row.ci_high:+.4f}] | {row.better} / {row.worse} | "
                         f"{row.p:.2g} |")
    if chosen is not None:
        lines += ["", f"Chosen scale (written to the run's `adapter.json`): **{chosen:g}**."]
    lines += ["", f"Wall time {seconds / 60:.1f} min on a shared 2-core CPU.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="LoRA run folder (cxrsam finetune)")
    parser.add_argument("--cnn-run", type=Path, action="append", default=[], help="CNN run folder (repeatable)")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="Scales to score, in this order (0 is always scored, first)")
    parser.add_argument("--weak-strength", type=float, default=2.0, help="Weak CNN's box error / the U-Net's")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shifted images and weak boxes")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N images (after --skip)")
    parser.add_argument("--skip", type=int, default=0, help="Leave out the first N images of the split")
    parser.add_argument("--zero-shot-from", type=Path, default=None,
                        help="Per-image CSV of an earlier transfer.py call (same split, seed, images) for scale 0")
    parser.add_argument("--rescore", type=Path, default=None,
                        help="Per-image CSV of a finished call: compare (and choose) from it without scoring again")
    parser.add_argument("--versus", type=Path, default=None,
                        help="Per-image CSV of another recipe's run (same split, seed, images): paired differences")
    parser.add_argument("--choose", action="store_true", help="Write the chosen scale into the run (val only)")
    parser.add_argument("--csv", type=Path, default=None, help="Per-image CSV [default: RUN/transfer-SPLIT.csv]")
    parser.add_argument("--docs", type=Path, default=None, help="Replace this file's Transfer section")
    args = parser.parse_args()
    if args.choose and args.split != "val":
        parser.error("--choose picks the scale on the validation split only")
    scales = [0.0, *dict.fromkeys(s for s in args.scales if s != 0.0)]
    csv = args.csv or args.run / f"transfer-{args.split}.csv"
    started = time.perf_counter()
    if args.rescore is not None:
        frame = pd.read_csv(args.rescore)
        images = frame.stem.nunique()
    else:
        sets = build_sets(args.run, args.split, args.cnn_run, args.limit, args.seed, args.weak_strength,
                          args.skip)
        images = len(sets["plain"])
        if args.zero_shot_from is not None:
            zero = pd.read_csv(args.zero_shot_from).query("scale == 0.0")
            frame = evaluate(args.run, sets, scales[1:], csv)
            cells = ["stem", "version", "source"]
            if set(map(tuple, zero[cells].to_numpy())) != set(map(tuple, frame.query(
                    "scale == @frame.scale.iloc[0]")[cells].to_numpy())):
                parser.error(f"{args.zero_shot_from} holds other images or sources than this call")
            frame = pd.concat([zero[frame.columns], frame], ignore_index=True)
        else:
            frame = evaluate(args.run, sets, scales, csv)
        write_csv(frame, csv)
    table = compare(frame)
    versus = compare_runs(frame, pd.read_csv(args.versus)) if args.versus is not None else None
    chosen = None
    if args.choose:
        chosen, evidence = choose(table)
        record_lora_scale(args.run, chosen, {**evidence, "split": args.split, "images": images,
                                             "bench": "bench/transfer.py"})
    command = "nice -n 10 python bench/transfer.py " + " ".join(
        [f"--run {args.run}"] + [f"--cnn-run {r}" for r in args.cnn_run] + [f"--split {args.split}"]
        + ["--scales " + " ".join(f"{s:g}" for s in scales), f"--weak-strength {args.weak_strength:g}"]
        + [f"--limit {args.limit}"] * (args.limit is not None) + [f"--skip {args.skip}"] * bool(args.skip)
        + [f"--zero-shot-from {args.zero_shot_from}"] * (args.zero_shot_from is not None)
        + [f"--rescore {args.rescore}"] * (args.rescore is not None)
        + [f"--versus {args.versus}"] * (args.versus is not None) + ["--choose"] * args.choose)
    section = markdown(table, args.run, args.split, images, command, time.perf_counter() - started, chosen, versus,
                       args.versus)
    print(section)
    print(json.dumps({"chosen": chosen}))
    if args.docs:
        replace_section(args.docs, SECTION, section)


if __name__ == "__main__":
    main()
