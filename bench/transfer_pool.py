"""Pool per-image CSVs of ``bench/transfer.py`` (e.g. the two halves of the validation split, ``--limit``/``--skip``)
and compare recipes on the transfer check: mean Dice per (version, box source) and paired differences.

Each ``--recipe NAME=CSV[,CSV...]`` takes the scale-1 rows (the run as trained) of its CSVs; ``zero-shot`` is the
scale-0 rows of the first recipe's CSVs (bit-identical for every run of one base). Differences are paired per image
on the images both sides have (``transfer.compare_runs``: mean, 95 % bootstrap CI, images better / worse,
Wilcoxon p).

    python bench/transfer_pool.py --recipe plain=runs/bench/a.csv,runs/bench/b.csv \\
        --recipe shift=runs/bench/c.csv,runs/bench/d.csv --compare shift:plain --compare shift:zero-shot
"""

from __future__ import annotations

import argparse

import pandas as pd

from transfer import compare_runs

ZERO_SHOT = "zero-shot"


def pooled(files: list[str], scale: float) -> pd.DataFrame:
    """The rows at ``scale`` of ``files`` (first occurrence of each (stem, version, source) kept), relabelled scale 1
    so that recipes and zero-shot pair in :func:`transfer.compare_runs`."""
    frame = pd.concat([pd.read_csv(path) for path in files], ignore_index=True)
    frame = frame[frame["scale"] == scale].drop_duplicates(["stem", "version", "source"])
    return frame.assign(scale=1.0)


def table(recipes: dict[str, list[str]], compare: list[tuple[str, str]]) -> str:
    """Markdown: one row per (version, source), mean Dice per recipe, then each comparison A - B."""
    first = next(iter(recipes.values()))
    frames = {ZERO_SHOT: pooled(first, 0), **{name: pooled(files, 1) for name, files in recipes.items()}}
    unknown = sorted({n for pair in compare for n in pair} - set(frames))
    if unknown:
        raise SystemExit(f"--compare names unknown recipes {unknown}; known: {sorted(frames)}")
    cells = ["version", "source"]
    means = pd.DataFrame({name: f.groupby(cells, sort=False)["dice"].mean() for name, f in frames.items()})
    diffs = [compare_runs(frames[a], frames[b]).set_index(cells) for a, b in compare]
    head = ["images", "boxes", *frames, *(f"{a} - {b}" for a, b in compare)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell, row in means.iterrows():
        text = [*cell, *(f"{v:.4f}" for v in row)]
        for d in diffs:
            c = d.loc[cell]
            text.append(f"{c['diff']:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]; {int(c.better)} / {int(c.worse)}; "
                        f"p = {c.p:.1g}")
        lines.append("| " + " | ".join(text) + " |")
    counts = sorted(set(frames[ZERO_SHOT].groupby(cells).size()))
    return "\n".join([*lines, "", f"{' to '.join(map(str, counts[::len(counts) - 1 or 1]))} images per cell."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", required=True, help="NAME=CSV[,CSV...] (repeatable)")
    parser.add_argument("--compare", action="append", default=[], help="A:B, recipe names or zero-shot")
    args = parser.parse_args()
    recipes = {name: files.split(",") for name, _, files in (item.partition("=") for item in args.recipe)}
    print(table(recipes, [tuple(item.split(":", 1)) for item in args.compare]))


if __name__ == "__main__":
    main()
