"""Train one fold of one model: the unit of work that every Ray Tune trial runs.

It runs without Ray. A ``reporter(metrics, checkpoint_dir)`` callback receives each epoch's
metrics and a folder holding the resumable state; ``resume_from`` points at such a folder.
Model selection uses the inner validation split only; the outer test fold is scored once, with
the best-validation weights, at the end.

Files written to ``output_dir`` (the format the analysis reads):
- ``epochs.csv``: epoch (1-based), train_loss, val_loss, val_accuracy, val_macro_f1,
  val_f1_<class> per class, lr, seconds
- ``predictions.csv``: subject_id, label, pred (class names), prob_<class> per class
- ``result.json``: the config, best epoch and validation score, test metrics, subject counts and ids
"""
from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from datasets import PreparedData, VolumeDataset, build_augmentation
from datasets.atomic import write_csv_atomic, write_text_atomic
from models import MODEL_NAMES, build_model
from search_spaces.recipe import PAPER_DEFAULTS  # the paper's recipe; anything in it can be overridden per trial
from trainables.metrics import class_weights, classification_metrics

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any], "str | None"], None]
CHECKPOINT_FILE = "fold_state.pt"

DEFAULT_CONFIG: dict[str, Any] = {
    "model": "mc3_18",
    "pretrained": False,  # True: Kinetics-400 from weights_dir / torch hub cache; or a path
    "weights_dir": None,
    **PAPER_DEFAULTS,
    "epochs": 50,
    "patience": None,  # stop after this many epochs without a better validation score
    "seed": 0,
    "fold": 0,
    "num_workers": 0,
    "amp": True,  # on CUDA only; bf16 where supported, else fp16 with a GradScaler
    # Recompute BatchNorm running statistics on the training part before each evaluation. Off for the
    # paper's protocol; short runs (the demo: 64 steps) need it, or their running averages lag so far
    # behind the weights that evaluation predicts one class whatever the model has learned.
    "bn_recalibration": False,
}


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, unknown keys refused (a typo must not silently train the default)."""
    unknown = sorted(k for k in config if k not in DEFAULT_CONFIG and not k.startswith("_"))
    if unknown:
        raise ValueError(f"Unknown training option(s) {unknown}; known: {sorted(DEFAULT_CONFIG)}")
    resolved = {**DEFAULT_CONFIG, **{k: v for k, v in config.items() if k in DEFAULT_CONFIG}}
    _check_types(resolved)
    for key in ("lr", "epochs", "batch_size"):
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
_INTEGERS = ("batch_size", "epochs", "seed", "fold", "num_workers")
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


def amp_setup(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    if device.type != "cuda" or not enabled:
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None  # bf16 has fp32's range: no loss scaling needed
    return torch.float16, torch.amp.GradScaler("cuda")


def train_step(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
               scaler: torch.amp.GradScaler | None) -> float:
    """One optimisation step under autocast; returns the batch's mean loss (shared with the benchmark)."""
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
    return loss.item()


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


class _State:
    """Everything needed to continue exactly where a run stopped."""

    def __init__(self) -> None:
        self.epoch = 0
        self.best_epoch = 0
        self.best_score = (-math.inf, -math.inf)  # (val macro F1, -val loss)
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []


def _evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
              amp_dtype: torch.dtype | None) -> tuple[float, np.ndarray, np.ndarray]:
    model.eval()
    losses, probabilities, targets = [], [], []
    with torch.no_grad():
        for volumes, labels in loader:
            volumes, labels = volumes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(volumes)
            losses.append(criterion(logits.float(), labels).item() * len(labels))
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            targets.append(labels.cpu().numpy())
    probs, y = np.concatenate(probabilities), np.concatenate(targets)
    return float(np.sum(losses) / len(y)), probs, y


def _save_checkpoint(directory: Path, model, optimizer, scaler, state: _State, finished: bool) -> None:
    """Resumable state; a finished fold keeps only its best weights (a quarter of the size)."""
    payload = {
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "best_weights": state.best_weights,
        "history": state.history,
        "finished": finished,
    }
    if not finished:
        payload.update({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        })
    tmp = directory / f".{CHECKPOINT_FILE}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)


def _load_checkpoint(directory: str | os.PathLike, model, optimizer, scaler, state: _State) -> bool:
    payload = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    state.epoch, state.best_epoch = payload["epoch"], payload["best_epoch"]
    state.best_score, state.best_weights = tuple(payload["best_score"]), payload["best_weights"]
    state.history = payload["history"]
    if payload["finished"]:
        return True
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng"]["torch"])
    np.random.set_state(payload["rng"]["numpy"])
    random.setstate(payload["rng"]["python"])
    return False


