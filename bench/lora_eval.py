"""LoRA fine-tuned SAM vs zero-shot SAM (same prompts) vs the CNN drafts alone, on a run's test split.

Images: the ``test`` part of the LoRA run's ``manifest.csv``. Draft sources: the ground truth
(oracle per-lung boxes) and each ``--cnn-run`` (its predicted masks). For every source the same
per-lung box prompts (:func:`cxrsam.prompts.prompts_from_mask`, no jitter) go to zero-shot SAM (the
run's base) and to the LoRA model (:func:`cxrsam.sam.lora.load_run`), each image encoded once per
model (:func:`cxrsam.sam.zeroshot.dice_by_prompt_variant`). Dice at the original image size; means
with 95 % bootstrap CIs and paired two-sided Wilcoxon tests per image
(:mod:`cxrsam.evaluation.stats`). With ``--docs`` the section "LoRA fine-tuned SAM" of that file is
replaced.

    nice -n 10 python bench/lora_eval.py --run runs/lora-litemedsam-short \\
        --cnn-run runs/unet-r18-128-e3 --docs docs/results.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from cxrsam.baselines.drafts import CnnDrafts
from cxrsam.data.dataset import load_case
from cxrsam.data.split import read_manifest
from cxrsam.evaluation.evaluate import write_csv
from cxrsam.evaluation.metrics import dice_score
from cxrsam.evaluation.stats import paired_comparison, summarize
from cxrsam.runs import RunFolder
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.lora import load_run, read_adapter_info
from cxrsam.sam.registry import build_sam
from cxrsam.sam.zeroshot import dice_by_prompt_variant
from cxrsam.train.finetune import read_config
from results_md import replace_section

SECTION = "## LoRA fine-tuned SAM"
VARIANTS = {"box": {"mode": "box"}}


def evaluate(run: Path, cnn_runs: list[Path], limit: int | None) -> pd.DataFrame:
    """Per-image Dice, one row per (stem, method); methods ``<model> with <source>`` and ``<cnn> alone``."""
    cases = read_manifest(RunFolder(run).manifest_file)["test"][:limit]
    pairs = [load_case(case) for case in cases]
    xrays, truths = [x for x, _ in pairs], [m for _, m in pairs]
    drafts = {"oracle boxes": truths}
    rows = []
    for cnn in cnn_runs:
        predict = CnnDrafts(cnn)
        drafts[f"{cnn.name} boxes"] = [predict(x) for x in xrays]
        rows += [{"stem": x.path.stem, "method": f"{cnn.name} alone", "dice": dice_score(d, t)}
                 for x, d, t in zip(xrays, drafts[f"{cnn.name} boxes"], truths, strict=True)]
    info = read_adapter_info(run)
    engines = {f"zero-shot {info.backend}": SamEngine(build_sam(info.backend, info.base_checkpoint)),
               f"LoRA {info.backend}": SamEngine(load_run(run))}
    for name, engine in engines.items():
        frame = dice_by_prompt_variant(engine, xrays, truths, drafts, VARIANTS)
        rows += [{"stem": r.stem, "method": f"{name} with {r.source}", "dice": r.dice} for r in frame.itertuples()]
    return pd.DataFrame(rows)


def comparisons(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(better candidate, reference) pairs: LoRA vs zero-shot per source, LoRA on CNN boxes vs each CNN."""
    methods = list(dict.fromkeys(frame.method))
    lora = [m for m in methods if m.startswith("LoRA")]
    pairs = [(m, m.replace("LoRA", "zero-shot", 1)) for m in lora]
    cnn_alone = [m for m in methods if m.endswith(" alone")]
    pairs += [(m, cnn) for m in lora if not m.endswith("oracle boxes") for cnn in cnn_alone]
    return pairs


