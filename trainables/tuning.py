"""Ray Tune runs: the paper grid and the nested-CV Optuna search, fresh or restored.

Resources are chosen after ``ray.init`` from what the cluster really has, so a machine without
a GPU runs trials on CPUs instead of leaving them pending for ever.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import optuna
import pyarrow.fs
import ray
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from datasets import PreparedData
from datasets.atomic import write_text_atomic
from search_spaces import TPE_STARTUP_TRIALS, active_ranges, optuna_distributions
from trainables.collect import lost_checkpoint_problem, missing_final_files
from trainables.experiment import ExperimentConfig
from trainables.nested_search import (STUDY_DATABASE, FoldStudies, OutputFolderStorage, PickledSearcher, StudyKey,
                                      studies_under, study_database_url, tell_resumed_results)
from trainables.ray_trainable import TUNE_METRIC, fold_trial, trial_name

log = logging.getLogger(__name__)

METRIC, MODE = TUNE_METRIC, "max"  # the trial reports it, NaN in a permanent failure's report
# Training and validation only: test scores are for the outputs and the report at the end, not for a person
# watching a search (who might otherwise stop, change and restart it on what the test folds say).
PROGRESS_METRICS = {"epoch": "epoch", "train_loss": "train loss", "val_loss": "val loss",
                    "val_macro_f1": "val F1", "val_macro_f1_best": "best val F1"}
GRID_RUN, SEARCH_RUN = "paper", "search"  # kinds of Tune run; their names carry the experiment's run id
RETRAIN_SUFFIX = "-retrain-"  # <run>-retrain-<n>: finished trials of <run> that lost their final checkpoint, trained again


def trial_resources(config: ExperimentConfig) -> dict[str, float]:
    """Per-trial resources given the running cluster: a GPU share only where GPUs exist."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus > 0:
        return {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    return {"cpu": config.cpus_per_trial}


def arm_label(model: str, pretrained: bool) -> str:
    return f"{model}-{'kinetics' if pretrained else 'scratch'}"


def _trainable(data: PreparedData, resources: dict[str, float]):
    return tune.with_resources(tune.with_parameters(fold_trial, data=data), resources)


def _run_config(config: ExperimentConfig, name: str, parameter_columns: list[str]) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=config.storage_root,
        failure_config=tune.FailureConfig(max_failures=config.max_failures),
        # Only the newest checkpoint is kept: the finished fold's holds its best weights and outputs.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        progress_reporter=tune.CLIReporter(metric_columns=PROGRESS_METRICS, parameter_columns=parameter_columns,
                                           max_report_frequency=30, sort_by_metric=False),
        verbose=1,
    )


def _tune_config(**kwargs: Any) -> tune.TuneConfig:
    # reuse_actors: a finished trial's worker process runs the next trial with the same resources, so torch,
    # torchvision and (on a GPU) the CUDA context are set up once per worker, not once per trial.
    return tune.TuneConfig(metric=METRIC, mode=MODE, reuse_actors=True,
                           trial_name_creator=lambda trial: trial_name(trial.config),
                           trial_dirname_creator=lambda trial: f"{trial_name(trial.config)}_{trial.trial_id}",
                           **kwargs)


def experiment_path(config: ExperimentConfig, name: str) -> str:
    """Where Tune keeps run ``name``; joined as text so that a ``--storage`` URI (s3://...) stays one."""
    return f"{config.storage_root}/{name}"


