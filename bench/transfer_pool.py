"""Pool per-image CSVs of ``bench/transfer.py`` (e.g. the two halves of the validation split, ``--limit``/``--skip``)
and compare recipes on the transfer check: mean Dice per (version, box source) and paired differences.

Each ``--recipe NAME=CSV[,CSV...]`` takes the scale-1 rows (the run as trained) of its CSVs; ``zero-shot`` is the
scale-0 rows of the first recipe's CSVs (bit-identical for every run of one base). Differences are paired per image
on the images both sides have (:func:`cxrsam.evaluation.stats.paired_comparison`: mean, 95 % bootstrap CI, images
better / worse, Wilcoxon p).

    python bench/transfer_pool.py --recipe plain=runs/bench/a.csv,runs/bench/b.csv \\
        --recipe shift=runs/bench/c.csv,runs/bench/d.csv --compare shift:plain --compare shift:zero-shot
"""

from __future__ import annotations

import argparse

import pandas as pd

from cxrsam.evaluation.stats import paired_comparison

ZERO_SHOT = "zero-shot"


def scored(files: list[str], scale: float) -> pd.Series:
    """Dice indexed by (version, source, stem) at ``scale``, pooled over ``files`` (first occurrence kept)."""
    frame = pd.concat([pd.read_csv(path) for path in files], ignore_index=True)
    frame = frame[frame["scale"] == scale].drop_duplicates(["version", "source", "stem"])
    return frame.set_index(["version", "source", "stem"])["dice"].sort_index()


def table(recipes: dict[str, list[str]], compare: list[tuple[str, str]]) -> str:
    """Markdown: one row per (version, source), mean Dice per recipe, then each comparison A - B."""
    first = next(iter(recipes.values()))
    dice = {ZERO_SHOT: scored(first, 0), **{name: scored(files, 1) for name, files in recipes.items()}}
    unknown = sorted({n for pair in compare for n in pair} - set(dice))
    if unknown:
        raise SystemExit(f"--compare names unknown recipes {unknown}; known: {sorted(dice)}")
    head = ["images", "boxes", *dice, *(f"{a} - {b}" for a, b in compare)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = dice[ZERO_SHOT].index.droplevel("stem").unique()
    for version, source in cells:
        row = [version, source, *(f"{d.loc[(version, source)].mean():.4f}" for d in dice.values())]
        for a, b in compare:
            x, y = dice[a].loc[(version, source)].align(dice[b].loc[(version, source)], join="inner")
            c = paired_comparison(x.to_numpy(), y.to_numpy())
            row.append(f"{c.mean_diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]; {c.n_better} / {c.n_worse}; "
                       f"p = {c.p:.1g}")
        lines.append("| " + " | ".join(row) + " |")
    n = len(dice[ZERO_SHOT].loc[cells[0]])
    return "\n".join([*lines, "", f"{n} images per cell."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", required=True, help="NAME=CSV[,CSV...] (repeatable)")
    parser.add_argument("--compare", action="append", default=[], help="A:B, recipe names or zero-shot")
    args = parser.parse_args()
    recipes = {name: files.split(",") for name, _, files in (item.partition("=") for item in args.recipe)}
    print(table(recipes, [tuple(item.split(":", 1)) for item in args.compare]))


if __name__ == "__main__":
    main()
