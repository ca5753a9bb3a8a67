"""Deterministic file-level splits and the manifest every run writes.

A case goes to train/val/test by a stable hash (SHA-256) of its ``case_id`` and the seed, so the
split does not depend on file order, the machine, or which other files exist: adding cases
never moves existing ones between splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cxrsam.data.layouts import Case
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, require_file

SPLITS = ("train", "val", "test")


def _unit_hash(case_id: str, seed: int) -> float:
    """Stable number in [0, 1) from a case id and seed."""
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(case_id: str, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for ``case_id`` with the given (train, val, test) ratios."""
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"split ratios must be three non-negative numbers summing to 1, got {tuple(ratios)}")
    u = _unit_hash(case_id, seed)
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "val"
    return "test"


def assign_fold(case_id: str, k: int, seed: int = 0) -> int:
    """Fold index in ``range(k)`` for k-fold cross-validation (stable, by hash)."""
    return int(_unit_hash(case_id, seed + 7919) * k)


def split_cases(cases: Sequence[Case], ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                folds: int | None = None, fold: int | None = None) -> dict[str, list[Case]]:
    """Split cases into ``{"train", "val", "test"}``.

    Without ``folds`` the hash split with ``ratios`` is used. With ``folds=k`` and ``fold=i`` the
    test part is fold ``i`` and the rest is split into train/val by ``ratios[0]:ratios[1]``.
    """
    out: dict[str, list[Case]] = {s: [] for s in SPLITS}
    for case in cases:
        if folds:
            if fold is None or not 0 <= fold < folds:
                raise ValueError(f"fold must be in 0..{folds - 1}")
            if assign_fold(case.case_id, folds, seed) == fold:
                out["test"].append(case)
                continue
            tv = ratios[0] + ratios[1]
            part = assign_split(case.case_id, (ratios[0] / tv, ratios[1] / tv, 0.0), seed)
            out[part].append(case)
        else:
            out[assign_split(case.case_id, ratios, seed)].append(case)
    return out


def manifest_frame(splits: dict[str, list[Case]]) -> pd.DataFrame:
    """One row per case: ``case,split,group,image,masks`` (mask paths joined by ``;``)."""
    rows = [{"case": c.case_id, "split": s, "group": c.group, "image": str(c.image),
             "masks": ";".join(str(m) for m in c.masks), "sides": ";".join(c.sides)}
            for s in SPLITS for c in splits.get(s, [])]
    return pd.DataFrame(rows, columns=["case", "split", "group", "image", "masks", "sides"])


def write_manifest(path: str | Path, splits: dict[str, list[Case]]) -> Path:
    """Write the manifest CSV atomically and return its path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        manifest_frame(splits).to_csv(tmp, index=False)
    return path


def read_manifest(path: str | Path) -> dict[str, list[Case]]:
    """Read a manifest written by :func:`write_manifest` back into splits (one-line error when malformed)."""
    path = require_file(path, "split manifest")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        out: dict[str, list[Case]] = {s: [] for s in SPLITS}
        for row in frame.itertuples(index=False):
            out[row.split].append(Case(row.case, Path(row.image), [Path(m) for m in row.masks.split(";")],
                                       row.sides.split(";"), row.group))
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise CxrsamError(f"not a split manifest ({type(exc).__name__}: {exc}; expected columns "
                          "case,split,group,image,masks,sides)", path=path) from None
    return out