def retrain_runs(config: ExperimentConfig, name: str) -> list[str]:
    """Names of the retrain runs of run ``name`` (``<name>-retrain-<n>``, see ``_retrain_lost``) in the storage, by n.

    Listed, not probed one number after another, so that every such folder is named (for experiment.json and
    TensorBoard); through pyarrow's filesystem for ``storage_root``, as Tune reaches it, so a URI (s3://) works too.
    ``name`` carries the experiment's run id: another experiment's runs in a shared --storage do not match.
    """
    root = config.storage_root
    filesystem, folder = (pyarrow.fs.FileSystem.from_uri(root) if "://" in root
                          else (pyarrow.fs.LocalFileSystem(), root))
    pattern = re.compile(re.escape(name + RETRAIN_SUFFIX) + r"([1-9][0-9]*)")
    found = {}
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True)):
        match = pattern.fullmatch(info.base_name)
        if match and info.type == pyarrow.fs.FileType.Directory:
            found[int(match.group(1))] = info.base_name
    return [found[number] for number in sorted(found)]


def run_path(config: ExperimentConfig, kind: str) -> str:
    """Where this experiment's run of ``kind`` (grid or search) lives: its own name, never another experiment's."""
    return experiment_path(config, config.tune_run_name(kind))


class ResumeRefusedError(ValueError):
    """A saved Tune run that must not be restored as it stands: its saved state cannot be read."""


def unreadable_state_problem(path: str) -> str | None:
    """Why the newest saved state of the Tune run at ``path`` cannot be read (as ``Tuner.restore`` reads it), or None.

    Checked before restoring because Ray's TuneController catches any error while it restores, logs "Restarting
    experiment" and starts every trial over beside the finished ones (``fail_fast`` is off, and on it would stop
    the run at the first failed trial): a state file cut short by a kill would cost the whole run's training again.
    A run without any state file yet is left to Ray, as before.
    """
    from ray.train._internal.storage import get_fs_and_path
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    newest = _find_newest_experiment_checkpoint(path)
    if newest is None:
        return None
    filesystem, _ = get_fs_and_path(path)
    try:
        with filesystem.open_input_stream(newest) as stream:
            _loads_with_cloudpickle(stream.readall())
    except Exception as error:  # noqa: BLE001 - whatever Ray cannot read, it would restart from scratch
        return (f"{path}: Ray Tune's saved state {Path(newest).name} cannot be read ({type(error).__name__}: "
                f"{error}). Restoring it would start every trial over. Move that file aside (a kill while it was "
                "written leaves it cut short) so that the state saved before it is used, then rerun; if it is the "
                "only experiment_state-*.json there, start a new --output")
    return None


