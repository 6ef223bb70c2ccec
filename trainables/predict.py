"""Fold-ensemble prediction on new scans with the weights of a finished run.

    python -m trainables.predict RUN_DIR (--data-root DIR | --manifest CSV | FILES...) --output preds.csv
        [--arm MODEL:scratch|kinetics] [--device cpu|cuda|auto] [--batch-size N]

RUN_DIR is a ``tune_main.py --output`` folder. Each refusal names the file or option and the fix, and comes as early
as it can: the run, the arm and every fold's weights are checked before any input is registered or preprocessed.

1. **Arm**: the one whose folds scored best on validation (mean over folds of each trial's best validation macro F1),
   every arm on the same footing: the paper configuration's (grid) trials, or, when every arm was searched, the
   nested estimate's selected trials (a searched arm's selected score is each fold's best of several candidates, so
   it would beat an unsearched arm's single configuration by the selection alone). Its test estimate (pooled macro
   F1 of the run's own test predictions, as in the report) is printed, never used to choose, so it is not the
   winner of a comparison on test data. ``--arm`` picks one.
2. **Folds**: each finished fold's trial of that arm (nested: the configuration the nested estimate used; grid:
   the grid's trial), found in trials.csv's ``checkpoint`` column. For runs made before that column existed, Ray
   Tune's own records of the run (``ray.tune.ExperimentAnalysis`` on experiment.json's ``tune_runs``).
3. **Inputs**: found as training finds them (``datasets.prepare.load_records``, with the run's ``--classes``
   selected as training selected them), or a manifest whose label column is optional, or bare FILES (one NIfTI per
   subject; id = file stem). A manifest's ``path_<contrast>`` columns must be the run's channels in the run's order
   (its contrasts, or the path columns of its manifest while that file is there; compared regardless of case, BraTS
   and RSNA spellings as one), else refused; where either side's names are unknown a note says it is unchecked.
   Validated by the training checks, registered when the run was, and preprocessed by the same code with the run
   cache's parameters and crop shape.
4. **Prediction**: every fold's best weights, in eval mode, float32 arithmetic (no autocast, and no TF32 in
   cuDNN's convolutions, so CPU and GPU give the same numbers up to kernel rounding), batch-wise in the training's
   video layout. The ensemble is the mean of the folds' softmax probabilities.

Outputs (OUT = ``--output``, a .csv):
- OUT: ``subject_id``, ``label`` (when labels were given), ``prob_<class>`` (mean over folds), ``pred``,
  ``prob_<class>_sd`` (sample standard deviation over folds, ddof=1 as the report's fold std; empty with one fold),
  ``n_folds``, ``fold<k>_pred`` per fold k (k = the run's fold index), ``in_run_cohort`` (the subject is one of the
  run's subjects.csv, by id, by the content of its volume or by its file name: see ``run_cohort_matches``; it was
  training data for every fold but its own test fold, so its prediction is no independent test).
- ``<OUT stem>_folds.csv``: one row per (subject, fold): ``subject_id, fold, trial_name, pred, prob_<class>``.
- ``<OUT stem>.json``: how it was obtained: run, arm and why, folds with checkpoints and weight checksums,
  preprocessing, device, versions, the score when labels were given (macro F1 over the classes with a labelled
  subject, ``macro_f1_classes``; the others in ``classes_without_subjects``), ``inputs.channels`` (the input's own
  channel names: path columns or contrasts; null for bare FILES) beside ``inputs.run_channels`` and
  ``inputs.channel_check``, and ``inputs.in_run_cohort_matches``: for each subject flagged in_run_cohort, the run
  subject id(s) it matches and how (``id``, ``content`` or ``name``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.load import Experiment, check_one_trial_per_fold, load_experiment
from analysis.metrics import arm_metrics, overall_metrics
from analysis.names import Arm, arm_sort_key, sort_arms
from analysis.nested import fold_studies, nested_estimate, select
from datasets.acquisition import looks_stripped
from datasets.atomic import write_csv_atomic, write_text_atomic
from datasets.dicom import convert_records, dicom_cache_dir
from datasets.preprocessing import CachedDataset, PreprocessConfig, preprocess_volumes
from datasets.prepare import DataSpec, load_records, select_classes
from datasets.records import SubjectRecord
from datasets.rsna import SEQUENCE_ALIASES
from datasets.sources import (BRATS_CONTRASTS, IXI_PATTERN, NIFTI_SUFFIXES, class_order, manifest_path_columns,
                              read_manifest)
from datasets.validation import CONTENT_DIGEST, Problem, validate_records
from datasets.volume_dataset import batch_to_video_layout
from datasets.workers import Interrupted
from models import build_model
from trainables.fold_training import FINAL_WEIGHTS_FILE
from trainables.fold_training import read_checkpoint_file as read_from_folder

PRETRAINING_TAGS = {"scratch": False, "kinetics": True}  # the --arm spelling, as in trial names
SUMMARY_FILE = "result.json"  # a finished fold's summary in its final checkpoint, with the trial's config
PROGRESS_LINES = 10  # progress lines per fold at most
COHORT_IDS_SHOWN = 5


class PredictError(ValueError):
    """A refusal: what is wrong, with which file or option, and the fix. ``main`` prints it and returns 2."""


def resume_hint(run_dir: Path) -> str:
    return f"python tune_main.py --resume --output {run_dir}"


def arm_text(arm: Arm) -> str:
    """An arm as ``--arm`` spells it: ``mc3_18:scratch``."""
    return f"{arm[0]}:{'kinetics' if arm[1] else 'scratch'}"


def parse_arm(text: str) -> Arm:
    model, _, tag = text.partition(":")
    if not model or tag not in PRETRAINING_TAGS:
        raise PredictError(f"--arm expects MODEL:scratch or MODEL:kinetics (e.g. mc3_18:scratch), got {text!r}")
    return model, PRETRAINING_TAGS[tag]


# ---------------------------------------------------------------------------------------------- the run
def load_run(run_dir: Path) -> Experiment:
    """The run's tables, read and checked by the analysis module (the same reader as the report)."""
    if not (run_dir / "experiment.json").is_file():
        raise PredictError(f"{run_dir} is not an experiment folder (no experiment.json): give the --output folder "
                           "of a tune_main.py run")
    if not (run_dir / "predictions.csv").is_file():
        raise PredictError(f"{run_dir} has no predictions.csv: the run has not collected its trials yet (stopped "
                           f"early?). Run `{resume_hint(run_dir)}` to finish it")
    try:
        return load_experiment(run_dir)
    except (ValueError, FileNotFoundError) as error:
        raise PredictError(f"{run_dir} cannot be read as a run: {error}") from error


