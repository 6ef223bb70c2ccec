"""The Ray Tune function trainable: ``train_fold`` with Tune's reporting and checkpoints.

One trial = one fold of one model. The fold comes from ``config["fold"]`` (grid and nested search;
``__trial_index__`` in runs made by the former Repeater-based search). Tune gets a report every epoch and
a checkpoint every ``checkpoint_every`` epochs and at the end; the final checkpoint carries the fold's
output files and its best weights, so the driver collects them from Ray's storage wherever the
trial ran (``collect._read_outputs`` reads the small files only). Between checkpoints the best weights
wait in the trial's folder in Tune's storage (``fold_best_weights/``, emptied when the fold finishes).
The trial caps its CPU threads to the CPUs Ray assigned it. Every report names the node (``node_id``,
``hostname``) so a fault can be traced to a machine.

Faults (README "Faults and resume"):
- A crash (an exception Tune may retry, a killed worker) is Tune's: it restarts the trial from its last
  checkpoint, up to ``max_failures`` times.
- A permanent error (``trainables.errors.is_permanent``: a missing or unreadable input, a bad value, a full
  disk), including what the preflight finds before any model is built (this node cannot see the cache
  entry or the Kinetics weights), is reported once as a final result ``{"fold_failed": True, "error":
  <one line>}`` (no checkpoint: the last training checkpoint stays the one to resume from) and raised as
  ``PermanentTrialError``. Tune has no per-exception retry filter, so it restarts the trial anyway: those
  restarts find a marker in the trial's node-local folder, written by the same driver run on the same node,
  and raise the same error at once, before the data, the preflight or a model is touched. The trial thus
  ends as Tune ERROR (collected as FAILED), and only an ERROR trial is resumed by
  ``Tuner.restore(..., resume_errored=True)``: the next run of the command has a new local folder (and a new
  Ray job or node id), so the trial runs again from its last checkpoint once the cause is fixed. A trial
  that returned instead (Tune TERMINATED) would never run again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from datasets import PreparedData
from datasets.preprocessing import CachedDataset
from models import KineticsWeightsNotFound, resolve_weights_path
from models.kinetics import candidate_paths, weights_filename
from models.pretrained_weights import pretraining_dataset
from trainables.errors import PermanentTrialError, describe_exception, is_permanent
from trainables.fold_training import OUTPUT_FILES, WeightStore, train_fold  # noqa: F401 - OUTPUT_FILES re-exported

log = logging.getLogger(__name__)
BEST_WEIGHTS_FOLDER = "fold_best_weights"
# The hyperparameters that make two trials "the same configuration" (folds of one config share an id).
CONFIG_ID_KEYS = ("lr", "weight_decay", "dropout", "augmentation", "aug_strength", "batch_size", "epochs", "patience",
                  "bn_recalibration")
# Tune's metric (trainables.tuning.METRIC): Tune refuses a result without it, so the failure report carries NaN.
TUNE_METRIC = "val_macro_f1_best"
FAILURE_MARKER = ".permanent_failure.json"
# With a negative --max-failures Tune restarts for ever; after this many no-op restarts the trial returns instead
# (it then ends as Tune TERMINATED with its failure report, still collected as FAILED, but not resumed).
NO_OP_RESTARTS_LIMIT = 10
SHARED_FS_FIX = ("Fix: put it on a file system that every node mounts at the same path (shared storage), or copy "
                 "it to this path on this node, then rerun the same command.")

# Test hooks (keys starting with "_" reach the trial but are no training options):
# crash once in this epoch (after its training, before its report), so Tune's retry must resume from the last
# checkpoint before it;
FAIL_ONCE_KEY = "_fail_once_in_epoch"
# a folder: every attempt appends JSON lines (start, no-op restart, each epoch before its report) with its pid;
FAULT_LOG_KEY = "_fault_log_dir"
# with FAULT_LOG_KEY: the first trial to reach this epoch sleeps before its report, so a test can kill the worker.
SLEEP_ONCE_KEY = "_sleep_once_in_epoch"
SLEEP_SECONDS = 600.0


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


# ---------------------------------------------------------------------------------------------- the node
def node_identity() -> dict[str, str]:
    """This process's host name and Ray node id ("" outside Ray): reported with every result."""
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"node_id": node_id or "", "hostname": socket.gethostname()}


