"""Dice against the number of probability-weighted point prompts (the paper's protocol), zero-shot and LoRA.

Images: the ``test`` part of ``--manifest`` (a run's ``manifest.csv``). Drafts and foreground probability maps
from ``--cnn-run`` (:class:`cxrsam.baselines.drafts.CnnDrafts`). For each model (zero-shot ``--backend`` and each
``--lora NAME=RUN``) every image is encoded once and decoded with ``points N`` (N positive points per image drawn
at random with the CNN's probability as the weight, split over the two lungs, seeded by the image's stem; rules in
docs/prompts.md) for each N of ``--points``, and with per-lung boxes from the same draft. Dice at the original
image size; means with 95 % bootstrap CIs; paired two-sided Wilcoxon tests of ``--compare A:B`` pairs of
``model/variant`` columns; and one simulated corrective click per image and model (:func:`corrective_click`).
Writes the per-image CSVs, a Dice-vs-N figure and, with ``--docs``, replaces the
section "Point prompts: the paper's protocol" of that file.

    nice -n 10 python bench/point_sweep.py --manifest runs/cpu/stages/split/manifest.csv \\
        --cnn-run runs/cpu/stages/cnn-unet --lora mixed=runs/lora-mixed --lora box=runs/cpu/stages/lora
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsam.baselines.drafts import CnnDrafts
from cxrsam.data.dataset import load_case
from cxrsam.data.split import read_manifest
from cxrsam.evaluation.evaluate import write_csv
from cxrsam.evaluation.metrics import dice_score
from cxrsam.evaluation.stats import paired_comparison, summarize
from cxrsam.prompts import prompts_from_mask
from cxrsam.prompts.boxes import clip_box
from cxrsam.prompts.corrections import error_click
from cxrsam.report.figures import point_sweep_curve
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.lora import load_run
from cxrsam.sam.registry import build_sam
from cxrsam.sam.zeroshot import dice_by_prompt_variant
from results_md import replace_section

SECTION = "## Point prompts: the paper's protocol"
PAPER_POINTS = tuple(range(15, 106, 15))
"""The paper's sweep: 15, 30, ..., 105 points per image."""
CLICK_PROBES = {"rim": 0.0, "box bases cut 30 %": -0.3, "box 30 % too low": 0.3}
"""The click probes: the lower side of every box moved by this fraction of its height before the click."""


def variants(points: list[int], box: bool) -> dict[str, dict]:
    """Prompt variants: ``points N`` (probability strategy, N per image) and per-lung ``box``."""
    out = {f"points {n}": {"mode": "points", "strategy": "probability", "points": n} for n in points}
    return {**out, **({"box": {"mode": "box"}} if box else {})}


SESSION_CLICKS = 3
"""Clicks of the simulated session per image and probe: each on the then current result's largest error."""


