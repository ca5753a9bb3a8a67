"""Step time and peak memory of LoRA vs full fine-tuning of a SAM backend at the same batch and size.

Each variant runs in a fresh subprocess (so peak memory is its own): build the backend, make it
trainable (``lora``: :func:`cxrsam.sam.lora.apply_lora` with the default settings -- adapters on
``qkv`` + the mask decoder; ``lora-strict``: adapters only; ``full``: every weight), then time
``--steps`` training steps (forward through :class:`cxrsam.train.finetune.SamTrainee` with one box
per lung, Dice + BCE, backward, AdamW step) after one warm-up step. Memory: peak resident set
size of the process (``getrusage`` max RSS; it includes the model and Python) on CPU, and
``torch.cuda.max_memory_allocated`` on a GPU.

    nice -n 10 python bench/lora_vs_full.py --batch-size 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

VARIANTS = ("lora", "lora-strict", "full")


def measure(variant: str, backend: str, batch_size: int, steps: int, device: str) -> dict:
    """Train ``steps`` steps of ``variant`` on synthetic two-lung images; return timings and memory."""
    from cxrsam.prompts import prompts_from_mask
    from cxrsam.prompts.components import lung_components
    from cxrsam.sam.lora import LoraSettings, apply_lora, trainable_summary
    from cxrsam.sam.registry import build_sam
    from cxrsam.train.finetune import SamTrainee, finetune_step

    torch.manual_seed(0)
    loaded = build_sam(backend, device=device)
    if variant == "full":
        for param in loaded.model.parameters():
            param.requires_grad_(True)
    else:
        apply_lora(loaded.model, LoraSettings(train_decoder=variant == "lora"))
    summary = trainable_summary(loaded.model)
    size = loaded.spec.img_size
    mask = np.zeros((size, size), bool)
    mask[size // 8: 7 * size // 8, size // 8: 7 * size // 16] = True
    mask[size // 8: 7 * size // 8, 9 * size // 16: 7 * size // 8] = True
    prompts = [prompts_from_mask(mask)] * batch_size
    targets = [torch.from_numpy(np.stack(lung_components(mask)[0]).astype(np.float32)).to(device)] * batch_size
    images = loaded.spec.transform.images(list(torch.rand(batch_size, size, size)), device)  # model input
    trainee = SamTrainee(loaded).train()
    step_fn = finetune_step()
    optimizer = torch.optim.AdamW([p for p in loaded.model.parameters() if p.requires_grad], lr=1e-5)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = step_fn(trainee, (images, None, None, prompts, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:  # the first step is warm-up (allocations, AdamW state)
            times.append(time.perf_counter() - started)
    peak_mib = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"variant": variant, "trainable": summary["trainable"], "share_percent": summary["share_percent"],
            "step_s_median": statistics.median(times), "step_s_min": min(times), "peak_mib": peak_mib,
            "memory": "cuda max allocated" if device.startswith("cuda") else "max RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=VARIANTS, help="Measure one variant in this process (internal)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.backend, args.batch_size, args.steps, args.device)))
        return
    rows = []
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--backend", args.backend,
                                "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                                "--device", args.device], capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"{args.backend}, batch {args.batch_size}, {args.steps} timed steps, {args.device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print("| variant | trainable params | share | step time (median, s) | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['trainable']:,} | {row['share_percent']:.1f} % | {row['step_s_median']:.2f} "
              f"| {row['peak_mib']:.0f} ({row['memory']}) |")


if __name__ == "__main__":
    main()