def node_label(node: dict[str, str]) -> str:
    return f"node {node['hostname']} (Ray node {node['node_id'] or 'unknown'})"


# ---------------------------------------------------------------------------------------------- preflight
def cache_problems(cache_dir: Path) -> list[str]:
    """What keeps this node from reading the cache entry, one line per problem ([] when it can): presence and
    sizes against meta.json (``CachedDataset.verify(full=False)``; the driver checked the checksums)."""
    if not cache_dir.is_dir():
        return [f"the folder {cache_dir} does not exist here"]
    return CachedDataset(cache_dir).verify(full=False)


def check_cache(cache_dir: Path, node: dict[str, str]) -> None:
    problems = cache_problems(cache_dir)
    if problems:
        raise PermanentTrialError(
            f"{node_label(node)} cannot use the preprocessing cache entry {cache_dir}: {'; '.join(problems)}. "
            f"{SHARED_FS_FIX} With several nodes give --cache-dir on shared storage (default OUT/cache).")


def check_weights(model: str, pretrained: Any, weights_dir: str | None, node: dict[str, str]) -> None:
    """The pre-trained file (Kinetics-400, or ImageNet for the 2-D baseline) must be on this node: the driver
    checked its own machine only."""
    try:
        resolve_weights_path(model, "kinetics" if pretrained is True else pretrained, weights_dir)
    except KineticsWeightsNotFound as error:
        places = [str(pretrained)] if pretrained is not True else [str(p) for p in candidate_paths(model, weights_dir)]
        raise PermanentTrialError(
            f"{node_label(node)} has no {pretraining_dataset(model)} weights for {model} (looked for {', '.join(places)}). "
            f"{SHARED_FS_FIX} With several nodes give --weights-dir on shared storage, or copy "
            f"{weights_filename(model)} into it on every node.") from error


def preflight(config: dict[str, Any], data: PreparedData, node: dict[str, str]) -> None:
    """Before any model is built: fail at once, naming this node, the path and the fix, if an input is missing."""
    check_cache(Path(data.cache_dir), node)
    if config.get("pretrained"):
        check_weights(config["model"], config["pretrained"], config.get("weights_dir"), node)