def markdown(frame: pd.DataFrame, run: Path, command: str, seconds: float) -> str:
    config = read_config(run)
    metrics = RunFolder(run).metrics()
    wide = frame.pivot(index="stem", columns="method", values="dice")
    lines = [SECTION, "",
             f"Run `{run}`: backend `{config.backend}`, LoRA rank {config.lora.rank} (alpha {config.lora.alpha:g}) on "
             f"{', '.join(config.lora.targets)}, mask decoder {'trained' if config.lora.train_decoder else 'frozen'}; "
             f"{int(metrics.step.iloc[-1])} AdamW steps at batch {config.loop.batch_size} (lr {config.loop.lr:g}, "
             f"warm-up + cosine) on "
             f"{f'the first {config.max_train_cases}' if config.max_train_cases else 'all'} training cases, "
             f"{'augmented' if config.augment else 'unaugmented'} images, prompts `{config.train_prompt}` with box "
             f"jitter {config.box_jitter:g}; best epoch by val Dice ({config.val_prompts.mode} prompts from "
             f"{config.val_drafts or 'the ground truth (oracle)'}, {config.max_val_cases or 'all'} val cases): "
             f"{metrics.val_dice.max():.4f}. Split: the run's `manifest.csv` (seed {config.split_seed}, "
             f"ratios {'/'.join(f'{r:g}' for r in config.split)}), data `{config.data}`. Every training "
             f"setting: `{run / 'config.yaml'}`.",
             "", "Evaluation command:", "", "```", command, "```", "",
             f"Test split, {len(wide)} images, Dice at the original image size (per-lung box prompts, masks "
             "merged by union):", "",
             "| method | prompts from | Dice mean | 95 % CI | median | n |", "|---|---|---|---|---|---|"]
    for method in wide.columns:
        model, _, source = method.partition(" with ")
        stats = summarize(wide[method].to_numpy())
        lines.append(f"| {model} | {source or '-'} | {stats['mean']:.4f} | [{stats['ci_low']:.4f}, "
                     f"{stats['ci_high']:.4f}] | {stats['median']:.4f} | {stats['n']} |")
    lines += ["", "Paired per-image comparisons (two-sided Wilcoxon signed-rank; difference = mean of per-image "
              "differences with its 95 % bootstrap CI):", "",
              "| comparison | mean difference | 95 % CI | images better / worse | p |", "|---|---|---|---|---|"]
    for better, reference in comparisons(frame):
        c = paired_comparison(wide[better].to_numpy(), wide[reference].to_numpy())
        lines.append(f"| {better} vs {reference} | {c.mean_diff:+.4f} | [{c.ci_low:+.4f}, {c.ci_high:+.4f}] | "
                     f"{c.n_better} / {c.n_worse} | {c.p:.2g} |")
    lines += ["", f"Evaluation wall time {seconds / 60:.1f} min on a shared 2-core CPU.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="LoRA run folder (cxrsam finetune)")
    parser.add_argument("--cnn-run", type=Path, action="append", default=[], help="CNN run folder (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N test images")
    parser.add_argument("--csv", type=Path, default=None, help="Per-image CSV [default: RUN/eval-test.csv]")
    parser.add_argument("--docs", type=Path, default=None, help="Update this results.md")
    args = parser.parse_args()
    started = time.perf_counter()
    frame = evaluate(args.run, args.cnn_run, args.limit)
    csv = args.csv or args.run / "eval-test.csv"
    write_csv(frame, csv)
    command = "nice -n 10 python bench/lora_eval.py " + " ".join(
        [f"--run {args.run}"] + [f"--cnn-run {r}" for r in args.cnn_run]
        + [f"--limit {args.limit}"] * (args.limit is not None) + [f"--docs {args.docs}"] * (args.docs is not None))
    section = markdown(frame, args.run, command, time.perf_counter() - started)
    print(section)
    print(f"per-image CSV: {csv}")
    if args.docs:
        replace_section(args.docs, SECTION, section)


if __name__ == "__main__":
    main()
