"""Paired per-image comparisons between the methods of an experiment (``evaluation/per_image.csv``).

For each pair ``A vs B`` over the images both were scored on: the mean per-image Dice difference with its
95 % percentile-bootstrap CI, how many images A is better / worse on, and the two-sided Wilcoxon p. By
default every LoRA-SAM row is compared with zero-shot SAM under the same prompts and draft source, and
with each CNN alone.

    python bench/paired.py runs/cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cxrsam.evaluation.stats import PairedComparison, paired_comparison


def default_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """(LoRA row, zero-shot row with the same prompts) and (LoRA row, each CNN) for every LoRA row."""
    cnns = [m for m in methods if not m.startswith(("Zero-shot", "LoRA"))]
    pairs = []
    for lora in (m for m in methods if m.startswith("LoRA-SAM")):
        same = "Zero-shot SAM" + lora.removeprefix("LoRA-SAM")
        if same in methods:
            pairs.append((lora, same))
        if "ground-truth" not in lora:
            pairs += [(lora, cnn) for cnn in cnns]
    return pairs


def compare(frame: pd.DataFrame, a: str, b: str, metric: str = "dice") -> PairedComparison:
    """``a`` against ``b`` on the images both were scored on (per-image ``metric``, differences ``a - b``)."""
    wide = frame.pivot(index="name", columns="method", values=metric)[[a, b]]
    return paired_comparison(wide[a].to_numpy(), wide[b].to_numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="experiment folder (holds evaluation/per_image.csv)")
    args = parser.parse_args()
    frame = pd.read_csv(args.run / "evaluation" / "per_image.csv")
    print("| comparison (Dice) | mean difference | 95 % CI | images better / worse | p (Wilcoxon) | n |")
    print("|---|---|---|---|---|---|")
    for a, b in default_pairs(list(dict.fromkeys(frame["method"]))):
        c = compare(frame, a, b)
        print(f"| {a} vs {b} | {c.mean_diff:+.4f} | [{c.ci_low:+.4f}, {c.ci_high:+.4f}] | "
              f"{c.n_better} / {c.n_worse} | {c.p:.2g} | {c.n} |")


if __name__ == "__main__":
    main()