def run_preprocessing(exp: Experiment) -> tuple[PreprocessConfig, int, Path]:
    """(the run's preprocessing with its crop shape, input channels, cache entry) from the entry's meta.json:
    the parameters that made the arrays the models were trained on."""
    cache = exp.meta.get("cache")
    run_dir = exp.out_dir
    if not cache:
        raise PredictError(f"{run_dir}/experiment.json names no preprocessing cache ('cache'), so the crop shape its "
                           f"models were trained on is unknown. Run `{resume_hint(run_dir)}`, which records it")
    entry = CachedDataset(Path(exp.relocated(str(cache))))
    try:
        meta = entry.meta
        config = PreprocessConfig(spacing=float(meta["config"]["spacing"]),
                                  percentiles=tuple(float(p) for p in meta["config"]["percentiles"]),
                                  target_shape=tuple(int(s) for s in meta["shape"]),
                                  register=str(meta["config"].get("register", "none")))
        channels = int(meta["channels"])
    except FileNotFoundError:
        raise PredictError(f"The run's cache entry {entry.directory} has no meta.json, so the spacing, intensity "
                           f"percentiles and crop shape its models were trained on are unknown. Copy the entry's "
                           f"meta.json with the run, or run `{resume_hint(run_dir)}` to rebuild the entry (its input "
                           "files must still be there)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise PredictError(f"{entry.directory}/meta.json is unreadable or incomplete ({type(error).__name__}: "
                           f"{error}). Run `{resume_hint(run_dir)}` to rebuild the entry") from error
    return config, channels, entry.directory


def channel_text(exp: Experiment, channels: int) -> str:
    """What the run's input channels were, for messages."""
    if exp.meta.get("manifest"):
        names = run_channels(exp, channels).names
        return (f"{channels} input channel(s) ({', '.join(names) + ': ' if names else ''}the path columns of its "
                f"manifest {exp.meta['manifest']})")
    return f"{channels} input channel(s) ({', '.join(exp.meta.get('contrasts') or ['t1ce'])})"


# ---------------------------------------------------------------------------------------------- the arm
@dataclass(frozen=True)
class ArmEstimate:
    """An arm's test estimate in the run and the trial of each fold behind it (whose weights then predict)."""

    arm: Arm
    kind: str  # "nested" (each fold's selected configuration) or "grid" (the grid's configuration)
    macro_f1: float  # pooled over the folds' test predictions
    trials: dict[int, str]  # fold -> trial name
    val_macro_f1: float = float("nan")  # mean over those trials of their best (inner-)validation macro F1
    # The same mean over the arm's paper-configuration trials (the grid's; for a grid estimate, val_macro_f1): the
    # footing every arm shares, since a nested arm's val_macro_f1 is each fold's best of several candidates.
    paper_val_macro_f1: float = float("nan")

    def describe(self) -> str:
        folds = len(self.trials)
        validation = f"validation macro F1 {score_text(self.val_macro_f1)} (mean over folds"
        if self.kind == "nested":
            validation += (f" of each fold's best candidate; the paper configuration's "
                           f"{score_text(self.paper_val_macro_f1)}")
        return (f"{self.kind} estimate: {validation}), test pooled macro F1 {self.macro_f1:.2f} over {folds} "
                f"fold{'s' if folds != 1 else ''}")


def score_text(value: float) -> str:
    return "none" if math.isnan(value) else f"{value:.2f}"


def arm_estimates(exp: Experiment) -> dict[Arm, ArmEstimate]:
    """Every arm with finished folds: its nested estimate where a search ran for it, else its grid estimate; each
    with the validation score of its own trials and of its paper-configuration (grid) trials."""
    grid: dict[Arm, ArmEstimate] = {}
    main = exp.select_main(exp.predictions)
    try:
        check_one_trial_per_fold(main, exp.out_dir / "predictions.csv")
    except ValueError as error:
        raise PredictError(str(error)) from error
    metrics = arm_metrics(main, exp.classes, exp.main_arms())
    for (model, pretrained), folds in metrics.per_fold_overall.groupby(["model", "pretrained"]):
        overall = metrics.overall
        pooled = overall[(overall["model"] == model) & (overall["pretrained"] == pretrained)
                         & (overall["metric"] == "macro_f1")]["pooled"]
        arm = (str(model), bool(pretrained))
        grid[arm] = ArmEstimate(arm, "grid", float(pooled.iloc[0]),
                                {int(f): str(t) for f, t in zip(folds["fold"], folds["trial_name"])})
    estimates = dict(grid)
    studies = fold_studies(exp)
    if studies:
        selection, _ = select(exp, studies)
        estimate = nested_estimate(exp, selection)
        for row in estimate[(estimate["estimate"] == "nested") & (estimate["n_folds"] > 0)].itertuples(index=False):
            used = set(str(row.trials).split(";"))
            chosen = selection[(selection["model"] == row.model) & (selection["pretrained"] == row.pretrained)
                               & selection["trial_name"].isin(used)]
            arm = (str(row.model), bool(row.pretrained))
            estimates[arm] = ArmEstimate(arm, "nested", float(row.test_macro_f1_pooled),
                                         {int(f): str(t) for f, t in zip(chosen["fold"], chosen["trial_name"])})
    return {arm: dataclasses.replace(
        e, val_macro_f1=validation_score(exp, e.trials),
        paper_val_macro_f1=validation_score(exp, grid[arm].trials) if arm in grid else float("nan"))
        for arm, e in estimates.items()}


def validation_score(exp: Experiment, trials: dict[int, str]) -> float:
    """Mean over folds of each trial's best validation macro F1 (trials.csv), NaN when none is recorded."""
    if exp.trials is None or "best_val_macro_f1" not in exp.trials:
        return float("nan")
    scores = exp.trials.set_index("trial_name")["best_val_macro_f1"]
    values = [float(scores.loc[name]) for name in trials.values() if name in scores.index]
    return float(np.nanmean(values)) if values and not np.all(np.isnan(values)) else float("nan")


def no_finished_fold(exp: Experiment, arm: Arm | None) -> PredictError:
    """What the trials of ``arm`` (all arms for None) did instead of finishing, and how to finish them."""
    trials = exp.trials
    what = f"arm {arm_text(arm)}" if arm else "any arm"
    if trials is None:
        counts = "no trials.csv"
    else:
        mine = trials[(trials["model"] == arm[0]) & (trials["pretrained"] == arm[1])] if arm else trials
        statuses = sorted(mine["status"].value_counts().items())
        counts = ", ".join(f"{n} {status}" for status, n in statuses) or "no trials"
    return PredictError(f"{exp.out_dir} has no finished fold of {what} (trials.csv: {counts}). Fix what stopped them "
                        "(trials.csv's error column; the report's Failed trials), then run "
                        f"`{resume_hint(exp.out_dir)}`, which runs unfinished and failed trials again")


def choose_arm(exp: Experiment, requested: Arm | None) -> tuple[ArmEstimate, str]:
    """(the arm to predict with, why): the best validation score on a footing every arm shares; ties go to more
    folds, then to the paper's order.

    Not the best test score: choosing the arm whose test estimate is highest would make that estimate the winner
    of a comparison on test data, optimistic by as much as the arms' noise. Ranked on validation, the printed test
    figure is the chosen arm's estimate and nothing was chosen by it.

    The same footing: a searched arm's nested validation score is, in every fold, the best of that fold's
    candidates (the grid trial among them), so it beats the arm's own paper configuration by the selection alone,
    and a single configuration's score of an arm that was not searched would lose to it for that reason. So arms
    are ranked on the nested scores only when every arm was searched, else on every arm's paper-configuration
    (grid) score. The chosen arm then predicts with its own estimate's trials: a searched arm with each fold's
    selected configuration (chosen within the fold on inner validation).
    """
    estimates = arm_estimates(exp)
    present = sort_arms([*exp.planned_arms, *estimates, *(study.arm for study in fold_studies(exp))])
    if requested is not None:
        if requested not in present:
            raise PredictError(f"--arm {arm_text(requested)} is not an arm of {exp.out_dir}; its arms: "
                               f"{', '.join(arm_text(a) for a in present)}")
        if requested not in estimates:
            raise no_finished_fold(exp, requested)
        chosen = estimates[requested]
        return chosen, f"chosen with --arm ({chosen.describe()})"
    if not estimates:
        raise no_finished_fold(exp, None)
    searched = [e.arm for e in estimates.values() if e.kind == "nested"]
    on_nested = len(searched) == len(estimates)
    footing = (lambda e: e.val_macro_f1) if on_nested else (lambda e: e.paper_val_macro_f1)
    ranked = sorted(estimates.values(), key=lambda e: (np.isnan(footing(e)), -np.nan_to_num(footing(e)),
                                                       -len(e.trials), arm_sort_key(e.arm)))
    best, others = ranked[0], ranked[1:]
    if on_nested:
        how = ("highest nested validation score (every arm was searched, so every arm is ranked on each fold's best "
               "candidate alike)")
        label = "nested validation"
    elif searched:
        how = (f"highest validation score of the paper configuration, the footing every arm shares (not every arm "
               f"was searched: the nested score of {', '.join(arm_text(a) for a in searched)} is each fold's best "
               "of several candidates, which would beat a single configuration by the selection alone)")
        label = "paper-configuration validation"
    else:
        how = "highest validation score of the paper configuration (no arm was searched)"
        label = "grid validation"
    reason = f"{how}; {best.describe()}"
    if others:
        reason += "; others: " + ", ".join(
            f"{arm_text(e.arm)} {label} {score_text(footing(e))}"
            + (f" (nested {score_text(e.val_macro_f1)})" if e.kind == "nested" and not on_nested else "")
            + f", test {e.macro_f1:.2f}" for e in others)
    return best, reason + " (chosen on validation scores; the test figure played no part)"


# ---------------------------------------------------------------------------------------------- fold weights
@dataclass(frozen=True)
class FoldWeights:
    """One fold's final checkpoint: a local folder or ``<scheme>://...`` on remote storage."""

    fold: int
    trial_name: str
    checkpoint: str


def fold_weights(exp: Experiment, estimate: ArmEstimate) -> list[FoldWeights]:
    """Each fold's checkpoint, as the run recorded it (trials.csv), else from Ray Tune's records of the run."""
    trials = exp.trials
    if trials is not None and "checkpoint" in trials.columns:
        recorded, source = dict(zip(trials["trial_name"], trials["checkpoint"])), f"{exp.out_dir}/trials.csv"
    else:
        recorded, source = tune_checkpoints(exp), "Ray Tune's records of the run"
    folds = []
    for fold, name in sorted(estimate.trials.items()):
        location = str(recorded.get(name) or "")
        if not location:
            raise PredictError(f"Fold {fold}'s trial {name} has no checkpoint in {source}. Run "
                               f"`{resume_hint(exp.out_dir)}`, which collects the trials again and rewrites trials.csv")
        folds.append(FoldWeights(fold, name, exp.relocated(location)))
    return folds


def tune_checkpoints(exp: Experiment) -> dict[str, str]:
    """trial name -> final checkpoint from Ray Tune's own experiment state (runs made before trials.csv recorded it)."""
    from ray.tune import ExperimentAnalysis  # Ray only for old runs: a second or more to import

    from trainables.collect import checkpoint_location
    from trainables.ray_trainable import trial_name

    storage = str((exp.meta.get("options") or {}).get("storage") or exp.out_dir / "ray").rstrip("/")
    runs = list((exp.meta.get("tune_runs") or {}).values()) or [f"{storage}/{kind}" for kind in ("paper", "search")]
    found, looked = {}, []
    for run in runs:
        run = exp.relocated(str(run))
        looked.append(run)
        try:
            analysis = ExperimentAnalysis(run)
        except (ValueError, FileNotFoundError, OSError):
            continue  # not there (a run kind this experiment did not use, or storage that moved)
        for trial in analysis.trials:
            location = checkpoint_location(trial.checkpoint)
            if location:
                found[trial_name(trial.config)] = location
    if not found:
        raise PredictError(f"{exp.out_dir}/trials.csv has no checkpoint column (a run made before it existed) and no "
                           f"Tune run with checkpoints was found (looked in {', '.join(looked)}). Run "
                           f"`{resume_hint(exp.out_dir)}`, which rewrites trials.csv with each trial's checkpoint")
    return found


def read_checkpoint_file(checkpoint: str, name: str, trial: str, run_dir: Path) -> bytes:
    """One file of a checkpoint folder, through pyarrow's filesystem for its location (local, s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" in checkpoint:
        filesystem, folder = pyarrow.fs.FileSystem.from_uri(checkpoint)
    else:
        filesystem, folder = pyarrow.fs.LocalFileSystem(), str(Path(checkpoint).resolve())
    try:
        content = read_from_folder(filesystem, folder, name)
        if content is None:
            raise FileNotFoundError(f"{folder.rstrip('/')}/{name}")
        return content
    except (FileNotFoundError, OSError) as error:
        raise PredictError(f"Trial {trial}'s checkpoint has no readable {name} at {checkpoint} ({error}). If the run "
                           f"or its --storage moved, run `{resume_hint(run_dir)}` where they are now, which rewrites "
                           "trials.csv with the checkpoints' new places; if the checkpoint or the file was deleted, "
                           "the same command trains that fold again") from None


def damaged_checkpoint(checkpoint: str, name: str, trial: str, run_dir: Path, error: BaseException) -> PredictError:
    """A checkpoint file that is there but cannot be read (truncated copy, disk error): the file and the fix."""
    detail = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:160]
    return PredictError(f"Trial {trial}'s {checkpoint.rstrip('/')}/{name} is damaged and cannot be read "
                        f"({type(error).__name__}{': ' + detail if detail else ''}). If the run was copied, copy that "
                        f"file again; otherwise delete the folder {checkpoint} and run `{resume_hint(run_dir)}`, which "
                        "trains that fold again")


@dataclass
class FoldModel:
    weights: FoldWeights
    config: dict[str, Any]  # the trial's training config (result.json)
    sha256: str  # of best_weights.pt, so the output says exactly which weights made it
    model: nn.Module


def load_fold_model(weights: FoldWeights, arm: Arm, classes: Sequence[str], channels: int,
                    run_dir: Path) -> FoldModel:
    """The fold's network on the CPU in eval mode with its best weights; built as the trial built it, from scratch
    (the saved weights replace every tensor, so Kinetics weights are not needed here)."""
    summary = read_checkpoint_file(weights.checkpoint, SUMMARY_FILE, weights.trial_name, run_dir)
    try:
        config = json.loads(summary)["config"]
    except (ValueError, KeyError, TypeError) as error:  # cut short or overwritten
        raise damaged_checkpoint(weights.checkpoint, SUMMARY_FILE, weights.trial_name, run_dir, error) from None
    if (config["model"], bool(config["pretrained"])) != arm or int(config["fold"]) != weights.fold:
        raise PredictError(f"{weights.checkpoint}/{SUMMARY_FILE} is trial {config['model']} fold {config['fold']}, "
                           f"not {arm_text(arm)} fold {weights.fold} as {weights.trial_name}: trials.csv does not "
                           f"match the checkpoints; run `{resume_hint(run_dir)}` to rewrite it")
    raw = read_checkpoint_file(weights.checkpoint, FINAL_WEIGHTS_FILE, weights.trial_name, run_dir)
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load's ways to say "not a complete PyTorch file": truncated, overwritten
        raise damaged_checkpoint(weights.checkpoint, FINAL_WEIGHTS_FILE, weights.trial_name, run_dir, error) from None
    if not isinstance(state, dict):
        raise damaged_checkpoint(weights.checkpoint, FINAL_WEIGHTS_FILE, weights.trial_name, run_dir,
                                 TypeError(f"a {type(state).__name__}, not a state dict"))
    model = build_model(config["model"], num_classes=len(classes), in_channels=channels, dropout=config["dropout"])
    try:
        model.load_state_dict(state)  # float32 (runs before 2026-11-24 stored float16: copied into float32)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise PredictError(f"{weights.checkpoint}/{FINAL_WEIGHTS_FILE} does not fit {config['model']} with {channels} "
                           f"input channel(s) and {len(classes)} classes ({detail}): the checkpoint is not from this "
                           "run's data") from None
    return FoldModel(weights, config, hashlib.sha256(raw).hexdigest(), model.eval())


# ---------------------------------------------------------------------------------------------- inputs
def file_record(path: str) -> SubjectRecord:
    """FILES: one volume per subject, the id its file name without the NIfTI suffix."""
    name = Path(path).name
    stem = next((name[:-len(s)] for s in NIFTI_SUFFIXES if name.endswith(s)), Path(path).stem)
    return SubjectRecord(stem, "", (str(Path(path).resolve()),), group=stem, source="files")


@dataclass(frozen=True)
class ChannelNames:
    """Input channels by name, in channel order: ``path_<contrast>`` columns of a manifest or contrasts."""

    names: tuple[str, ...] | None  # None: not known
    source: str  # where the names come from, or why they are not known

    def text(self) -> str:
        return ", ".join(self.names or ())

    def keys(self) -> list[str | None] | None:
        return None if self.names is None else [channel_key(name) for name in self.names]


@dataclass(frozen=True)
class InputChannels:
    """The input's channels beside the run's, what their comparison found, and the classes a --data-root input
    was restricted to; written into the provenance's ``inputs``."""

    given: ChannelNames
    run: ChannelNames
    check: str  # "same as the run's", "differs from the run's (...)", or "not checked: <why>"
    selected_classes: tuple[str, ...] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"channels": None if self.given.names is None else list(self.given.names),
                "channels_from": self.given.source,
                "run_channels": None if self.run.names is None else list(self.run.names),
                "run_channels_from": self.run.source, "channel_check": self.check,
                "selected_classes": None if self.selected_classes is None else list(self.selected_classes)}


