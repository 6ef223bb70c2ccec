"""Gather every trial's outputs into the experiment-level tables the analysis reads.

OUT/predictions.csv: experiment, model, pretrained, fold, config_id, trial_name, subject_id,
    label, pred, prob_<class>..., source, site (from the run's subject table, for per-site results)
OUT/val_predictions.csv: the same columns for each trial's inner validation part, scored with the weights that
    were chosen on it (optimistic there; for choosing a two-class threshold without test subjects). Trials
    finished before folds saved them have no rows (the analysis then uses threshold 0.5 for them).
OUT/epochs.csv: experiment, model, pretrained, fold, config_id, trial_name, epoch, train_loss,
    val_loss, val_accuracy, val_macro_f1, val_f1_<class>..., val_predicted_classes, lr, seconds
OUT/trial_subjects.csv: trial_name, part (train/val/test), subject_id: what each finished trial used
OUT/trials.csv: experiment, trial_name, model, pretrained, fold, config_id, status, error, node_id,
    hostname, lr, weight_decay, dropout, augmentation, aug_strength, epochs_run, best_epoch,
    best_val_macro_f1, n_train, n_val, n_test, loss (``class_weighted_per_sample``; ``class_weighted_per_batch`` for
    folds finished before the class weights acted per sample), checkpoint (a finished trial's final checkpoint: its
    ``best_weights.pt`` is what ``python -m trainables.predict`` loads; a path, or a URI for remote storage)

Statuses: TERMINATED (finished, outputs collected), FAILED (a permanent error: missing input, bad value,
full disk; not retried), ERROR (a crash that Tune's retries, --max-failures, did not get past), INCOMPLETE
(stopped before its end, e.g. Ctrl-C; or finished, but its final checkpoint lost files since, which ``error``
then names with the fix: ``trainables.tuning`` trains such a trial again on the next run), MISSING (planned,
never started). ``error`` is one line: the
exception's type, message and where it was raised (trainables.errors), not Ray's header. ``node_id`` and
``hostname``: the Ray node of the trial's last report.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from ray import tune

from datasets.atomic import write_csv_atomic
from trainables.errors import error_text, is_permanent_result_error, one_line
from trainables.metrics import LOSS_PER_BATCH
from trainables.fold_training import FINAL_WEIGHTS_FILE, OPTIONAL_OUTPUT_FILES, OUTPUT_FILES, read_checkpoint_file
from trainables.ray_trainable import config_id, fold_of, trial_name

log = logging.getLogger(__name__)

KEY_COLUMNS = ["experiment", "model", "pretrained", "fold", "config_id", "trial_name"]
HYPERPARAMETERS = ["lr", "weight_decay", "dropout", "augmentation", "aug_strength"]
# What a finished fold's final checkpoint must hold: collect reads the outputs, ``trainables.predict`` the weights.
FINAL_CHECKPOINT_FILES = (FINAL_WEIGHTS_FILE, *(name for name in OUTPUT_FILES if name not in OPTIONAL_OUTPUT_FILES))
TRIAL_COLUMNS = ["experiment", "trial_name", "model", "pretrained", "fold", "config_id", "status", "error",
                 "node_id", "hostname", *HYPERPARAMETERS, "epochs_run", "best_epoch", "best_val_macro_f1", "n_train",
                 "n_val", "n_test", "loss", "checkpoint"]


def _keys(config: dict[str, Any]) -> dict[str, Any]:
    return {"experiment": config.get("_experiment", "paper"), "model": config["model"],
            "pretrained": bool(config["pretrained"]), "fold": fold_of(config), "config_id": config_id(config),
            "trial_name": trial_name(config)}


def trial_status(result: tune.Result, finished: bool) -> tuple[str, str]:
    """(status, one-line error) of a trial; FAILED (permanent, not retried) is kept apart from ERROR (retries used up).

    A permanent failure ends as Tune ERROR (see trainables.ray_trainable) with a ``PermanentTrialError``; its
    failure report holds the error line made where it happened. A trial whose last result is that report
    but which has no error (stopped after too many no-op restarts) failed permanently too.
    """
    metrics = result.metrics or {}
    reported = one_line(metrics.get("error") or "", limit=2000) if metrics.get("fold_failed") else ""
    if result.error is not None:
        if is_permanent_result_error(result.error):
            return "FAILED", reported or error_text(result.error)
        return "ERROR", error_text(result.error)
    if finished:
        return "TERMINATED", ""
    return ("FAILED", reported) if reported else ("INCOMPLETE", "")


def missing_final_files(result: tune.Result) -> list[str]:
    """The files a finished trial's final checkpoint lacks ([] for a sound one, or a trial not reported finished).

    A trial counts as finished here when its last report says ``fold_finished`` and it has no error. Its final
    checkpoint (the only one kept) holds the outputs and the best weights; if that folder or a file in it was
    deleted since, Tune still records the trial as finished and never runs it again.
    """
    import pyarrow.fs

    metrics = result.metrics or {}
    if result.error is not None or not metrics.get("fold_finished"):
        return []
    checkpoint = result.checkpoint
    if checkpoint is None:
        return list(FINAL_CHECKPOINT_FILES)
    folder = str(checkpoint.path).rstrip("/")
    return [name for name in FINAL_CHECKPOINT_FILES
            if checkpoint.filesystem.get_file_info(f"{folder}/{name}").type != pyarrow.fs.FileType.File]


def lost_checkpoint_problem(result: tune.Result, missing: list[str]) -> str:
    """Which finished trial lost what: ``<trial> finished, but its final checkpoint <path> is gone (deleted?)``."""
    import pyarrow.fs

    checkpoint = result.checkpoint
    gone = checkpoint is None or checkpoint.filesystem.get_file_info(
        str(checkpoint.path)).type != pyarrow.fs.FileType.Directory
    what = "is gone" if gone else f"lacks {', '.join(missing)}"
    return (f"{trial_name(result.config)} finished, but its final checkpoint "
            f"{checkpoint_location(checkpoint) or '(none recorded)'} {what} (deleted?)")


def lost_checkpoint_text(result: tune.Result, missing: list[str]) -> str:
    """trials.csv's one-line error for such a trial: the problem and what brings the fold back."""
    return (f"LostFinalCheckpoint: {lost_checkpoint_problem(result, missing)}, so its outputs and best weights cannot "
            "be read. Fix: rerun the same command with the same --output (or python tune_main.py --resume --output "
            "OUT): Ray Tune never runs a finished trial again, so the rerun trains this fold again from the start in "
            "a Tune run of its own beside the original (<run>-retrain-<n>)")


