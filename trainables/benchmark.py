"""Throughput and memory of one trial's work, to choose ``--gpus-per-trial`` and check the GPU is fed.

    python -m trainables.benchmark                          # all three models, this machine's device
    python -m trainables.benchmark --models mc3_18 --amp both --batch-size 2 --output bench.csv
    python -m trainables.benchmark --cache runs/paper/cache/<key>   # the shape of a prepared cache

Per model and precision it times the training step that trials run (``train_step``: forward,
weighted cross-entropy, backward, Adam) and an evaluation forward pass on random volumes of the
cached shape, and on CUDA records the peak memory one trial needs. It also times the data path a trial
pays per training volume (on the device for ``none``/``light``, TorchIO on the CPU for ``heavy``): without
loader workers that cost adds to every step (``fed_volumes_per_s``), so when it exceeds the step time the GPU
waits for it. The CPU-side TorchIO augmentation is timed beside it for comparison.
Timings belong here, not in the tests.

Rows also carry, per model and precision (``samples_per_s``, ``step_ms`` ... are the issue's names):

- ``flops_per_step``: forward + backward FLOPs of one training step, counted once with
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls; Adam's element-wise work is
  not counted); ``achieved_tflops = flops_per_step * steps_per_s / 1e12``;
- ``peak_tflops``: the device's dense peak from a small table of known CUDA GPUs (bf16/fp16 for mixed
  precision, TF32/fp32 for float32), empty on a CPU or an unknown GPU, and then ``peak_fraction`` too;
- ``data_ms_per_sample``: the trainer's on-device data path per sample (index a float16 device tensor,
  cast to float32, ``augment_light`` when ``--augmentation light``, permute to the video layout); with
  ``--augmentation heavy`` the trainer augments with TorchIO on the CPU, so it is that figure.
  ``torchio_ms_per_sample`` is the CPU TorchIO path, side by side;
- ``checkpoint_mb_per_epoch``: bytes of ``model.state_dict()`` plus the optimizer's state after a step
  (what a resumable checkpoint holds), in MB of 2**20 bytes; ``peak_memory_mb`` likewise (CUDA only);
- ``trials_per_device``: 1 for the in-process row; on CUDA ``--concurrency 1,2,4`` adds rows from that
  many concurrent processes each running the training step on the one device, ``samples_per_s`` then
  the aggregate, once without and once with a private CUDA MPS daemon (``--mps``, column ``mps``;
  ``trainables/cuda_mps.py``); when MPS cannot start, its rows are left out and the reason is printed. On a
  CPU this is skipped. Apple's Metal (``mps`` device) is not handled;
- ``conv_backend``: the convolution kernels one training step used (``cudnn``, ``mkldnn``, ``slow_conv3d``...),
  read from ``torch.profiler``; on CUDA anything but ``cudnn`` is printed as a warning (3-D convolutions under
  bf16 once fell back to a slow path in a torch release). ``device_name``, ``torch_version``,
  ``cudnn_version`` say what was measured;
- ``memory_format`` (``--memory-format``: ``contiguous``, ``channels_last_3d`` or both) and ``compiled``
  (``--compile``: ``torch.compile`` around the model, its first call's time in ``compile_s``): the trainer uses
  neither until a row shows that it helps on the device in question.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchio as tio
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from datasets import build_augmentation
from datasets.device_augmentation import augment_light
from datasets.volume_dataset import batch_to_video_layout, to_video_layout
from models import MODEL_NAMES, PAPER_MODEL_NAMES, build_model
from search_spaces import PAPER_DEFAULTS
from trainables.cuda_mps import DEFAULT_PIPE_DIRECTORY, MpsUnavailable, log_tail, private_mps, system_mps_running
from trainables.fold_training import (amp_setup, cuda_settings, make_optimizer, tensor_bytes, train_step,
                                      train_step_loss, unsupported_gpu)
from trainables.metrics import WeightedCrossEntropy

# The profiler's C++ side (kineto) prints start/stop trace lines for every profiled step, and on a machine without
# a GPU an "ERROR ... gpuGetDeviceCount failed" line, though CPU profiling works. Level 6 keeps those out of the
# benchmark's table; it is read when the profiler first starts, and a value the user set wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

# The brain's bounding box at the paper's 2 mm in RAS (x, y, z): MNI152's brain is about 143 x 180 x 153 mm.
DEFAULT_SHAPE = (72, 90, 77)
# A trial keeps its fold's volumes on the device (train + val + test: the whole cohort, float16); without --cache
# the memory estimate counts the paper's cohort (259 HGG + 73 LGG + 259 Healthy).
PAPER_SUBJECTS = 591
MB = 2**20

# Dense (no sparsity) peak TFLOP/s by CUDA device name: (mixed precision bf16/fp16, float32 as cuDNN
# runs it: TF32 on Ampere and later, where PyTorch allows TF32 convolutions by default; plain fp32 before).
# First match wins, so the PCIe and NVL cards come before the SXM ones of their name. Figures from NVIDIA's data sheets.
PEAK_TFLOPS = [
    (r"H100.*PCIe", 756.0, 378.0),
    (r"H100.*NVL", 835.0, 418.0),
    (r"H100", 989.0, 494.0),
    (r"H200.*NVL", 835.0, 418.0),
    (r"H200", 989.0, 494.0),
    (r"A100", 312.0, 156.0),
    (r"\bL4\b", 121.0, 60.0),
    (r"\bT4\b", 65.0, 8.1),
    (r"V100S", 130.0, 16.4),
    (r"V100.*PCIE", 112.0, 14.0),
    (r"V100", 125.0, 15.7),
]


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's known dense peak for this precision, or None (a CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, mixed, fp32 in PEAK_TFLOPS:
        if re.search(pattern, name):
            return fp32 if precision == "float32" else mixed
    return None


def train_step_flops(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
                     optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                     scaler: torch.amp.GradScaler | None) -> int:
    """FLOPs of one training step (forward + backward) as ``FlopCounterMode`` counts them; it takes the step."""
    counter = FlopCounterMode(display=False)
    with counter:
        train_step_loss(model, batch, labels, criterion, optimizer, amp_dtype, scaler)
    return int(counter.get_total_flops())


# aten operators that are one convolution library's kernel (or the slow fallback); which one ran is what matters.
CONVOLUTION_BACKENDS = {
    "aten::cudnn_convolution": "cudnn",
    "aten::miopen_convolution": "miopen",
    "aten::mkldnn_convolution": "mkldnn",
    "aten::slow_conv3d_forward": "slow_conv3d",
    "aten::slow_conv_dilated3d": "slow_conv_dilated3d",
    "aten::_conv_depthwise2d": "depthwise",
    "aten::conv_depthwise3d": "depthwise",
    "aten::_nnpack_spatial_convolution": "nnpack",
}


def convolution_backends(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
                         optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                         scaler: torch.amp.GradScaler | None) -> list[str]:
    """The convolution kernels one training step dispatched to, as ``torch.profiler`` records the aten calls.

    Why: a torch release once sent 3-D convolutions under bf16 autocast to a slow native path instead of cuDNN,
    which no error reveals, only the speed. The backward pass picks its kernel with the same rule as the forward
    pass (``select_conv_backend``), so the forward operators name both. It takes the step.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train_step_loss(model, batch, labels, criterion, optimizer, amp_dtype, scaler)
    names = {event.key for event in profiler.key_averages()}
    return sorted({backend for op, backend in CONVOLUTION_BACKENDS.items() if op in names})


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Tensor bytes of ``model.state_dict()`` and the optimizer's state: what a resumable checkpoint holds."""
    return tensor_bytes(model.state_dict()) + tensor_bytes(optimizer.state_dict()["state"])


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


