"""Two-class runs: ROC AUC with a subject bootstrap CI, precision-recall, sensitivity/specificity at two kinds
of threshold, and a scikit-learn classification report, on each arm's pooled out-of-fold test predictions.

The positive class is the second class of the run's class order (experiment.json "classes", the order of
the prob_ columns); its score is prob_<positive>. Predicted positive means prob_<positive> > threshold.

Thresholds, both reported side by side:
- 0.5: exactly the argmax prediction in the `pred` column (an exact tie goes to the first class, as argmax
  does); papers that report argmax results are compared with this one.
- validation-chosen, per fold: each trial (one arm's fold) also scored its inner validation part with its
  best-validation weights (OUT/val_predictions.csv). On that part the threshold maximising Youden's J
  (sensitivity + specificity - 1) is found with sklearn.metrics.roc_curve, and that fold's own threshold is
  applied to that fold's test predictions; the folds are then pooled. Test predictions never enter the choice.
  The validation scores only fix the cut up to the gap between two neighbouring distinct scores: within the
  best gap the threshold is 0.5 when 0.5 lies in it (nothing on validation argues against argmax), else the
  gap's midpoint (the widest margin to both neighbours). When several gaps give the same J, the one whose cut
  is closest to 0.5 wins (the lower on an exact tie): 0.5 is the rule the model was trained and selected
  under, so a tie should move it least. A fold falls back to 0.5, and the tables say why, when its validation
  part holds one class only, when no cut beats chance there (J <= 0), or when the run saved no validation
  predictions (runs made before they were saved). The validation weights were chosen on that same part, so its
  scores are optimistic: fine for placing a threshold, never used as an estimate.
ROC AUC, average precision and the precision-recall curves are threshold-free and use the test predictions only.
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
    roc_curve,
)

from analysis.names import Arm, arm_frames, arm_mask
from analysis.stats import defined_percentile_interval

THRESHOLD = 0.5
ARGMAX_RULE = "0.5"  # values of the classification report's threshold_rule column
VALIDATION_RULE = "validation"
# Why a fold uses 0.5 instead of a validation-chosen threshold.
NO_VALIDATION = "no validation predictions (a run made before they were saved)"
ONE_CLASS = "its validation part holds one class only"
NO_SIGNAL = "no cut beats chance on its validation part (Youden's J <= 0)"
YOUDEN = "Youden's J on validation"

THRESHOLD_COLUMNS = ["model", "pretrained", "fold", "trial_name", "n_val", "n_val_positive", "threshold", "chosen_by",
                     "val_youden_j", "val_sensitivity", "val_specificity"]
SUMMARY_COLUMNS = ["model", "pretrained", "positive_class", "n_predictions", "n_subjects", "auc", "auc_low", "auc_high",
                   "n_resamples", "n_undefined_resamples", "seed", "average_precision", "threshold", "threshold_source",
                   "sensitivity", "specificity", "sensitivity_argmax", "specificity_argmax"]
REPORT_COLUMNS = ["model", "pretrained", "threshold_rule", "row", "precision", "recall", "f1", "support", "threshold"]


def is_binary(classes: list[str]) -> bool:
    return len(classes) == 2


def positive_class(classes: list[str]) -> str:
    """The second class of the run's class order."""
    return classes[1]