def _fit_or_restore(config: ExperimentConfig, name: str, trainable, make_tuner: Callable[[], tune.Tuner],
                    parameter_columns: list[str]) -> tune.ResultGrid:
    """Restore an interrupted run (only unfinished trials run again), else start it; then retrain lost trials.

    A saved state that cannot be read stops the run (``unreadable_state_problem``). See ``_retrain_lost`` for
    finished trials whose final checkpoint was deleted since.
    """
    path = experiment_path(config, name)
    if tune.Tuner.can_restore(path):
        problem = unreadable_state_problem(path)
        if problem:
            raise ResumeRefusedError(problem)
        log.info("Restoring %s: finished trials are kept, unfinished and errored ones resume", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = make_tuner()
    return _retrain_lost(config, name, trainable, tuner.fit(), parameter_columns)


class TrialConfigs(PickledSearcher):
    """Hands Tune each of the given trial configurations once, in order: the trials of a retrain run."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self._configs = [dict(c) for c in configs]
        self._given = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the configurations are complete; Tune's param_space is empty

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._given >= len(self._configs):
            return Searcher.FINISHED
        self._given += 1
        return dict(self._configs[self._given - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        return None


def _finished_in_tune(grid: tune.ResultGrid) -> list[bool]:
    """Per result of ``grid``, in its order: whether Tune records the trial as TERMINATED (it will not run again).

    Read from the grid's ``ExperimentAnalysis`` (``ResultGrid._experiment_analysis``, whose trials are the grid's
    results in the same order; Ray 2.60): a Result does not carry its trial's status.
    """
    return [trial.status == "TERMINATED" for trial in grid._experiment_analysis.trials]


def _unfinished(grid) -> bool:
    """A trial stopped before its end without an error (Ctrl-C): the caller stops and a rerun resumes it."""
    return any(result.error is None and not (result.metrics or {}).get("fold_finished")
               and not (result.metrics or {}).get("fold_failed") for result in grid)


def _retrain_lost(config: ExperimentConfig, name: str, trainable, grid: tune.ResultGrid,
                  parameter_columns: list[str]) -> tune.ResultGrid:
    """Train again, from the start, the finished trials whose final checkpoint lost files since (deleted by hand).

    Tune records such a trial as TERMINATED; its ``Tuner.restore`` runs unfinished and errored trials again
    (``resume_unfinished``, ``resume_errored``/``restart_errored``), never a finished one, and its state cannot be
    told otherwise through its API. So the lost trials' configurations run in a Tune run of their own,
    ``<name>-retrain-<n>``, beside the original: each earlier retrain run is restored (an interrupted one
    resumes; a finished one runs nothing), then one new run is started for trials lost and not yet retrained.
    The returned grid holds the original's results with each retrained trial's result in place of the lost one
    (same trial name and configuration), so the tables and predictions come from it; iteration, ``len`` and
    indexing see that list, the grid's other methods (``get_dataframe``...) the original run only. A search
    trial is retrained outside its Optuna study, which keeps the score it was told the first time (the same
    configuration, seed and folds). Nothing is retrained while a trial is unfinished (a Ctrl-C): the caller
    stops first, and the rerun comes back here. ``retrain_runs`` lists these runs (experiment.json, TensorBoard).
    """
    if _unfinished(grid):
        return grid
    # (result, whether Tune records its trial as TERMINATED), in the grid's order; retrained trials replace theirs.
    results = list(zip(grid, _finished_in_tune(grid)))
    replaced = started_new = False
    number = 1
    while True:
        lost = [(r, missing) for r, done in results if done and (missing := missing_final_files(r))]
        retrain_name = f"{name}{RETRAIN_SUFFIX}{number}"
        retrain_path = experiment_path(config, retrain_name)
        if tune.Tuner.can_restore(retrain_path):
            log.info("Restoring %s (finished trials trained again after their final checkpoint was lost)",
                     retrain_path)
            retrained = tune.Tuner.restore(retrain_path, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True).fit()
        elif lost and not started_new:  # one new retrain run per invocation at most
            for result, missing in lost:
                log.warning("%s. Ray Tune never runs a finished trial again: training it again from the start, in "
                            "%s", lost_checkpoint_problem(result, missing), retrain_path)
            retrained = tune.Tuner(
                trainable, param_space={},
                tune_config=_tune_config(search_alg=TrialConfigs([r.config for r, _ in lost]), num_samples=len(lost),
                                         max_concurrent_trials=config.max_concurrent),
                run_config=_run_config(config, retrain_name, parameter_columns)).fit()
            started_new = True
        else:
            break
        position = {trial_name(r.config): i for i, (r, _) in enumerate(results)}
        for pair in zip(retrained, _finished_in_tune(retrained)):
            where = position.get(trial_name(pair[0].config))
            if where is None:
                results.append(pair)
            else:
                results[where] = pair
            replaced = True
        if _unfinished(retrained):
            break  # interrupted: the caller stops, and the rerun restores this retrain run
        number += 1
    if not replaced:
        return grid
    merged = copy.copy(grid)
    merged._results = [r for r, _ in results]
    return merged


def run_grid(config: ExperimentConfig, data: PreparedData, resources: dict[str, float]) -> tune.ResultGrid:
    """The paper's protocol: one trial per (model, pretrained, fold) with fixed hyperparameters."""
    trainable = _trainable(data, resources)
    arms = config.arms()
    param_space = {
        **config.training_constants(),
        "_experiment": "paper",
        "model": tune.grid_search(sorted({m for m, _ in arms}, key=list(config.models).index)),
        "pretrained": tune.grid_search(sorted({p for _, p in arms})),
        "fold": tune.grid_search(list(range(len(data.plan.folds)))),
    }
    columns = ["model", "pretrained", "fold"]
    return _fit_or_restore(
        config, config.tune_run_name(GRID_RUN), trainable,
        lambda: tune.Tuner(trainable, param_space=param_space,
                           tune_config=_tune_config(max_concurrent_trials=config.max_concurrent),
                           run_config=_run_config(config, config.tune_run_name(GRID_RUN), columns)),
        columns,
    )