SWITCH = {"off": [False], "on": [True], "both": [False, True]}  # --amp, --compile, --mps: the settings to run
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


@dataclasses.dataclass(frozen=True)
class StepVariant:
    """How the training step is run beyond model and precision: the issue asks to adopt ``channels_last_3d`` and
    ``torch.compile`` only where measured to help, so the benchmark measures them side by side."""

    memory_format: str = "contiguous"  # a key of MEMORY_FORMATS: weights and batch in that layout
    compiled: bool = False  # torch.compile (inductor) around the model; compile time reported apart

    def __post_init__(self) -> None:
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}")


def in_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """``model`` with its 3-D convolutions' weights in ``memory_format`` (and 2-D ones in ``channels_last``).

    ``Module.to(memory_format=torch.channels_last_3d)`` also converts every 4-D tensor and fails on them
    ("required rank 5 tensor"), so the 2-D slice baseline could not be measured that way.
    """
    if memory_format is torch.contiguous_format:
        return model
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            module.to(memory_format=memory_format)
        elif isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    return model


def _setup(model_name: str, shape: tuple[int, int, int], batch_size: int, channels: int,
           device: torch.device, amp: bool, variant: StepVariant = StepVariant()):
    torch.manual_seed(0)
    cuda_settings(device)  # what a trial sets: cuDNN autotuning for the fixed shape
    memory_format = MEMORY_FORMATS[variant.memory_format]
    model = in_memory_format(build_model(model_name, num_classes=3, in_channels=channels).to(device), memory_format)
    optimizer = make_optimizer(model, {"lr": 1e-5, "weight_decay": 1e-3}, device)  # the trial's (fused on CUDA)
    criterion = WeightedCrossEntropy([0.8, 0.5, 0.7], mean_weight=2 / 3).to(device)  # the trials' loss
    amp_dtype, scaler = amp_setup(device, amp)
    volume = torch.randn(batch_size, channels, *shape)
    batch = torch.stack([to_video_layout(v) for v in volume]).to(device).contiguous(memory_format=memory_format)
    labels = torch.arange(batch_size, device=device) % 3
    return model, optimizer, criterion, amp_dtype, scaler, batch, labels


