"""Train one fold of one model: the unit of work that every Ray Tune trial runs.

It runs without Ray. A ``reporter(metrics, checkpoint_dir)`` callback receives each epoch's
metrics and, in checkpoint epochs, a folder holding the resumable state (``None`` otherwise);
``resume_from`` points at such a folder. Model selection uses the inner validation split only;
the outer test fold is scored once, with the best-validation weights, at the end.

Data path, chosen by ``augmentation``:
- ``none`` and ``light``: the fold's cached volumes (train, val and test parts, float16) are copied
  once to the trial's device, one tensor per part (``datasets.volume_dataset.DeviceVolumes``), and
  batches are drawn there by index and cast to float32 on the device; no DataLoader and no per-sample
  host work. ``light`` augments each batch on the device (``datasets/device_augmentation.py``, in RAS,
  then permuted to the video layout) with a ``torch.Generator`` on the device seeded from
  (seed, fold, epoch). The memory this takes is printed at the start of the trial.
- ``heavy``: TorchIO's per-sample CPU transforms through a DataLoader with ``num_workers`` workers,
  as before; validation and test still come from the device (evaluation never augments).
The training order is a permutation drawn from (seed, epoch) alone on either path.

Checkpoints (``checkpoint_every``): Tune gets a report every epoch; a resumable checkpoint (model,
optimizer, loss scaler, RNG states, history: at most model + optimizer in bytes) is written every
``checkpoint_every`` epochs and at the end. A crash loses at most ``checkpoint_every - 1`` epochs, which
the resumed run replays identically (bit for bit on the CPU; on CUDA up to cuDNN's own nondeterminism).
The best-validation weights stay on the device; when a checkpoint's best epoch is its own epoch they are
the checkpoint's model, otherwise they are written once, beside the checkpoints, to ``best_weights_store``
(a folder that outlives checkpoints: the trial's folder in Tune's storage under Ray). A finished fold's
final checkpoint holds ``fold_state.pt`` (counters and history), ``best_weights.pt`` (float32) and the
output files below, and no optimizer state.

Files written to ``output_dir`` (the format the analysis reads):
- ``epochs.csv``: epoch (1-based), train_loss, val_loss, val_accuracy, val_macro_f1,
  val_f1_<class> per class, val_predicted_classes (how many classes the validation predictions used), lr, seconds
- ``predictions.csv``: subject_id, label, pred (class names), prob_<class> per class, on the test part
- ``val_predictions.csv``: the same columns on the inner validation part, scored once at the end with the same
  best-validation weights (eval mode, the same ``_evaluate``) as the test part. It exists so that a two-class
  decision threshold can be chosen without test subjects (``analysis/binary.py``). These weights were chosen on
  this very validation part, so its scores are optimistic for it: good enough to place a threshold, never an
  estimate of performance. Checkpoints written before this file existed lack it; they still resume and collect
  (the analysis then uses 0.5 for that fold and says so).
- ``result.json``: the config, best epoch and validation score, test metrics, subject counts and ids
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import PreparedData, VolumeDataset, build_augmentation
from datasets.atomic import write_csv_atomic, write_text_atomic
from datasets.disk_space import free_bytes, is_disk_full, space_message
from datasets import device_augmentation
from datasets.volume_dataset import DeviceVolumes
from models import MODEL_NAMES, build_model
from search_spaces.recipe import PAPER_DEFAULTS  # the paper's recipe; anything in it can be overridden per trial
from trainables.errors import PermanentTrialError
from trainables.metrics import LOSS_PER_SAMPLE, WeightedCrossEntropy, classification_metrics

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any], "str | None"], None]
CHECKPOINT_FILE = "fold_state.pt"
FINAL_WEIGHTS_FILE = "best_weights.pt"  # in a finished fold's final checkpoint: float32 (see _save_final_checkpoint)
OUTPUT_FILES = ("predictions.csv", "val_predictions.csv", "epochs.csv", "result.json")
# Absent from finished checkpoints written before validation predictions were saved: such a checkpoint still
# resumes from its outputs (its test predictions are kept as they are, not recomputed from its weights).
OPTIONAL_OUTPUT_FILES = ("val_predictions.csv",)

DEFAULT_CONFIG: dict[str, Any] = {
    "model": "mc3_18",
    "pretrained": False,  # True: Kinetics-400 from weights_dir / torch hub cache; or a path
    "weights_dir": None,
    # lr, weight_decay, dropout, augmentation, aug_strength, batch_size and bn_recalibration (recompute
    # BatchNorm's running statistics on the training part before each evaluation): the paper's recipe with the
    # deviations search_spaces/recipe.py states and measures.
    **PAPER_DEFAULTS,
    "epochs": 50,
    "patience": None,  # stop after this many epochs without a better validation score
    "seed": 0,
    "fold": 0,
    "num_workers": 0,  # DataLoader workers of the heavy augmentation's CPU path (other kinds run on the device)
    "amp": True,  # on CUDA only; bf16 where the GPU supports it natively, else fp16 with a GradScaler
    # Epochs between resumable checkpoints (and the final one). A crash loses at most checkpoint_every - 1
    # epochs, which the resumed run replays identically. 1: on the 2-core CPU machine a checkpoint (written,
    # then copied by Tune) took ~0.1 s for mc3_18 (138 MB) and ~1-2 s for r3d_18 (398 MB), against ~15 min
    # per epoch at the paper's settings (2.8 s per step); on a GPU, where an epoch can take seconds, 5 or
    # more keeps the GPU busy instead of waiting for the disk.
    "checkpoint_every": 1,
}


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, unknown keys refused (a typo must not silently train the default)."""
    unknown = sorted(k for k in config if k not in DEFAULT_CONFIG and not k.startswith("_"))
    if unknown:
        raise ValueError(f"Unknown training option(s) {unknown}; known: {sorted(DEFAULT_CONFIG)}")
    resolved = {**DEFAULT_CONFIG, **{k: v for k, v in config.items() if k in DEFAULT_CONFIG}}
    _check_types(resolved)
    for key in ("lr", "epochs", "batch_size", "checkpoint_every"):
        if not resolved[key] > 0:
            raise ValueError(f"{key} must be positive, got {resolved[key]}")
    if resolved["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be >= 0, got {resolved['weight_decay']}")
    if not 0 <= resolved["dropout"] < 1:
        raise ValueError(f"dropout must be in [0, 1), got {resolved['dropout']}")
    if resolved["num_workers"] < 0:
        raise ValueError(f"num_workers must be >= 0, got {resolved['num_workers']}")
    if resolved["patience"] is not None and resolved["patience"] < 1:
        raise ValueError(f"patience must be at least 1 (or null for none), got {resolved['patience']}")
    if resolved["model"] not in MODEL_NAMES:
        raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, got {resolved['model']!r}")
    build_augmentation(resolved["augmentation"], resolved["aug_strength"])  # its own ValueError names the problem
    return resolved


