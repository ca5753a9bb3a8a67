"""``cxrsam data summary``: what a dataset folder holds and what is wrong with it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import track

from cxrsam.data.io import read_image, read_mask
from cxrsam.data.layouts import Discovery
from cxrsam.data.split import split_cases
from cxrsam.errors import CxrsamError


@dataclass
class Summary:
    """Counts and problems of a checked dataset."""

    usable: int = 0
    per_group_split: Counter = field(default_factory=Counter)
    image_sizes: Counter = field(default_factory=Counter)
    mask_sizes: Counter = field(default_factory=Counter)
    problems: list[tuple[Path, str]] = field(default_factory=list)


def summarize_dataset(found: Discovery, ratios=(0.8, 0.1, 0.1), seed: int = 0, progress: bool = True) -> Summary:
    """Read every image and mask once; count usable pairs per group and split; collect problems."""
    summary = Summary(problems=list(found.problems))
    split_of = {c.case_id: s for s, cases in split_cases(found.cases, ratios, seed).items() for c in cases}
    for case in track(found.cases, description="checking", disable=not progress, transient=True):
        try:
            xray = read_image(case.image)
            masks = [read_mask(m) for m in case.masks]
        except CxrsamError as exc:
            summary.problems.append((exc.path or case.image, exc.problem))
            continue
        if not any(m.any() for m in masks):
            summary.problems.append((case.masks[0], "empty mask (no lung pixels)"))
            continue
        summary.usable += 1
        summary.per_group_split[(case.group, split_of[case.case_id])] += 1
        summary.image_sizes[f"{xray.size[1]}x{xray.size[0]}"] += 1
        for m in masks:
            summary.mask_sizes[f"{m.shape[1]}x{m.shape[0]}"] += 1
    return summary
