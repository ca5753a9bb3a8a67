"""The generic training loop shared by the CNN baselines and the LoRA-SAM trainer.

:class:`Trainer` owns everything that is not model specific: Hugging Face ``accelerate`` (devices,
multi-GPU, bf16/fp16 autocast, gradient accumulation), AdamW with linear warm-up and per-step cosine
decay, rich progress, validation each epoch, the best checkpoint by ``val_dice``, early stopping,
``metrics.csv``, the training-curve PNG, atomic checkpoints and exact resume. On a CPU the process keeps freed
memory for reuse (:func:`cxrsam.config.keep_freed_memory`).

What is model specific comes in as functions:

* ``step_fn(model, batch) -> loss`` (a scalar tensor; the loop does backward/step),
* ``validate_fn(model) -> {"val_dice": ..., ...}`` (called on every process with the unwrapped
  model in eval mode under ``torch.no_grad`` and autocast; :func:`segmentation_dice` shards and gathers),
* ``state_fn(model) -> dict[str, Tensor]`` / ``load_state_fn(model, state)``: WHAT is checkpointed
  (default: the whole ``state_dict``; a LoRA trainer saves only adapters and opened weights).

Run directory written by the main process:

``last.pt``
    ``{"model", "optimizer", "scheduler", "epoch" (completed), "step", "best_dice", "best_epoch",
    "bad_epochs", "finished", "history", "rng", "loop"}``, rewritten atomically after every epoch and removed
    when the run finishes (unless ``keep_resume_state``).
``best.pt``
    ``{"model", "epoch", "metrics"}`` of the epoch with the highest ``val_dice``.
``metrics.csv``, ``curves.png``
    One row per epoch (``epoch, step, train_loss, lr, val_*, epoch_s, train_images_per_s``) and its plot.

Resume (``fit(resume=True)``) restores model, optimizer, scheduler, counters and all RNG states
(python, numpy, torch, CUDA); shuffling and augmentation are seeded by ``(seed, epoch)``, so a run
killed after any epoch and resumed ends with the same weights as an uninterrupted run (on CPU,
bit for bit). A run killed mid-epoch repeats that epoch from its start.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrsam.config import LoopConfig, device_type, keep_freed_memory, resolve_device
from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, remove_stale_temps
from cxrsam.runs import BEST, CURVES_PNG, LAST, METRICS_CSV, forget, load_checkpoint, record_checksum, save_checkpoint

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any], torch.Tensor]
ValidateFn = Callable[[nn.Module], dict[str, float]]
StateFn = Callable[[nn.Module], dict[str, torch.Tensor]]
LoadStateFn = Callable[[nn.Module, dict[str, torch.Tensor]], None]



@dataclass
class FitResult:
    """Outcome of :meth:`Trainer.fit`."""

    best_dice: float
    best_epoch: int
    epochs_done: int
    steps_done: int
    stopped_early: bool
    run_dir: Path


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (CPU and all GPUs); optionally request deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear 1/(w+1)..1 over ``warmup_steps``, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def segmentation_dice(model: nn.Module, dataset: Dataset,
                      logits_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]],
                      batch_size: int = 8, collate_fn: Callable | None = None) -> float:
    """Mean per-sample Dice of ``dataset`` (thresholded logits at 0), sharded over processes and gathered.

    ``logits_fn(model, batch) -> (logits (B, 1, H, W), target (B, 1, H, W))``; batches are moved to the
    process's device. Every process returns the same number.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object, send_to_device

    from cxrsam.evaluation.metrics import batch_dice

    state = PartialState()
    shard = torch.utils.data.Subset(dataset, range(state.process_index, len(dataset), state.num_processes))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    scores: list[float] = []
    for batch in loader:
        logits, target = logits_fn(model, send_to_device(batch, state.device))
        scores.extend(batch_dice(logits.float(), target.float()).tolist())
    if state.num_processes > 1:
        scores = gather_object(scores)
    return float(np.mean(scores)) if scores else math.nan


def _default_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _default_load(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state)