def study_storage(config: ExperimentConfig) -> str:
    """SQLite URL holding every (arm, fold) study of the search: ``optuna-dashboard URL`` lists them all."""
    (config.output_path / STUDY_DATABASE).parent.mkdir(parents=True, exist_ok=True)
    return study_database_url(config.output_path)


def grid_fold_values(grid: tune.ResultGrid) -> dict[tuple[str, bool, int], tuple[float, str]]:
    """Per (model, pretrained, fold): the finished grid trial's best inner-validation macro F1 and its name.

    Each is exactly what that fold's study would measure for the default configuration.
    """
    values = {}
    for result in grid:
        if result.error is None and result.metrics.get("fold_finished"):
            cfg = result.config
            values[(cfg["model"], bool(cfg["pretrained"]), int(cfg["fold"]))] = (result.metrics[METRIC], trial_name(cfg))
    return values


# Beside the studies: which grid trial each study was handed when it was created (``run_search``). The hand-over
# happens once; a grid trial that finished only in a later run was never handed over, whatever the grid holds now.
GRID_HANDOFF_FILE = "optuna/grid_handoff.json"


def search_studies(config: ExperimentConfig, arms: list[tuple[str, bool]], folds: int,
                   grid_values: dict[tuple[str, bool, int], tuple[float, str]]) -> list[dict[str, Any]]:
    """Every (arm, fold) study as plain data, for experiment.json and the report. ``grid_trial``: the grid trial
    the study was handed (GRID_HANDOFF_FILE, once the search exists), else the one it will be (``grid_values``)."""
    if not arms:
        return []
    url = study_storage(config)
    handoff_file = config.output_path / GRID_HANDOFF_FILE
    handed = json.loads(handoff_file.read_text()) if handoff_file.is_file() else None

    def grid_trial(m: str, p: bool, k: int) -> str | None:
        if handed is not None:
            return handed.get(StudyKey(m, p, k).name)
        return grid_values[(m, p, k)][1] if (m, p, k) in grid_values else None

    return [{"model": m, "pretrained": p, "fold": k, "storage": url, "study_name": StudyKey(m, p, k).name,
             "grid_trial": grid_trial(m, p, k)} for m, p in arms for k in range(folds)]


def fresh_fold_studies(config: ExperimentConfig, keys: list[StudyKey], constants: dict[str, Any],
                       default_point: dict[str, Any], known: dict[StudyKey, float]) -> dict[StudyKey, OptunaSearch]:
    """One new seeded TPE study per key, its first point the grid's configuration (queued, or its grid score given).

    Built only for a fresh Tune run, never on a restore: constructing OptunaSearch enqueues points_to_evaluate (and
    adds evaluated_rewards as finished trials) in the persistent study at once. A study of the same name that is
    already there belongs to no Tune run (none could be restored: a stop between building the studies and the Tuner
    writing tuner.pkl, or a Tune run deleted by hand), so it is started over: added to, its grid point would
    be evaluated or counted twice and TPE would leave its random start early, unlike an uninterrupted run.
    """
    url = study_storage(config)
    names = {summary.study_name: summary.n_trials for summary in optuna.get_all_study_summaries(url)}
    for key in keys:
        if key.name in names:
            log.warning("%s: study %s holds %d trial(s) of a search that Tune has no record of; starting it over",
                        url, key.name, names[key.name])
            optuna.delete_study(study_name=key.name, storage=url)
    return {
        key: OptunaSearch(
            optuna_distributions(constants), metric=METRIC, mode=MODE,
            points_to_evaluate=[default_point],
            evaluated_rewards=[known[key]] if key in known else None,
            # One seed for every study: their first (random) suggestions coincide across folds, so a
            # configuration evaluated in every fold exists to compare folds and to deploy.
            sampler=optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=TPE_STARTUP_TRIALS),
            study_name=key.name, storage=OutputFolderStorage(config.output_path))
        for key in keys}