def channel_key(name: str) -> str | None:
    """The contrast a channel name stands for: without a ``path_`` prefix, regardless of case and surrounding spaces,
    the RSNA and BraTS spellings of one sequence as one (t1ce = T1wCE); None for a bare ``path`` column."""
    text = name.strip().casefold()
    if text.startswith("path_"):
        text = text[len("path_"):].strip()
    elif text == "path":
        return None
    return SEQUENCE_ALIASES.get(text, text).casefold() if text else None


def run_channels(exp: Experiment, channels: int) -> ChannelNames:
    """The run's input channels by name: its recorded contrasts (--data-root runs); for a --manifest run the path
    columns of its manifest, read now from the file experiment.json names (neither experiment.json nor the cache
    entry records those names), else unknown, with why."""
    recorded = exp.meta.get("channel_names")  # runs since it was recorded: the names training fed, in order
    if isinstance(recorded, list) and len(recorded) == channels:
        return ChannelNames(tuple(str(n) for n in recorded), f"{exp.out_dir}/experiment.json channel_names")
    manifest = exp.meta.get("manifest")
    if not manifest:
        return ChannelNames(tuple(exp.meta.get("contrasts") or ("t1ce",)), f"{exp.out_dir}/experiment.json contrasts")
    path = Path(exp.relocated(str(manifest)))
    unknown = (f"{exp.out_dir} was trained on a manifest whose path columns name its channels; its experiment.json "
               "(written before runs recorded channel_names) and the cache entry record only their number")
    if not path.is_file():
        return ChannelNames(None, f"{unknown}, and its manifest {manifest} is no longer there")
    try:
        names = manifest_path_columns(path)
    except (ValueError, OSError) as error:  # pandas' EmptyDataError and ParserError are ValueErrors
        return ChannelNames(None, f"{unknown}, and its manifest {path} is unreadable now ({type(error).__name__})")
    if len(names) != channels:
        return ChannelNames(None, f"{unknown}, and its manifest {path} has {len(names)} path column(s) now where the "
                                  f"run had {channels} channel(s): the file changed since the run")
    return ChannelNames(names, f"the path columns of its manifest {path}")