def _target_score(arm_df: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(1 where the label is the positive class else 0, prob_<positive>): the inputs of every two-class score,
    on test rows and on validation rows alike."""
    pos = positive_class(classes)
    return (arm_df["label"] == pos).to_numpy(dtype=int), arm_df[f"prob_{pos}"].to_numpy(dtype=float)


def threshold_predictions(arm_df: pd.DataFrame, classes: list[str], threshold: float | np.ndarray) -> np.ndarray:
    """Class names: the positive class where prob_<positive> > threshold (one value, or one per row), else the
    negative class."""
    _, score = _target_score(arm_df, classes)
    return np.where(score > threshold, classes[1], classes[0])


# --------------------------------------------------------------------------------- validation thresholds
def youden_threshold(y: np.ndarray, score: np.ndarray) -> tuple[float, str]:
    """(threshold, how it was chosen) on one validation part: the cut maximising Youden's J, ties to 0.5.

    ``y`` is 1 for the positive class. sklearn's roc_curve (drop_intermediate=False: every distinct score is a
    candidate, so a tie is seen whole) predicts positive for score >= cut; with this module's "> threshold"
    the same operating point holds for any threshold in [next lower distinct score, cut), from which the
    module docstring's rule picks one. Falls back to 0.5 with the reason (ONE_CLASS, NO_SIGNAL).
    """
    y = np.asarray(y, dtype=int)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return THRESHOLD, ONE_CLASS
    fpr, tpr, cuts = roc_curve(y, np.asarray(score, dtype=float), drop_intermediate=False)
    # J * P * N = TP * N - FP * P in whole numbers, so that equal J values compare equal.
    tp, fp = np.rint(tpr * positives).astype(int), np.rint(fpr * negatives).astype(int)
    j = tp * negatives - fp * positives
    if j.max() <= 0:
        return THRESHOLD, NO_SIGNAL
    # J is 0 at both ends (nobody positive at cuts[0], everybody at cuts[-1]): every best point has two neighbours.
    candidates = []
    for i in np.flatnonzero(j == j.max()):
        low, high = float(cuts[i + 1]), float(cuts[i])
        candidates.append(THRESHOLD if low <= THRESHOLD < high else (low + high) / 2)
    return min(candidates, key=lambda cut: (abs(cut - THRESHOLD), cut)), YOUDEN


def fold_thresholds(test_preds: pd.DataFrame, val_preds: pd.DataFrame | None, classes: list[str]) -> pd.DataFrame:
    """One row per trial (an arm's fold) of ``test_preds``: its threshold chosen on its own validation rows
    (``val_preds``, matched by trial_name; None or no rows: 0.5) and the validation sensitivity, specificity and J
    at that threshold. Only validation rows are read, and a trial whose validation rows include one of its own
    test subjects is refused: its threshold would have seen the subject it is applied to.
    """
    rows = []
    for trial in test_preds.drop_duplicates("trial_name").itertuples(index=False):
        val = val_preds[val_preds["trial_name"] == trial.trial_name] if val_preds is not None else test_preds.iloc[:0]
        tested = set(test_preds.loc[test_preds["trial_name"] == trial.trial_name, "subject_id"])
        both = sorted(tested & set(val["subject_id"]))
        if both:
            raise ValueError(f"val_predictions.csv: trial {trial.trial_name!r} has validation rows for its own test "
                             f"subject(s) {both[:5]}; a fold's validation part must exclude its test fold (check "
                             "splits.json and rerun the trial)")
        y, score = _target_score(val, classes)
        threshold, chosen_by = youden_threshold(y, score) if len(val) else (THRESHOLD, NO_VALIDATION)
        sens, spec = sensitivity_specificity(y, score > threshold)
        rows.append({"model": trial.model, "pretrained": trial.pretrained, "fold": trial.fold,
                     "trial_name": trial.trial_name, "n_val": len(val), "n_val_positive": int(y.sum()),
                     "threshold": threshold, "chosen_by": chosen_by, "val_youden_j": sens + spec - 1,
                     "val_sensitivity": sens, "val_specificity": spec})
    table = pd.DataFrame(rows, columns=THRESHOLD_COLUMNS)
    return table.sort_values(["model", "pretrained", "fold", "trial_name"], kind="stable").reset_index(drop=True)


def threshold_source(arm_thresholds: pd.DataFrame) -> str:
    """How an arm's folds got their thresholds, in one line (median and range over the folds)."""
    values = arm_thresholds["threshold"]
    fallbacks = arm_thresholds[arm_thresholds["chosen_by"] != YOUDEN]
    if len(fallbacks) == len(arm_thresholds):
        return "0.5 in every fold: " + "; ".join(sorted(set(fallbacks["chosen_by"])))
    text = (f"each fold's own threshold, chosen by Youden's J on its validation part (median {values.median():.3g}, "
            f"range {values.min():.3g}-{values.max():.3g} over {len(values)} fold(s))")
    for reason, group in sorted(fallbacks.groupby("chosen_by"), key=lambda item: item[1]["fold"].min()):
        text += f"; 0.5 in fold(s) {', '.join(str(f) for f in sorted(group['fold']))}: {reason}"
    return text


def per_row_threshold(arm_df: pd.DataFrame, thresholds: pd.DataFrame) -> np.ndarray:
    """Each test row's fold threshold (by trial_name); a trial without one is an error, not a silent 0.5."""
    by_trial = dict(zip(thresholds["trial_name"], thresholds["threshold"]))
    missing = sorted(set(arm_df["trial_name"]) - set(by_trial))
    if missing:
        raise ValueError(f"no threshold for trial(s) {missing}: compute fold_thresholds on the same predictions")
    return arm_df["trial_name"].map(by_trial).to_numpy(dtype=float)


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
    out["n_undefined_resamples"] = int(np.isnan(dist).sum())
    out["auc_low"], out["auc_high"] = (float(v) for v in defined_percentile_interval(dist, confidence))
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
                   seed: int = 0, thresholds: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per arm with predictions: AUC [bootstrap CI], average precision, and pooled sensitivity and
    specificity at each fold's validation-chosen threshold (``thresholds`` from fold_thresholds; None: 0.5 in
    every fold) and at 0.5 (``*_argmax``). ``threshold`` is the median of the arm's fold thresholds, a summary
    only: each fold used its own (``threshold_source``)."""
    thresholds = fold_thresholds(preds, None, classes) if thresholds is None else thresholds
    rows = []
    for arm, arm_df in arm_frames(preds, arms):
        y, score = _target_score(arm_df, classes)
        arm_thresholds = thresholds[arm_mask(thresholds, arm)]
        sens, spec = sensitivity_specificity(y, score > per_row_threshold(arm_df, thresholds))
        sens_argmax, spec_argmax = sensitivity_specificity(y, score > THRESHOLD)
        ap = float(average_precision_score(y, score)) if y.any() else np.nan
        rows.append({"model": arm[0], "pretrained": arm[1], "positive_class": positive_class(classes),
                     "n_predictions": len(arm_df), "n_subjects": int(arm_df["subject_id"].nunique()),
                     **bootstrap_auc_ci(arm_df, classes, n_resamples, seed), "average_precision": ap,
                     "threshold": float(arm_thresholds["threshold"].median()),
                     "threshold_source": threshold_source(arm_thresholds), "sensitivity": sens, "specificity": spec,
                     "sensitivity_argmax": sens_argmax, "specificity_argmax": spec_argmax})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def pr_curves(preds: pd.DataFrame, classes: list[str], arms: list[Arm]) -> dict:
    """arm -> (recall, precision, average precision, positive prevalence) from sklearn's precision_recall_curve."""
    curves = {}
    for arm, arm_df in arm_frames(preds, arms):
        y, score = _target_score(arm_df, classes)
        if not y.any():
            continue  # no positive subject: precision-recall is undefined
        precision, recall, _ = precision_recall_curve(y, score)
        curves[arm] = (recall, precision, float(average_precision_score(y, score)), float(y.mean()))
    return curves


def classification_report_table(preds: pd.DataFrame, classes: list[str], arms: list[Arm],
                                thresholds: pd.DataFrame | None = None) -> pd.DataFrame:
    """sklearn's classification_report (output_dict) per arm and threshold rule: ``threshold_rule`` "0.5" (argmax)
    then "validation" (each fold's threshold from ``thresholds``; None: 0.5 in every fold; ``threshold`` holds
    their median). One row per class, then accuracy (in the f1 column, as sklearn prints it), macro avg and
    weighted avg; zero_division=0."""
    thresholds = fold_thresholds(preds, None, classes) if thresholds is None else thresholds
    rows = []
    for arm, arm_df in arm_frames(preds, arms):
        applied = {ARGMAX_RULE: (THRESHOLD, THRESHOLD),
                   VALIDATION_RULE: (per_row_threshold(arm_df, thresholds),
                                     float(thresholds[arm_mask(thresholds, arm)]["threshold"].median()))}
        for rule, (per_row, summary) in applied.items():
            report = classification_report(arm_df["label"].to_numpy(), threshold_predictions(arm_df, classes, per_row),
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
                rows[-1].update({"model": arm[0], "pretrained": arm[1], "threshold_rule": rule, "threshold": summary})
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)
