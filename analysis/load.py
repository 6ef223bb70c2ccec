"""Read and validate an experiment directory written by the orchestrator.

Everything is read as text first and converted column by column, so a malformed value fails with a
`ValueError` naming the file, the column and the offending value instead of surfacing later as a
silently wrong metric (pandas would otherwise turn a config_id like "1e100000" into a float).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis.names import Arm, arm_mask, sort_arms

PREDICTION_COLUMNS = ["experiment", "model", "pretrained", "fold", "config_id", "trial_name", "subject_id", "label", "pred"]
EPOCH_COLUMNS = ["experiment", "model", "pretrained", "fold", "config_id", "trial_name", "epoch"]
EPOCH_NUMERIC = ["train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr"]
TRIAL_COLUMNS = ["experiment", "trial_name", "model", "pretrained", "fold", "config_id", "status"]
TRIAL_NUMERIC = ["lr", "weight_decay", "dropout", "aug_strength", "epochs_run", "best_epoch", "best_val_macro_f1",
                 "n_train", "n_val", "n_test"]
HYPERPARAMETERS = ["lr", "weight_decay", "dropout", "augmentation", "aug_strength"]
# Optional inputs written by newer runs; an experiment folder without them still gets a report.
ORIGIN_COLUMNS = ["source", "site"]
SELECTION_COLUMNS = ["model", "fold", "chosen_C", "val_macro_f1", "candidates", "n_train", "n_val", "n_test", "features"]
SELECTION_NUMERIC = ["chosen_C", "val_macro_f1", "n_train", "n_val", "n_test", "test_macro_f1"]
SUBJECT_COLUMNS = ["subject_id", "label"]
TRIAL_SUBJECT_COLUMNS = ["trial_name", "part", "subject_id"]
SPLIT_PARTS = ("train", "val", "test")
SUBJECT_NUMERIC = ["border_zero_fraction", "voxel_x", "voxel_y", "voxel_z", "shape_x", "shape_y", "shape_z",
                   "fg_volume_ml", "fg_median", "fg_p99", "zero_fraction"]
_UNKNOWN_TEXT = {"nan", "none", "null"}  # how a missing site may arrive after pandas' astype(str)
# A written softmax may be rounded; this only catches columns that are not probabilities at all.
PROB_SUM_TOLERANCE = 1e-2

_TRUE = {"true", "1", "1.0", "yes"}
_FALSE = {"false", "0", "0.0", "no"}


@dataclass
class Experiment:
    """One experiment directory, validated. DataFrames keep the contract's column names."""

    out_dir: Path
    meta: dict
    classes: list[str]
    n_folds: int
    predictions: pd.DataFrame
    epochs: pd.DataFrame | None
    trials: pd.DataFrame | None
    notes: list[str] = field(default_factory=list)  # input problems worth telling the reader about
    # Optional (newer runs): the scikit-learn baselines and the run's cohort, None when absent or unreadable.
    baseline_predictions: pd.DataFrame | None = None
    baseline_selection: pd.DataFrame | None = None
    subjects: pd.DataFrame | None = None
    # Optional (nested-search runs): the subjects each finished trial used, and the run's outer folds,
    # so a reader can audit that no candidate of fold k ever saw fold k's test subjects.
    trial_subjects: pd.DataFrame | None = None
    splits: dict[int, dict[str, list[str]]] | None = None
    # Optional (newer runs): each trial's inner validation part, scored with the weights chosen on it; used
    # only to choose two-class decision thresholds without test subjects (analysis.binary).
    val_predictions: pd.DataFrame | None = None

    @property
    def experiment(self) -> str:
        return str(self.meta.get("experiment", "unknown"))

    @property
    def planned_arms(self) -> list[Arm]:
        return sort_arms((a["model"], a["pretrained"]) for a in self.meta.get("arms", []))

    @property
    def planned_trials(self) -> list[str]:
        return [str(t) for t in self.meta.get("planned_trials", [])]

    @property
    def paper_config_id(self) -> str | None:
        value = self.meta.get("paper_config_id")
        return None if value is None else str(value)

    @property
    def paper_defaults(self) -> dict:
        return dict(self.meta.get("paper_defaults") or {})

    @property
    def default_label(self) -> str:
        """How to name the grid's configuration: the paper's recipe, plus any ``--set`` overrides.

        The demo, for one, trains with lr=3e-4 and batch 4; calling that "the paper's" would mislead.
        """
        overrides = self.meta.get("overrides") or {}
        # Runs that record deviations from the published recipe start from the protocol's defaults, not the paper's.
        base = "protocol defaults" if self.meta.get("deviations") is not None else "paper defaults"
        if not overrides:
            return base
        return f"{base} with --set " + " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(overrides.items()))

    @property
    def optuna_studies(self) -> list[dict]:
        return list(self.meta.get("optuna_studies") or [])

    @property
    def search_design(self) -> str | None:
        """The search's design: "nested" for nested cross-validation; None for runs made before it (one study per
        arm, configurations chosen by their mean over folds), whose test scores cannot be an unbiased estimate."""
        value = self.meta.get("search_design")
        return None if value is None else str(value)

    def relocated(self, location: str) -> str:
        """A local path the run recorded, moved with the run folder: a path under the run's recorded ``output`` is
        looked up under this folder when the original is gone (a run copied or renamed, or moved to another
        machine for prediction)."""
        if "://" in location or Path(location).exists():
            return location
        recorded = str(self.meta.get("output") or "").rstrip("/")
        if recorded and location.startswith(recorded + "/"):
            moved = self.out_dir.resolve() / location[len(recorded) + 1:]
            if moved.exists():
                return str(moved)
        return location

    def main_selection(self) -> tuple[str, str, str | None]:
        """(column, value, description) choosing the paper-protocol rows, or value None when nothing qualifies.

        Paper runs are tagged experiment == "paper"; a search evaluates the paper defaults first, so
        without paper-tagged rows those (config_id == paper_config_id) are the paper protocol.
        """
        preds = self.predictions
        if (preds["experiment"] == "paper").any():
            return "experiment", "paper", 'rows with experiment == "paper"'
        cid = self.paper_config_id
        if cid is not None and (preds["config_id"] == cid).any():
            return "config_id", cid, f"rows with config_id == {cid!r} (the paper's default hyperparameters within the search)"
        trials = self.trials
        if trials is not None and (trials["experiment"] == "paper").any():
            return "experiment", "paper", 'rows with experiment == "paper" (no predictions yet)'
        if cid is not None:
            return "config_id", cid, f"rows with config_id == {cid!r} (no predictions yet)"
        return "experiment", "paper", 'rows with experiment == "paper" (none found)'

    def select_main(self, frame: pd.DataFrame | None) -> pd.DataFrame | None:
        """Rows of `frame` (predictions, epochs or trials) belonging to the paper protocol."""
        if frame is None:
            return None
        column, value, _ = self.main_selection()
        return frame[frame[column] == value].reset_index(drop=True)

    def main_arms(self) -> list[Arm]:
        """Planned arms plus any arm that has paper-protocol predictions, in the paper's order."""
        found = self.select_main(self.predictions)[["model", "pretrained"]].itertuples(index=False)
        return sort_arms([*self.planned_arms, *((m, p) for m, p in found)])


