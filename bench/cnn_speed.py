"""Speed of the CNN baselines: training step throughput and prediction throughput.

Training: the loop's work per step (forward, DiceCE loss, backward, AdamW step) on real augmented
batches, after warm-up steps; seconds per epoch = train images / (images/s). Prediction: the
predictor's full path on images at their original size (resize, forward, resize back, threshold,
post-processing), disk reading excluded. Random weights: speed does not depend on them.

    nice -n 10 python bench/cnn_speed.py --data ../shared/data/COVID-19_Radiography_Dataset --size 128
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Iterator

import torch

from cxrsam.baselines.config import make_config
from cxrsam.baselines.models import ARCHITECTURES, build_cnn
from cxrsam.baselines.predict import CnnPredictor
from cxrsam.data.dataset import SegmentationDataset, load_case
from cxrsam.data.layouts import discover, require_cases
from cxrsam.data.split import split_cases
from cxrsam.train.cnn import cnn_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forever(loader: torch.utils.data.DataLoader) -> Iterator:
    """The loader's batches, epoch after epoch (a small dataset still gives every timed step)."""
    while True:
        yield from loader


def train_images_per_s(arch: str, encoder: str, dataset: SegmentationDataset, batch_size: int, steps: int,
                       device: torch.device, warmup: int = 2) -> float:
    model = build_cnn(arch, encoder).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_fn = cnn_step(in_channels=1)
    loader = _forever(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True))
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            started = time.perf_counter()
        images, masks, indices = next(loader)
        loss = step_fn(model, (images.to(device), masks.to(device), indices))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - started)


def predict_images_per_s(arch: str, encoder: str, size: int, images: list, batch_size: int,
                         device: torch.device) -> float:
    config = make_config(arch=arch, encoder=encoder, size=size, data=".")
    predictor = CnnPredictor(build_cnn(arch, encoder), config, device=device)
    predictor.predict_many(images[:batch_size], batch_size)  # warm-up
    _sync(device)
    started = time.perf_counter()
    predictor.predict_many(images, batch_size)  # returns numpy masks: the device work is done
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--predict-images", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--split", choices=("test", "all"), default="test",
                        help="test: train on the train split, predict the test split; all: every image for both")
    args = parser.parse_args()
    device = torch.device(args.device)

    cases = require_cases(discover(args.data))
    splits = {"train": cases, "test": cases} if args.split == "all" else split_cases(cases)
    train = SegmentationDataset(splits["train"][: args.batch_size * (args.steps + 2)], args.size, augment=True)
    images = [load_case(c)[0].pixels for c in splits["test"][: args.predict_images]]
    n_train = len(splits["train"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"machine: {where}; "
          f"size {args.size}, encoder {args.encoder}, batch {args.batch_size}, {n_train} training images")
    print("| arch | train images/s | s/epoch (estimated) | predict images/s |")
    print("|---|---|---|---|")
    for arch in ARCHITECTURES:
        train_rate = train_images_per_s(arch, args.encoder, train, args.batch_size, args.steps, device)
        predict_rate = predict_images_per_s(arch, args.encoder, args.size, images, args.batch_size, device)
        print(f"| {arch} | {train_rate:.1f} | {n_train / train_rate:.0f} | {predict_rate:.1f} |")


if __name__ == "__main__":
    main()
