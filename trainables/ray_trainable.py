"""The Ray Tune function trainable: ``train_fold`` with Tune's reporting and checkpoints.

One trial = one fold of one model. The fold comes from ``config["fold"]`` (grid and nested search;
``__trial_index__`` in runs made by the former Repeater-based search). The final checkpoint carries the fold's output files, so
the driver collects them from Ray's storage wherever the trial ran.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from datasets import PreparedData
from trainables.fold_training import train_fold

OUTPUT_FILES = ("predictions.csv", "epochs.csv", "result.json")
# The hyperparameters that make two trials "the same configuration" (folds of one config share an id).
CONFIG_ID_KEYS = ("lr", "weight_decay", "dropout", "augmentation", "aug_strength", "batch_size", "epochs", "patience",
                  "bn_recalibration")
# Test hook: crash once in this epoch (after its training, before its report), so Tune's retry
# must resume from the previous epoch's checkpoint.
FAIL_ONCE_KEY = "_fail_once_in_epoch"


def config_id(config: dict[str, Any]) -> str:
    values = {k: config.get(k) for k in CONFIG_ID_KEYS}
    values = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in values.items()}
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def fold_of(config: dict[str, Any]) -> int:
    return int(config["__trial_index__"] if "__trial_index__" in config else config["fold"])


def trial_name(config: dict[str, Any]) -> str:
    """Readable and unique within an experiment: model, pretraining, fold, configuration."""
    pretrained = "kinetics" if config.get("pretrained") else "scratch"
    # A search may evaluate the grid's configuration again: the prefix keeps the two trials apart.
    prefix = "search-" if config.get("_experiment") == "search" else ""
    return f"{prefix}{config['model']}-{pretrained}-f{fold_of(config)}-{config_id(config)}"


def fold_trial(config: dict[str, Any], data: PreparedData) -> None:
    """Run by Tune in a worker; ``data`` arrives through the object store (``tune.with_parameters``)."""
    # One "Checkpoint successfully created" line per trial and epoch would bury the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    train_config = {k: v for k, v in config.items() if not k.startswith("_")}
    train_config["fold"] = fold_of(config)
    fail_in = config.get(FAIL_ONCE_KEY)
    marker = Path(tune.get_context().get_trial_dir()) / ".injected_failure_done"

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if fail_in is not None and metrics["epoch"] == fail_in and not marker.exists():
            marker.touch()
            raise RuntimeError(f"Injected failure in epoch {fail_in} (test hook {FAIL_ONCE_KEY})")
        if metrics.get("fold_finished") and checkpoint_dir is not None:
            for name in OUTPUT_FILES:
                if (output_dir / name).is_file():
                    shutil.copy2(output_dir / name, Path(checkpoint_dir) / name)
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    # Outputs go to a private folder, not the trial folder: Tune syncs that one while we write.
    # They reach Tune's storage inside the final checkpoint; their content is rebuilt on a resume.
    with tempfile.TemporaryDirectory(prefix="fold_output_") as scratch:
        output_dir = Path(scratch)
        if checkpoint is None:
            train_fold(train_config, data, output_dir, reporter=report)
        else:
            with checkpoint.as_directory() as resume_from:
                train_fold(train_config, data, output_dir, reporter=report, resume_from=resume_from)
