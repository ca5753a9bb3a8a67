"""The generic loop: learning on phantoms, exact resume, atomic checkpoints, refusals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from cxrsam.baselines.config import make_config
from cxrsam.errors import CxrsamError
from cxrsam.train import loop
from cxrsam.train.cnn import train_cnn


def tiny_config(data, **overrides):
    options = dict(arch="unet", data=data, size=64, split=(0.75, 0.25, 0.0), epochs=8, batch_size=4, lr=3e-3,
                   patience=None, progress=False, keep_resume_state=True)
    return make_config(**{**options, **overrides})


def model_state(run_dir, name="last.pt"):
    return loop.load_checkpoint(run_dir / name)["model"]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def phantoms64(tmp_path_factory):
    from cxrsam.data.synthetic import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("ph64"), n=12, size=64, seed=3, progress=False)


def test_tiny_unet_learns_and_writes_run_files(phantoms64, tmp_path):
    # 10 training phantoms at batch 4: two full batches per epoch (the ragged last batch is dropped).
    run = train_cnn(tiny_config(phantoms64, epochs=12, keep_resume_state=False), tmp_path / "run")
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(1, 13))
    assert {"train_loss", "val_dice", "lr", "epoch_s", "train_images_per_s"} <= set(metrics.columns)
    assert metrics["val_dice"].iloc[0] < 0.7
    assert metrics["val_dice"].max() > 0.85
    assert metrics["train_loss"].iloc[-1] < 0.6 * metrics["train_loss"].iloc[0]
    # a finished run holds its weights once (best.pt, with its SHA-256); the resume state is gone
    assert {p.name for p in run.iterdir()} == {"config.yaml", "manifest.csv", "metrics.csv", "best.pt", "curves.png",
                                               "checksums.json"}
    assert set(json.loads((run / "checksums.json").read_text())) == {"best.pt"}
    best = loop.load_checkpoint(run / "best.pt")
    assert best["epoch"] == int(metrics["epoch"][metrics["val_dice"].idxmax()])
    assert best["metrics"]["val_dice"] == pytest.approx(metrics["val_dice"].max(), abs=1e-5)
    # the learning rate warmed up and decayed to the cosine floor
    assert metrics["lr"].iloc[-1] == pytest.approx(3e-3 * 0.01, rel=1e-3)
    with pytest.raises(CxrsamError, match="already holds a training run"):
        train_cnn(tiny_config(phantoms64), run)
    with pytest.raises(CxrsamError, match=r"nothing to resume \(the run has finished\)"):
        train_cnn(tiny_config(phantoms64, epochs=12, keep_resume_state=False), run, resume=True)


def resume_config(data):
    """DeepLabv3+ (it has dropout, so the RNG state matters) with augmentation, 3 epochs."""
    return tiny_config(data, arch="deeplabv3plus", epochs=3)


@pytest.fixture(scope="module")
def straight_run(phantoms64, tmp_path_factory):
    return train_cnn(resume_config(phantoms64), tmp_path_factory.mktemp("straight") / "run")


def assert_same_run(a_dir, b_dir):
    for name in ("last.pt", "best.pt"):
        assert_same_tensors(model_state(a_dir, name), model_state(b_dir, name))
    a, b = (loop.load_checkpoint(d / "last.pt") for d in (a_dir, b_dir))
    assert [r["val_dice"] for r in a["history"]] == [r["val_dice"] for r in b["history"]]
    assert_same_tensors(a["optimizer"]["state"][0], b["optimizer"]["state"][0])


def test_interrupted_and_resumed_run_equals_uninterrupted(phantoms64, straight_run, tmp_path):
    config = resume_config(phantoms64)

    def kill_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cnn(config, tmp_path / "resumed", on_epoch_end=kill_after_first)
    assert loop.load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    random.seed(123), np.random.seed(123), torch.manual_seed(123)  # resume must not depend on the caller's RNG
    train_cnn(config, tmp_path / "resumed", resume=True)
    assert_same_run(straight_run, tmp_path / "resumed")


def test_sigkilled_cli_run_resumes_to_the_same_weights(phantoms64, straight_run, tmp_path):
    """A real kill (SIGKILL, no clean-up) of `cxrsam train-cnn` after its first checkpoint, then `--resume`."""
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "cxrsam", "train-cnn", "--arch", "deeplabv3plus", "--data", str(phantoms64),
            "--size", "64", "--split", "0.75,0.25,0", "--epochs", "3", "--batch-size", "4", "--lr", "3e-3",
            "--set", "loop.keep_resume_state=true", "--out", str(run)]  # --set: the dotted override mechanism
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert loop.load_checkpoint(run / "last.pt")["epoch"] in (1, 2)
    res = subprocess.run([sys.executable, "-m", "cxrsam", "train-cnn", "--resume", "--out", str(run)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert_same_run(straight_run, run)


def test_resume_removes_the_temp_file_of_a_killed_checkpoint_write(phantoms64, tmp_path):
    config = tiny_config(phantoms64, epochs=2)

    def kill_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cnn(config, tmp_path / "run", on_epoch_end=kill_after_first)
    stale = tmp_path / "run" / ".last.pt.q7x2k_0a.tmp.pt"  # what a SIGKILL inside save_checkpoint leaves
    stale.write_bytes((tmp_path / "run" / "last.pt").read_bytes()[:1000])
    train_cnn(config, tmp_path / "run", resume=True)
    assert not stale.exists()
    assert loop.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_resume_refuses_changed_settings_and_missing_run(phantoms64, tmp_path):
    config = tiny_config(phantoms64, epochs=1)
    run = train_cnn(config, tmp_path / "run")
    with pytest.raises(CxrsamError, match="lr"):
        train_cnn(tiny_config(phantoms64, epochs=1, lr=1e-2), run, resume=True)
    with pytest.raises(CxrsamError, match="size"):
        train_cnn(tiny_config(phantoms64, epochs=1, size=96), run, resume=True)
    with pytest.raises(CxrsamError, match="nothing to resume"):
        train_cnn(config, tmp_path / "empty", resume=True)


def test_half_written_checkpoint_never_replaces_last(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    loop.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def crash_midway(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(loop.torch, "save", crash_midway)
    with pytest.raises(OSError):
        loop.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert loop.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_ctrl_c_during_checkpoint_write_is_deferred(tmp_path, monkeypatch):
    real_save = torch.save

    def save_then_interrupt(obj, target):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the checkpoint is being written
        real_save(obj, target)

    monkeypatch.setattr(loop.torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.save_checkpoint(tmp_path / "last.pt", {"epoch": 5})
    assert loop.load_checkpoint(tmp_path / "last.pt")["epoch"] == 5


def test_rng_state_round_trips_through_weights_only_checkpoint(tmp_path):
    loop.seed_everything(7)
    loop.save_checkpoint(tmp_path / "rng.pt", {"rng": loop.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loop.set_rng_state(loop.load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CxrsamError, match="unreadable checkpoint"):
        loop.load_checkpoint(bad)


def test_warmup_cosine_schedule_shape():
    factor = loop.warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    values = [factor(s) for s in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert factor(100) == pytest.approx(0.01)


def test_validate_start_keeps_the_untouched_model_when_training_only_hurts(tmp_path):
    # A 1x1 convolution that starts as the perfect segmenter of binary images (logit 20x - 10); the "loss"
    # is the mean logit, so every step shrinks the masks and every trained epoch validates worse.
    images = (torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    data = torch.utils.data.TensorDataset(images, images)
    model = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        model.weight.fill_(20.0)
        model.bias.fill_(-10.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def validate(net):
        dice = loop.segmentation_dice(net, data, lambda m, batch: (m(batch[0]), batch[1]), batch_size=4)
        return {"val_dice": dice}

    config = loop.LoopConfig(epochs=3, steps_per_epoch=1, batch_size=2, lr=20.0, warmup_steps=0, patience=None,
                             max_grad_norm=None, weight_decay=0.0, validate_start=True, progress=False,
                             keep_resume_state=True)
    result = loop.Trainer(config, tmp_path / "run", model, data, lambda net, batch: net(batch[0]).mean(),
                          validate).fit()
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1, 2, 3]
    assert list(metrics["step"]) == [0, 1, 2, 3]  # one optimizer step per epoch out of a 4-batch data pass
    assert metrics["val_dice"].iloc[0] == pytest.approx(1.0)
    assert (metrics["val_dice"].iloc[1:] < 0.99).all()
    assert (result.best_epoch, result.best_dice) == (0, pytest.approx(1.0))
    best = loop.load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 0
    assert_same_tensors(best["model"], start)
    assert not torch.equal(model_state(tmp_path / "run")["weight"], start["weight"])  # training did move it


def test_training_on_the_cpu_keeps_freed_memory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    data = torch.utils.data.TensorDataset(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8))
    config = loop.LoopConfig(epochs=1, batch_size=2, device="cpu", progress=False)
    loop.Trainer(config, tmp_path / "run", torch.nn.Conv2d(1, 1, 1), data, lambda net, batch: net(batch[0]).mean(),
                 lambda net: {"val_dice": 0.0})
    assert calls == [1]  # glibc keeps a step's large activations for the next step (cxrsam.config)


def test_shift_augment_shifts_the_training_images_only(phantoms64, tmp_path, monkeypatch):
    from cxrsam.baselines.config import read_config
    from cxrsam.data.dataset import SegmentationDataset

    shifted = []
    original = SegmentationDataset.shifted
    monkeypatch.setattr(SegmentationDataset, "shifted",
                        lambda self, index, rng: shifted.append(len(self)) or original(self, index, rng))
    run = train_cnn(tiny_config(phantoms64, epochs=1, shift_augment=1.0, keep_resume_state=False), tmp_path / "run")
    assert shifted == [10] * 8  # every item of the two full training batches (of 10); no validation image
    assert read_config(run).shift_augment == 1.0
    with pytest.raises(CxrsamError, match="shift_augment"):
        tiny_config(phantoms64, shift_augment=2.0)