def corrective_click(engine: SamEngine, xray, truth: np.ndarray, draft: np.ndarray, bottom: float = 0.0) -> dict:
    """A simulated correction session on the box prediction: up to :data:`SESSION_CLICKS` clicks, each at the deepest
    pixel of the current result's largest error region (:func:`cxrsam.prompts.corrections.error_click`; positive
    "more lung" on a missed region, negative "less lung" on a false one), decoded as the app does
    (:meth:`cxrsam.sam.engine.SamEngine.decode_clicks`: each click joins the lung set it falls in; a model trained with
    its previous result as a mask prompt gets one round per click). ``bottom`` moves each lung box's lower side by
    that fraction of its height first (-0.3: the bases cut off, a visibly wrong box; +0.3: reaching into the abdomen).

    Returns: ``dice`` before and after the first click and after the session (``dice_after_3``), ``kind`` (more/less)
    of the first click, ``obeyed``: its pixel changed as asked and the mask grew (more) or shrank (less); ``depth``:
    the first error's depth at the click (pixels).
    """
    prompts = prompts_from_mask(draft, mode="box")
    for prompt_set in prompts.sets:
        y0, y1 = prompt_set.box[1], prompt_set.box[3]
        prompt_set.box = clip_box(prompt_set.box + np.array([0, 0, 0, bottom * (y1 - y0)]), draft.shape)
    embedding = engine.embed([xray])[0]
    before = engine.segment(xray, prompts)
    first = error_click(truth, before)
    if first is None:
        dice = dice_score(before, truth)
        return {"dice_before": dice, "dice_after": dice, "dice_after_3": dice, "kind": "none", "obeyed": True,
                "depth": 0.0}
    points, labels, results = [], [], []
    current = before
    for _ in range(SESSION_CLICKS):
        click = error_click(truth, current)
        if click is None:
            break
        points.append(click.point)
        labels.append(click.label)
        _, logits, _ = engine.decode_clicks(embedding, prompts, np.array(points, np.float32), np.array(labels))
        current = engine.union_mask(logits)
        results.append(current)
    after = results[0]
    col, row = int(first.point[0]), int(first.point[1])
    grew = after.sum() > before.sum()
    obeyed = bool(after[row, col] and grew) if first.label == 1 else bool(not after[row, col] and not grew)
    return {"dice_before": dice_score(before, truth), "dice_after": dice_score(after, truth),
            "dice_after_3": dice_score(current, truth), "kind": "more" if first.label == 1 else "less",
            "obeyed": obeyed, "depth": first.depth}


