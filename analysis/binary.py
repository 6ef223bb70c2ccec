"""Two-class runs: ROC AUC with a subject bootstrap CI, precision-recall, sensitivity/specificity at a
threshold, and a scikit-learn classification report, on each arm's pooled out-of-fold test predictions.

The positive class is the second class of the run's class order (experiment.json "classes", the order of
the prob_ columns); its score is prob_<positive>.

Threshold: the folds write only test predictions (trainables/fold_training.py: predictions.csv holds the
test subjects; validation probabilities are not saved), so no threshold can be chosen on validation and
the fixed threshold 0.5 is used: predicted positive when prob_<positive> > 0.5, which is exactly the argmax
prediction in the `pred` column (an exact tie goes to the first class, as argmax does).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.metrics import (
    average_precision_score,
    classification_report,
    precision_recall_curve,
    roc_auc_score,
)

from analysis.names import Arm

THRESHOLD = 0.5
THRESHOLD_TEXT = "threshold 0.5 (no validation probabilities are saved)"

SUMMARY_COLUMNS = ["model", "pretrained", "positive_class", "n_predictions", "n_subjects", "auc", "auc_low", "auc_high",
                   "n_resamples", "n_undefined_resamples", "seed", "average_precision", "threshold", "threshold_source",
                   "sensitivity", "specificity"]
REPORT_COLUMNS = ["model", "pretrained", "row", "precision", "recall", "f1", "support", "threshold"]


def is_binary(classes: list[str]) -> bool:
    return len(classes) == 2


def positive_class(classes: list[str]) -> str:
    """The second class of the run's class order."""
    return classes[1]


def decision_threshold() -> tuple[float, str]:
    """(threshold, how it was chosen). No run saves validation probabilities, so this is always 0.5."""
    return THRESHOLD, THRESHOLD_TEXT


def _arm_frames(preds: pd.DataFrame, arms: list[Arm]):
    """(arm, its pooled predictions) for every arm that has any."""
    for arm in arms:
        arm_df = preds[(preds["model"] == arm[0]) & (preds["pretrained"] == arm[1])]
        if not arm_df.empty:
            yield arm, arm_df