def fold_data_bytes(subjects: int, channels: int, shape: tuple[int, int, int]) -> int:
    """Bytes of a trial's fold on the device: every subject of the cohort once, float16 (``DeviceVolumes``)."""
    return subjects * channels * int(np.prod(shape)) * 2


def benchmark_model(model_name: str, shape: tuple[int, int, int], batch_size: int, channels: int,
                    device: torch.device, amp: bool, warmup: int, steps: int,
                    variant: StepVariant = StepVariant(), subjects: int = PAPER_SUBJECTS) -> dict:
    """Seconds per training step and per evaluation batch, FLOPs, checkpoint size and memory per trial.

    On CUDA, what one trial needs is the step's peak (model, Adam state, activations, cuDNN workspace) plus what
    the step does not show: the fold's volumes, the best weights kept beside the model, and the CUDA context
    (measured as the device's used memory outside PyTorch's allocator: exact on a GPU nothing else uses).
    """
    model, optimizer, criterion, amp_dtype, scaler, batch, labels = _setup(
        model_name, shape, batch_size, channels, device, amp, variant)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.train()
    # Counted on the eager model: compiling changes the kernels, not the arithmetic.
    flops = train_step_flops(model, batch, labels, criterion, optimizer, amp_dtype, scaler)
    backends = convolution_backends(model, batch, labels, criterion, optimizer, amp_dtype, scaler)
    runner = torch.compile(model) if variant.compiled else model
    compile_s = None
    if variant.compiled:
        started = time.perf_counter()
        train_step(runner, batch, labels, criterion, optimizer, amp_dtype, scaler)  # the first call compiles
        compile_s = time.perf_counter() - started
    train_s = _timed(lambda: train_step(runner, batch, labels, criterion, optimizer, amp_dtype, scaler),
                     device, warmup, steps)
    checkpoint = checkpoint_bytes(model, optimizer)
    best_weights = tensor_bytes(model.state_dict())
    model.eval()

    def evaluate() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            runner(batch)

    eval_s = _timed(evaluate, device, warmup, steps)
    precision = str(amp_dtype or torch.float32).removeprefix("torch.")
    peak = peak_tflops(device, precision)
    achieved = flops / train_s / 1e12
    row = {"model": model_name, "device": str(device), "precision": precision,
           "batch_size": batch_size, "trials_per_device": 1, "shape_xyz": "x".join(map(str, shape)),
           "samples_per_s": batch_size / train_s, "step_ms": train_s * 1000,
           "flops_per_step": flops, "achieved_tflops": achieved,
           "peak_tflops": peak, "peak_fraction": achieved / peak if peak else None,
           "checkpoint_mb_per_epoch": checkpoint / MB, "peak_memory_mb": None,
           "fold_data_mb": fold_data_bytes(subjects, channels, shape) / MB, "subjects": subjects,
           "conv_backend": "+".join(backends) or "unknown", "mps": False,
           "memory_format": variant.memory_format, "compiled": variant.compiled, "compile_s": compile_s,
           "train_step_s": train_s, "train_volumes_per_s": batch_size / train_s,
           "eval_volumes_per_s": batch_size / eval_s}
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_reserved(device)
        free, total = torch.cuda.mem_get_info(device)
        context = max(0, total - free - torch.cuda.memory_reserved(device))
        trial = peak_memory + fold_data_bytes(subjects, channels, shape) + best_weights + context
        row.update({"peak_memory_mb": peak_memory / MB, "peak_memory_gib": peak_memory / 2**30,
                    "context_mb": context / MB, "trial_memory_mb": trial / MB,
                    "trials_per_gpu_by_memory": int(0.9 * total // trial)})
    del model, runner, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _concurrency_worker(spec: dict) -> None:
    """One of ``--concurrency`` N processes: warm up, say ready, wait for go, time the steps, print JSON."""
    device = torch.device(spec["device"])
    variant = StepVariant(spec["memory_format"], spec["compiled"])
    model, optimizer, criterion, amp_dtype, scaler, batch, labels = _setup(
        spec["model"], tuple(spec["shape"]), spec["batch_size"], spec["channels"], device, spec["amp"], variant)
    model.train()
    runner = torch.compile(model) if variant.compiled else model
    step = lambda: train_step(runner, batch, labels, criterion, optimizer, amp_dtype, scaler)  # noqa: E731
    if variant.compiled:
        step()  # the first call compiles: never inside the timed steps, whatever --warmup says
    for _ in range(spec["warmup"]):
        step()
    _synchronize(device)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":  # every process starts timing together; anything else: stop
        return
    started = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    _synchronize(device)
    print(json.dumps({"seconds": time.perf_counter() - started, "steps": spec["steps"]}), flush=True)


def concurrent_rate(processes: int, model_name: str, shape: tuple[int, int, int], batch_size: int, channels: int,
                    device: torch.device, amp: bool, warmup: int, steps: int,
                    env: dict[str, str] | None = None, variant: StepVariant = StepVariant()) -> tuple[float, float]:
    """(aggregate samples/s, mean seconds per step) of ``processes`` concurrent training processes on ``device``.

    ``env``: the processes' environment (:func:`trainables.cuda_mps.private_mps` gives one that joins MPS).
    """
    spec = json.dumps({"model": model_name, "shape": list(shape), "batch_size": batch_size, "channels": channels,
                       "device": str(device), "amp": amp, "warmup": warmup, "steps": max(1, steps),
                       **dataclasses.asdict(variant)})
    children = [subprocess.Popen([sys.executable, "-m", "trainables.benchmark", "--concurrency-worker", spec],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                for _ in range(processes)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a --concurrency worker failed (exit {child.wait()})")
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            line = child.stdout.readline()
            if not line.strip():
                raise RuntimeError(f"a --concurrency worker failed while timing (exit {child.wait()})")
            results.append(json.loads(line))
    finally:
        for child in children:  # after a failure the others get no "go": they stop instead of timing
            if child.poll() is None:
                child.stdin.close()
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    step_s = [r["seconds"] / r["steps"] for r in results]
    return sum(batch_size / s for s in step_s), float(np.mean(step_s))


def _concurrent_rows(rows: list[dict], counts: list[int], args: argparse.Namespace, shape: tuple[int, int, int],
                     channels: int, device: torch.device, mps_modes: list[bool]) -> tuple[list[dict], list[str]]:
    """Rows for ``counts`` concurrent trial processes per in-process row, without and/or with CUDA MPS.

    MPS that cannot be started (or whose clients cannot connect) costs its rows, not the run: the reason comes
    back as a note to print.
    """
    out, notes = [], []
    for mps in mps_modes:
        try:
            with (private_mps() if mps else contextlib.nullcontext(None)) as env:
                try:
                    out += [_concurrent_row(row, processes, mps, args, shape, channels, device, env)
                            for row in rows for processes in counts]
                except RuntimeError as error:
                    if not mps:
                        # The in-process rows are kept. A GPU in EXCLUSIVE_PROCESS compute mode (common on shared
                        # clusters) admits one process, and this one already holds a context from those rows.
                        notes.append(f"concurrent trial processes: not measured: {error}; if the GPU's compute "
                                     f"mode is EXCLUSIVE_PROCESS (`nvidia-smi --query-gpu=compute_mode "
                                     f"--format=csv`), only one process may use it at a time")
                        continue
                    # Read while the daemon's folder still exists: its log says why the client was refused.
                    notes.append(f"CUDA MPS: the daemon started but a trial process failed under it ({error}); "
                                 f"{log_tail(env)}")
        except MpsUnavailable as error:
            notes.append(f"CUDA MPS: not measured: {error}")
    return out, notes


def _concurrent_row(row: dict, processes: int, mps: bool, args: argparse.Namespace, shape: tuple[int, int, int],
                    channels: int, device: torch.device, env: dict[str, str] | None) -> dict:
    samples_per_s, step_s = concurrent_rate(processes, row["model"], shape, args.batch_size, channels, device,
                                            row["precision"] != "float32", args.warmup, args.steps, env=env,
                                            variant=StepVariant(row["memory_format"], row["compiled"]))
    achieved = row["flops_per_step"] * samples_per_s / args.batch_size / 1e12
    return {**row, "trials_per_device": processes, "mps": mps, "samples_per_s": samples_per_s,
            "step_ms": step_s * 1000, "achieved_tflops": achieved,
            "peak_fraction": achieved / row["peak_tflops"] if row["peak_tflops"] else None,
            "train_step_s": step_s, "train_volumes_per_s": samples_per_s, "eval_volumes_per_s": None,
            "peak_memory_mb": None, "peak_memory_gib": None, "trials_per_gpu_by_memory": None}


def _backend_verdict(table: pd.DataFrame, device: torch.device) -> str:
    """One line on the convolution kernels: on CUDA anything but cuDNN is the slow path the issue warns about."""
    rows = table[table["trials_per_device"] == 1].drop_duplicates(["model", "precision", "conv_backend"])
    used = ", ".join(f"{r.model} {r.precision}: {r.conv_backend}" for r in rows.itertuples())
    if device.type != "cuda":
        return f"Convolution kernels (torch.profiler): {used}."
    slow = table[(table["trials_per_device"] == 1) & (table["conv_backend"] != "cudnn")]
    if slow.empty:
        return f"Convolution kernels (torch.profiler): cuDNN in every row ({used})."
    return (f"WARNING: convolutions did not all run in cuDNN ({used}): this torch build falls back to a slower "
            f"kernel for those rows; compare --amp off, or another torch/cuDNN release.")


def device_data_seconds(shape: tuple[int, int, int], channels: int, batch_size: int, device: torch.device,
                        kind: str, strength: float, repeats: int) -> float:
    """Median seconds per sample of the trainer's on-device data path for one batch.

    Index a float16 tensor held on the device, cast to float32, ``augment_light`` (``kind`` light) in RAS,
    permute to the video layout.
    """
    count = max(2 * batch_size, 4)
    volumes = torch.rand(count, channels, *shape, device=device).half()
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    order = torch.randperm(count, device=device)

    def draw() -> torch.Tensor:
        batch = volumes.index_select(0, order[:batch_size]).float()
        if kind == "light":
            batch = augment_light(batch, strength, generator)
        return batch_to_video_layout(batch)

    seconds = _timed(draw, device, 1, repeats)
    del volumes
    return seconds / batch_size


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


def shape_of_cache(cache_dir: str | Path) -> tuple[tuple[int, int, int], int, int | None]:
    """(shape, channels, number of subjects or None) of a prepared cache; ValueError naming the entry to give."""
    folder = Path(cache_dir)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        return tuple(meta["shape"]), int(meta.get("channels", 1)), meta.get("n_subjects")
    except (OSError, ValueError, KeyError, TypeError):
        entries = sorted(p.parent.name for p in folder.glob("*/meta.json")) if folder.is_dir() else []
        hint = (f"; it holds the entr{'y' if len(entries) == 1 else 'ies'} {', '.join(entries)}: give "
                f"{folder / entries[0]}" if entries else "")
        raise ValueError(f"--cache {cache_dir} is not a prepared cache entry (no readable meta.json): give the "
                         f"OUT/cache/<key> folder that a run printed{hint}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(PAPER_MODEL_NAMES),
                   help="comma list (default the paper's three; add resnet18_2d for the 2-D baseline)")
    p.add_argument("--shape", help=f"x,y,z voxels of one volume (default {','.join(map(str, DEFAULT_SHAPE))}: 2 mm)")
    p.add_argument("--cache", help="a prepared cache folder (OUT/cache/<key>): take shape and channels from it")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--subjects", type=int,
                   help=f"subjects a trial keeps on the device, for the memory estimate (default: the cache's, else "
                        f"{PAPER_SUBJECTS}, the paper's cohort)")
    p.add_argument("--batch-size", type=int, default=PAPER_DEFAULTS["batch_size"],
                   help=f"volumes per step (default {PAPER_DEFAULTS['batch_size']}, the trials' default)")
    p.add_argument("--device", help="cuda, cpu, cuda:1 ... (default cuda if available)")
    p.add_argument("--amp", choices=["on", "off", "both"], default="on", help="mixed precision (CUDA only)")
    p.add_argument("--augmentation", default="light", help="none, light or heavy (default light)")
    p.add_argument("--aug-strength", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--concurrency", default="1",
                   help="CUDA only: comma list of concurrent training processes on the one device, e.g. 1,2,4")
    p.add_argument("--mps", choices=["off", "on", "both"], default="both",
                   help="CUDA only, with --concurrency: run the concurrent processes without and/or with a private "
                        "CUDA MPS daemon (default both; rows where it cannot start are left out, and the reason "
                        "printed)")
    p.add_argument("--memory-format", choices=[*MEMORY_FORMATS, "both"], default="contiguous",
                   help="weights and batch layout of the step (channels_last_3d: what cuDNN prefers for bf16 "
                        "on recent GPUs); both: a row each")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="torch.compile the model (compile time in compile_s, not in step_ms); both: a row each")
    p.add_argument("--concurrency-worker", help=argparse.SUPPRESS)
    p.add_argument("--output", help="also write the rows to this CSV")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.concurrency_worker:
        _concurrency_worker(json.loads(args.concurrency_worker))
        return 0
    try:
        concurrency = sorted({int(v) for v in args.concurrency.split(",") if v.strip()})
        if not concurrency or min(concurrency) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --concurrency takes positive process counts like 1,2,4, got {args.concurrency!r}",
              file=sys.stderr)
        return 2
    subjects = None
    if args.cache:
        try:
            shape, channels, subjects = shape_of_cache(args.cache)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else DEFAULT_SHAPE
        channels = args.channels
    subjects = args.subjects if args.subjects is not None else subjects or PAPER_SUBJECTS
    if subjects < 1:
        print(f"error: --subjects must be at least 1, got {args.subjects}", file=sys.stderr)
        return 2
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
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: PyTorch sees no CUDA device here (torch {torch.__version__}, CUDA "
              f"build {torch.version.cuda or 'none'}); leave --device out to benchmark the CPU", file=sys.stderr)
        return 2
    problem = unsupported_gpu(device)
    if problem:
        print(f"error: --device {device}: {problem}", file=sys.stderr)
        return 2
    precisions = SWITCH[args.amp]
    if device.type != "cuda":
        precisions = [False]  # autocast is used on CUDA only, as in training

    variants = [StepVariant(layout, compiled)
                for layout in (list(MEMORY_FORMATS) if args.memory_format == "both" else [args.memory_format])
                for compiled in SWITCH[args.compile]]
    rows = [benchmark_model(m, shape, args.batch_size, channels, device, amp, args.warmup, args.steps, variant,
                            subjects) for m in models for amp in precisions for variant in variants]
    mps_notes = []
    if device.type == "cuda" and any(n > 1 for n in concurrency):
        concurrent, mps_notes = _concurrent_rows(rows, [n for n in concurrency if n > 1], args, shape, channels,
                                                 device, SWITCH[args.mps])
        rows += concurrent
    table = pd.DataFrame(rows)
    for column in ["peak_tflops", "peak_fraction", "peak_memory_mb"]:  # None (a CPU, an unknown GPU) -> NaN
        table[column] = pd.to_numeric(table[column])
    augment = augmentation_seconds(shape, channels, args.augmentation, args.aug_strength, repeats=max(3, args.steps))
    table["augment_s_per_volume"] = augment
    table["torchio_ms_per_sample"] = augment * 1000
    device_data = device_data_seconds(shape, channels, args.batch_size, device, args.augmentation,
                                      args.aug_strength, repeats=max(3, args.steps))
    # The data cost a trial pays per volume: TorchIO's on the CPU for heavy, the device path's otherwise. Without
    # loader workers a trial prepares a batch, then steps: its rate is bounded by the sum of both.
    per_volume = augment if args.augmentation == "heavy" else device_data
    table["data_ms_per_sample"] = per_volume * 1000
    table["fed_volumes_per_s"] = args.batch_size / (table["train_step_s"] + per_volume * args.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    table["device_name"], table["torch_version"], table["cudnn_version"] = name, torch.__version__, cudnn
    print(f"Device: {name}; torch {torch.__version__}; cuDNN {cudnn or '-'}; "
          f"volume {table['shape_xyz'][0]} x {channels} channel(s)")
    issue_columns = ["model", "device", "precision", "batch_size", "trials_per_device", "samples_per_s", "step_ms",
                     "data_ms_per_sample", "torchio_ms_per_sample", "achieved_tflops", "peak_tflops",
                     "peak_fraction", "checkpoint_mb_per_epoch", "peak_memory_mb", "conv_backend", "mps",
                     "memory_format", "compiled"]
    table = table[issue_columns + [c for c in table.columns if c not in issue_columns]]
    print(table[issue_columns].to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-"))
    print("\n" + table[[c for c in table.columns if c not in issue_columns[1:]]].to_string(
        index=False, float_format=lambda v: f"{v:.3g}", na_rep="-"))
    print(f"\nTorchIO '{args.augmentation}' augmentation at strength {args.aug_strength}: "
          f"{augment * 1000:.0f} ms per volume on one CPU thread.")
    if args.augmentation == "heavy":
        print("data_ms_per_sample: heavy augmentation runs in TorchIO on the CPU, so it is the TorchIO figure.")
    else:
        print(f"On-device data path ('{args.augmentation}': gather float16, cast, "
              f"{'augment_light, ' if args.augmentation == 'light' else ''}permute) on {device}: "
              f"{device_data * 1000:.3g} ms per sample.")
    if device.type != "cuda":
        print("Concurrent trials per device and CUDA MPS: skipped on a CPU (trials_per_device = 1); "
              "peak TFLOP/s is known for CUDA GPUs only.")
    elif any(n > 1 for n in concurrency):
        print("Rows with trials_per_device > 1: that many concurrent processes on this device, samples_per_s "
              "and achieved_tflops aggregated over them; mps = True: through a private CUDA MPS daemon.")
        if system_mps_running():
            print(f"Note: a machine-wide MPS daemon seems to run ({DEFAULT_PIPE_DIRECTORY}/control exists), so the "
                  f"rows with mps = False may go through it too.")
    for note in mps_notes:
        print(note)
    print(_backend_verdict(table, device))
    # Only heavy augmentation still runs in TorchIO on the CPU during training; light runs on the device.
    if (device.type == "cuda" and args.augmentation == "heavy" and augment > 0
            and (table["train_step_s"] < augment * args.batch_size).any()):
        print("The GPU step is faster than the CPU augmentation: give trials loader workers "
              "(--set num_workers=2 with --cpus-per-trial 3) or more CPUs.")
    if args.output:
        from datasets.atomic import write_csv_atomic

        write_csv_atomic(table, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