def compare_channels(given: ChannelNames, run: ChannelNames) -> str:
    """"same", "different", or why the two cannot be compared (a name is unknown, or a bare ``path`` column)."""
    if run.names is None:
        return run.source
    if given.names is None:
        return given.source
    mine, theirs = given.keys(), run.keys()
    if None in mine or None in theirs:
        return (f"a column `path` names no contrast ({given.text()} given, the run's {run.text()}: "
                f"{run.source})")
    return "same" if mine == theirs else "different"


def input_records(args: argparse.Namespace, exp: Experiment,
                  channels: int) -> tuple[list[SubjectRecord], InputChannels]:
    """The subjects to predict, each with one file per input channel of the run, and their channels beside the
    run's (refused: another number of files; a manifest whose path columns are not the run's channels, in its
    order; a channel order that cannot be checked is said in a note)."""
    run = run_channels(exp, channels)
    if args.files:
        if channels > 1:
            raise PredictError(f"{exp.out_dir} was trained on {channel_text(exp, channels)}; bare FILES give one "
                               "volume per subject. Write a manifest with a subject_id column and one path_<contrast> "
                               "column per channel, in the run's order, and pass --manifest")
        given = ChannelNames(None, "bare FILES name no contrast")
        taken = f"the run's {run.text()} channel" if run.names is not None else "the run's single channel"
        why = "" if run.names is not None else f" ({run.source})"
        note = f"bare FILES name no contrast: each volume is read as {taken}{why}, which is not checked"
        records = [file_record(f) for f in args.files]
        by_id: dict[str, list[str]] = {}
        for record in records:  # resolved: a/x.nii.gz and ./a/x.nii.gz are one file, which validation names
            by_id.setdefault(record.subject_id, []).append(record.paths[0])
        same = {sid: paths for sid, paths in by_id.items() if len(set(paths)) > 1}
        if same:  # p1/t1ce.nii.gz and p2/t1ce.nii.gz: validation would refuse both as one duplicated subject
            sid, paths = next(iter(same.items()))
            raise PredictError(f"FILES {', '.join(paths)} would all be subject {sid}: a bare FILE's id is its name "
                               f"without the suffix ({len(same)} such name(s)). Rename them, or write a manifest "
                               "with subject_id and path columns and pass --manifest")
        print(f"note: {note}", file=sys.stderr)
        return records, InputChannels(given, run, f"not checked: {note}")
    if args.manifest:
        records = read_manifest(args.manifest, require_label=False)
        given = ChannelNames(manifest_path_columns(args.manifest), f"the path columns of --manifest {args.manifest}")
        check_file_count(records, f"--manifest {args.manifest} has {{n}} path column(s)", exp, channels)
        verdict = compare_channels(given, run)
        if verdict == "different":
            raise PredictError(manifest_order_error(args.manifest, given, run, exp))
        if verdict != "same":
            print(f"note: whether --manifest {args.manifest}'s path columns ({given.text()}) are the run's channels in "
                  f"its order cannot be checked: {verdict}. Channel k goes to the weights trained on the run's "
                  "channel k: make sure the columns are in the run's order", file=sys.stderr)
        return records, InputChannels(given, run, "same as the run's" if verdict == "same" else
                                      f"not checked: {verdict}")
    contrasts = tuple(c.strip() for c in (args.contrasts or "").split(",") if c.strip())
    named = f"--contrasts {args.contrasts}"
    given = ChannelNames(contrasts, named)
    if not contrasts:
        contrasts, named = default_contrasts(exp, run)
        given = ChannelNames(contrasts, named)
    if len(contrasts) != channels:
        raise PredictError(f"{named} name {len(contrasts)} contrast(s), but {exp.out_dir} was trained on "
                           f"{channel_text(exp, channels)}; pass --contrasts with that many, in the run's order")
    verdict = compare_channels(given, run)
    if verdict == "different":
        print(f"warning: {contrast_warning(contrasts, exp, run)}", file=sys.stderr)
        check = "differs from the run's (--contrasts: predicted with a warning)"
    elif verdict == "same":
        check = "same as the run's"
    else:
        print(f"note: whether {named} are the contrasts {exp.out_dir} was trained on, in its order, cannot be "
              f"checked: {verdict}", file=sys.stderr)
        check = f"not checked: {verdict}"
    subset = (exp.meta.get("options") or {}).get("classes")  # the run's --classes, as training passed it
    records = load_records(DataSpec(data_root=args.data_root, contrasts=contrasts,
                                    classes=tuple(subset) if subset else None))
    if subset:
        records = run_class_subset(records, tuple(subset), exp, args.data_root)
    check_file_count(records, f"--data-root {args.data_root} gives {{n}} file(s) per subject", exp, channels)
    return records, InputChannels(given, run, check, tuple(subset) if subset else None)


