"""Report figures (matplotlib, Agg): Dice box plots, overlay examples, training curves, lung-area histograms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrsam.files import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def dice_boxplot(per_image: pd.DataFrame, methods: Sequence[str], path: str | Path) -> Path:
    """Box plot of per-image Dice, one box per method (in ``methods`` order), points overlaid."""
    data = [per_image.loc[per_image["method"] == m, "dice"].to_numpy(dtype=float) for m in methods]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods)), 4.5))
    ax.boxplot(data, showfliers=False)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=6, alpha=0.5, color="tab:blue")
    labels = [m.replace(", ", ",\n").replace(" (", "\n(") for m in methods]
    ax.set_xticks(range(1, len(methods) + 1), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("Dice per test image")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def overlay(ax: plt.Axes, image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None, title: str) -> None:
    """Draw an X-ray (H, W) in gray with the ground-truth contour (green) and prediction contour (red)."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    if gt is not None and gt.any():
        ax.contour(gt.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
    if pred is not None and pred.any():
        ax.contour(pred.astype(float), levels=[0.5], colors="red", linewidths=1.0)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def overlay_grid(per_image: pd.DataFrame, methods: Sequence[str], load_image: Callable[[str], np.ndarray],
                 load_gt: Callable[[str], np.ndarray], load_pred: Callable[[str, str], np.ndarray | None],
                 path: str | Path) -> Path:
    """Best, median and worst test image (by Dice) of each method: rows = methods, columns = cases.

    Ground truth is drawn in green, the method's prediction in red.
    """
    fig, axes = plt.subplots(len(methods), 3, figsize=(10, 2.9 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        part = per_image[per_image["method"] == method].sort_values("dice", kind="stable")
        if part.empty:
            for ax in axes[row]:
                ax.axis("off")
            continue
        picks = {"best": part.iloc[-1], "median": part.iloc[len(part) // 2], "worst": part.iloc[0]}
        for col, (label, r) in enumerate(picks.items()):
            name = str(r["name"])
            overlay(axes[row, col], load_image(name), load_gt(name), load_pred(method, name),
                    f"{method}\n{label}: {name} (Dice {r['dice']:.3f})")
    return _save(fig, Path(path))


def training_curves(curves: dict[str, str | Path], path: str | Path) -> Path | None:
    """Loss and validation Dice per epoch for each trained model (``name -> metrics.csv``)."""
    frames = {name: pd.read_csv(p) for name, p in curves.items() if Path(p).exists()}
    if not frames:
        return None
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, frame in frames.items():
        x = frame["epoch"] if "epoch" in frame else np.arange(len(frame))
        if "train_loss" in frame:
            ax_loss.plot(x, frame["train_loss"], marker=".", label=name)
        if "val_dice" in frame:
            ax_dice.plot(x, frame["val_dice"], marker=".", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_dice.set(xlabel="epoch", ylabel="validation Dice", title="Validation Dice")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def lung_area_histogram(fractions: dict[str, Sequence[float]], path: str | Path, bins: int = 30) -> Path:
    """Histogram of lung area as a fraction of the image (0-1, ground-truth masks), one series per dataset."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    values = [np.asarray(v, dtype=float) for v in fractions.values()]
    edges = np.linspace(min(v.min() for v in values), max(v.max() for v in values), bins + 1) if values else bins
    for name, v in zip(fractions, values):
        ax.hist(v, bins=edges, alpha=0.6, label=f"{name} (n={len(v)})")
    ax.set_xlabel("lung area / image area (test masks)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def point_sweep_curve(per_image: pd.DataFrame, curves: dict[str, dict[int, str]], path: str | Path,
                      references: dict[str, str] | None = None) -> Path:
    """Mean Dice (with its 95 % bootstrap CI) against the number of points per image, one line per curve.

    Args:
        per_image: rows ``method, dice``.
        curves: curve label -> {points per image N: method name}.
        path: PNG to write.
        references: curve label -> a method drawn as a dashed horizontal line in the curve's colour (e.g. the
            same model with boxes).
    """
    from cxrsam.evaluation.stats import bootstrap_ci

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (label, methods) in enumerate(curves.items()):
        n = sorted(methods)
        values = [per_image.loc[per_image["method"] == methods[k], "dice"].to_numpy(dtype=float) for k in n]
        mean = np.array([v.mean() for v in values])
        ci = np.array([bootstrap_ci(v) for v in values]).reshape(-1, 2)
        ax.errorbar(n, mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], marker="o", capsize=3, color=f"C{i}",
                    label=f"{label}: points")
        reference = (references or {}).get(label)
        if reference is not None:
            dice = per_image.loc[per_image["method"] == reference, "dice"].mean()
            ax.axhline(dice, ls="--", lw=1, color=f"C{i}", label=f"{label}: box ({dice:.3f})")
    ax.set_xlabel("positive points per image (drawn with the draft's probability)")
    ax.set_ylabel("Dice (mean, 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))