def _target_score(arm_df: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    pos = positive_class(classes)
    return (arm_df["label"] == pos).to_numpy(dtype=int), arm_df[f"prob_{pos}"].to_numpy(dtype=float)


def threshold_predictions(arm_df: pd.DataFrame, classes: list[str], threshold: float) -> np.ndarray:
    """Class names: the positive class where prob_<positive> > threshold, else the negative class."""
    _, score = _target_score(arm_df, classes)
    return np.where(score > threshold, classes[1], classes[0])


def auc_or_nan(y: np.ndarray, score: np.ndarray) -> float:
    """sklearn's roc_auc_score; NaN where it is undefined (only one label value present)."""
    if y.min(initial=1) == y.max(initial=0) or len(y) == 0:
        return np.nan
    return float(roc_auc_score(y, score))


def bootstrap_auc_ci(arm_df: pd.DataFrame, classes: list[str], n_resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Pooled ROC AUC and its subject-level percentile bootstrap CI (scipy.stats.bootstrap, as
    analysis.stats.bootstrap_f1_ci: subjects drawn with replacement, a subject's rows travel together).

    A resample with a single label value has no AUC; such resamples are counted (n_undefined_resamples)
    and left out of the percentiles of the others.
    """
    y, score = _target_score(arm_df, classes)
    subjects = np.array(sorted(arm_df["subject_id"].unique()))
    pos = {s: i for i, s in enumerate(subjects)}
    row_subject = arm_df["subject_id"].map(pos).to_numpy(dtype=int)
    rows_by_subject = [np.flatnonzero(row_subject == i) for i in range(len(subjects))]

    def statistic(idx: np.ndarray) -> float:
        rows = np.concatenate([rows_by_subject[i] for i in idx.astype(int)])
        return auc_or_nan(y[rows], score[rows])

    point = auc_or_nan(y, score)
    out = {"auc": point, "auc_low": np.nan, "auc_high": np.nan, "n_resamples": int(n_resamples),
           "n_undefined_resamples": 0, "seed": seed}
    if len(subjects) < 2 or not np.isfinite(point):
        return out
    result = sps.bootstrap((np.arange(len(subjects)),), statistic, n_resamples=n_resamples, vectorized=False,
                           method="percentile", confidence_level=confidence, rng=np.random.default_rng(seed))
    dist = np.asarray(result.bootstrap_distribution, dtype=float)
    defined = dist[np.isfinite(dist)]
    alpha = (1.0 - confidence) / 2.0
    out["n_undefined_resamples"] = int(len(dist) - len(defined))
    if len(defined):
        out["auc_low"], out["auc_high"] = (float(v) for v in np.percentile(defined, [100 * alpha, 100 * (1 - alpha)]))
    return out


def sensitivity_specificity(y: np.ndarray, predicted_positive: np.ndarray) -> tuple[float, float]:
    """TP / (TP + FN) and TN / (TN + FP); NaN where the denominator is 0."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(predicted_positive, dtype=bool)
    tp, fn, tn, fp = (y & p).sum(), (y & ~p).sum(), (~y & ~p).sum(), (~y & p).sum()
    sens = tp / (tp + fn) if tp + fn else np.nan
    spec = tn / (tn + fp) if tn + fp else np.nan
    return float(sens), float(spec)


def binary_summary(preds: pd.DataFrame, classes: list[str], arms: list[Arm], n_resamples: int = 2000,
                   seed: int = 0) -> pd.DataFrame:
    """One row per arm with predictions: AUC [bootstrap CI], average precision, sensitivity and specificity."""
    threshold, source = decision_threshold()
    rows = []
    for arm, arm_df in _arm_frames(preds, arms):
        y, score = _target_score(arm_df, classes)
        sens, spec = sensitivity_specificity(y, score > threshold)
        ap = float(average_precision_score(y, score)) if y.any() else np.nan
        rows.append({"model": arm[0], "pretrained": arm[1], "positive_class": positive_class(classes),
                     "n_predictions": len(arm_df), "n_subjects": int(arm_df["subject_id"].nunique()),
                     **bootstrap_auc_ci(arm_df, classes, n_resamples, seed), "average_precision": ap,
                     "threshold": threshold, "threshold_source": source, "sensitivity": sens, "specificity": spec})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def pr_curves(preds: pd.DataFrame, classes: list[str], arms: list[Arm]) -> dict:
    """arm -> (recall, precision, average precision, positive prevalence) from sklearn's precision_recall_curve."""
    curves = {}
    for arm, arm_df in _arm_frames(preds, arms):
        y, score = _target_score(arm_df, classes)
        if not y.any():
            continue  # no positive subject: precision-recall is undefined
        precision, recall, _ = precision_recall_curve(y, score)
        curves[arm] = (recall, precision, float(average_precision_score(y, score)), float(y.mean()))
    return curves


def classification_report_table(preds: pd.DataFrame, classes: list[str], arms: list[Arm]) -> pd.DataFrame:
    """sklearn's classification_report (output_dict) per arm at the decision threshold: one row per class,
    then accuracy (in the f1 column, as sklearn prints it), macro avg and weighted avg; zero_division=0."""
    threshold, _ = decision_threshold()
    rows = []
    for arm, arm_df in _arm_frames(preds, arms):
        report = classification_report(arm_df["label"].to_numpy(), threshold_predictions(arm_df, classes, threshold),
                                       labels=classes, output_dict=True, zero_division=0)
        for name in [*classes, "accuracy", "macro avg", "weighted avg"]:
            if name not in report:
                continue
            r = report[name]
            if name == "accuracy":  # sklearn stores a bare float
                rows.append({"row": name, "precision": np.nan, "recall": np.nan, "f1": float(r),
                             "support": int(report["macro avg"]["support"])})
            else:
                rows.append({"row": name, "precision": float(r["precision"]), "recall": float(r["recall"]),
                             "f1": float(r["f1-score"]), "support": int(r["support"])})
            rows[-1].update({"model": arm[0], "pretrained": arm[1], "threshold": threshold})
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)