def _resolve_precision(choice: str) -> str | None:
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # set by `accelerate launch`: let accelerate read it
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def write_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Plot training loss and validation Dice per epoch to a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(frame["epoch"], frame["train_loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax_dice.plot(frame["epoch"], frame["val_dice"], marker="o", color="tab:green")
    ax_dice.set(xlabel="epoch", ylabel="validation Dice", title="Validation Dice")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


class Trainer:
    """Train ``model`` on ``train_data`` with :class:`LoopConfig`; see the module docstring.

    Args:
        config: loop settings.
        run_dir: where checkpoints, metrics and curves go.
        model: the network (not yet wrapped by accelerate).
        params: the parameters to optimise (e.g. only LoRA adapters); default all that require grad.
        train_data: training Dataset; if it has ``set_epoch(e)`` it is called before each epoch.
        step_fn: ``(model, batch) -> scalar loss`` (batch already on the device).
        validate_fn: ``(model) -> dict`` with at least ``val_dice``.
        state_fn / load_state_fn: what model state goes into checkpoints and how it is put back.
        collate_fn: DataLoader collate function (default: torch's).
        on_epoch_end: ``(epoch, row) -> None`` after each epoch's checkpoint is written (main process).
    """

    def __init__(self, config: LoopConfig, run_dir: str | Path, model: nn.Module, train_data: Dataset,
                 step_fn: StepFn, validate_fn: ValidateFn, params: Iterable[nn.Parameter] | None = None,
                 state_fn: StateFn = _default_state, load_state_fn: LoadStateFn = _default_load,
                 collate_fn: Callable | None = None,
                 on_epoch_end: Callable[[int, dict[str, float]], None] | None = None):
        from accelerate import Accelerator, DataLoaderConfiguration

        on_cpu = device_type(resolve_device(config.device)) == "cpu"
        if on_cpu and keep_freed_memory():  # a step's large activations reuse the heap's pages: LoRA steps 1.43x
            log.debug("glibc malloc keeps freed memory for reuse (mmap off, no trimming)")
        self.config = config
        self.run_dir = Path(run_dir)
        self.train_data = train_data
        self.step_fn, self.validate_fn = step_fn, validate_fn
        self.state_fn, self.load_state_fn = state_fn, load_state_fn
        self.on_epoch_end = on_epoch_end
        self.accelerator = Accelerator(
            cpu=on_cpu,
            mixed_precision=_resolve_precision(config.mixed_precision),
            gradient_accumulation_steps=config.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            step_scheduler_with_optimizer=False,
        )
        params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters")
        self.params = params
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        # A last batch of one sample breaks BatchNorm layers that pool to 1x1 (DeepLabv3+'s ASPP), and
        # tiny last batches give noisy steps: drop the remainder whenever a full batch exists.
        loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=True,
                            drop_last=len(train_data) > config.batch_size,
                            num_workers=config.num_workers, collate_fn=collate_fn)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.steps_per_epoch = math.ceil(len(self.loader) / config.grad_accum)
        if config.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, config.steps_per_epoch)
        self.batches_per_epoch = min(len(self.loader), self.steps_per_epoch * config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        warmup = (config.warmup_steps if config.warmup_steps is not None
                  else int(round(config.warmup_fraction * self.total_steps)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            warmup_cosine(self.total_steps, min(warmup, self.total_steps - 1), config.min_lr_ratio))

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _progress(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        enabled = self.config.progress and self.accelerator.is_main_process and console.is_terminal
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not enabled, transient=True)

    def _write(self, state: dict[str, Any]) -> None:
        """Checkpoint, metrics.csv and curves for the epoch just finished (main process only)."""
        if not self.accelerator.is_main_process:
            return
        save_checkpoint(self.run_dir / LAST, state)
        with atomic_path(self.run_dir / METRICS_CSV) as tmp:
            pd.DataFrame(state["history"]).to_csv(tmp, index=False, float_format="%.6g")
        write_curves(state["history"], self.run_dir / CURVES_PNG)

    def _validate(self) -> dict[str, float]:
        """``validate_fn`` on the unwrapped model in eval mode, without gradients, under autocast."""
        self.model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            metrics = {k: float(v) for k, v in self.validate_fn(self.unwrapped).items()}
        if "val_dice" not in metrics:
            raise ValueError("validate_fn must return 'val_dice'")
        return metrics

    def fit(self, resume: bool = False) -> FitResult:
        """Train until ``epochs``/``max_steps`` or early stopping; with ``resume`` continue ``last.pt``."""
        cfg, acc = self.config, self.accelerator
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:  # temporary files of a write killed in an earlier start (e.g. a half last.pt)
            remove_stale_temps(self.run_dir)
        epoch, step, best_dice, best_epoch, bad_epochs = 0, 0, -math.inf, -1, 0
        history: list[dict[str, float]] = []
        finished = False
        if resume:
            ckpt = load_checkpoint(self.run_dir / LAST)
            saved = LoopConfig(**ckpt["loop"]).schedule_fields()
            changed = sorted(k for k, v in cfg.schedule_fields().items() if saved.get(k) != v)
            if changed:
                raise CxrsamError("cannot resume with changed settings (they shape the weights and the "
                                  "learning-rate schedule): " + ", ".join(
                    f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed), path=self.run_dir / LAST)
            self.load_state_fn(self.unwrapped, ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            epoch, step = ckpt["epoch"], ckpt["step"]
            best_dice, best_epoch, bad_epochs = ckpt["best_dice"], ckpt["best_epoch"], ckpt["bad_epochs"]
            history, finished = list(ckpt["history"]), ckpt["finished"]
            set_rng_state(ckpt["rng"])
            if acc.is_main_process:
                log.info("resuming %s after epoch %d (step %d, best val Dice %.4f)", self.run_dir, epoch, step,
                         best_dice)
        stopped_early = finished and bad_epochs >= (cfg.patience or math.inf)
        track = {"best_dice": best_dice, "best_epoch": best_epoch, "bad_epochs": bad_epochs}

        def record(done_epoch: int, row: dict[str, float]) -> None:
            """Best checkpoint, counters and history after ``done_epoch`` (0: the untouched model)."""
            if row["val_dice"] > track["best_dice"]:
                track.update(best_dice=row["val_dice"], best_epoch=done_epoch, bad_epochs=0)
                if acc.is_main_process:
                    metrics = {k: v for k, v in row.items() if k.startswith("val_")}
                    save_checkpoint(self.run_dir / BEST, {"model": self.state_fn(self.unwrapped),
                                                         "epoch": done_epoch, "metrics": metrics})
                    record_checksum(self.run_dir / BEST)
            elif done_epoch > 0:
                track["bad_epochs"] += 1
            history.append(row)

        def write_last(done_epoch: int, done: bool) -> None:
            self._write({"model": self.state_fn(self.unwrapped), "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "epoch": done_epoch, "step": step,
                         **track, "finished": done, "history": history, "rng": rng_state(),
                         "loop": cfg.model_dump()})

        if cfg.validate_start and not resume:
            started = time.perf_counter()
            metrics = self._validate()
            record(0, {"epoch": 0, "step": 0, "train_loss": math.nan, "lr": self.scheduler.get_last_lr()[0],
                       **metrics, "epoch_s": time.perf_counter() - started, "train_images_per_s": math.nan})
            write_last(0, False)
            if acc.is_main_process:
                log.info("epoch 0 (untouched model)  val Dice %.4f", metrics["val_dice"])
        with self._progress() as progress:
            task = progress.add_task("train", total=cfg.epochs * self.batches_per_epoch,
                                     completed=epoch * self.batches_per_epoch, info="")
            while not finished:
                started = time.perf_counter()
                if hasattr(self.train_data, "set_epoch"):
                    self.train_data.set_epoch(epoch)
                self.loader.set_epoch(epoch)
                self.model.train()
                loss_sum, loss_count, seen, epoch_start_step = 0.0, 0, 0, step
                for batch in self.loader:
                    with acc.accumulate(self.model):
                        with acc.autocast():
                            loss = self.step_fn(self.model, batch)
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.max_grad_norm:
                            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    if acc.sync_gradients:
                        if not self.optimizer.step_was_skipped:  # fp16 overflow: keep the schedule in place
                            self.scheduler.step()
                        step += 1
                    loss_sum += float(loss.detach())
                    loss_count += 1
                    seen += len(batch[0]) if isinstance(batch, (list, tuple)) else cfg.batch_size
                    best = track["best_dice"] if track["best_epoch"] >= 0 else None
                    info = f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / loss_count:.4f}"
                    progress.update(task, advance=1, info=info
                                    + (f" best Dice {best:.4f}" if best is not None else ""))
                    if (cfg.max_steps and step >= cfg.max_steps) or step - epoch_start_step >= self.steps_per_epoch:
                        break
                train_s = time.perf_counter() - started
                mean_loss = float(acc.gather(torch.tensor([loss_sum / max(1, loss_count)], device=acc.device)).mean())
                metrics = self._validate()
                epoch += 1
                row = {"epoch": epoch, "step": step, "train_loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                       **metrics, "epoch_s": time.perf_counter() - started,
                       "train_images_per_s": seen * acc.num_processes / train_s}
                record(epoch, row)
                stopped_early = cfg.patience is not None and track["bad_epochs"] >= cfg.patience
                finished = stopped_early or epoch >= cfg.epochs or bool(cfg.max_steps and step >= cfg.max_steps)
                write_last(epoch, finished)
                if acc.is_main_process:
                    log.info("epoch %d/%d  loss %.4f  val Dice %.4f  (best %.4f @ %d)  %.0f s", epoch, cfg.epochs,
                             mean_loss, metrics["val_dice"], track["best_dice"], track["best_epoch"], row["epoch_s"])
                acc.wait_for_everyone()
                if self.on_epoch_end is not None and acc.is_main_process:
                    self.on_epoch_end(epoch, row)
        best_dice, best_epoch, bad_epochs = track["best_dice"], track["best_epoch"], track["bad_epochs"]
        if finished and not cfg.keep_resume_state and acc.is_main_process:
            forget(self.run_dir / LAST)  # a finished run holds each weight once
        if stopped_early and acc.is_main_process:
            log.info("early stopping: no val Dice gain for %d epochs", bad_epochs)
        return FitResult(best_dice=best_dice, best_epoch=best_epoch, epochs_done=epoch, steps_done=step,
                         stopped_early=stopped_early, run_dir=self.run_dir)