def check_file_count(records: Sequence[SubjectRecord], given: str, exp: Experiment, channels: int) -> None:
    """Refuses another number of files per subject than the run's channels; ``given`` says it, with ``{n}``."""
    if records and len(records[0].paths) != channels:
        raise PredictError(f"{given.format(n=len(records[0].paths))}, but {exp.out_dir} was trained on "
                           f"{channel_text(exp, channels)}; give one file per channel, in the run's order")


def default_contrasts(exp: Experiment, run: ChannelNames) -> tuple[tuple[str, ...], str]:
    """(--data-root's contrasts when --contrasts is not given, how they are named in messages): the run's."""
    if exp.meta.get("manifest"):
        if run.names is not None and None not in run.keys():
            contrasts = tuple(name.strip()[len("path_"):].strip() for name in run.names)
            return contrasts, f"The path columns of the run's manifest ({','.join(run.names)})"
        return ("t1ce",), "The default contrast (t1ce; the names of the run's channels are unknown)"
    contrasts = tuple(exp.meta.get("contrasts") or ("t1ce",))
    return contrasts, f"The run's recorded contrasts ({','.join(contrasts)})"


def manifest_order_error(manifest: str, given: ChannelNames, run: ChannelNames, exp: Experiment) -> str:
    """A manifest whose path columns are other contrasts than the run's, or the same in another order."""
    expected = [name if exp.meta.get("manifest") else f"path_{name}" for name in run.names or ()]
    if sorted(map(str, given.keys())) == sorted(map(str, run.keys())):
        what, fix = "the run's contrasts in another order", "Reorder the path columns to"
    else:
        what, fix = "other contrasts than the run's", "Rename (or replace) the path columns so that they are"
    return (f"--manifest {manifest} has path columns {given.text()} (in that order), but {exp.out_dir} was trained "
            f"on {run.text()} ({run.source}, in that order): {what}. Channel k of the manifest goes to the weights "
            f"trained on the run's channel k, so a channel would be read by weights trained on another contrast. "
            f"{fix} {', '.join(expected)}, in that order (names compare regardless of case; t1ce = T1wCE, t1 = T1w, "
            "t2 = T2w)")


def run_class_subset(records: list[SubjectRecord], subset: tuple[str, ...], exp: Experiment,
                     data_root: str) -> list[SubjectRecord]:
    """The --data-root subjects of the run's --classes, selected as training selected them (``select_classes``
    after ``class_order``): an LGG/HGG run of a BraTS+IXI root leaves IXI's Healthy out instead of refusing it."""
    kept = select_classes(records, class_order(records, subset))
    kept_ids = {r.subject_id for r in kept}
    left_out = Counter(r.label for r in records if r.subject_id not in kept_ids)
    print(f"note: {exp.out_dir} was trained on --classes {','.join(subset)} (its experiment.json options), so only "
          f"--data-root subjects of those classes are listed, as training listed them"
          + (f"; left out: {', '.join(f'{label} ({n})' for label, n in sorted(left_out.items()))}" if left_out else ""),
          file=sys.stderr)
    if not kept:
        raise PredictError(f"--data-root {data_root} has no subject of the classes {exp.out_dir} was trained on "
                           f"(--classes {','.join(subset)}); point it at data of those classes")
    return kept


def contrast_warning(contrasts: Sequence[str], exp: Experiment, run: ChannelNames | None = None) -> str | None:
    """--contrasts naming other contrasts than the run's (BraTS and RSNA spellings of one contrast count as one): the
    channel count fits, so the models would read them, but each channel was trained on another contrast. For a
    manifest run, its manifest's path columns are the run's contrasts (None when the file is gone). ``run``: the
    run's channels when the caller has them already (else read again)."""
    run = run or run_channels(exp, len(contrasts))
    if run.names is None:
        return None
    given = ChannelNames(tuple(contrasts), "--contrasts")
    if compare_channels(given, run) != "different":
        return None
    trained = run.text() if not exp.meta.get("manifest") else f"{run.text()}: {run.source}"
    return (f"--contrasts {','.join(contrasts)} are not the contrasts {exp.out_dir} was trained on "
            f"({trained}, in that order): each channel goes to weights trained on another contrast, so "
            "the predictions are out of the training distribution")


def check_labels(records: Sequence[SubjectRecord], classes: Sequence[str]) -> None:
    """Labels are optional, but a given one must be a class of the run: otherwise it cannot be scored."""
    unknown = sorted({r.label for r in records if r.label and r.label not in classes})
    if unknown:
        subjects = [r.subject_id for r in records if r.label in unknown][:COHORT_IDS_SHOWN]
        raise PredictError(f"Label(s) {', '.join(map(repr, unknown))} (e.g. subject(s) {', '.join(subjects)}) are not "
                           f"classes of the run ({', '.join(classes)}), so they cannot be scored: correct them, or "
                           "list the subjects in a --manifest without a label column to predict without a score")


def keep_or_refuse(records: list[SubjectRecord], problems: list[Problem], step: str,
                   skip_invalid: bool) -> list[SubjectRecord]:
    """The records left after a step's failures: every failure stops unless --skip-invalid (never all of them)."""
    if not problems:
        return records
    lines = "\n".join(f"  {p.path or '-'}: {p.reason} (subject {p.subject_id})" for p in problems)
    failed = {p.subject_id for p in problems}
    kept = [r for r in records if r.subject_id not in failed]
    if not skip_invalid or not kept:
        skip = ", or pass --skip-invalid to leave them out" if kept else ""
        raise PredictError(f"{len(problems)} of {len(records)} subjects failed {step}; fix or remove these files"
                           f"{skip}:\n{lines}")
    print(f"warning: left out (--skip-invalid), {len(problems)} subject(s) failed {step}:\n{lines}", file=sys.stderr)
    return kept


def survivors(records: list[SubjectRecord], transformed: list[SubjectRecord], problems: list[Problem], step: str,
              skip_invalid: bool) -> list[SubjectRecord]:
    """``transformed`` (a step's output records, its failures left out) once ``keep_or_refuse`` allowed them."""
    kept = {r.subject_id for r in keep_or_refuse(records, problems, step, skip_invalid)}
    return [r for r in transformed if r.subject_id in kept]


def stripping_warning(records: Sequence[SubjectRecord], profiles: dict[str, dict], exp: Experiment) -> str | None:
    """New volumes stripped differently from every volume of the run are out of its distribution: say which."""
    subjects = exp.subjects
    if subjects is None or "stripped" not in subjects.columns:
        return None
    run = {bool(v) for v in subjects["stripped"] if v is not None}
    if len(run) != 1:
        return None  # a mixed or unknown run: nothing to compare with
    run_stripped = run.pop()
    odd = [r.subject_id for r in records
           if all(looks_stripped(profiles[p]) for p in r.paths) != run_stripped]
    if not odd:
        return None
    new, old = ("unstripped (no zero background)", "skull-stripped") if run_stripped else ("skull-stripped",
                                                                                           "unstripped")
    fix = " Strip them as the training data was (e.g. FSL bet) first." if run_stripped else ""
    return (f"{len(odd)} of {len(records)} new volume(s) look {new}, while every volume of the run was {old}: their "
            f"predictions are out of the training distribution ({', '.join(odd[:COHORT_IDS_SHOWN])}"
            f"{' ...' if len(odd) > COHORT_IDS_SHOWN else ''}).{fix}")