def checkpoint_location(checkpoint: tune.Checkpoint | None) -> str:
    """Where a trial's checkpoint lies: a local path, or ``<scheme>://path`` on remote storage ("" for none)."""
    if checkpoint is None:
        return ""
    scheme = checkpoint.filesystem.type_name
    return str(checkpoint.path) if scheme == "local" else f"{scheme}://{str(checkpoint.path).lstrip('/')}"


def _read_outputs(result: tune.Result) -> dict[str, Any]:
    """The fold's files from its final checkpoint (present only once the fold finished).

    Only the small output files are read, through the checkpoint's own filesystem (local or remote):
    the checkpoint's weights are never downloaded, copied or loaded. ``val_predictions`` is None for a
    checkpoint written before folds saved it.
    """
    import io

    checkpoint = result.checkpoint
    if checkpoint is None:
        return {}
    filesystem, folder = checkpoint.filesystem, str(checkpoint.path)

    def read(name: str) -> bytes | None:
        return read_checkpoint_file(filesystem, folder, name)

    summary = read("result.json")
    if summary is None:
        return {}
    predictions, epochs = read("predictions.csv"), read("epochs.csv")
    if predictions is None or epochs is None:  # a finished checkpoint that lost files: see missing_final_files
        return {}
    val_predictions = read("val_predictions.csv")
    return {"summary": json.loads(summary),
            "predictions": pd.read_csv(io.BytesIO(predictions), dtype={"subject_id": str}),
            "val_predictions": (None if val_predictions is None
                                else pd.read_csv(io.BytesIO(val_predictions), dtype={"subject_id": str})),
            "epochs": pd.read_csv(io.BytesIO(epochs))}


def _with_origin(predictions: pd.DataFrame, subjects: pd.DataFrame | None) -> pd.DataFrame:
    """Each row's subject source and site from the run's subject table (for per-site results)."""
    if subjects is None or "subject_id" not in predictions.columns:
        return predictions
    origin = subjects[["subject_id", "source", "site"]].astype(str)
    return predictions.drop(columns=["source", "site"], errors="ignore").merge(
        origin, on="subject_id", how="left", validate="many_to_one")