# ---------------------------------------------------------------------------------------------- failures
class FailureMarker:
    """A permanent failure, remembered in the trial's node-local folder for the rest of this driver run.

    That folder is made per driver run and per node (Ray's session artifacts), and the marker also records the
    Ray job and node ids, so a restart by Tune in this run on this node finds it, and nothing else does.
    """

    def __init__(self, path: Path, run: dict[str, str]) -> None:
        self.path, self.run = path, run

    def earlier(self) -> dict[str, Any] | None:
        """The failure recorded by this run on this node, or None (a stale marker is removed)."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("run") == self.run:
            return record
        self.path.unlink(missing_ok=True)
        return None

    def write(self, error: str, no_op_restarts: int = 0) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"run": self.run, "error": error, "no_op_restarts": no_op_restarts}))


def failure_metrics(error: str, node: dict[str, str]) -> dict[str, Any]:
    """The final result of a trial that failed permanently: what collect and the report show."""
    return {"fold_failed": True, "fold_finished": False, "error": error, TUNE_METRIC: math.nan, **node}


def _report_failure(error: str, node: dict[str, str]) -> None:
    try:
        tune.report(failure_metrics(error, node))  # no checkpoint: the last training one stays the one to resume
    except Exception as report_error:  # noqa: BLE001 - the error itself must still end the trial
        log.warning("Could not report the failure to Tune (%s); raising it anyway", report_error)


# ---------------------------------------------------------------------------------------------- test hooks
def _log_event(config: dict[str, Any], event: str, **fields: Any) -> None:
    folder = config.get(FAULT_LOG_KEY)
    if folder is None:
        return
    record = {"trial": trial_name(config), "event": event, "pid": os.getpid(), "time": time.time(), **fields}
    with open(Path(folder) / f"{trial_name(config)}.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _sleep_once(config: dict[str, Any], epoch: int) -> None:
    if config.get(SLEEP_ONCE_KEY) != epoch or config.get(FAULT_LOG_KEY) is None:
        return
    try:
        (Path(config[FAULT_LOG_KEY]) / ".slept").touch(exist_ok=False)  # the first trial to get here, once
    except FileExistsError:
        return
    _log_event(config, "sleeping", epoch=epoch)
    time.sleep(SLEEP_SECONDS)


# ---------------------------------------------------------------------------------------------- the trial
def _reporter(config: dict[str, Any], node: dict[str, str]) -> Callable[[dict[str, Any], str | None], None]:
    fail_in = config.get(FAIL_ONCE_KEY)
    marker = Path(tune.get_context().get_trial_dir()) / ".injected_failure_done"

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        _log_event(config, "epoch", epoch=metrics["epoch"])
        _sleep_once(config, metrics["epoch"])
        if fail_in is not None and metrics["epoch"] == fail_in and not marker.exists():
            marker.touch()
            raise RuntimeError(f"Injected failure in epoch {fail_in} (test hook {FAIL_ONCE_KEY})")
        # train_fold puts the output files into the final checkpoint itself.
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # fold_failed and error in every result: Tune's CSV logger keeps the first result's columns only.
        tune.report({**metrics, "fold_failed": False, "error": "", **node}, checkpoint=checkpoint)

    return report


def _train(config: dict[str, Any], data: PreparedData, node: dict[str, str]) -> None:
    train_config = {k: v for k, v in config.items() if not k.startswith("_")}
    train_config["fold"] = fold_of(config)
    options = {"reporter": _reporter(config, node), "best_weights_store": best_weights_store(),
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


def fold_trial(config: dict[str, Any], data: PreparedData) -> None:
    """Run by Tune in a worker; ``data`` arrives through the object store (``tune.with_parameters``)."""
    # One "Checkpoint successfully created" line per trial and epoch would bury the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    node = node_identity()
    run = {"job_id": ray.get_runtime_context().get_job_id(), "node_id": node["node_id"]}
    marker = FailureMarker(Path(tune.get_context().get_trial_dir()) / FAILURE_MARKER, run)
    earlier = marker.earlier()
    if earlier is not None:
        _end_no_op_restart(config, marker, earlier)
        return
    _log_event(config, "start", **node)
    try:
        preflight(config, data, node)
        _train(config, data, node)
    except Exception as error:
        if not is_permanent(error):
            raise  # Tune's retry: a crash may not happen again
        text = describe_exception(error)
        marker.write(text)
        _report_failure(text, node)
        raise PermanentTrialError(text) from error


def _end_no_op_restart(config: dict[str, Any], marker: FailureMarker, earlier: dict[str, Any]) -> None:
    """Tune restarted a trial that failed permanently on this node in this run: raise its error again at once."""
    restarts = int(earlier.get("no_op_restarts", 0)) + 1
    _log_event(config, "no-op restart", restart=restarts)
    if restarts > NO_OP_RESTARTS_LIMIT:
        log.warning("%s failed permanently and Tune keeps restarting it (negative --max-failures?): stopping it",
                    trial_name(config))
        return
    marker.write(earlier["error"], restarts)
    print(f"{trial_name(config)} failed permanently in this run on this node; not retried "
          f"(restart {restarts} by Tune does nothing): {earlier['error']}", flush=True)
    raise PermanentTrialError(earlier["error"])