def run_search(config: ExperimentConfig, data: PreparedData, resources: dict[str, float],
               arms: list[tuple[str, bool]],
               grid_values: dict[tuple[str, bool, int], tuple[float, str]] | None = None) -> tune.ResultGrid | None:
    """Nested CV: one seeded TPE study per (arm, outer fold), all studies' trials in one Tuner.

    Each study starts from the grid's configuration (the paper's, plus any --set): it is evaluated
    first, or, when the grid ran in the same experiment, its fold score is handed to the study as an
    evaluated trial and counts as one of ``num_samples``. See ``trainables.nested_search`` for why one
    Tuner routes to all studies. Returns None when no study has a suggestion left to run and no
    earlier search of this experiment to restore.
    """
    grid_values = grid_values or {}
    folds = len(data.plan.folds)
    constants = config.training_constants()
    searched = [item.name for item in active_ranges(constants)]  # aug_strength is fixed without augmentation
    fixed = {k: v for k, v in constants.items() if k not in searched}
    keys = [StudyKey(m, p, k) for m, p in arms for k in range(folds)]
    known = {key: grid_values.get((key.model, key.pretrained, key.fold)) for key in keys}
    quota = {key: config.num_samples - (1 if known[key] else 0) for key in keys}
    # A search that ran before is restored even when nothing is left to start (its grid trials, failed then,
    # finished since): its trials stay in the results.
    if not any(q > 0 for q in quota.values()) and not tune.Tuner.can_restore(run_path(config, SEARCH_RUN)):
        return None
    trainable = _trainable(data, resources)
    url = study_storage(config)
    default_point = {key: constants[key] for key in searched}

    columns = ["model", "pretrained", "fold", *searched]

    def new_tuner() -> tune.Tuner:
        studies = fresh_fold_studies(config, keys, constants, default_point, {k: v[0] for k, v in known.items() if v})
        searcher = FoldStudies(studies, quota, fixed, METRIC, MODE)
        write_text_atomic(config.output_path / GRID_HANDOFF_FILE,
                          json.dumps({key.name: known[key][1] if known[key] else None for key in keys}, indent=2))
        return tune.Tuner(
            trainable, param_space={},
            tune_config=_tune_config(search_alg=searcher, num_samples=sum(max(q, 0) for q in quota.values()),
                                     max_concurrent_trials=config.max_concurrent),
            run_config=_run_config(config, config.tune_run_name(SEARCH_RUN), columns),
        )

    # A restored search's studies are unpickled from Ray's state: they must open this output folder's database,
    # not the one of the folder the run was copied or moved from.
    with studies_under(config.output_path):
        grid = _fit_or_restore(config, config.tune_run_name(SEARCH_RUN), trainable, new_tuner, columns)
    # A trial that ended in ERROR was told FAIL; if this (restored) run ran it again to its end, its score is given
    # to its study now (Ray's OptunaSearch does not: see trainables.nested_search.tell_resumed_results).
    tell_resumed_results(optuna.storages.RDBStorage(url), [key.name for key in keys], finished_scores(grid))
    return grid


def finished_scores(grid: tune.ResultGrid) -> dict[str, float]:
    """Tune trial id -> final score (Tune's metric) of each trial of ``grid`` that finished its fold."""
    return {result.metrics["trial_id"]: result.metrics[METRIC] for result in grid
            if result.error is None and (result.metrics or {}).get("fold_finished")}