# The run's cohort (run_cohort_matches). The acquisition-profile fields that pin down a volume's content whatever its
# file is called, where it lies and how it is stored (dtype is left out: the same intensities saved as int16 or
# float32 are the same volume to the models).
CONTENT_NUMERIC = ("shape_x", "shape_y", "shape_z", "voxel_x", "voxel_y", "voxel_z", "fg_volume_ml", "fg_median",
                   "fg_p99", "zero_fraction", "border_zero_fraction")
CONTENT_TEXT = ("orientation",)
CONTENT_RTOL = 1e-9  # the same measurement read back from subjects.csv: equal up to float text round-trips
# File-name endings that name a scan of a subject rather than the subject: BraTS's <id>_<contrast>.nii.gz (and its
# segmentation), the RSNA sequence names; IXI's <id>-T1[_brain] is datasets.sources.IXI_PATTERN.
SCAN_SUFFIXES = frozenset({*BRATS_CONTRASTS, "seg", *SEQUENCE_ALIASES})
MATCH_KINDS = {"id": "same id", "content": "the same volume, by content",
               "name": "another scan of that subject, by file name",
               "group": "the same group (patient), by the manifest's group column"}


@dataclass(frozen=True)
class CohortMatch:
    """Why a new subject counts as one of the run's: ``by`` "id", "content", "name" or "group" (see
    ``run_cohort_matches``)."""

    run_subjects: tuple[str, ...]  # the run's subject id(s) it matches
    by: str

    def describe(self, subject_id: str) -> str:
        if self.by == "id":
            return subject_id
        return f"{subject_id} = run subject {' / '.join(self.run_subjects)} ({MATCH_KINDS[self.by]})"


def scan_names(record: SubjectRecord) -> set[str]:
    """The subject ids the run's layouts would give the record's files: a BraTS ``<id>_<contrast>`` file is subject
    ``<id>``, an IXI ``<id>-T1[_brain]`` file is subject ``<id>``; and each file's own stem."""
    names = set()
    for path in record.paths:
        name = Path(path).name
        stem = next((name[:-len(s)] for s in NIFTI_SUFFIXES if name.endswith(s)), Path(path).stem)
        names.add(stem)
        head, _, tail = stem.rpartition("_")
        if head and tail.casefold() in SCAN_SUFFIXES:
            names.add(head)
        if (ixi := IXI_PATTERN.match(name)) is not None:
            names.add(ixi.group(1))
    return names


def cohort_profiles(subjects: pd.DataFrame | None) -> pd.DataFrame | None:
    """The run's subjects with every content field of their profile, or None (no subjects.csv, or one written
    before profiles were recorded)."""
    if subjects is None or not set(CONTENT_NUMERIC + CONTENT_TEXT) <= set(subjects.columns):
        return None
    known = subjects[subjects[list(CONTENT_NUMERIC)].notna().all(axis=1)]
    digest = [CONTENT_DIGEST] if CONTENT_DIGEST in known.columns else []  # runs since subjects.csv records it
    return known[["subject_id", *CONTENT_NUMERIC, *CONTENT_TEXT, *digest]].reset_index(drop=True)


def same_content(profile: dict | None, cohort: pd.DataFrame | None) -> list[str]:
    """The run subjects whose first file has the same voxels as ``profile``'s file (``CONTENT_DIGEST``, whatever
    the header says), or whose recorded profile equals ``profile`` in every content field (sorted ids)."""
    if profile is None or cohort is None or cohort.empty:
        return []
    by_digest = set()
    if CONTENT_DIGEST in cohort.columns and profile.get(CONTENT_DIGEST):
        by_digest = {str(s) for s in cohort.loc[cohort[CONTENT_DIGEST].astype(str) == profile[CONTENT_DIGEST],
                                                "subject_id"]}
    try:
        mine = np.array([float(profile[c]) for c in CONTENT_NUMERIC])
    except (KeyError, TypeError, ValueError):
        return sorted(by_digest)
    equal = np.isclose(cohort[list(CONTENT_NUMERIC)].to_numpy(dtype=float), mine, rtol=CONTENT_RTOL,
                       atol=0).all(axis=1)
    for column in CONTENT_TEXT:
        equal &= (cohort[column].astype(str) == str(profile.get(column))).to_numpy()
    return sorted(by_digest | {str(s) for s in cohort.loc[equal, "subject_id"]})


def run_cohort_matches(records: Sequence[SubjectRecord], profiles: dict[str, dict | None],
                       exp: Experiment) -> list[CohortMatch | None]:
    """For each record, the run subject(s) it is (None: none found); ``profiles``: subject id -> the acquisition
    profile validation measured for the record's first file (the file subjects.csv profiled for the run's subjects).

    Matched, in this order: 1. **id**: the subject id is in subjects.csv. 2. **content**: the first file's voxel
    values (``datasets.validation.content_digest``, recorded in subjects.csv since the duplicate-scan check: the same
    voxels whatever the file's name, format, data type, axis order or header) equal a cohort subject's, or its
    acquisition profile (matrix, voxel size, orientation, foreground volume, foreground median and 99th percentile,
    zero and border-zero fractions; older runs) does. 3. **name**: a file is named as the
    run's layouts name a scan of a cohort subject (``<id>_flair.nii.gz``, ``<id>-T1_brain.nii``): another contrast
    of that subject, so the same anatomy and tumour. 4. **group**: the new manifest's ``group`` (patient) is a cohort
    subject's group: another scan (a later time point) of that patient.

    Why these: bare FILES get their id from the file name, so a cohort volume copied or renamed (or BraTS's
    ``<id>_t1ce.nii.gz``, id ``<id>_t1ce``) passes the id check. The run keeps no path or checksum of its cohort's
    files: the cache key hashes path, size and mtime into one digest that cannot be taken apart; the cache entry's
    meta.json checksums only its own volumes.npy and subjects.csv; the validation cache beside the entry lists every
    file ever checked under that cache folder, not the cohort, and does not travel with the run. Re-finding the
    cohort's files from experiment.json's --data-root/--manifest needs the data where it was (often not on the
    machine that predicts), and a checksum of raw bytes misses the same volume recompressed or re-saved. Comparing
    preprocessed volumes with the cache's volumes.npy reads the whole entry (GBs) and is not bit-reproducible after
    ANTs registration. The profile costs nothing: validation measured it for every input already, and subjects.csv
    (kept with the run) holds the cohort's. It is invariant to file name, place, compression and stored dtype, and
    its intensity statistics (medians and percentiles of a million-voxel foreground, the exact foreground voxel
    count) make two different scans agreeing in every field implausible. What it cannot see: a cohort volume
    changed in content (resampled, reoriented, rescaled, cropped) is a different volume to it, and to the models.
    """
    subjects = exp.subjects
    if subjects is None:
        return [None] * len(records)
    ids = set(subjects["subject_id"])
    # A manifest's group (another time point of a run patient) is that patient: same anatomy and tumour. Without a
    # group column a manifest row's group is its id, which may be a run patient's group name all the same; a bare
    # FILE's is only its file name, and is not compared.
    groups = (subjects.groupby(subjects["group"].astype(str))["subject_id"].apply(list).to_dict()
              if "group" in subjects.columns else {})
    cohort = cohort_profiles(subjects)
    matches: list[CohortMatch | None] = []
    for record in records:
        if record.subject_id in ids:
            matches.append(CohortMatch((record.subject_id,), "id"))
        elif same := same_content(profiles.get(record.subject_id), cohort):
            matches.append(CohortMatch(tuple(same), "content"))
        elif named := sorted(ids & scan_names(record)):
            matches.append(CohortMatch(tuple(named), "name"))
        elif record.source == "manifest" and (kin := sorted(groups.get(record.group, ()))):
            matches.append(CohortMatch(tuple(kin), "group"))
        else:
            matches.append(None)
    return matches