def load_experiment(out_dir: str | Path) -> Experiment:
    """Read OUT/experiment.json, predictions.csv and (when present) epochs.csv, trials.csv and the optional
    tables: baselines, subjects, trial subjects, splits and validation predictions."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "experiment.json"
    pred_path = out_dir / "predictions.csv"
    for path in (meta_path, pred_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the orchestrator writes it; is {out_dir} an experiment directory?")
    meta = _read_meta(meta_path)
    classes = meta["classes"]
    notes: list[str] = []

    predictions = _read_predictions(pred_path, classes)
    epochs_path, trials_path = out_dir / "epochs.csv", out_dir / "trials.csv"
    epochs = _read_epochs(epochs_path, classes, notes) if epochs_path.is_file() else None
    if epochs is None:
        notes.append(f"{epochs_path.name} is missing: no learning curves.")
    trials = _read_trials(trials_path, notes) if trials_path.is_file() else None
    if trials is None:
        notes.append(f"{trials_path.name} is missing: no trial statuses, no n_test/n_train for the corrected t-test.")
    baseline_predictions = _read_optional(out_dir / "baseline_predictions.csv", notes, "baseline rows",
                                          lambda p: _read_predictions(p, classes))
    baseline_selection = _read_optional(out_dir / "baseline_selection.csv", notes, "the baselines' choice of C",
                                        _read_selection)
    subjects = _read_optional(out_dir / "subjects.csv", notes, "the cohort table from subjects.csv", _read_subjects)
    trial_subjects = _read_optional(out_dir / "trial_subjects.csv", notes, "the search's leak check",
                                    _read_trial_subjects)
    splits = _read_optional(out_dir / "splits.json", notes, "the search's leak check", _read_splits)
    val_predictions = _read_optional(out_dir / "val_predictions.csv", notes,
                                     "validation-chosen thresholds (0.5 is used instead)",
                                     lambda p: _read_predictions(p, classes))
    return Experiment(out_dir=out_dir, meta=meta, classes=classes, n_folds=meta["n_folds"],
                      predictions=predictions, epochs=epochs, trials=trials, notes=notes,
                      baseline_predictions=baseline_predictions, baseline_selection=baseline_selection,
                      subjects=subjects, trial_subjects=trial_subjects, splits=splits,
                      val_predictions=val_predictions)


def _read_optional(path: Path, notes: list[str], what: str, reader: Callable[[Path], pd.DataFrame]) -> pd.DataFrame | None:
    """Read a file that older runs do not write: None when absent; when malformed, a note instead of a crash.

    The deep arms' results do not depend on these files, so a bad one should cost its own section only.
    """
    if not path.is_file():
        return None
    try:
        return reader(path)
    except ValueError as exc:
        notes.append(f"{path.name} could not be read ({exc}): {what} left out.")
        return None


# ---------------------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    classes = meta.get("classes")
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise ValueError(f"{path}: 'classes' must be a list of at least two distinct class names, got {classes!r}")
    n_folds = meta.get("n_folds")
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 1:
        raise ValueError(f"{path}: 'n_folds' must be a positive integer, got {n_folds!r}")
    arms = meta.get("arms", [])
    if not isinstance(arms, list) or not all(isinstance(a, dict) and "model" in a and "pretrained" in a for a in arms):
        raise ValueError(f"{path}: 'arms' must be a list of {{'model': ..., 'pretrained': ...}} objects")
    meta["arms"] = [{"model": str(a["model"]), "pretrained": _parse_bool_value(a["pretrained"], path, "arms")} for a in arms]
    if not isinstance(meta.get("planned_trials", []), list):
        raise ValueError(f"{path}: 'planned_trials' must be a list of trial names")
    studies = meta.get("optuna_studies") or []
    if not isinstance(studies, list) or not all(isinstance(s, dict) and {"storage", "study_name"} <= s.keys() for s in studies):
        raise ValueError(f"{path}: 'optuna_studies' must be a list of objects with 'storage' and 'study_name'")
    meta["optuna_studies"] = [_normalise_study(s, path) for s in studies]
    return meta


def _normalise_study(spec: dict, path: Path) -> dict:
    """pretrained as a bool and fold as an int (or None for the one-study-per-arm runs made before nested CV).

    A nested study's fold decides which trials may be its candidates, so a malformed one must fail loudly.
    """
    spec = dict(spec)
    if "pretrained" in spec:
        spec["pretrained"] = _parse_bool_value(spec["pretrained"], path, "optuna_studies.pretrained")
    fold = spec.get("fold")
    if fold is not None:
        integral = isinstance(fold, int) and not isinstance(fold, bool)
        if not (integral or (isinstance(fold, str) and fold.strip().isdigit())):
            raise ValueError(f"{path}: optuna study {spec['study_name']!r} has fold {fold!r}; expected an integer")
        spec["fold"] = int(fold)
    spec["grid_trial"] = None if spec.get("grid_trial") in (None, "") else str(spec["grid_trial"])
    return spec


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise ValueError(f"{path}: empty file (expected at least a header row with columns {required})") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing and frame.empty:
        # A run where every trial failed writes a header-only table, possibly with only the key columns:
        # there is no value to misread, so complete the header instead of failing the whole report.
        for col in missing:
            frame[col] = pd.Series(dtype=str)
        missing = []
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    for col in frame.columns:
        frame[col] = frame[col].astype(str).str.strip()
    return frame


def _parse_bool_value(value, path: Path, column: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().casefold()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{path}: column {column!r} must be True/False, got {value!r}")


def _to_bool(frame: pd.DataFrame, column: str, path: Path, allow_empty: bool = False) -> None:
    values = [None if allow_empty and v == "" else _parse_bool_value(v, path, column) for v in frame[column]]
    frame[column] = pd.Series(values, index=frame.index, dtype=object if None in values else bool)


def _to_float(frame: pd.DataFrame, column: str, path: Path, required: bool = False) -> None:
    raw = frame[column]
    values = pd.to_numeric(raw.where(raw != "", np.nan), errors="coerce").astype(float)
    bad = values.isna() & (raw != "") & (~raw.str.casefold().isin(["nan", "none", "null"]))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path}: column {column!r} row {row + 2} is not a number: {raw.iloc[row]!r}")
    if required and values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        found = "empty" if raw.iloc[row] == "" else f"{raw.iloc[row]!r}, not a number (a trial that diverged?)"
        raise ValueError(f"{path}: column {column!r} row {row + 2} is {found}")
    frame[column] = values


def _to_int(frame: pd.DataFrame, column: str, path: Path) -> None:
    _to_float(frame, column, path, required=True)
    values = frame[column]
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        row = int(np.flatnonzero(~(np.isfinite(values) & (values == np.round(values))))[0])
        raise ValueError(f"{path}: column {column!r} row {row + 2} is not an integer: {values.iloc[row]!r}")
    frame[column] = values.astype(int)


def _read_predictions(path: Path, classes: list[str]) -> pd.DataFrame:
    prob_cols = [f"prob_{c}" for c in classes]
    frame = _read_csv(path, PREDICTION_COLUMNS + prob_cols)
    _to_bool(frame, "pretrained", path)
    _to_int(frame, "fold", path)
    for col in prob_cols:
        _to_float(frame, col, path, required=True)
    for col in ("label", "pred"):
        unknown = sorted(set(frame[col]) - set(classes))
        if unknown:
            raise ValueError(f"{path}: column {col!r} has value(s) {unknown} not in experiment.json classes {classes}")
    if len(frame):
        sums = frame[prob_cols].sum(axis=1).to_numpy()
        off = np.abs(sums - 1.0) > PROB_SUM_TOLERANCE
        if off.any():
            row = int(np.flatnonzero(off)[0])
            raise ValueError(f"{path}: prob_ columns of row {row + 2} (trial {frame['trial_name'].iloc[row]!r}, "
                             f"subject {frame['subject_id'].iloc[row]!r}) sum to {sums[row]:.4f}, not 1")
    dup = frame.duplicated(["trial_name", "subject_id"], keep=False)
    if dup.any():
        row = frame[dup].iloc[0]
        raise ValueError(f"{path}: subject {row['subject_id']!r} appears more than once in trial {row['trial_name']!r}")
    _check_trial_identity(frame, path)
    _normalise_origin(frame)
    return frame


def _normalise_origin(frame: pd.DataFrame) -> None:
    """Unknown source/site as "" (a merge in pandas may have written it as 'nan')."""
    for col in ORIGIN_COLUMNS:
        if col in frame.columns:
            frame[col] = frame[col].where(~frame[col].str.casefold().isin(_UNKNOWN_TEXT), "")


def _read_selection(path: Path) -> pd.DataFrame:
    """baseline_selection.csv: one row per (baseline, fold) with the C chosen on inner validation."""
    frame = _read_csv(path, SELECTION_COLUMNS)
    _to_int(frame, "fold", path)
    for col in SELECTION_NUMERIC:
        if col in frame.columns:
            _to_float(frame, col, path)
    return frame.sort_values(["model", "fold"], kind="stable").reset_index(drop=True)


def _read_subjects(path: Path) -> pd.DataFrame:
    """subjects.csv: the run's cohort, one row per subject, with source, site and stripping status."""
    frame = _read_csv(path, SUBJECT_COLUMNS)
    dup = frame.duplicated(["subject_id"], keep=False)
    if dup.any():
        raise ValueError(f"{path}: subject {frame[dup]['subject_id'].iloc[0]!r} is listed more than once")
    for col in ORIGIN_COLUMNS:
        if col not in frame.columns:
            frame[col] = ""
    _normalise_origin(frame)
    if "stripped" in frame.columns:
        _to_bool(frame, "stripped", path, allow_empty=True)
    for col in SUBJECT_NUMERIC:
        if col in frame.columns:
            _to_float(frame, col, path)
    return frame.sort_values("subject_id", kind="stable").reset_index(drop=True)