def train_fold(
    config: dict[str, Any],
    data: PreparedData,
    output_dir: str | os.PathLike,
    reporter: Reporter | None = None,
    resume_from: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> FoldResult:
    """Train ``config["model"]`` on fold ``config["fold"]`` of ``data`` and score it on that fold's test part."""
    config = resolve_config(config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(config["seed"] * 1000 + config["fold"])
    classes = list(data.classes)
    parts = data.fold_indices(config["fold"])
    volumes = data.cached.volumes()
    train_idx, train_y, _ = parts["train"]
    datasets = {
        part: VolumeDataset(volumes, parts[part][0], parts[part][1], data.spacing,
                            transform=build_augmentation(config["augmentation"], config["aug_strength"]) if part == "train" else None)
        for part in ("train", "val", "test")
    }
    loader_options = {"num_workers": config["num_workers"], "pin_memory": device.type == "cuda"}
    # Evaluation never augments and its batch size does not change results: use the training one.
    loaders = {part: DataLoader(datasets[part], batch_size=config["batch_size"], shuffle=False, **loader_options)
               for part in ("val", "test")}
    if config["bn_recalibration"]:
        unaugmented = VolumeDataset(volumes, train_idx, train_y, data.spacing)
        loaders["bn"] = DataLoader(unaugmented, batch_size=config["batch_size"], shuffle=False, **loader_options)

    pretrained = config["pretrained"]
    model = build_model(config["model"], num_classes=len(classes), in_channels=data.cached.meta["channels"],
                        dropout=config["dropout"], pretrained=("kinetics" if pretrained is True else pretrained) or None,
                        weights_dir=config["weights_dir"]).to(device)
    weights = torch.tensor(class_weights(train_y, len(classes)), dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    amp_dtype, scaler = amp_setup(device, config["amp"])

    state = _State()
    finished = False
    if resume_from is not None and (Path(resume_from) / CHECKPOINT_FILE).is_file():
        finished = _load_checkpoint(resume_from, model, optimizer, scaler, state)
        log.info("Resumed fold %d of %s after epoch %d", config["fold"], config["model"], state.epoch)

    while not finished and state.epoch < config["epochs"]:
        started = time.perf_counter()
        state.epoch += 1
        model.train()
        # The shuffle order depends on (seed, epoch) only, so a resumed run sees the same order.
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(config["seed"] * 7919 + state.epoch))
        train_loader = DataLoader(datasets["train"], batch_size=config["batch_size"], sampler=order.tolist(), **loader_options)
        train_loss, seen = 0.0, 0
        for batch, labels in train_loader:
            batch, labels = batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            train_loss += train_step(model, batch, labels, criterion, optimizer, amp_dtype, scaler) * len(labels)
            seen += len(labels)
        if "bn" in loaders:
            update_bn(loaders["bn"], model, device=device)
        val_loss, val_probs, val_y = _evaluate(model, loaders["val"], criterion, device, amp_dtype)
        metrics = {"epoch": state.epoch, "train_loss": train_loss / seen, "val_loss": val_loss,
                   **classification_metrics("val", val_y, val_probs.argmax(1), classes),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
        score = (metrics["val_macro_f1"], -val_loss)
        if score > state.best_score:
            state.best_score, state.best_epoch = score, state.epoch
            state.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state.history.append(metrics)
        patience = config["patience"]
        stop_early = patience is not None and state.epoch - state.best_epoch >= patience
        finished = stop_early or state.epoch >= config["epochs"]
        write_csv_atomic(pd.DataFrame(state.history), output_dir / "epochs.csv")

        report = {**metrics, "val_macro_f1_best": state.best_score[0], "best_epoch": state.best_epoch,
                  "fold_finished": finished}
        if finished:
            result = _finish(config, model, state, loaders, criterion, device, amp_dtype, classes, parts, output_dir)
            report.update({f"test_{k}": v for k, v in result.test_metrics.items()})
        if reporter is not None:
            with tempfile.TemporaryDirectory(prefix="fold_ckpt_") as checkpoint_dir:
                _save_checkpoint(Path(checkpoint_dir), model, optimizer, scaler, state, finished)
                reporter(report, checkpoint_dir)
        else:
            checkpoint_dir = output_dir / "checkpoint"
            checkpoint_dir.mkdir(exist_ok=True)
            _save_checkpoint(checkpoint_dir, model, optimizer, scaler, state, finished)
        log.info("%s fold %d epoch %d: %s", config["model"], config["fold"], state.epoch,
                 ", ".join(f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float)))
        if finished:
            return result
    # Resumed from a finished checkpoint: outputs are already on disk, rebuild the result from them.
    return _finish(config, model, state, loaders, criterion, device, amp_dtype, classes, parts, output_dir)


def _finish(config, model, state: _State, loaders, criterion, device, amp_dtype, classes, parts, output_dir: Path) -> FoldResult:
    """Score the best-validation weights on the test fold and write predictions and the summary."""
    evaluated = copy.deepcopy(model)
    if state.best_weights is not None:
        evaluated.load_state_dict(state.best_weights)
    _, probs, y = _evaluate(evaluated, loaders["test"], criterion, device, amp_dtype)
    test_ids = parts["test"][2]
    predictions = pd.DataFrame({"subject_id": test_ids, "label": [classes[i] for i in y],
                                "pred": [classes[i] for i in probs.argmax(1)]})
    for index, name in enumerate(classes):
        predictions[f"prob_{name}"] = probs[:, index]
    write_csv_atomic(predictions, output_dir / "predictions.csv")
    test_metrics = classification_metrics("test", y, probs.argmax(1), classes)
    test_metrics = {k.removeprefix("test_"): v for k, v in test_metrics.items()}
    result = FoldResult(config=config, best_epoch=state.best_epoch, best_val_macro_f1=float(state.best_score[0]),
                        epochs_run=state.epoch, test_metrics=test_metrics, n_train=len(parts["train"][2]),
                        n_val=len(parts["val"][2]), n_test=len(test_ids), predictions=predictions)
    summary = {k: v for k, v in asdict(result).items() if k != "predictions"}
    # Which subjects the fold trained, selected and was tested on: lets anyone audit a nested search's
    # candidates against splits.json (OUT/trial_subjects.csv).
    summary["subjects"] = {part: list(parts[part][2]) for part in ("train", "val", "test")}
    write_text_atomic(output_dir / "result.json", json.dumps(summary, indent=2, default=str))
    return result
