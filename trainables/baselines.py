"""Two cheap scikit-learn baselines fitted on the deep models' own folds, to show what needs no anatomy.

Why: BraTS (LGG, HGG) and IXI (Healthy) come from different scanners, sites, voxel grids,
skull-stripping and intensity ranges, so "Healthy" can be recognised from how a file was made
rather than from the brain in it. A deep arm that does not beat these baselines has shown nothing
about anatomy. The two baselines are:

- ``acquisition_baseline``: logistic regression on header and acquisition features of each
  subject's first raw file (``ACQUISITION_NUMERIC`` + ``ACQUISITION_CATEGORICAL``: voxel size, grid
  shape, orientation, on-disk dtype, foreground volume and raw intensity percentiles, zero
  fractions). It never sees a voxel's position, so it sees no anatomy beyond overall brain size.
  ``source``, ``site`` and ``stripped`` are deliberately left out: they are bookkeeping that names
  the data set (and so, for Healthy, the class), not measurements of the file, and would turn the
  baseline into a lookup table.
- ``histogram_baseline``: logistic regression on a fixed-bin, normalised histogram of the brain
  (voxels > 0) in the preprocessed cache, per channel: what is left of contrast and intensity
  distribution after the same preprocessing the deep models get.

"Choices on inner validation only": for every outer fold of the plan, each candidate C of
``C_GRID`` is fitted on the fold's ``train`` part (imputer, scaler and encoder statistics too, as
they live in the pipeline) and scored by macro F1 on its ``val`` part; the best C (ties: the
smaller C, i.e. stronger regularisation) is kept as fitted on ``train`` -- no refit on train + val,
as the deep arms do not refit either -- and only then predicts the ``test`` part. Test subjects
are never seen before that single prediction. Class weights are "balanced" because the deep
models train with weighted cross-entropy.

What they cannot detect: both are linear in a handful of global numbers. They miss shortcuts that
are spatial (skull or neck remnants, defacing, field of view, registration or bias-field
patterns, lesion-free texture), non-linear combinations of features, and anything in channels
other than the first for the acquisition baseline. The histogram cannot see global intensity
scale (each subject is percentile-rescaled before caching) nor brain size (it is normalised).
So a deep arm beating them does not prove it used anatomy; failing to beat them is the warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from datasets.acquisition import PROFILE_CATEGORICAL, PROFILE_NUMERIC
from datasets.preprocessing import CachedDataset
from datasets.splits import Fold, SplitPlan

# The profile validation measures of every raw file (datasets.acquisition) is the feature set, by definition.
ACQUISITION_NUMERIC = PROFILE_NUMERIC
ACQUISITION_CATEGORICAL = PROFILE_CATEGORICAL
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
HISTOGRAM_BINS = 20
# lbfgs on standardised features converges in well under this; C=100 on separable data needs the headroom.
MAX_ITER = 5000
ACQUISITION = "acquisition_baseline"
HISTOGRAM = "histogram_baseline"
EXPERIMENT = "baseline"
# Same leading columns as trainables.collect.KEY_COLUMNS (not imported: that module pulls in Ray).
KEY_COLUMNS = ["experiment", "model", "pretrained", "fold", "config_id", "trial_name"]
SELECTION_COLUMNS = ["model", "fold", "chosen_C", "val_macro_f1", "candidates", "n_train", "n_val", "n_test",
                     "features", "test_macro_f1"]
MISSING_CATEGORY = "missing"


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """The columns of ``predictions.csv`` followed by the subject's ``source`` and ``site``."""
    return [*KEY_COLUMNS, "subject_id", "label", "pred", *[f"prob_{c}" for c in classes], "source", "site"]


def _by_subject(frame: pd.DataFrame) -> pd.DataFrame:
    """Index by subject id as a string, the type the split plan uses."""
    frame = frame.copy()
    frame["subject_id"] = frame["subject_id"].astype(str)
    if frame["subject_id"].duplicated().any():
        repeated = sorted(frame.loc[frame["subject_id"].duplicated(), "subject_id"])
        raise ValueError(f"Duplicate subject ids: {repeated[:5]}")
    return frame.set_index("subject_id")


def acquisition_features(subjects: pd.DataFrame) -> pd.DataFrame:
    """Numeric features as floats (NaN kept for the imputer), categorical ones as strings, by subject id.

    A missing column is an error rather than NaN: a whole feature silently imputed would make the
    baseline look weaker than it is.
    """
    wanted = [*ACQUISITION_NUMERIC, *ACQUISITION_CATEGORICAL]
    absent = [c for c in wanted if c not in subjects.columns]
    if absent:
        raise KeyError(f"subjects lacks acquisition feature column(s): {', '.join(absent)}")
    table = _by_subject(subjects)
    numeric = table[list(ACQUISITION_NUMERIC)].apply(pd.to_numeric, errors="coerce").astype(float)
    # A missing category is a category of its own (e.g. an unreadable header), not a reason to drop the subject.
    categorical = table[list(ACQUISITION_CATEGORICAL)].astype(object).fillna(MISSING_CATEGORY).astype(str)
    return pd.concat([numeric, categorical], axis=1)


