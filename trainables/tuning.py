"""Ray Tune runs: the paper grid and the per-arm Optuna searches, fresh or restored.

Resources are chosen after ``ray.init`` from what the cluster really has, so a machine without
a GPU runs trials on CPUs instead of leaving them pending for ever.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import optuna
import ray
from ray import tune
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch

from datasets import PreparedData
from search_spaces import SEARCH_SPACE, optuna_distributions
from trainables.experiment import ExperimentConfig
from trainables.ray_trainable import fold_trial, trial_name

log = logging.getLogger(__name__)

METRIC, MODE = "val_macro_f1_best", "max"
PROGRESS_METRICS = {"epoch": "epoch", "train_loss": "train loss", "val_loss": "val loss",
                    "val_macro_f1": "val F1", "val_macro_f1_best": "best val F1", "test_macro_f1": "test F1"}


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
        storage_path=config.storage or str(config.output_path / "ray"),
        failure_config=tune.FailureConfig(max_failures=config.max_failures),
        # Only the newest checkpoint is kept: the finished fold's holds its best weights and outputs.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        progress_reporter=tune.CLIReporter(metric_columns=PROGRESS_METRICS, parameter_columns=parameter_columns,
                                           max_report_frequency=30, sort_by_metric=False),
        verbose=1,
    )


def _tune_config(**kwargs: Any) -> tune.TuneConfig:
    return tune.TuneConfig(metric=METRIC, mode=MODE,
                           trial_name_creator=lambda trial: trial_name(trial.config),
                           trial_dirname_creator=lambda trial: f"{trial_name(trial.config)}_{trial.trial_id}",
                           **kwargs)


def experiment_path(config: ExperimentConfig, name: str) -> str:
    """Where Tune keeps run ``name``; joined as text so that a ``--storage`` URI (s3://...) stays one."""
    return f"{(config.storage or str(config.output_path / 'ray')).rstrip('/')}/{name}"


def _fit_or_restore(path: str, trainable, make_tuner: Callable[[], tune.Tuner]) -> tune.ResultGrid:
    """Restore an interrupted run (only unfinished trials run again), else start it."""
    if tune.Tuner.can_restore(path):
        log.info("Restoring %s: finished trials are kept, unfinished and errored ones resume", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = make_tuner()
    return tuner.fit()


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
    return _fit_or_restore(
        experiment_path(config, "paper"), trainable,
        lambda: tune.Tuner(trainable, param_space=param_space,
                           tune_config=_tune_config(max_concurrent_trials=config.max_concurrent),
                           run_config=_run_config(config, "paper", ["model", "pretrained", "fold"])),
    )


def study_storage(config: ExperimentConfig, model: str, pretrained: bool) -> tuple[str, str]:
    """SQLite URL and study name of one arm's Optuna study (open it with optuna-dashboard)."""
    folder = config.output_path / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    label = arm_label(model, pretrained)
    return f"sqlite:///{folder / label}.db", label


def grid_values(grid: tune.ResultGrid, folds: int) -> dict[tuple[str, bool], float]:
    """Per arm, the search objective the grid already measured: mean over folds of the best val macro F1."""
    scores: dict[tuple[str, bool], list[float]] = {}
    for result in grid:
        if result.error is None and result.metrics.get("fold_finished"):
            arm = (result.config["model"], bool(result.config["pretrained"]))
            scores.setdefault(arm, []).append(result.metrics[METRIC])
    return {arm: sum(values) / len(values) for arm, values in scores.items() if len(values) == folds}


def run_search(config: ExperimentConfig, data: PreparedData, resources: dict[str, float],
               model: str, pretrained: bool, grid_value: float | None = None) -> tune.ResultGrid | None:
    """One arm's Optuna TPE search; each suggestion runs as one trial per fold through Repeater.

    ``grid_value``: the grid's score of the default configuration, when the grid ran in the same
    experiment; Optuna then records it as evaluated instead of training those folds again, and it
    counts as one of ``num_samples``. Returns None when no suggestion is left to run.
    """
    new_suggestions = config.num_samples - (1 if grid_value is not None else 0)
    if new_suggestions < 1:
        return None
    trainable = _trainable(data, resources)
    folds = len(data.plan.folds)
    url, study_name = study_storage(config, model, pretrained)
    constants = config.training_constants()
    searched = [item.name for item in SEARCH_SPACE]
    fixed = {k: v for k, v in constants.items() if k not in searched}
    param_space = {**fixed, "_experiment": "search", "model": model, "pretrained": pretrained}
    name = f"search-{arm_label(model, pretrained)}"

    def new_tuner() -> tune.Tuner:
        # Built only for a fresh run: constructing OptunaSearch enqueues points_to_evaluate in the
        # persistent study, which on a restore would evaluate the paper's point a second time.
        searcher = OptunaSearch(
            optuna_distributions(constants), metric=METRIC, mode=MODE,
            # The grid's configuration (the paper's, plus any --set) first: the search can only improve on it.
            points_to_evaluate=[{key: constants[key] for key in searched}],
            evaluated_rewards=[grid_value] if grid_value is not None else None,
            sampler=optuna.samplers.TPESampler(seed=config.seed),
            study_name=study_name,
            storage=optuna.storages.RDBStorage(url),
        )
        return tune.Tuner(
            trainable, param_space=param_space,
            tune_config=_tune_config(search_alg=Repeater(searcher, repeat=folds), num_samples=new_suggestions * folds,
                                     max_concurrent_trials=config.max_concurrent),
            run_config=_run_config(config, name, ["__trial_index__", *searched]),
        )

    return _fit_or_restore(experiment_path(config, name), trainable, new_tuner)
