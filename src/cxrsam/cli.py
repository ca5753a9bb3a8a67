"""The ``cxrsam`` command line. It only wires stages together; each stage lives in its package."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from cxrsam.errors import CxrsamError

app = typer.Typer(help="Lung segmentation in chest X-rays with SAM + LoRA, U-Net and DeepLabv3+.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich")
data_app = typer.Typer(help="Inspect and generate datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)
out = Console()

LayoutOpt = Annotated[str, typer.Option("--layout", help="covid19 | montgomery | shenzhen | jsrt | folder | auto")]
ClassesOpt = Annotated[Optional[list[str]], typer.Option("--classes", help="COVID-19 layout: class folders to use")]


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.4f}"


@data_app.command("summary")
def data_summary(
    root: Annotated[Path, typer.Argument(help="Dataset folder")],
    layout: LayoutOpt = "auto",
    classes: ClassesOpt = None,
    seed: Annotated[int, typer.Option(help="Split seed")] = 0,
) -> None:
    """Pairs per class and split, image and mask sizes, and every problem found."""
    from cxrsam.data.layouts import discover
    from cxrsam.data.summary import summarize_dataset

    found = discover(root, layout, classes)
    summary = summarize_dataset(found, seed=seed)
    table = Table(title=f"{root} (layout {found.layout})")
    for col in ("group", "train", "val", "test", "total"):
        table.add_column(col, justify="right" if col != "group" else "left")
    for group in sorted({g for g, _ in summary.per_group_split}):
        counts = [summary.per_group_split[(group, s)] for s in ("train", "val", "test")]
        table.add_row(group, *map(str, counts), str(sum(counts)))
    out.print(table)
    out.print(f"usable pairs: {summary.usable}")
    out.print("image sizes: " + ", ".join(f"{k} ({v})" for k, v in summary.image_sizes.most_common()))
    out.print("mask sizes: " + ", ".join(f"{k} ({v})" for k, v in summary.mask_sizes.most_common()))
    if summary.problems:
        out.print(f"[yellow]{len(summary.problems)} problem(s):[/yellow]")
        for path, problem in summary.problems:
            out.print(f"  {path}: {problem}", markup=False, highlight=False, soft_wrap=True)
    if summary.usable == 0:
        raise CxrsamError(f"no usable image/mask pairs found with layout {found.layout!r}", path=root)


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Argument(help="Output folder (generic layout: images/ + masks/)")],
    n: Annotated[int, typer.Option("-n", help="Number of phantoms")] = 40,
    size: Annotated[int, typer.Option(help="Side in pixels")] = 256,
    seed: int = 0,
) -> None:
    """Generate synthetic CXR-like phantoms with lung masks."""
    from cxrsam.data.synthetic import generate_phantoms

    generate_phantoms(out_dir, n=n, size=size, seed=seed)
    out.print(f"wrote {n} phantoms to {out_dir}")


@app.command("evaluate")
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted masks")],
    gt: Annotated[Path, typer.Option("--gt", help="Folder of ground-truth masks")],
    results: Annotated[Path, typer.Option("--out", help="Per-image CSV to write")] = Path("results.csv"),
) -> None:
    """Score predicted masks against ground truth (matched by file stem)."""
    from cxrsam.evaluation.evaluate import evaluate_dirs, summary_table, write_csv

    frame, missing = evaluate_dirs(pred, gt)
    write_csv(frame, results)
    if missing:
        console.print(f"[yellow]{len(missing)} missing prediction(s) (scored Dice 0):[/yellow] " + ", ".join(missing))
    table = Table(title=f"{len(frame)} images")
    for col in ("metric", "mean", "std", "median", "95% CI"):
        table.add_column(col)
    for row in summary_table(frame).itertuples():
        table.add_row(row.metric, _fmt(row.mean), _fmt(row.std), _fmt(row.median),
                      f"[{_fmt(row.ci_low)}, {_fmt(row.ci_high)}]")
    out.print(table)
    out.print(f"per-image results: {results}")


def main() -> None:
    """Entry point: run the app and turn expected failures into one-line errors."""
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    try:
        app(standalone_mode=False)
    except CxrsamError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except (typer.Abort, typer.Exit) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:  # usage errors from typer's click layer carry show() and exit_code
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