_NUMBERS = ("lr", "weight_decay", "dropout", "aug_strength")
_INTEGERS = ("batch_size", "epochs", "seed", "fold", "num_workers", "checkpoint_every")
_BOOLEANS = ("amp", "bn_recalibration")


def _check_types(config: dict[str, Any]) -> None:
    """Wrong types fail here, in the driver, not as a TypeError inside a worker hours later."""
    def is_number(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    def is_integer(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    for key in _NUMBERS:
        if not is_number(config[key]):
            raise ValueError(f"{key} must be a number, got {config[key]!r}")
    for key in _INTEGERS:
        if not is_integer(config[key]):
            raise ValueError(f"{key} must be a whole number, got {config[key]!r}")
    if config["patience"] is not None and not is_integer(config["patience"]):
        raise ValueError(f"patience must be a whole number or null, got {config['patience']!r}")
    for key in _BOOLEANS:
        if not isinstance(config[key], bool):
            raise ValueError(f"{key} must be true or false, got {config[key]!r}")
    if not isinstance(config["augmentation"], str):
        raise ValueError(f"augmentation must be none, light or heavy, got {config['augmentation']!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augmentation_seed(seed: int, fold: int, epoch: int) -> int:
    """The device augmentation's generator seed: a function of (seed, fold, epoch) only, so a resume repeats it."""
    return ((seed * 1000 + fold) * 1_000_003 + epoch) % (2**63)


# torch.cuda.get_arch_list() entries: sm_86 (a cubin), compute_90 (PTX), sm_90a / sm_100f (feature-specific cubins).
CUDA_ARCH = re.compile(r"^(sm|compute)_(\d{2,3})([a-z]?)$")


def cuda_settings(device: torch.device) -> None:
    """cuDNN autotuning on a GPU: every batch of a trial has the same shape, so its fastest kernels are found once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def unsupported_gpu(device: torch.device) -> str | None:
    """Why this torch build has no kernels for the GPU ``device``, or None (a CPU, a supported GPU, a ROCm build).

    A torch wheel carries kernels for a list of GPU architectures (the CUDA 13 builds, torch 2.14.1 among them,
    dropped Volta, sm_70). On a GPU outside the list the first kernel fails with "no kernel image is available
    for execution on the device": a crash that Tune would retry on every trial. A cubin runs on its own major
    version at the same or a higher minor (``sm_90a``, arch-specific, on exactly 9.0); PTX (``compute_XY``) is
    compiled for any later GPU at load time.
    """
    if device.type != "cuda" or torch.version.hip:  # ROCm lists gfx names, and its devices are "cuda" too
        return None
    capability = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    parsed = [m.groups() for m in map(CUDA_ARCH.match, archs) if m]
    if not parsed:  # a build that does not say: let the first kernel tell
        return None
    for kind, digits, suffix in parsed:
        arch = (int(digits[:-1]), int(digits[-1]))
        if suffix == "a":
            if kind == "sm" and arch == capability:
                return None
        elif (kind == "sm" and arch[0] == capability[0] and arch[1] <= capability[1]) or \
                (kind == "compute" and arch <= capability):
            return None
    return (f"{torch.cuda.get_device_name(device)} (sm_{capability[0]}{capability[1]}) is not among the GPU "
            f"architectures this torch {torch.__version__} was built for ({', '.join(archs)}), so no kernel can run "
            f"on it. Install a torch build that includes sm_{capability[0]}{capability[1]} (the wheels for an "
            f"older CUDA at https://download.pytorch.org/whl/ still carry Volta's sm_70), or use another GPU")


def amp_setup(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """bf16 only where the GPU computes it natively (an emulated bf16 is slower than fp16), else fp16 + GradScaler.

    Not on the CPU: bf16 autocast there (oneDNN, torch 2.14.1, AVX512-BF16) made steps 1.3-1.7x faster but gave NaN
    losses and run-to-run differences on small volumes (r2plus1d_18 at 16 mm), so CPU training stays float32.
    """
    if device.type != "cuda" or not enabled:
        return None, None
    # is_bf16_supported asks about the current device: make that the one asked about (cuda:1 of a mixed machine).
    with torch.cuda.device(device.index) if device.index is not None else contextlib.nullcontext():
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if native_bf16:
        return torch.bfloat16, None  # bf16 has fp32's range: no loss scaling needed
    return torch.float16, torch.amp.GradScaler("cuda")


def train_step_loss(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                    scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """One optimisation step under autocast; returns the batch's mean loss as a detached tensor (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = criterion(model(batch).float(), labels)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def train_step(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
               scaler: torch.amp.GradScaler | None) -> float:
    """``train_step_loss`` read back as a float (the benchmark's timing includes that sync; the loop does not)."""
    return train_step_loss(model, batch, labels, criterion, optimizer, amp_dtype, scaler).item()


def make_optimizer(model: nn.Module, config: dict[str, Any], device: torch.device) -> torch.optim.Adam:
    """Adam; on CUDA the fused kernel (one launch for all parameters; with a GradScaler, no host sync per step)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], **fused)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Cap torch's, OpenMP's (for processes started here) and SimpleITK's threads to ``threads``; restored after.

    ``None`` leaves everything as it is. A trial gets its share from Ray; without the cap each of several
    trials on one machine would start one thread per core and they would fight over the cores.
    """
    if threads is None:
        yield
        return
    threads = max(1, int(threads))
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - TorchIO depends on it
        sitk = None
    saved_torch, saved_omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    saved_sitk = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() if sitk is not None else None
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if sitk is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_torch)
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp
        if sitk is not None:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved_sitk)


