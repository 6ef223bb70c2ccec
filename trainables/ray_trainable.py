"""The Ray Tune function trainable: ``train_fold`` with Tune's reporting and checkpoints.

One trial = one fold of one model. The fold comes from ``config["fold"]`` (grid and nested search;
``__trial_index__`` in runs made by the former Repeater-based search). Tune gets a report every epoch and
a checkpoint every ``checkpoint_every`` epochs and at the end; the final checkpoint carries the fold's
output files and its float16 best weights, so the driver collects them from Ray's storage wherever the
trial ran (``collect._read_outputs`` reads the small files only). Between checkpoints the best weights
wait in the trial's folder in Tune's storage (``fold_best_weights/``, emptied when the fold finishes).
The trial caps its CPU threads to the CPUs Ray assigned it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from datasets import PreparedData
from trainables.fold_training import OUTPUT_FILES, WeightStore, train_fold  # noqa: F401 - OUTPUT_FILES re-exported

log = logging.getLogger(__name__)
BEST_WEIGHTS_FOLDER = "fold_best_weights"
# The hyperparameters that make two trials "the same configuration" (folds of one config share an id).
CONFIG_ID_KEYS = ("lr", "weight_decay", "dropout", "augmentation", "aug_strength", "batch_size", "epochs", "patience",
                  "bn_recalibration")
# Test hook: crash once in this epoch (after its training, before its report), so Tune's retry
# must resume from the last checkpoint before it.
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


def cpu_share(assigned: dict[str, float]) -> int | None:
    """Threads for a trial from Ray's assigned resources (``{"CPU": 1.0, "GPU": 0.25}``): whole CPUs, at least 1."""
    cpus = assigned.get("CPU")
    return None if cpus is None else max(1, int(cpus))


def best_weights_store() -> WeightStore:
    """A folder in the trial's own directory in Tune's storage: it outlives checkpoints and trial restarts."""
    try:
        storage = tune.get_context().get_storage()  # a DeveloperAPI: the storage filesystem and the trial's path
        return WeightStore(f"{storage.trial_fs_path}/{BEST_WEIGHTS_FOLDER}", storage.storage_filesystem)
    except Exception as error:  # noqa: BLE001 - fall back to the trial's local folder (enough on one machine)
        log.warning("Best weights kept in the trial's local folder (Tune's storage context: %s)", error)
        return WeightStore(Path(tune.get_context().get_trial_dir()) / BEST_WEIGHTS_FOLDER)


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
        # train_fold puts the output files into the final checkpoint itself.
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    options = {"reporter": report, "best_weights_store": best_weights_store(),
               "cpus": cpu_share(ray.get_runtime_context().get_assigned_resources())}
    checkpoint = tune.get_checkpoint()
    # Outputs go to a private folder, not the trial folder: Tune syncs that one while we write.
    # They reach Tune's storage inside the final checkpoint; their content is rebuilt on a resume.
    with tempfile.TemporaryDirectory(prefix="fold_output_") as scratch:
        output_dir = Path(scratch)
        if checkpoint is None:
            train_fold(train_config, data, output_dir, **options)
        else:
            with checkpoint.as_directory() as resume_from:
                train_fold(train_config, data, output_dir, resume_from=resume_from, **options)
