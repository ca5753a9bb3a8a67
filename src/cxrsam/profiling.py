"""Wall time and peak memory of a block of work (used by experiments and bench scripts)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import torch


@dataclass
class Usage:
    """Measured cost of a block: ``seconds`` of wall time and ``peak_mb`` of memory.

    ``peak_mb`` is the CUDA allocator's peak when the block ran on a GPU, otherwise the peak
    resident set size (RSS) of this process sampled every 20 ms, which includes everything the
    process already held (model weights loaded earlier count too).
    """

    seconds: float = 0.0
    peak_mb: float = 0.0


@contextlib.contextmanager
def measure(device: str | torch.device = "cpu", interval: float = 0.02) -> Iterator[Usage]:
    """Measure the wall time and peak memory of the ``with`` block (RSS sampled every ``interval`` seconds)."""
    usage = Usage()
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    stop = threading.Event()
    process = psutil.Process()
    peak = [process.memory_info().rss]

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], process.memory_info().rss)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        if cuda:
            torch.cuda.synchronize()
        usage.seconds = time.perf_counter() - start
        stop.set()
        thread.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        usage.peak_mb = (torch.cuda.max_memory_allocated() if cuda else peak[0]) / 2**20