def _brain_histogram(volume: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fraction of brain voxels (> 0) per bin; all zeros for an empty channel rather than NaN."""
    brain = volume[volume > 0].astype(np.float32)
    counts, _ = np.histogram(np.minimum(brain, 1.0), bins=edges)  # anything above 1 counts as top bin, not lost
    return counts / counts.sum() if counts.sum() else counts.astype(float)


def histogram_features(cached: CachedDataset, bins: int = HISTOGRAM_BINS) -> pd.DataFrame:
    """Per channel a normalised ``bins``-bin histogram of the brain on (0, 1], indexed by subject id.

    Reads one subject at a time from the memory map, so the whole cache is never in memory.
    """
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    volumes = cached.volumes()
    table = cached.table.sort_values("index")
    edges = np.linspace(0.0, 1.0, bins + 1)
    names = [f"ch{channel}_bin{b:02d}" for channel in range(volumes.shape[1]) for b in range(bins)]
    rows = [np.concatenate([_brain_histogram(np.asarray(volumes[int(i), c]), edges) for c in range(volumes.shape[1])])
            for i in table["index"]]
    return pd.DataFrame(np.vstack(rows), index=pd.Index(table["subject_id"].astype(str), name="subject_id"),
                        columns=names)


def _classifier(C: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=C, class_weight="balanced", max_iter=MAX_ITER, random_state=seed)


def _pipeline(numeric: Sequence[str], categorical: Sequence[str], C: float, seed: int) -> Pipeline:
    """Imputer + scaler for numeric, one-hot for categorical columns; just a scaler when all are complete numbers."""
    if not categorical:
        return Pipeline([("scale", StandardScaler()), ("model", _classifier(C, seed))])
    numbers = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    columns = ColumnTransformer([
        ("numeric", numbers, list(numeric)),
        ("categorical", OneHotEncoder(handle_unknown="ignore"), list(categorical)),
    ])
    return Pipeline([("columns", columns), ("model", _classifier(C, seed))])


Model = Pipeline | DummyClassifier


@dataclass(frozen=True)
class _Baseline:
    name: str
    features: pd.DataFrame  # one row per subject, indexed by subject id
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]


def _probabilities(model: Model, X: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Probabilities in ``classes`` order; a class the model never saw in training gets 0."""
    fitted = model.predict_proba(X)
    full = np.zeros((len(X), len(classes)))
    for column, name in enumerate(model.classes_):
        full[:, list(classes).index(name)] = fitted[:, column]
    return full


def _predict(probabilities: np.ndarray, classes: Sequence[str]) -> list[str]:
    # Argmax in ``classes`` order, so ``pred`` always agrees with the prob_ columns (ties: the earlier class).
    return [classes[i] for i in probabilities.argmax(axis=1)]


def macro_f1(labels: Iterable[str], predictions: Iterable[str], classes: Sequence[str]) -> float:
    """Macro F1 over all ``classes``: a class absent from the part scores 0 instead of being dropped."""
    return float(f1_score(list(labels), list(predictions), labels=list(classes), average="macro", zero_division=0))


def choose_c(scores: dict[float, float]) -> float:
    """The C with the best validation score; ties go to the smaller C (stronger regularisation)."""
    return min(scores, key=lambda c: (-scores[c], c))


def _fit(baseline: _Baseline, ids: Sequence[str], y: pd.Series, C: float, seed: int) -> Model:
    X, target = baseline.features.loc[list(ids)], y.loc[list(ids)]
    if target.nunique() < 2:
        # Logistic regression needs two classes; with one, the honest model always predicts it (and C is moot).
        return DummyClassifier(strategy="prior").fit(X, target)
    return _pipeline(baseline.numeric, baseline.categorical, C, seed).fit(X, target)


def _select(baseline: _Baseline, fold: Fold, y: pd.Series, classes: Sequence[str],
            seed: int) -> tuple[Model, float, dict[float, float]]:
    """Fit every C on ``train``, score on ``val``; return the chosen fitted model, its C and all scores."""
    if not fold.train or not fold.val:
        raise ValueError(f"Fold {fold.fold} needs non-empty train and val parts to choose C")
    X_val = baseline.features.loc[list(fold.val)]
    scores, models = {}, {}
    for C in C_GRID:
        models[C] = _fit(baseline, fold.train, y, C, seed)
        predicted = _predict(_probabilities(models[C], X_val, classes), classes)
        scores[C] = macro_f1(y.loc[list(fold.val)], predicted, classes)
    chosen = choose_c(scores)
    return models[chosen], chosen, scores


def _config_id(model: Model, C: float) -> str:
    return "constant" if isinstance(model, DummyClassifier) else f"C={C:g}"


def _fold_predictions(baseline: _Baseline, fold: Fold, model: Model, C: float, y: pd.Series, classes: Sequence[str],
                      subjects: pd.DataFrame) -> pd.DataFrame:
    test_ids = sorted(fold.test)
    probabilities = _probabilities(model, baseline.features.loc[test_ids], classes)
    frame = pd.DataFrame({"experiment": EXPERIMENT, "model": baseline.name, "pretrained": False, "fold": fold.fold,
                          "config_id": _config_id(model, C), "trial_name": f"{baseline.name}-f{fold.fold}",
                          "subject_id": test_ids, "label": y.loc[test_ids].to_numpy(),
                          "pred": _predict(probabilities, classes)})
    for index, name in enumerate(classes):
        frame[f"prob_{name}"] = probabilities[:, index]
    extra = subjects.reindex(index=test_ids, columns=["source", "site"])
    frame["source"], frame["site"] = extra["source"].to_numpy(), extra["site"].to_numpy()
    return frame


def evaluate_baseline(name: str, features: pd.DataFrame, subjects: pd.DataFrame, plan: SplitPlan,
                      classes: Sequence[str], seed: int = 0,
                      categorical: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One baseline on every fold of ``plan``: (predictions, selection rows). ``features`` is indexed by subject id."""
    table = _by_subject(subjects)
    y = _labels(table, classes)
    numeric = tuple(c for c in features.columns if c not in categorical)
    baseline = _Baseline(name, features, numeric, tuple(categorical))
    predictions, selection = [], []
    for fold in plan.folds:
        _require(features, [*fold.train, *fold.val, *fold.test], name)
        model, chosen, scores = _select(baseline, fold, y, classes, seed)
        fold_frame = _fold_predictions(baseline, fold, model, chosen, y, classes, table)
        predictions.append(fold_frame)
        selection.append({"model": name, "fold": fold.fold, "chosen_C": chosen, "val_macro_f1": scores[chosen],
                          "candidates": ";".join(f"{c:g}:{s:.4f}" for c, s in scores.items()),
                          "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
                          "features": ",".join(map(str, features.columns)),
                          "test_macro_f1": macro_f1(fold_frame["label"], fold_frame["pred"], classes)})
    return pd.concat(predictions, ignore_index=True), pd.DataFrame(selection, columns=SELECTION_COLUMNS)


def _labels(table: pd.DataFrame, classes: Sequence[str]) -> pd.Series:
    unknown = set(table["label"]) - set(classes)
    if unknown:
        raise ValueError(f"Labels not among classes {list(classes)}: {sorted(unknown)}")
    return table["label"].astype(str)


def _require(features: pd.DataFrame, ids: Sequence[str], name: str) -> None:
    missing = sorted(set(ids) - set(features.index))
    if missing:
        raise KeyError(f"{name}: no features for {len(missing)} subject(s) of the plan, e.g. {missing[:5]}")


def _check_cache_labels(subjects: pd.DataFrame, cached: CachedDataset) -> None:
    """The cache must hold the same labels as the subject table: a stale or foreign cache would mislead silently."""
    both = _by_subject(subjects)[["label"]].merge(_by_subject(cached.table)[["label"]], left_index=True,
                                                  right_index=True, suffixes=("", "_cache"))
    differ = both.index[both["label"].astype(str) != both["label_cache"].astype(str)]
    if len(differ):
        raise ValueError(f"Cache labels differ from the subject table for {list(differ[:5])}")


def run_baselines(subjects: pd.DataFrame, cached: CachedDataset, plan: SplitPlan, classes: Sequence[str],
                  seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both baselines on every fold: (predictions, one selection row per baseline and fold).

    Predictions have ``prediction_columns(classes)``, one row per test subject per fold per
    baseline, sorted by model, fold, subject id. The selection table has ``SELECTION_COLUMNS``;
    its ``test_macro_f1`` is computed from those prediction rows, for the report.
    """
    classes = tuple(classes)
    _check_cache_labels(subjects, cached)
    runs = [evaluate_baseline(ACQUISITION, acquisition_features(subjects), subjects, plan, classes, seed,
                              categorical=ACQUISITION_CATEGORICAL),
            evaluate_baseline(HISTOGRAM, histogram_features(cached), subjects, plan, classes, seed)]
    predictions = pd.concat([p for p, _ in runs], ignore_index=True)
    predictions = predictions.sort_values(["model", "fold", "subject_id"], ignore_index=True)
    predictions = predictions[prediction_columns(classes)]
    selection = pd.concat([s for _, s in runs], ignore_index=True).sort_values(["model", "fold"], ignore_index=True)
    return predictions, selection
