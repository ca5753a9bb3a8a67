"""Step time and peak memory of LoRA vs full fine-tuning of a SAM backend at the same batch and size, with and
without activation (gradient) checkpointing of the encoder blocks.

Each variant runs in a fresh subprocess (so peak memory is its own): build the backend, make it
trainable (``lora``: :func:`cxrsam.sam.lora.apply_lora` with the default settings -- adapters on
``qkv`` + the mask decoder; ``lora-strict``: adapters only; ``full``: every weight; ``+ckpt``: and
:func:`cxrsam.train.finetune.enable_gradient_checkpointing` on the image encoder, as
``finetune --gradient-checkpointing`` does), then time ``--steps`` training steps (forward through
:class:`cxrsam.train.finetune.SamTrainee` with one box per lung, Dice + BCE, backward, AdamW step) after one
warm-up step. Memory: peak resident set size of the process (``getrusage`` max RSS; it includes the model and
Python) on CPU, and ``torch.cuda.max_memory_allocated`` on a GPU; ``before`` is the same figure once the model
and optimizer are built, before the first step, so ``peak - before`` is what training adds.

    nice -n 10 python bench/lora_vs_full.py --batch-size 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

VARIANTS = ("full", "lora", "lora-strict", "full+ckpt", "lora+ckpt", "lora-strict+ckpt")
"""``+ckpt``: the same with the encoder blocks checkpointed (recomputed in backward)."""


def prepare(variant: str, backend: str, batch_size: int, device: str) -> tuple[Callable[[], None], dict]:
    """Build ``variant`` and a batch of synthetic two-lung images: (one training step, its description)."""
    from cxrsam.prompts import prompts_from_mask
    from cxrsam.prompts.components import lung_components
    from cxrsam.sam.lora import LoraSettings, apply_lora, trainable_summary
    from cxrsam.sam.registry import build_sam
    from cxrsam.train.finetune import SamTrainee, enable_gradient_checkpointing, finetune_step

    torch.manual_seed(0)
    loaded = build_sam(backend, device=device)
    kind, checkpointing = variant.removesuffix("+ckpt"), variant.endswith("+ckpt")
    if kind == "full":
        for param in loaded.model.parameters():
            param.requires_grad_(True)
    else:
        apply_lora(loaded.model, LoraSettings(train_decoder=kind == "lora"))
    blocks = enable_gradient_checkpointing(loaded.model.image_encoder) if checkpointing else 0
    summary = trainable_summary(loaded.model)
    size = loaded.spec.img_size
    mask = np.zeros((size, size), bool)
    mask[size // 8: 7 * size // 8, size // 8: 7 * size // 16] = True
    mask[size // 8: 7 * size // 8, 9 * size // 16: 7 * size // 8] = True
    prompts = [prompts_from_mask(mask)] * batch_size
    targets = [torch.from_numpy(np.stack(lung_components(mask)[0]).astype(np.float32)).to(device)] * batch_size
    images = loaded.spec.transform.images(list(torch.rand(batch_size, size, size).to(device)))  # model input
    trainee = SamTrainee(loaded).train()
    step_fn = finetune_step()
    optimizer = torch.optim.AdamW([p for p in loaded.model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        loss = step_fn(trainee, (images, None, None, prompts, targets, [False] * len(prompts)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, {"variant": variant, "trainable": summary["trainable"], "share_percent": summary["share_percent"],
                  "checkpointed_blocks": blocks}


def timed(step: Callable[[], None], device: str) -> float:
    """Seconds of one ``step`` (synchronised on a GPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(variant: str, backend: str, batch_size: int, steps: int, device: str) -> dict:
    """Train ``steps`` steps of ``variant`` after a warm-up step (allocations, AdamW state); timings and memory."""
    step, row = prepare(variant, backend, batch_size, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before_mib = peak_mib(device)
    times = [timed(step, device) for _ in range(steps + 1)][1:]
    return {**row, "step_s_median": statistics.median(times), "step_s_min": min(times),
            "before_mib": before_mib, "peak_mib": peak_mib(device),
            "memory": "cuda max allocated" if device.startswith("cuda") else "max RSS"}


def interleaved(variants: list[str], backend: str, batch_size: int, steps: int, device: str) -> None:
    """Step time only, all variants in this one process, one step of each in turn (A, B, C, A, B, C, ...) so that
    a changing load hits them alike; the first round is warm-up. Prints the table."""
    prepared = [prepare(variant, backend, batch_size, device) for variant in variants]
    times: list[list[float]] = [[] for _ in variants]
    load = os.getloadavg()
    for round_ in range(steps + 1):
        for (step, _), spent in zip(prepared, times):
            seconds = timed(step, device)
            if round_:
                spent.append(seconds)
    medians = [statistics.median(spent) for spent in times]
    print(f"{backend}, batch {batch_size}, {steps} timed steps per variant, interleaved in one process, {device} "
          f"({torch.get_num_threads()} threads); load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| variant | step time (median, s) | " + " | ".join(f"/ {v}" for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for (_, row), median in zip(prepared, medians):
        print(f"| {row['variant']} | {median:.2f} | " + " | ".join(f"{median / other:.2f}" for other in medians) + " |")


def peak_mib(device: str) -> float:
    """Peak memory so far in MiB: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's max RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="Variants to run, each in a fresh process, in this order")
    parser.add_argument("--variant", choices=VARIANTS, help="Measure one variant in this process (internal)")
    parser.add_argument("--interleaved", action="store_true",
                        help="Step time only: the variants in this one process, a step of each in turn")
    args = parser.parse_args()
    if args.interleaved:
        interleaved(args.variants, args.backend, args.batch_size, args.steps, args.device)
        return
    if args.variant:
        print(json.dumps(measure(args.variant, args.backend, args.batch_size, args.steps, args.device)))
        return
    rows = []
    load = os.getloadavg()
    for variant in args.variants:
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--backend", args.backend,
                                "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                                "--device", args.device], capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"  {variant}: step {rows[-1]['step_s_median']:.3g} s (median), peak {rows[-1]['peak_mib']:.0f} MiB",
              flush=True)  # a run cut short (bench/gpu.sh's time limits) keeps the variants done
    print(f"{args.backend}, batch {args.batch_size}, {args.steps} timed steps, {args.device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); load average "
          f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    full = next((row for row in rows if row["variant"] == "full"), None)
    print("| variant | trainable params | checkpointed blocks | step time (median, s) | peak memory (MiB) "
          "| before training (MiB) | step time / full | peak memory / full |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratios = ("-", "-") if full is None else (f"{row['step_s_median'] / full['step_s_median']:.2f}",
                                                   f"{row['peak_mib'] / full['peak_mib']:.2f}")
        print(f"| {row['variant']} | {row['trainable']:,} ({row['share_percent']:.1f} %) | "
              f"{row['checkpointed_blocks']} | {row['step_s_median']:.3g} | {row['peak_mib']:.0f} ({row['memory']}) | "
              f"{row['before_mib']:.0f} | {ratios[0]} | {ratios[1]} |")


if __name__ == "__main__":
    main()
