"""The device and process rules of cxrsam.config, and that a CPU predict can resolve them without PyTorch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cxrsam import config
from cxrsam.errors import CxrsamError


def test_device_rule(monkeypatch):
    assert config.resolve_device("cpu") == "cpu" and config.resolve_device("cuda:1") == "cuda:1"
    assert config.device_type("cuda:1") == "cuda" and config.device_type("cpu") == "cpu"
    with pytest.raises(CxrsamError, match="unknown device 'gpu7'"):
        config.resolve_device("gpu7")
    monkeypatch.setattr(config, "gpu_possible", lambda: False)  # no GPU driver: auto is the CPU, PyTorch unasked
    assert config.resolve_device("auto") == config.resolve_device(None) == "cpu"
    import torch

    monkeypatch.setattr(config, "gpu_possible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config.resolve_device("auto") == "cuda"  # one process: the GPU; a launched rank: its own (accelerate)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.resolve_device("auto") == "cpu"


def test_a_process_not_launched_as_several_is_one_without_accelerate(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = config.process_state()
    assert isinstance(state, config.SingleProcess) and state.is_main_process and state.num_processes == 1
    with state.split_between_processes([1, 2, 3]) as share:
        assert list(share) == [1, 2, 3]
    assert config.gather_objects(state, ["a"]) == ["a"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert config.launched_processes() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert config.launched_processes() == 4


def test_cpu_auto_device_and_process_need_no_pytorch(fresh_imports):
    code = ("from cxrsam import config\nconfig.gpu_possible = lambda: False\n"
            "assert config.resolve_device('auto') == 'cpu' and config.process_state().num_processes == 1")
    assert fresh_imports(code, ["torch", "accelerate"], env={"WORLD_SIZE": "1"}) == []


FAULTS_OF_FREED_BLOCKS = """
import resource, sys, torch
from cxrsam.config import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # 64 MiB blocks, freed at once: the kept heap grows to hold them in the first 2-5 rounds
    torch.empty(2**24).fill_(1.0)
start = faults()
for _ in range(8):
    torch.empty(2**24).fill_(1.0)
print(faults() - start)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux only")
def test_kept_freed_memory_is_reused_without_page_faults():
    # Without keep_freed_memory glibc maps each 64 MiB block afresh (above its 32 MiB mmap limit) and unmaps it on
    # free: 8 x 16384 faults of 4 KiB pages; kept, the heap's pages are reused after the first rounds.
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_FREED_BLOCKS, "keep"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 8 * 2**24 * 4 // 4096 // 2
