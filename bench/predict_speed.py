"""`cxrsam predict` end to end, an old commit against this tree: steady-state images/s, start-up, identical masks.

Every variant is a whole ``python -m cxrsam predict`` process (what a user runs), timed on N images and on 1 image;
the variants run in turn (old, new, ...) for ``--repeats`` rounds, so machine load hits all of them alike. From the
medians of the two wall times::

    steady images/s = (N - 1) / (t_N - t_1)        start-up s = t_1 - (t_N - t_1) / (N - 1)

(start-up: interpreter, imports, model loads and the first image's one-off costs.) Every process runs with Python's
bytecode cache on, as users have it (a sandbox's ``PYTHONDONTWRITEBYTECODE=1`` would recompile every source file of
cxrsam at each start); the untimed warm-up run writes it. The old commit runs from a
checkout given by ``--old`` (``git worktree add /tmp/old 0b14060``) through PYTHONPATH; each variant's masks are
compared with the first variant's (per-image IoU; target >= 0.999 for every image).

    nice -n 10 python bench/predict_speed.py --images runs/imgs20 --drafts-from ../main/runs/cpu/stages/cnn-unet \\
        --old /tmp/old --n 10 --repeats 2
    nice -n 10 python bench/predict_speed.py --images runs/imgs20 --drafts-from ../main/runs/cpu/stages/cnn-unet \\
        --old /tmp/old --backend vit_b --random-checkpoint runs/vit_b_random.pt --n 3 --repeats 1 --variants old new
    python bench/predict_speed.py --device cuda --variants new new-bf16 --n 64 ...      # GPU (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrsam.data.io import read_mask
from cxrsam.evaluation.metrics import iou_score
from zero_shot_speed import machine

SRC = Path(__file__).resolve().parents[1] / "src"
VARIANTS = {"old": [], "old-torch": ["--runtime", "torch"], "new": [], "new-torch": ["--runtime", "torch"],
            "new-onnx": ["--runtime", "onnx"],
            "new-int8": ["--runtime", "onnx", "--precision", "int8"], "new-bf16": ["--precision", "bf16"],
            "new-fp16": ["--precision", "fp16"]}
"""Extra ``predict`` options per variant (``old*`` run from ``--old``; the others from this tree)."""


def random_checkpoint(backend: str, path: Path) -> Path:
    """Weights of ``backend`` drawn with seed 0, saved once to ``path`` (speed only: random weights are fine)."""
    if not path.is_file():
        import torch

        from cxrsam.sam.registry import get_backend

        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(get_backend(backend).builder().state_dict(), path)
    return path


def run_predict(variant: str, images: list[Path], out: Path, common: list[str], old: Path | None) -> float:
    """Wall seconds of one ``python -m cxrsam predict`` process of ``variant`` on ``images`` into ``out``."""
    folder = out.parent / f"{out.name}-in"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    folder.mkdir(parents=True)
    for image in images:
        (folder / image.name).symlink_to(image.resolve())
    src = old / "src" if variant.startswith("old") else SRC
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # Python's default: cached bytecode, as every user has it
    command = [sys.executable, "-m", "cxrsam", "predict", "--images", str(folder), "--out", str(out),
               *common, *VARIANTS[variant]]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="Folder of images (the first N are used)")
    parser.add_argument("--drafts-from", type=Path, required=True, help="CNN run giving the prompts")
    parser.add_argument("--old", type=Path, default=None, help="Checkout of the old commit (variant old)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--n", type=int, default=10, help="Images of the long run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--random-checkpoint", type=Path, default=None,
                        help="Use random weights of --backend saved here (made once)")
    parser.add_argument("--variants", nargs="+", default=["old", "new", "new-onnx"], choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder [default: a temporary one]")
    args = parser.parse_args()
    if any(v.startswith("old") for v in args.variants) and args.old is None:
        parser.error("the old variants need --old (a checkout of the old commit)")
    common = ["--drafts-from", str(args.drafts_from), "--backend", args.backend, "--device", args.device]
    if args.random_checkpoint is not None:
        common += ["--checkpoint", str(random_checkpoint(args.backend, args.random_checkpoint))]
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".dcm"))[:args.n]
    work = args.work or Path(tempfile.mkdtemp(prefix="predict-speed-"))
    print(f"Machine: {machine(args.device)}. {len(images)} images of {args.images}, backend {args.backend}"
          f"{' (random weights)' if args.random_checkpoint else ''}, variants {' '.join(args.variants)}; "
          f"{args.repeats} round(s).", flush=True)
    for variant in args.variants:  # warm-up: ONNX export / quantisation and file caches, not timed
        run_predict(variant, images[:1], work / f"warm-{variant}", common, args.old)
    times: dict[str, dict[int, list[float]]] = {v: {1: [], len(images): []} for v in args.variants}
    for _ in range(args.repeats):
        for count in (len(images), 1):
            for variant in args.variants:
                seconds = run_predict(variant, images[:count], work / f"{variant}-{count}", common, args.old)
                times[variant][count].append(seconds)
                print(f"  {variant:9s} {count:3d} images {seconds:7.2f} s", flush=True)
    reference = args.variants[0]
    lines = ["", "| variant | t_1 s | t_N s | steady images/s | start-up s | speed-up (steady) | mask IoU vs "
             f"{reference} min / mean |", "|---|---|---|---|---|---|---|"]
    rates = {}
    for variant in args.variants:
        t1, tn = statistics.median(times[variant][1]), statistics.median(times[variant][len(images)])
        rates[variant] = (len(images) - 1) / (tn - t1)
        startup = t1 - (tn - t1) / (len(images) - 1)
        ious = [iou_score(read_mask(work / f"{variant}-{len(images)}" / f"{p.stem}_mask.png"),
                          read_mask(work / f"{reference}-{len(images)}" / f"{p.stem}_mask.png")) for p in images]
        lines.append(f"| {variant} | {t1:.2f} | {tn:.2f} | {rates[variant]:.3f} | {startup:.2f} | "
                     f"{rates[variant] / rates[reference]:.2f}x | {min(ious):.5f} / {float(np.mean(ious)):.5f} |")
    print("\n".join(lines))
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