@dataclass
class FoldResult:
    config: dict[str, Any]
    best_epoch: int
    best_val_macro_f1: float
    epochs_run: int
    test_metrics: dict[str, float]
    n_train: int
    n_val: int
    n_test: int
    predictions: pd.DataFrame = field(repr=False)
    # The validation part scored with the same weights; None for a fold resumed from an older checkpoint.
    val_predictions: pd.DataFrame | None = field(default=None, repr=False)


_TABLE_FIELDS = ("predictions", "val_predictions")  # written as CSV files, not into result.json


def read_checkpoint_file(filesystem, folder: str, name: str) -> bytes | None:
    """One file of a checkpoint folder through its pyarrow filesystem (local or remote); None when it is not there.

    Shared by ``collect`` and ``predict``, which read a finished fold's small files without loading its weights.
    """
    import pyarrow.fs

    path = f"{folder.rstrip('/')}/{name}"
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


class WeightStore:
    """Where best weights wait between checkpoints: a folder that outlives them, local or on a pyarrow filesystem.

    One file per best epoch (``best_weights_e0007.pt``, float32, written once); a checkpoint names the
    epoch it needs, and older files are pruned only after a newer checkpoint has been handed over.
    """

    PREFIX = "best_weights_e"

    def __init__(self, path: str | os.PathLike, filesystem=None) -> None:
        import pyarrow.fs

        if filesystem is None:
            filesystem, path = pyarrow.fs.LocalFileSystem(), Path(path).resolve().as_posix()
        self.filesystem, self.path = filesystem, str(path).rstrip("/")

    def __repr__(self) -> str:
        return f"WeightStore({self.path!r}, {type(self.filesystem).__name__})"

    def file(self, epoch: int) -> str:
        return f"{self.path}/{self.PREFIX}{epoch:04d}.pt"

    def save(self, epoch: int, weights: dict[str, torch.Tensor]) -> None:
        import pyarrow.fs

        weights = {k: v.detach().cpu() for k, v in weights.items()}
        local = isinstance(self.filesystem, pyarrow.fs.LocalFileSystem)  # a free-space probe means nothing remotely
        tmp = f"{self.path}/.{uuid.uuid4().hex}.tmp"
        with (_disk_full_is_permanent(self.path, f"the best weights of epoch {epoch}", tensor_bytes(weights))
              if local else contextlib.nullcontext()):
            self.filesystem.create_dir(self.path, recursive=True)
            try:
                with self.filesystem.open_output_stream(tmp) as stream:
                    torch.save(weights, stream)
                self.filesystem.move(tmp, self.file(epoch))
            except BaseException:
                with contextlib.suppress(OSError):
                    self.filesystem.delete_file(tmp)
                raise

    def load(self, epoch: int) -> dict[str, torch.Tensor]:
        import pyarrow.fs

        if self.filesystem.get_file_info(self.file(epoch)).type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(f"The checkpoint's best weights (epoch {epoch}) are not in {self}: resume with "
                                    f"the best_weights_store of the run that wrote the checkpoint")
        with self.filesystem.open_input_file(self.file(epoch)) as stream:
            return torch.load(stream, map_location="cpu", weights_only=True)

    def prune(self, keep: int | None) -> None:
        """Delete every best-weights file but epoch ``keep``'s (all of them for None)."""
        import pyarrow.fs

        keep_name = self.file(keep).rsplit("/", 1)[-1] if keep is not None else None
        for info in self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True)):
            if info.base_name.startswith(self.PREFIX) and info.base_name != keep_name:
                self.filesystem.delete_file(info.path)