def one_result_per_trial_name(results: Iterable[tune.Result]) -> list[tune.Result]:
    """Each trial name once: a study can train one configuration twice on one fold (its enqueued grid point, when a
    driver died between saving Optuna's study and Tune's state). Both trials compute the same thing, but two sets
    of rows under one name would count that fold's test subjects twice wherever trials are picked by name. The
    finished one is kept (of two finished ones, the smaller Tune trial id); the other is logged, not lost: its
    folder stays in the Tune run."""
    chosen: dict[str, tune.Result] = {}

    def rank(result: tune.Result) -> tuple[bool, str]:
        metrics = result.metrics or {}
        finished = result.error is None and bool(metrics.get("fold_finished"))
        return (not finished, str(metrics.get("trial_id", "")))

    for result in results:
        name = trial_name(result.config)
        kept = chosen.setdefault(name, result)
        if kept is not result:
            chosen[name], dropped = sorted((kept, result), key=rank)
            log.warning("Two Tune trials are named %s (one configuration trained twice on one fold); the tables keep "
                        "Tune trial %s, not %s", name, (chosen[name].metrics or {}).get("trial_id", "?"),
                        (dropped.metrics or {}).get("trial_id", "?"))
    return list(chosen.values())


def collect(result_grids: Iterable[tune.ResultGrid], planned: Iterable[str] = (),
            subjects: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Test and validation predictions, epochs and trial statuses of every trial; ``subjects`` adds each
    subject's source and site."""
    predictions, val_predictions, epochs, trials, used = [], [], [], [], []
    seen = set()
    for result in one_result_per_trial_name(result for grid in result_grids for result in grid):
        keys = _keys(result.config)
        seen.add(keys["trial_name"])
        outputs = _read_outputs(result)
        summary = outputs.get("summary", {})
        status, error = trial_status(result, finished=bool(summary))
        if status == "INCOMPLETE":
            missing = missing_final_files(result)
            if missing:
                error = lost_checkpoint_text(result, missing)
        metrics = result.metrics or {}
        row = {**keys, **{k: result.config.get(k) for k in HYPERPARAMETERS}, "status": status, "error": error,
               "node_id": metrics.get("node_id", ""), "hostname": metrics.get("hostname", ""),
               "epochs_run": summary.get("epochs_run"), "best_epoch": summary.get("best_epoch"),
               "best_val_macro_f1": summary.get("best_val_macro_f1"), "n_train": summary.get("n_train"),
               "n_val": summary.get("n_val"), "n_test": summary.get("n_test"),
               "loss": summary.get("loss", LOSS_PER_BATCH if summary else ""),
               "checkpoint": checkpoint_location(result.checkpoint) if summary else ""}
        trials.append(row)
        if outputs:
            predictions.append(outputs["predictions"].assign(**keys))
            if outputs["val_predictions"] is not None:
                val_predictions.append(outputs["val_predictions"].assign(**keys))
            epochs.append(outputs["epochs"].assign(**keys))
            used += [{"trial_name": keys["trial_name"], "part": part, "subject_id": sid}
                     for part, ids in summary.get("subjects", {}).items() for sid in ids]
    for name in planned:
        if name not in seen:
            trials.append({"trial_name": name, "status": "MISSING", "error": "", "node_id": "", "hostname": ""})

    def ordered(frames: list[pd.DataFrame]) -> pd.DataFrame:
        if not frames:
            return pd.DataFrame(columns=KEY_COLUMNS)
        frame = pd.concat(frames, ignore_index=True)
        return frame[KEY_COLUMNS + [c for c in frame.columns if c not in KEY_COLUMNS]]

    def by_subject(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frame = ordered(frames).sort_values(KEY_COLUMNS + ["subject_id"]) if frames else ordered([])
        return _with_origin(frame, subjects)

    trials_frame = pd.DataFrame(trials, columns=TRIAL_COLUMNS).sort_values(["experiment", "trial_name"], na_position="last")
    return {"predictions": by_subject(predictions),
            "val_predictions": by_subject(val_predictions),
            "epochs": ordered(epochs).sort_values(KEY_COLUMNS + ["epoch"]) if epochs else ordered([]),
            "trials": trials_frame,
            "trial_subjects": pd.DataFrame(used, columns=["trial_name", "part", "subject_id"])}


def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> None:
    for name, frame in tables.items():
        write_csv_atomic(frame, out_dir / f"{name}.csv")