def evaluate(manifest: Path, cnn_run: Path, models: dict[str, Path | None], backend: str, points: list[int],
             limit: int | None, split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-image Dice, one row per (stem, model, variant); and one corrective click per (stem, model, probe)."""
    cases = read_manifest(manifest)[split][:limit]
    pairs = [load_case(case) for case in cases]
    xrays, truths = [x for x, _ in pairs], [m for _, m in pairs]
    source = CnnDrafts(cnn_run)
    drafts, probabilities = [], []
    for xray in xrays:
        drafts.append(source(xray))
        probabilities.append(source.probability(xray))
    frames, clicks = [], []
    for name, run in models.items():
        engine = SamEngine(build_sam(backend) if run is None else load_run(run))
        frame = dice_by_prompt_variant(engine, xrays, truths, {cnn_run.name: drafts}, variants(points, True),
                                       weights={cnn_run.name: probabilities}, progress=False)
        frames.append(frame.assign(model=name))
        clicks += [{"stem": x.path.stem, "model": name, "probe": probe, **corrective_click(engine, x, t, d, bottom)}
                   for probe, bottom in CLICK_PROBES.items()
                   for x, t, d in zip(xrays, truths, drafts)]  # embeddings come from the engine's memory cache
    return pd.concat(frames, ignore_index=True), pd.DataFrame(clicks)


DEEP_ERROR = 4.0
"""Errors deeper than this (pixels from the click to the error's edge) are wider than one cell of LiteMedSAM's
64 x 64 mask logits on a 299 px image (4.7 px): the clicks a 256 px model can act on."""


def click_table(clicks: pd.DataFrame) -> list[str]:
    """Markdown rows: per model, Dice before/after one corrective click (and after the session of
    :data:`SESSION_CLICKS`) and how often the first click was obeyed, overall and on errors deeper than
    :data:`DEEP_ERROR` (CSVs of older runs lack the depth and the session: "-")."""
    lines = ["| model | boxes | clicks (more / less lung) | obeyed | obeyed, errors > 4 px deep (n) | Dice box | "
             f"Dice box + click | Dice after {SESSION_CLICKS} clicks |", "|---|---|---|---|---|---|---|---|"]
    clicks = clicks.assign(probe=clicks["probe"].fillna("rim")) if "probe" in clicks else clicks.assign(probe="rim")
    for (model, probe), group in clicks.groupby(["model", "probe"], sort=False):
        acted = group[group.kind != "none"]
        deep = acted[acted["depth"] > DEEP_ERROR] if "depth" in acted and acted["depth"].notna().all() else None
        deep_cell = "-" if deep is None else f"{deep.obeyed.mean():.0%} ({len(deep)})" if len(deep) else "- (0)"
        session = group.get("dice_after_3")
        session_cell = "-" if session is None or session.isna().any() else f"{session.mean():.4f}"
        lines.append(f"| {model} | {probe} | {(acted.kind == 'more').sum()} / {(acted.kind == 'less').sum()} | "
                     f"{acted.obeyed.mean():.0%} | {deep_cell} | {group.dice_before.mean():.4f} | "
                     f"{group.dice_after.mean():.4f} | {session_cell} |")
    return lines


def figure(frame: pd.DataFrame, path: Path) -> Path:
    """Mean Dice (95 % CI) against N, one line per model, its box Dice dashed
    (:func:`cxrsam.report.figures.point_sweep_curve`)."""
    frame = frame.assign(method=frame.model + "/" + frame.variant)
    models = list(dict.fromkeys(frame.model))
    curves = {m: {int(v.split()[1]): f"{m}/{v}" for v in dict.fromkeys(frame[frame.model == m].variant)
                  if v.startswith("points ")} for m in models}
    references = {m: f"{m}/box" for m in models if (frame.method == f"{m}/box").any()}
    return point_sweep_curve(frame, {m: c for m, c in curves.items() if c}, path, references)


def markdown(frame: pd.DataFrame, clicks: pd.DataFrame, compare: list[tuple[str, str]], command: str,
             seconds: float | None, figure_link: str | None, split: str = "test") -> str:
    frame = frame.assign(column=frame.model + "/" + frame.variant)
    wide = frame.pivot(index="stem", columns="column", values="dice")
    lines = [SECTION, "", "```", command, "```", "",
             f"{split.capitalize()} split, {len(wide)} images; Dice at the original image size (masks of the per-lung "
             "prompt sets merged by union).", "",
             "| model | prompt | Dice mean | 95 % CI | median | min |", "|---|---|---|---|---|---|"]
    for column in dict.fromkeys(frame.column):
        model, _, variant = column.partition("/")
        stats = summarize(wide[column].to_numpy())
        lines.append(f"| {model} | {variant} | {stats['mean']:.4f} | [{stats['ci_low']:.4f}, {stats['ci_high']:.4f}] "
                     f"| {stats['median']:.4f} | {wide[column].min():.4f} |")
    if compare:
        lines += ["", "Paired per-image comparisons (two-sided Wilcoxon signed-rank; mean of per-image differences "
                  "with its 95 % bootstrap CI):", "",
                  "| comparison | mean difference | 95 % CI | images better / worse | p |", "|---|---|---|---|---|"]
        for a, b in compare:
            c = paired_comparison(wide[a].to_numpy(), wide[b].to_numpy())
            lines.append(f"| {a} vs {b} | {c.mean_diff:+.4f} | [{c.ci_low:+.4f}, {c.ci_high:+.4f}] | "
                         f"{c.n_better} / {c.n_worse} | {c.p:.2g} |")
    lines += ["", "One corrective click on the box prediction (U-Net draft boxes as drawn: *rim*; or each box's lower "
              "side moved by 30 % of its height: cut short, or too low), at the deepest pixel of the largest "
              "error region: positive where lung was missed, negative where background was taken; *obeyed* = the "
              "clicked pixel changed as asked and the mask grew (more) or shrank (less); then up to "
              f"{SESSION_CLICKS - 1} more clicks, each on the then current result's largest error (a model trained "
              "with its previous result as a mask prompt gets one round per click):", "", *click_table(clicks)]
    if figure_link is not None:
        lines += ["", f"![Dice against the number of points per image]({figure_link})"]
    if seconds is None:
        lines += ["", "Tables from the per-image CSVs of earlier calls (--include); their wall times are given where "
                  "those calls are described.", ""]
    else:
        lines += ["", f"Wall time {seconds / 60:.1f} min on a shared 2-core CPU (load average "
                  f"{os.getloadavg()[0]:.1f} at the end).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.csv whose --split part is scored")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="Which part of the manifest")
    parser.add_argument("--cnn-run", type=Path, required=True, help="CNN run folder: drafts and probability maps")
    parser.add_argument("--lora", action="append", default=[], help="NAME=RUN: a LoRA run to score (repeatable)")
    parser.add_argument("--no-zero-shot", action="store_true", help="Skip the pretrained backend")
    parser.add_argument("--backend", default="litemedsam", help="Pretrained SAM backend (zero-shot)")
    parser.add_argument("--points", type=int, nargs="*", default=list(PAPER_POINTS),
                        help="Points per image (none: boxes and the click probes only)")
    parser.add_argument("--compare", action="append", default=[], help="A:B pair of model/variant columns")
    parser.add_argument("--include", type=Path, action="append", default=[],
                        help="Per-image CSV of an earlier run of this script to add to the tables and figure")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N images of the split")
    parser.add_argument("--csv", type=Path, default=Path("point_sweep.csv"),
                        help="Per-image CSV (and <stem>-clicks.csv) of the models scored now")
    parser.add_argument("--figure", type=Path, default=None, help="Dice-vs-N figure (PNG)")
    parser.add_argument("--docs", type=Path, default=None, help="Update this results.md")
    args = parser.parse_args()
    started = time.perf_counter()
    models: dict[str, Path | None] = {} if args.no_zero_shot else {"zero-shot": None}
    models.update({name: Path(run) for name, _, run in (item.partition("=") for item in args.lora)})
    if models:
        frame, clicks = evaluate(args.manifest, args.cnn_run, models, args.backend, args.points, args.limit,
                                 args.split)
        write_csv(frame, args.csv)
        write_csv(clicks, args.csv.with_name(f"{args.csv.stem}-clicks.csv"))
    else:  # --no-zero-shot without --lora: tables and figure of the --include CSVs only
        frame, clicks = pd.DataFrame(), pd.DataFrame()
    frame = pd.concat([*(pd.read_csv(path) for path in args.include), frame], ignore_index=True)
    earlier = [path.with_name(f"{path.stem}-clicks.csv") for path in args.include]
    clicks = pd.concat([*(pd.read_csv(path) for path in earlier if path.is_file()), clicks], ignore_index=True)
    figure_path = None if args.figure is None else figure(frame, args.figure)
    compare = [tuple(item.split(":", 1)) for item in args.compare]
    command = "nice -n 10 python bench/point_sweep.py " + " ".join(
        [f"--manifest {args.manifest} --cnn-run {args.cnn_run}"] + [f"--split {args.split}"] * (args.split != "test")
        + [f"--lora {item}" for item in args.lora]
        + ["--no-zero-shot"] * args.no_zero_shot + [f"--include {path}" for path in args.include]
        + [f"--points {' '.join(map(str, args.points))}"]
        + [f"--compare '{item}'" for item in args.compare] + [f"--limit {args.limit}"] * (args.limit is not None)
        + [f"--csv {args.csv}"] * bool(models) + [f"--figure {args.figure}"] * (args.figure is not None)
        + [f"--docs {args.docs}"] * (args.docs is not None))
    link = None
    if figure_path is not None:
        base = args.docs.parent.resolve() if args.docs else Path.cwd()
        link = os.path.relpath(figure_path.resolve(), base)
    seconds = time.perf_counter() - started if models else None
    section = markdown(frame, clicks, compare, command, seconds, link, args.split)
    print(section)
    if args.docs:
        replace_section(args.docs, SECTION, section)


if __name__ == "__main__":
    main()