class _State:
    """Everything needed to continue exactly where a run stopped."""

    def __init__(self) -> None:
        self.epoch = 0
        self.best_epoch = 0
        self.best_score = (-math.inf, -math.inf)  # (val macro F1, -val loss)
        self.best_weights: dict[str, torch.Tensor] | None = None  # on the training device
        self.stored_best_epoch: int | None = None  # the best epoch whose weights are in the WeightStore
        self.history: list[dict[str, float]] = []


def _evaluate(model: nn.Module, part: DeviceVolumes, criterion: WeightedCrossEntropy, amp_dtype: torch.dtype | None,
              batch_size: int) -> tuple[float, np.ndarray, np.ndarray]:
    """The part's weighted mean loss (the training part's class weights; the same whatever the batch size),
    probabilities and targets, never augmented; one host transfer at the end."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=part.device)
    weight_sum = torch.zeros((), dtype=torch.float64, device=part.device)
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(part), batch_size):
            volumes, labels = part.batch(slice(start, start + batch_size))
            with torch.autocast(part.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(volumes)
            logits = logits.float()
            weighted, weights = criterion.sums(logits, labels)
            loss_sum += weighted.double()
            weight_sum += weights.double()
            probabilities.append(torch.softmax(logits, dim=1))
    probs = torch.cat(probabilities).cpu().numpy()
    return float((loss_sum / weight_sum).item()), probs, part.targets_host


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch) alone: a resumed run draws the same, and nothing else that draws
    from the global RNG moves it. For the epoch's order and its DataLoaders' worker seeds."""
    return torch.Generator().manual_seed(seed * 7919 + epoch)