def _read_trial_subjects(path: Path) -> pd.DataFrame:
    """trial_subjects.csv: which subjects each finished trial trained, selected and was tested on."""
    frame = _read_csv(path, TRIAL_SUBJECT_COLUMNS)
    unknown = sorted(set(frame["part"]) - set(SPLIT_PARTS))
    if unknown:
        raise ValueError(f"{path}: column 'part' has value(s) {unknown}; expected {list(SPLIT_PARTS)}")
    return frame[TRIAL_SUBJECT_COLUMNS].sort_values(TRIAL_SUBJECT_COLUMNS, kind="stable").reset_index(drop=True)


def _read_splits(path: Path) -> dict[int, dict[str, list[str]]]:
    """splits.json: fold -> {"train": [...], "val": [...], "test": [...]} subject ids, as the run drew them."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    folds = data.get("folds") if isinstance(data, dict) else None
    if not isinstance(folds, list):
        raise ValueError(f"{path}: expected an object with a 'folds' list")
    out: dict[int, dict[str, list[str]]] = {}
    for entry in folds:
        if not isinstance(entry, dict) or isinstance(entry.get("fold"), bool) or not isinstance(entry.get("fold"), int):
            raise ValueError(f"{path}: every fold needs an integer 'fold', got {entry!r:.80}")
        parts = {part: entry.get(part, []) for part in SPLIT_PARTS}
        if not all(isinstance(ids, list) for ids in parts.values()):
            raise ValueError(f"{path}: fold {entry['fold']}'s train/val/test must be lists of subject ids")
        out[entry["fold"]] = {part: [str(s) for s in ids] for part, ids in parts.items()}
    return out


def _check_trial_identity(frame: pd.DataFrame, path: Path) -> None:
    """One trial is one (experiment, arm, fold, config); anything else would mix folds or arms."""
    ident = ["experiment", "model", "pretrained", "fold", "config_id"]
    counts = frame.drop_duplicates(["trial_name", *ident]).groupby("trial_name").size()
    if (counts > 1).any():
        name = sorted(counts[counts > 1].index)[0]
        raise ValueError(f"{path}: trial {name!r} has rows with different {ident}")


def _read_epochs(path: Path, classes: list[str], notes: list[str]) -> pd.DataFrame:
    frame = _read_csv(path, EPOCH_COLUMNS)
    _to_bool(frame, "pretrained", path)
    _to_int(frame, "fold", path)
    _to_int(frame, "epoch", path)
    for col in EPOCH_NUMERIC + [f"val_f1_{c}" for c in classes]:
        if col in frame.columns:
            _to_float(frame, col, path)
        else:
            notes.append(f"{path.name} has no column {col!r}: left out of the learning curves.")
            frame[col] = np.nan
    dup = frame.duplicated(["trial_name", "epoch"], keep=False)
    if dup.any():
        row = frame[dup].iloc[0]
        raise ValueError(f"{path}: epoch {row['epoch']} appears more than once for trial {row['trial_name']!r}")
    return frame


def _read_trials(path: Path, notes: list[str]) -> pd.DataFrame:
    frame = _read_csv(path, TRIAL_COLUMNS)
    # A MISSING trial (planned, never started) is written with its name and status only.
    _to_bool(frame, "pretrained", path, allow_empty=True)
    # A MISSING/PENDING trial may not know its fold yet: keep it, as NaN, rather than fail the report.
    _to_float(frame, "fold", path)
    if "error" not in frame.columns:
        frame["error"] = ""
    if "augmentation" not in frame.columns:
        frame["augmentation"] = ""
    for col in TRIAL_NUMERIC:
        if col in frame.columns:
            _to_float(frame, col, path)
        else:
            notes.append(f"{path.name} has no column {col!r}: treated as unknown.")
            frame[col] = np.nan
    frame["status"] = frame["status"].str.upper()
    dup = frame.duplicated(["trial_name"], keep=False)
    if dup.any():
        raise ValueError(f"{path}: trial {frame[dup]['trial_name'].iloc[0]!r} is listed more than once")
    return frame


def check_one_trial_per_fold(main_preds: pd.DataFrame, path: Path) -> None:
    """The paper protocol has one trial per (arm, fold); two would be averaged as if they were two folds."""
    per = main_preds.drop_duplicates(["model", "pretrained", "fold", "trial_name"])
    counts = per.groupby(["model", "pretrained", "fold"]).size()
    if (counts > 1).any():
        model, pretrained, fold = counts[counts > 1].index[0]
        names = sorted(per[arm_mask(per, (model, pretrained)) & (per["fold"] == fold)]["trial_name"])
        raise ValueError(f"{path}: arm ({model}, pretrained={pretrained}) fold {fold} has predictions from several "
                         f"paper-protocol trials {names}; expected exactly one")
