"""CPU training steps with glibc's default allocator against :func:`cxrsam.config.keep_freed_memory`.

Each (workload, allocator) runs in a fresh subprocess, the variants in turn for ``--rounds`` rounds, so a changing
load hits both alike. Workloads:

* ``lora``: ``configs/cpu.yaml``'s LoRA recipe on real images: LiteMedSAM with rank-8 ``qkv`` adapters (decoder
  frozen), jittered per-lung ground-truth boxes, half the images shifted like other sites, the consistency term
  (weight 5), batch 2, AdamW (:func:`cxrsam.train.finetune.finetune_step` on
  :class:`~cxrsam.train.finetune.PromptedDataset` items);
* ``unet``: the U-Net baseline (ResNet-18 encoder, random init) at ``--cnn-size`` on random images, batch 8,
  BCE, AdamW.

Per step after ``--warmup`` steps: wall time, minor page faults and user/kernel CPU seconds (``getrusage``);
per process the peak resident set size and every step's loss, which must agree bit for bit between the two
allocators (it is the same arithmetic).

    PYTHONPATH=src python bench/allocator.py --data ../shared/data/COVID-19_Radiography_Dataset --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

ALLOCATORS = ("default", "kept")
WORKLOADS = ("lora", "unet")


def lora_steps(data: str, batch_size: int) -> Callable[[int], float]:
    """Step ``i`` of the LoRA recipe on the first cases of ``data``; returns the loss."""
    from cxrsam.data.layouts import discover
    from cxrsam.sam.lora import LoraSettings, apply_lora
    from cxrsam.sam.registry import build_sam
    from cxrsam.train.finetune import PromptedDataset, SamTrainee, collate_prompted, finetune_step

    loaded = build_sam("litemedsam")
    apply_lora(loaded.model, LoraSettings(rank=8, alpha=16, train_decoder=False))
    net = SamTrainee(loaded).train()
    cases = discover(data).cases[:64]
    items = PromptedDataset(cases, loaded.spec.transform, "box", 0.05, shift=0.5, seed=0)
    step_fn = finetune_step(consistency_weight=5.0)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-3)

    def step(i: int) -> float:
        batch = collate_prompted([items[(i * batch_size + k) % len(items)] for k in range(batch_size)])
        loss = step_fn(net, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def unet_steps(size: int, batch_size: int) -> Callable[[int], float]:
    """Step ``i`` of the U-Net baseline on random (seeded) images of ``size``; returns the loss."""
    import segmentation_models_pytorch as smp

    model = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i: int) -> float:
        generator = torch.Generator().manual_seed(i)
        images = torch.rand(batch_size, 1, size, size, generator=generator)
        masks = (torch.rand(batch_size, 1, size, size, generator=generator) > 0.5).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def measure(workload: str, allocator: str, args: argparse.Namespace) -> dict:
    """Run one process's steps: timings, page faults, CPU seconds and peak memory."""
    from cxrsam.config import keep_freed_memory

    if allocator == "kept" and not keep_freed_memory():
        raise SystemExit("glibc's mallopt is not available here")
    torch.manual_seed(0)
    step = lora_steps(args.data, 2) if workload == "lora" else unet_steps(args.cnn_size, 8)
    rows, losses = [], []
    for i in range(args.warmup + args.steps):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        losses.append(step(i))
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        if i >= args.warmup:
            rows.append((seconds, after.ru_minflt - before.ru_minflt, after.ru_utime - before.ru_utime,
                         after.ru_stime - before.ru_stime))
    columns = list(zip(*rows))
    return {"workload": workload, "allocator": allocator, "step_s": statistics.median(columns[0]),
            "faults": statistics.median(columns[1]), "user_s": statistics.median(columns[2]),
            "kernel_s": statistics.median(columns[3]),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="Dataset root (the lora workload's images)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--cnn-size", type=int, default=256, help="U-Net input size (px)")
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (the heap grows in them)")
    parser.add_argument("--rounds", type=int, default=2, help="Processes per variant, run in turn")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args)))
        return
    if "lora" in args.workloads and not args.data:
        parser.error("the lora workload needs --data")
    load = os.getloadavg()[0]
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for workload in args.workloads:
            for allocator in ALLOCATORS:
                command = [sys.executable, __file__, "--child", workload, allocator, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--cnn-size", str(args.cnn_size)]
                done = subprocess.run(command + (["--data", args.data] if args.data else []), capture_output=True,
                                      text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((workload, allocator), []).append(row)
                print(f"  {workload} {allocator}: {row['step_s']:.2f} s per step", flush=True)
    print(f"{args.rounds} rounds, {args.warmup} + {args.steps} steps per process, {torch.get_num_threads()} threads; "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| workload | allocator | s per step (median of rounds) | speed-up | page faults per step | user CPU s "
          "| kernel CPU s | peak memory MiB | same losses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        base = results[(workload, "default")]
        for allocator in ALLOCATORS:
            rows = results[(workload, allocator)]
            step = statistics.median(r["step_s"] for r in rows)
            same = all(r["losses"] == base[0]["losses"] for r in rows)
            print(f"| {workload} | {allocator} | {step:.2f} | "
                  f"{statistics.median(r['step_s'] for r in base) / step:.2f}x | "
                  f"{statistics.median(r['faults'] for r in rows):.0f} | "
                  f"{statistics.median(r['user_s'] for r in rows):.1f} | "
                  f"{statistics.median(r['kernel_s'] for r in rows):.1f} | "
                  f"{max(r['peak_mib'] for r in rows):.0f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