def training_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training part that epoch ``epoch`` trains in (and recalibrates BatchNorm in)."""
    return torch.randperm(size, generator=epoch_generator(seed, epoch))


def recalibrate_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to the sample-weighted mean over ``batches`` (inputs on the device).

    torch's ``update_bn`` averages the batches' statistics with equal weights, so a short last batch (a lone subject
    after batches of 4) counts as much as a full one; here batch b of size n_b after s samples gets momentum
    n_b / (s + n_b), which makes each running mean the mean over samples (and each running variance the
    sample-weighted mean of the batch variances).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
    model.train()
    seen = 0
    with torch.no_grad():
        for batch in batches:
            for norm in norms:
                norm.momentum = len(batch) / (seen + len(batch))
            model(batch)
            seen += len(batch)
    for norm, momentum in momenta.items():
        norm.momentum = momentum
    model.train(was_training)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_atomic(payload: Any, path: Path) -> None:
    """A checkpoint file, whole or not at all; a full disk ends the trial as a PermanentTrialError that says so."""
    tmp = path.with_name(f".{path.name}.tmp")
    with _disk_full_is_permanent(path.parent, f"the checkpoint file {path.name}", tensor_bytes(payload)):
        try:
            # Through a Python file a full disk shows as OSError(ENOSPC) (raised, or as the RuntimeError's
            # context); given a path, torch.save's own writer only says "unexpected pos ...".
            with open(tmp, "wb") as handle:
                torch.save(payload, handle)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _disk_full_is_permanent(folder: str | os.PathLike, what: str, needed: int) -> Iterator[None]:
    """Check free space before a checkpoint write (one statvfs) and turn ENOSPC during it into a
    PermanentTrialError: the retry Tune would start hits the same full disk."""
    free = free_bytes(folder)
    if free < needed:
        raise _checkpoint_space_error(folder, what, needed, free)
    try:
        yield
    except BaseException as error:
        if is_disk_full(error):
            raise _checkpoint_space_error(folder, what, needed, free_bytes(folder)) from error
        raise


def tensor_bytes(payload: Any) -> int:
    """The bytes of the tensors in a (nested) state dict: the estimate of its file's size."""
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(tensor_bytes(value) for value in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(tensor_bytes(value) for value in payload)
    return 0


def _checkpoint_space_error(folder: str | os.PathLike, what: str, needed: int, free: int) -> PermanentTrialError:
    fix = ("Free space on that disk, or give checkpoints a larger one (TMPDIR for the checkpoints Tune collects, "
           "--storage for Tune's storage).")
    return PermanentTrialError(space_message(folder, what, needed, free, fix))


def _save_checkpoint(directory: Path, model, optimizer, scaler, state: _State, store: WeightStore,
                     device: torch.device) -> int | None:
    """The resumable state: model + optimizer (+ scaler, RNG, history), never a second copy of the weights.

    The best weights are this checkpoint's model when the best epoch is this epoch; otherwise they go to
    ``store`` once (a file per best epoch). Returns the best epoch whose store file this checkpoint needs.
    """
    best_in_model = state.best_epoch == state.epoch
    if not best_in_model and state.stored_best_epoch != state.best_epoch:
        store.save(state.best_epoch, state.best_weights)
        state.stored_best_epoch = state.best_epoch
    payload = {
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "best_in_model": best_in_model,
        "history": state.history,
        "finished": False,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(device),
    }
    _save_atomic(payload, directory / CHECKPOINT_FILE)
    return None if best_in_model else state.best_epoch


def _save_final_checkpoint(directory: Path, state: _State, output_dir: Path) -> None:
    """A finished fold: its best weights, its counters and history, and its output files.

    The weights stay float32, so prediction later reproduces the fold's own test predictions exactly. float16
    halved the file (mc3_18 44 -> 22 MB, r3d_18 127 -> 63 MB, once per trial) but moved probabilities by up to
    4e-3 (r2plus1d_18 after one epoch at 16 mm; mc3_18 2e-4): BatchNorm after the stem divides by channel
    standard deviations as small as 0.02 of the activations, which magnifies the kernels' rounding (2**-11).
    """
    _save_atomic({k: v.detach().cpu() for k, v in state.best_weights.items()}, directory / FINAL_WEIGHTS_FILE)
    for name in OUTPUT_FILES:
        if (output_dir / name).is_file() and (output_dir / name).resolve() != (directory / name).resolve():
            shutil.copy2(output_dir / name, directory / name)
    _save_atomic({"epoch": state.epoch, "best_epoch": state.best_epoch, "best_score": state.best_score,
                  "history": state.history, "finished": True}, directory / CHECKPOINT_FILE)


# How the optimizer runs on this device, not what it has learnt: never taken from a checkpoint.
OPTIMIZER_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def _keep_implementation(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``saved`` with this optimizer's kernel choices, so a checkpoint resumes on another kind of device.

    ``Optimizer.load_state_dict`` takes every param-group key from the checkpoint, ``fused`` included: a CPU
    checkpoint resumed on a GPU would step with the unfused Adam, which refuses the GradScaler's fp16 arguments
    (an AssertionError on every step), and a GPU one resumed on the CPU would switch to the fused CPU kernel.
    """
    groups = [{**group, **{key: current[key] for key in OPTIMIZER_IMPLEMENTATION_KEYS if key in current}}
              for group, current in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


def _load_checkpoint(directory: str | os.PathLike, model, optimizer, scaler, state: _State, store: WeightStore,
                     device: torch.device) -> bool:
    """Restore ``state`` (and model, optimizer, scaler, RNG unless finished); True for a finished fold."""
    directory = Path(directory)
    payload = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    state.epoch, state.best_epoch = payload["epoch"], payload["best_epoch"]
    state.best_score = tuple(payload["best_score"])
    state.history = payload["history"]

    def on_device(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in weights.items()}

    if payload["finished"]:
        if (directory / FINAL_WEIGHTS_FILE).is_file():
            state.best_weights = on_device(torch.load(directory / FINAL_WEIGHTS_FILE, map_location="cpu",
                                                      weights_only=True))
        elif payload.get("best_weights") is not None:  # written before checkpoints got lighter
            state.best_weights = on_device(payload["best_weights"])
        return True
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(_keep_implementation(payload["optimizer"], optimizer))
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    _set_rng_state(payload["rng"], device)
    if payload.get("best_weights") is not None:  # written before checkpoints got lighter
        state.best_weights = on_device(payload["best_weights"])
    elif payload["best_in_model"]:
        state.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        state.best_weights = on_device(store.load(state.best_epoch))
        state.stored_best_epoch = state.best_epoch
    return False


def train_fold(
    config: dict[str, Any],
    data: PreparedData,
    output_dir: str | os.PathLike,
    reporter: Reporter | None = None,
    resume_from: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    best_weights_store: WeightStore | str | os.PathLike | None = None,
    cpus: float | None = None,
) -> FoldResult:
    """Train ``config["model"]`` on fold ``config["fold"]`` of ``data`` and score it on that fold's test part.

    ``best_weights_store``: where best weights wait between checkpoints (see the module docstring); by
    default the checkpoint folder ``output_dir/checkpoint`` without a reporter, ``output_dir/best_weights``
    with one. A resume must use the store of the run that wrote its checkpoint.
    ``cpus``: the CPU share of this trial (Ray's assignment): torch, OpenMP and SimpleITK threads are capped
    to it (less the heavy path's loader workers, at least 1) for the call; None leaves them alone.
    """
    config = resolve_config(config)
    threads = None
    if cpus is not None:
        workers = config["num_workers"] if config["augmentation"] == "heavy" else 0
        threads = max(1, int(cpus) - workers)
    with cpu_threads(threads):
        return _train_fold(config, data, Path(output_dir), reporter, resume_from, device, best_weights_store)


def _train_fold(config: dict[str, Any], data: PreparedData, output_dir: Path, reporter: Reporter | None,
                resume_from: str | os.PathLike | None, device: torch.device | str | None,
                best_weights_store: WeightStore | str | os.PathLike | None) -> FoldResult:
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    problem = unsupported_gpu(device)
    if problem:
        raise PermanentTrialError(problem)
    cuda_settings(device)
    if best_weights_store is None:
        best_weights_store = output_dir / ("best_weights" if reporter is not None else "checkpoint")
    store = best_weights_store if isinstance(best_weights_store, WeightStore) else WeightStore(best_weights_store)
    seed_everything(config["seed"] * 1000 + config["fold"])
    classes = list(data.classes)
    parts = data.fold_indices(config["fold"])
    volumes = data.cached.volumes()
    train_idx, train_y, _ = parts["train"]
    batch_size, kind, strength = config["batch_size"], config["augmentation"], config["aug_strength"]
    train_on_device = kind != "heavy"
    augment_on_device = kind == "light" and strength > 0
    # The fold's volumes, once, on the device (augmented in RAS, hence that layout for an augmented train part).
    on_device = {part: DeviceVolumes(volumes, parts[part][0], parts[part][1], device,
                                     layout="ras" if part == "train" and augment_on_device else "video")
                 for part in (("train",) if train_on_device else ()) + ("val", "test")}
    sizes = ", ".join(f"{part} {p.nbytes / 1e6:.1f} MB" for part, p in on_device.items())
    print(f"{config['model']} fold {config['fold']}: {sum(p.nbytes for p in on_device.values()) / 1e6:.1f} MB of "
          f"cached volumes on {device} ({sizes}; {on_device['val'].volumes.dtype})", flush=True)
    loader_options = {"num_workers": config["num_workers"], "pin_memory": device.type == "cuda"}
    if not train_on_device:  # heavy: TorchIO on the CPU, per sample
        train_set = VolumeDataset(volumes, train_idx, train_y, data.spacing, transform=build_augmentation(kind, strength))
        plain_train_set = VolumeDataset(volumes, train_idx, train_y, data.spacing)

    def training_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = training_order(len(train_idx), config["seed"], epoch)
        if train_on_device:
            train, order, augment = on_device["train"], order.to(device), None
            if augment_on_device:
                generator = torch.Generator(device=device)
                generator.manual_seed(augmentation_seed(config["seed"], config["fold"], epoch))
                augment = partial(device_augmentation.augment_light, strength=strength, generator=generator)
            for start in range(0, len(train), batch_size):
                yield train.batch(order[start:start + batch_size], augment)
        else:
            loader = DataLoader(train_set, batch_size=batch_size, sampler=order.tolist(),
                                generator=epoch_generator(config["seed"], epoch), **loader_options)
            for batch, labels in loader:
                yield batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def recalibrate_bn(epoch: int) -> None:
        """BatchNorm statistics from the un-augmented training part, in the epoch's own shuffled batches.

        The shuffled order matters: the stored order is sorted by subject id, so its batches hold one source
        and mostly one class (every IXI id after every BraTS id), and averaging their variances would leave out
        the variance between sources and classes that every training batch contains. Under the same autocast as
        training, so the statistics describe the activations the layers will see.
        """
        order = training_order(len(train_idx), config["seed"], epoch)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if train_on_device:
                train = on_device["train"]
                order = order.to(device)
                recalibrate_batch_norm(model, (train.batch(order[s:s + batch_size])[0]
                                               for s in range(0, len(train), batch_size)))
            else:
                # Own generator: the loader's worker seeds come from (seed, epoch), not from the global RNG.
                loader = DataLoader(plain_train_set, batch_size=batch_size, sampler=order.tolist(),
                                    generator=epoch_generator(config["seed"], epoch), **loader_options)
                recalibrate_batch_norm(model, (batch.to(device, non_blocking=True) for batch, _ in loader))

    pretrained = config["pretrained"]
    model = build_model(config["model"], num_classes=len(classes), in_channels=data.cached.meta["channels"],
                        dropout=config["dropout"], pretrained=("kinetics" if pretrained is True else pretrained) or None,
                        weights_dir=config["weights_dir"]).to(device)
    criterion = WeightedCrossEntropy.for_training_part(train_y, len(classes)).to(device)
    optimizer = make_optimizer(model, config, device)
    amp_dtype, scaler = amp_setup(device, config["amp"])

    state = _State()
    if resume_from is not None and (Path(resume_from) / CHECKPOINT_FILE).is_file():
        finished = _load_checkpoint(resume_from, model, optimizer, scaler, state, store, device)
        log.info("Resumed fold %d of %s after epoch %d", config["fold"], config["model"], state.epoch)
        if finished:  # its outputs are in the checkpoint (else rebuilt from its best weights)
            required = [name for name in OUTPUT_FILES if name not in OPTIONAL_OUTPUT_FILES]
            if all((Path(resume_from) / name).is_file() for name in required):
                for name in OUTPUT_FILES:
                    source = Path(resume_from) / name
                    if not source.is_file():  # an optional file the checkpoint lacks: no stale copy may stand in
                        (output_dir / name).unlink(missing_ok=True)
                    elif source.resolve() != (output_dir / name).resolve():
                        shutil.copy2(source, output_dir / name)
                return _result_from_outputs(output_dir)
            if state.best_weights is None:  # scoring the freshly built model would pass it off as the trained one
                missing = [name for name in required if not (Path(resume_from) / name).is_file()]
                raise PermanentTrialError(
                    f"The finished checkpoint {resume_from} has lost its best weights ({FINAL_WEIGHTS_FILE}) and "
                    f"outputs ({', '.join(missing)}), so fold {config['fold']} of {config['model']} cannot be "
                    "scored; delete that checkpoint so the fold is trained again")
            return _finish(config, model, state, on_device, criterion, amp_dtype, classes, parts, output_dir)

    def write_checkpoint(directory: Path, finished: bool) -> int | None:
        if finished:
            _save_final_checkpoint(directory, state, output_dir)
            return None
        return _save_checkpoint(directory, model, optimizer, scaler, state, store, device)

    while state.epoch < config["epochs"]:
        started = time.perf_counter()
        state.epoch += 1
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch, labels in training_batches(state.epoch):
            loss_sum += train_step_loss(model, batch, labels, criterion, optimizer, amp_dtype, scaler).double() * len(labels)
        if config["bn_recalibration"]:
            recalibrate_bn(state.epoch)
        val_loss, val_probs, val_y = _evaluate(model, on_device["val"], criterion, amp_dtype, batch_size)
        metrics = {"epoch": state.epoch, "train_loss": loss_sum.item() / len(train_idx), "val_loss": val_loss,
                   **classification_metrics("val", val_y, val_probs.argmax(1), classes),
                   # 1 means every validation subject got the same class: selection among such epochs is noise
                   "val_predicted_classes": int(np.unique(val_probs.argmax(1)).size),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
        score = (metrics["val_macro_f1"], -val_loss)
        if score > state.best_score:
            state.best_score, state.best_epoch = score, state.epoch
            state.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # stays on the device
        state.history.append(metrics)
        patience = config["patience"]
        stop_early = patience is not None and state.epoch - state.best_epoch >= patience
        finished = stop_early or state.epoch >= config["epochs"]
        checkpoint_now = finished or state.epoch % config["checkpoint_every"] == 0
        write_csv_atomic(pd.DataFrame(state.history), output_dir / "epochs.csv")

        report = {**metrics, "val_macro_f1_best": state.best_score[0], "best_epoch": state.best_epoch,
                  "fold_finished": finished}
        if finished:
            result = _finish(config, model, state, on_device, criterion, amp_dtype, classes, parts, output_dir)
            report.update({f"test_{k}": v for k, v in result.test_metrics.items()})
        if reporter is not None and checkpoint_now:
            with tempfile.TemporaryDirectory(prefix="fold_ckpt_") as checkpoint_dir:
                keep = write_checkpoint(Path(checkpoint_dir), finished)
                reporter(report, checkpoint_dir)
            store.prune(keep)  # the checkpoint is handed over: older best weights are no longer needed
        elif reporter is not None:
            reporter(report, None)
        elif checkpoint_now:
            checkpoint_dir = output_dir / "checkpoint"
            checkpoint_dir.mkdir(exist_ok=True)
            store.prune(write_checkpoint(checkpoint_dir, finished))
        log.info("%s fold %d epoch %d: %s", config["model"], config["fold"], state.epoch,
                 ", ".join(f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float)))
        if finished:
            return result
    # Resumed past the last epoch (``epochs`` lowered since the checkpoint): score what there is.
    return _finish(config, model, state, on_device, criterion, amp_dtype, classes, parts, output_dir)


def _prediction_table(subject_ids, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """subject_id, label, pred (argmax), prob_<class>...: the layout of predictions.csv and val_predictions.csv."""
    table = pd.DataFrame({"subject_id": list(subject_ids), "label": [classes[i] for i in y],
                          "pred": [classes[i] for i in probs.argmax(1)]})
    for index, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, index]
    return table


def _finish(config, model, state: _State, parts_on_device: dict[str, DeviceVolumes], criterion, amp_dtype, classes,
            parts, output_dir: Path) -> FoldResult:
    """Score the best-validation weights on the test fold (and on the validation part, for choosing a two-class
    threshold there; see the module docstring) and write predictions and the summary."""
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)  # training is over: the model itself takes the best weights
    _, val_probs, val_y = _evaluate(model, parts_on_device["val"], criterion, amp_dtype, config["batch_size"])
    val_predictions = _prediction_table(parts["val"][2], val_y, val_probs, classes)
    write_csv_atomic(val_predictions, output_dir / "val_predictions.csv")
    _, probs, y = _evaluate(model, parts_on_device["test"], criterion, amp_dtype, config["batch_size"])
    test_ids = parts["test"][2]
    predictions = _prediction_table(test_ids, y, probs, classes)
    write_csv_atomic(predictions, output_dir / "predictions.csv")
    test_metrics = classification_metrics("test", y, probs.argmax(1), classes)
    test_metrics = {k.removeprefix("test_"): v for k, v in test_metrics.items()}
    result = FoldResult(config=config, best_epoch=state.best_epoch, best_val_macro_f1=float(state.best_score[0]),
                        epochs_run=state.epoch, test_metrics=test_metrics, n_train=len(parts["train"][2]),
                        n_val=len(parts["val"][2]), n_test=len(test_ids), predictions=predictions,
                        val_predictions=val_predictions)
    summary = {f.name: getattr(result, f.name) for f in fields(FoldResult) if f.name not in _TABLE_FIELDS}
    # Which subjects the fold trained, selected and was tested on: lets anyone audit a nested search's
    # candidates against splits.json (OUT/trial_subjects.csv).
    summary["subjects"] = {part: list(parts[part][2]) for part in ("train", "val", "test")}
    summary["loss"] = LOSS_PER_SAMPLE
    write_text_atomic(output_dir / "result.json", json.dumps(summary, indent=2, default=str))
    return result


def _result_from_outputs(folder: Path) -> FoldResult:
    """A finished fold's result read back from its output files (resumed from its final checkpoint)."""
    summary = json.loads((folder / "result.json").read_text())
    predictions = pd.read_csv(folder / "predictions.csv", dtype={"subject_id": str})
    val_path = folder / "val_predictions.csv"  # absent from checkpoints written before it existed
    val_predictions = pd.read_csv(val_path, dtype={"subject_id": str}) if val_path.is_file() else None
    return FoldResult(**{f.name: summary[f.name] for f in fields(FoldResult) if f.name not in _TABLE_FIELDS},
                      predictions=predictions, val_predictions=val_predictions)