def cohort_warning(records: Sequence[SubjectRecord], matches: Sequence[CohortMatch | None]) -> str | None:
    """The subjects that are the run's own, each with the run subject it matches when its id differs."""
    found = [match.describe(r.subject_id) for r, match in zip(records, matches) if match is not None]
    if not found:
        return None
    return (f"{len(found)} of {len(records)} subject(s) are in the run's own subjects.csv "
            f"({', '.join(found[:COHORT_IDS_SHOWN])}{' ...' if len(found) > COHORT_IDS_SHOWN else ''}): they were "
            "training data of the run (of every fold but their own test fold), so their predictions are not an "
            "independent test (column in_run_cohort; which run subject each matches: in_run_cohort_matches in "
            "the .json)")


# ---------------------------------------------------------------------------------------------- prediction
def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: torch sees no CUDA device here; use --device cpu (or auto)")
    return torch.device(choice)


@contextlib.contextmanager
def ieee_float32_convolutions() -> Iterator[None]:
    """Float32 convolutions in full float32 while the block runs, whatever the process set before.

    cuDNN runs float32 convolutions in TF32 (a 10-bit mantissa) on Ampere and later GPUs by default, so GPU
    probabilities would differ from the CPU's by ~1e-3 instead of by rounding, and "float32" in the provenance
    would be untrue. Prediction is cheap enough to afford the exact kernels. (torch's new per-operator API; it
    does not mix with the legacy ``allow_tf32`` flag.)
    """
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


def predict_volumes(model: nn.Module, volumes: np.ndarray, batch_size: int, device: torch.device,
                    progress: Callable[[int], None] = lambda done: None) -> np.ndarray:
    """Softmax probabilities (N, K) of (N, C, X, Y, Z) RAS volumes, in the layout and order training used."""
    probabilities = []
    with torch.inference_mode(), ieee_float32_convolutions():
        for start in range(0, len(volumes), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(volumes[start:start + batch_size])).to(device)
            logits = model(batch_to_video_layout(batch).float())
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
            progress(min(start + batch_size, len(volumes)))
    return torch.cat(probabilities).numpy().astype(np.float64)


def progress_printer(label: str, total: int, batch_size: int) -> Callable[[int], None]:
    """Prints ``label: done/total volumes`` about PROGRESS_LINES times per fold, and at the end."""
    step = max(batch_size, math.ceil(total / PROGRESS_LINES))
    printed = [0]

    def report(done: int) -> None:
        if done == total or done - printed[0] >= step:
            printed[0] = done
            print(f"{label}: {done}/{total} volumes", flush=True)

    return report


def ensemble_tables(records: Sequence[SubjectRecord], classes: Sequence[str], folds: Sequence[FoldModel],
                    probabilities: Sequence[np.ndarray], cohort: Sequence[bool]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the ensemble table, the per-fold long table); see the module docstring for the columns."""
    stacked = np.stack(probabilities)  # (folds, subjects, classes)
    mean = stacked.mean(axis=0)
    spread = stacked.std(axis=0, ddof=1) if len(folds) > 1 else np.full_like(mean, np.nan)
    names = np.asarray(classes, dtype=object)
    table: dict[str, Any] = {"subject_id": [r.subject_id for r in records]}
    if any(r.label for r in records):
        table["label"] = [r.label for r in records]
    table.update({f"prob_{c}": mean[:, i] for i, c in enumerate(classes)})
    table["pred"] = names[mean.argmax(axis=1)]
    table.update({f"prob_{c}_sd": spread[:, i] for i, c in enumerate(classes)})
    table["n_folds"] = len(folds)
    table.update({f"fold{f.weights.fold}_pred": names[p.argmax(axis=1)] for f, p in zip(folds, probabilities)})
    table["in_run_cohort"] = list(cohort)
    long = pd.concat([pd.DataFrame({"subject_id": [r.subject_id for r in records], "fold": f.weights.fold,
                                    "trial_name": f.weights.trial_name, "pred": names[p.argmax(axis=1)],
                                    **{f"prob_{c}": p[:, i] for i, c in enumerate(classes)}})
                      for f, p in zip(folds, probabilities)], ignore_index=True)
    return pd.DataFrame(table), long


def score(table: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any] | None:
    """Accuracy and macro F1 (scikit-learn, as the report) on the labelled subjects; None without labels.

    Macro F1 averages over the run's classes that have a labelled subject here: a class without one has no F1 to
    speak of (scikit-learn counts it as 0, so ten correctly predicted Healthy scans scored 0.333 for a three-class
    run). Those classes are named in ``classes_without_subjects``; a prediction of one still costs the recall of
    the subject's own class.
    """
    if "label" not in table.columns:
        return None
    labelled = table[table["label"] != ""]
    given = set(labelled["label"])
    present = [c for c in classes if c in given]
    metrics = overall_metrics(labelled["label"], labelled["pred"], present)
    return {"n_labelled": len(labelled), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "macro_f1_classes": present, "classes_without_subjects": [c for c in classes if c not in given],
            "n_in_run_cohort": int(labelled["in_run_cohort"].sum())}


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --output folder of a tune_main.py run")
    p.add_argument("files", nargs="*", metavar="FILES", help="NIfTI volumes, one per subject (id = file stem)")
    p.add_argument("--data-root", help="a folder in any layout tune_main.py --data-root reads; labels come with it")
    p.add_argument("--manifest", help="CSV: subject_id, path or path_<contrast>..., optional label")
    p.add_argument("--output", required=True, help="the predictions CSV; <stem>_folds.csv and <stem>.json go beside it")
    p.add_argument("--arm", help="MODEL:scratch or MODEL:kinetics (default: the arm with the best estimate)")
    p.add_argument("--contrasts", help="--data-root: comma list of contrasts, in the run's order (default: the run's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--batch-size", type=int, default=4, help="volumes per forward pass (4)")
    p.add_argument("--workers", type=int, help="preprocessing processes (default: as training, up to 8)")
    p.add_argument("--cache-dir", help="where DICOM series converted to NIfTI and (for --register mni runs) registered "
                                       "volumes are cached (default <output stem>_cache beside --output)")
    p.add_argument("--skip-invalid", action="store_true", help="leave invalid volumes out (listed) instead of stopping")
    return p


def check_args(args: argparse.Namespace) -> Path:
    """The --output path; refuses a source other than exactly one of --data-root, --manifest and FILES."""
    given = [name for name, value in (("--data-root", args.data_root), ("--manifest", args.manifest),
                                      ("FILES", args.files)) if value]
    if len(given) != 1:
        raise PredictError(f"give exactly one of --data-root DIR, --manifest CSV and FILES (got "
                           f"{' and '.join(given) or 'none'})")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 1:
        raise PredictError(f"--workers must be at least 1, got {args.workers}")
    output = Path(args.output).resolve()
    if output.suffix.lower() != ".csv":
        raise PredictError(f"--output {args.output} must be a .csv file (its _folds.csv and .json go beside it)")
    return output


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_intermixed_args(argv)  # FILES may come after options (RUN_DIR --arm X a.nii b.nii)
    try:
        return predict(args)
    except (ValueError, FileNotFoundError) as error:  # PredictError, and the data readers' own refusals
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted:  # Ctrl-C in preprocessing or registration: its one line (logged) said what a rerun does
        return 130
    except KeyboardInterrupt:
        print("\nInterrupted: no predictions were written; rerun the same command.", file=sys.stderr)
        return 130


def prepare_volumes(args: argparse.Namespace, exp: Experiment, records: list[SubjectRecord],
                    config: PreprocessConfig, output: Path
                    ) -> tuple[list[SubjectRecord], np.ndarray, Path | None, list[CohortMatch | None]]:
    """(the subjects kept, their volumes as the models expect them, the registration cache or None, the run subject
    each one is, if any: ``run_cohort_matches``): converted from DICOM and validated as training does, registered
    when the run was, and preprocessed; warns about volumes unlike the run's and subjects from its cohort."""
    work_dir = Path(args.cache_dir).resolve() if args.cache_dir else output.with_name(f"{output.stem}_cache")
    converted, failed = convert_records(records, dicom_cache_dir(work_dir))  # DICOM series (RSNA layout) only
    records = survivors(records, converted, failed, "DICOM conversion", args.skip_invalid)
    # Labels were checked before; the per-file verdicts are cached like training's, so a rerun does not reopen files.
    report = validate_records(records, tuple(sorted({r.label for r in records})), work_dir / "validation.json")
    records = keep_or_refuse(records, report.problems, "validation", args.skip_invalid)
    # The raw first file's profile, as subjects.csv holds the run's (before registration gives records new paths).
    profiles = {r.subject_id: report.profiles.get(r.paths[0]) for r in records}
    warning = stripping_warning(records, report.profiles, exp)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    registration_cache = None
    if config.register != "none":
        from datasets.registration import register_records  # ANTsPy only when the run registered

        registration_cache = work_dir
        registered, failed = register_records(records, registration_cache, method=config.register,
                                              spacing=config.spacing, num_workers=args.workers)
        records = survivors(records, registered, failed, "registration to MNI152", args.skip_invalid)
    volumes, failed = preprocess_volumes(records, config, num_workers=args.workers)
    records = keep_or_refuse(records, failed, "preprocessing", args.skip_invalid)
    matches = run_cohort_matches(records, profiles, exp)
    warning = cohort_warning(records, matches)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if exp.subjects is None:
        print(f"note: {exp.out_dir} has no subjects.csv, so whether these subjects were its training data cannot be "
              "checked (column in_run_cohort is False for all)", file=sys.stderr)
    elif cohort_profiles(exp.subjects) is None:
        print(f"note: {exp.out_dir}/subjects.csv records no acquisition profiles (a run made before it did), so "
              "subjects are matched to its cohort by id and file name only: a cohort volume copied under another "
              "name is not recognised", file=sys.stderr)
    return records, volumes, registration_cache, matches


