"""Throughput and memory of one trial's work, to choose ``--gpus-per-trial`` and check the GPU is fed.

    python -m trainables.benchmark                          # all three models, this machine's device
    python -m trainables.benchmark --models mc3_18 --amp both --batch-size 2 --output bench.csv
    python -m trainables.benchmark --cache runs/paper/cache/<key>   # the shape of a prepared cache

Per model and precision it times the training step that trials run (``train_step``: forward,
weighted cross-entropy, backward, Adam) and an evaluation forward pass on random volumes of the
cached shape, and on CUDA records the peak memory one trial needs. It also times the CPU-side
TorchIO augmentation of one volume: with ``--cpus-per-trial 1`` and no loader workers that cost is
paid once per training volume, so when it exceeds the step time the GPU waits for the CPU.
Timings belong here, not in the tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchio as tio
from torch import nn

from datasets import build_augmentation
from datasets.volume_dataset import to_video_layout
from models import MODEL_NAMES, build_model
from trainables.fold_training import amp_setup, train_step

# The brain's bounding box at the paper's 2 mm in RAS (x, y, z): MNI152's brain is about 143 x 180 x 153 mm.
DEFAULT_SHAPE = (72, 90, 77)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per call after ``warmup`` untimed calls (cuDNN autotuning, allocator growth)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _synchronize(device)
        started = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def benchmark_model(model_name: str, shape: tuple[int, int, int], batch_size: int, channels: int,
                    device: torch.device, amp: bool, warmup: int, steps: int) -> dict:
    """Seconds per training step and per evaluation batch, and peak CUDA memory, for one model."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=3, in_channels=channels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=1e-3)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([0.8, 0.5, 0.7], device=device))
    amp_dtype, scaler = amp_setup(device, amp)
    volume = torch.randn(batch_size, channels, *shape)
    batch = torch.stack([to_video_layout(v) for v in volume]).to(device)
    labels = torch.arange(batch_size, device=device) % 3
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.train()
    train_s = _timed(lambda: train_step(model, batch, labels, criterion, optimizer, amp_dtype, scaler),
                     device, warmup, steps)
    model.eval()

    def evaluate() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(batch)

    eval_s = _timed(evaluate, device, warmup, steps)
    row = {"model": model_name, "device": str(device), "precision": str(amp_dtype or torch.float32).removeprefix("torch."),
           "batch_size": batch_size, "shape_xyz": "x".join(map(str, shape)),
           "train_step_s": train_s, "train_volumes_per_s": batch_size / train_s,
           "eval_volumes_per_s": batch_size / eval_s}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(device)
        total = torch.cuda.get_device_properties(device).total_memory
        row.update({"peak_memory_gib": peak / 2**30,
                    "trials_per_gpu_by_memory": int(0.9 * total // peak) if peak else None})
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def augmentation_seconds(shape: tuple[int, int, int], channels: int, kind: str, strength: float,
                         repeats: int, spacing: float = 2.0) -> float:
    """Median CPU seconds to augment one volume as a training loader does (one thread, like one trial)."""
    transform = build_augmentation(kind, strength)
    if transform is None:
        return 0.0
    image = tio.ScalarImage(tensor=torch.rand(channels, *shape), affine=np.diag([spacing] * 3 + [1.0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed(lambda: transform(image), torch.device("cpu"), 1, repeats)
    finally:
        torch.set_num_threads(threads)


def shape_of_cache(cache_dir: str | Path) -> tuple[tuple[int, int, int], int]:
    meta = json.loads((Path(cache_dir) / "meta.json").read_text())
    return tuple(meta["shape"]), int(meta.get("channels", 1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma list (default all three)")
    p.add_argument("--shape", help=f"x,y,z voxels of one volume (default {','.join(map(str, DEFAULT_SHAPE))}: 2 mm)")
    p.add_argument("--cache", help="a prepared cache folder (OUT/cache/<key>): take shape and channels from it")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", help="cuda, cpu, cuda:1 ... (default cuda if available)")
    p.add_argument("--amp", choices=["on", "off", "both"], default="on", help="mixed precision (CUDA only)")
    p.add_argument("--augmentation", default="light", help="none, light or heavy (default light)")
    p.add_argument("--aug-strength", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output", help="also write the rows to this CSV")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cache:
        shape, channels = shape_of_cache(args.cache)
    else:
        shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else DEFAULT_SHAPE
        channels = args.channels
    if len(shape) != 3 or min(shape) < 1:
        print(f"error: --shape takes three positive sizes x,y,z, got {args.shape!r}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        print(f"error: --models: unknown {unknown}; choose from {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return 2
    try:
        build_augmentation(args.augmentation, args.aug_strength)  # refuse a typo before minutes of timing
    except ValueError as error:
        print(f"error: --augmentation/--aug-strength: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = {"on": [True], "off": [False], "both": [False, True]}[args.amp]
    if device.type != "cuda":
        precisions = [False]  # autocast is used on CUDA only, as in training

    rows = [benchmark_model(m, shape, args.batch_size, channels, device, amp, args.warmup, args.steps)
            for m in models for amp in precisions]
    table = pd.DataFrame(rows)
    augment = augmentation_seconds(shape, channels, args.augmentation, args.aug_strength, repeats=max(3, args.steps))
    # Without loader workers a trial augments, then steps: its rate is bounded by the sum of both.
    table["augment_s_per_volume"] = augment
    table["fed_volumes_per_s"] = args.batch_size / (table["train_step_s"] + augment * args.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"Device: {name}; torch {torch.__version__}; volume {table['shape_xyz'][0]} x {channels} channel(s)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nTorchIO '{args.augmentation}' augmentation at strength {args.aug_strength}: "
          f"{augment * 1000:.0f} ms per volume on one CPU thread.")
    if device.type == "cuda" and augment > 0 and (table["train_step_s"] < augment * args.batch_size).any():
        print("The GPU step is faster than the CPU augmentation: give trials loader workers "
              "(--set num_workers=2 with --cpus-per-trial 3) or more CPUs.")
    if args.output:
        from datasets.atomic import write_csv_atomic

        write_csv_atomic(table, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