def predict(args: argparse.Namespace) -> int:
    output = check_args(args)
    run_dir = Path(args.run_dir).resolve()
    exp = load_run(run_dir)
    config, channels, cache_entry = run_preprocessing(exp)
    estimate, reason = choose_arm(exp, parse_arm(args.arm) if args.arm else None)
    print(f"Arm {arm_text(estimate.arm)}: {reason}", flush=True)
    device = pick_device(args.device)
    folds = fold_weights(exp, estimate)
    records, input_channels = input_records(args, exp, channels)  # listed, not opened yet
    check_labels(records, exp.classes)
    # Every fold's weights are read now, on the CPU: a missing or foreign file is refused before the inputs are
    # opened, registered and preprocessed (minutes for a large cohort), not after.
    models = [load_fold_model(weights, estimate.arm, exp.classes, channels, run_dir) for weights in folds]
    records, volumes, registration_cache, matches = prepare_volumes(args, exp, records, config, output)

    probabilities = []
    for number, fold_model in enumerate(models, start=1):
        weights = fold_model.weights
        label = f"fold {number}/{len(models)} (run fold {weights.fold}, {weights.trial_name})"
        probabilities.append(predict_volumes(fold_model.model.to(device), volumes, args.batch_size, device,
                                             progress_printer(label, len(volumes), args.batch_size)))
        fold_model.model.cpu()  # one fold on the device at a time
    table, per_fold = ensemble_tables(records, exp.classes, models, probabilities, [m is not None for m in matches])
    result = score(table, exp.classes)
    paths = {"predictions": output, "folds": output.with_name(f"{output.stem}_folds.csv"),
             "provenance": output.with_suffix(".json")}
    write_csv_atomic(per_fold, paths["folds"])
    write_text_atomic(paths["provenance"], json.dumps(
        provenance(args, exp, estimate, reason, models, config, channels, cache_entry, registration_cache, device,
                   table, result, paths, dict(zip(table["subject_id"], matches)), input_channels), indent=2))
    write_csv_atomic(table, paths["predictions"])  # last: the predictions exist only with their companions
    print(f"{len(table)} subject(s) predicted by {len(models)} fold(s) of {arm_text(estimate.arm)}: "
          f"{paths['predictions']} (per fold: {paths['folds']}; how: {paths['provenance']})")
    if result is None:
        print("No labels given: no score.")
    else:
        note = (f"; {result['n_in_run_cohort']} of them are in the run's training data, so this is no independent test"
                if result["n_in_run_cohort"] else "")
        absent = result["classes_without_subjects"]
        over = (f" over the classes with labelled subjects ({', '.join(result['macro_f1_classes'])}; left out of "
                f"the mean for want of a labelled subject: {', '.join(absent)})" if absent else "")
        print(f"Score on {result['n_labelled']} labelled subject(s): accuracy {result['accuracy']:.3f}, "
              f"macro F1 {result['macro_f1']:.3f}{over}{note}")
    return 0


def provenance(args: argparse.Namespace, exp: Experiment, estimate: ArmEstimate, reason: str,
               models: Sequence[FoldModel], config: PreprocessConfig, channels: int, cache_entry: Path,
               registration_cache: Path | None, device: torch.device, table: pd.DataFrame,
               result: dict[str, Any] | None, paths: dict[str, Path],
               matches: dict[str, CohortMatch | None], input_channels: InputChannels) -> dict[str, Any]:
    """<stem>.json: everything needed to say how the predictions were obtained, and to obtain them again."""
    import torchvision

    source = ({"data_root": str(Path(args.data_root).resolve())} if args.data_root else
              {"manifest": str(Path(args.manifest).resolve())} if args.manifest else
              {"files": [str(Path(f).resolve()) for f in args.files]})
    return {
        "run_dir": str(exp.out_dir.resolve()), "run_id": exp.meta.get("run_id"), "experiment": exp.experiment,
        "arm": {"model": estimate.arm[0], "pretrained": estimate.arm[1], "estimate": estimate.kind,
                "pooled_macro_f1": estimate.macro_f1,
                "validation_macro_f1": None if math.isnan(estimate.val_macro_f1) else estimate.val_macro_f1,
                "paper_configuration_validation_macro_f1":
                    None if math.isnan(estimate.paper_val_macro_f1) else estimate.paper_val_macro_f1,
                "why": reason},
        "folds": [{"fold": m.weights.fold, "trial_name": m.weights.trial_name, "checkpoint": m.weights.checkpoint,
                   "best_weights_sha256": m.sha256, "config": m.config} for m in models],
        "classes": list(exp.classes),
        "inputs": {**source, **input_channels.as_json(), "n_subjects": len(table),
                   "in_run_cohort": [str(s) for s in table.loc[table["in_run_cohort"], "subject_id"]],
                   "in_run_cohort_matches": {str(s): {"run_subject_ids": list(m.run_subjects), "by": m.by}
                                             for s, m in matches.items() if m is not None}},
        "preprocessing": {**dataclasses.asdict(config), "channels": channels, "cache_entry": str(cache_entry),
                          "registration_cache": str(registration_cache) if registration_cache else None},
        "inference": {"device": str(device), "batch_size": args.batch_size, "dtype": "float32",
                      "torch": torch.__version__, "torchvision": torchvision.__version__},
        "outputs": {name: str(path) for name, path in paths.items()},
        "score": result,
    }


if __name__ == "__main__":
    sys.exit(main())
