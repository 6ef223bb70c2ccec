"""Per-fold and pooled classification metrics, all computed by scikit-learn.

Per fold = on that fold's test predictions; summarised as mean and sample std (ddof=1) over folds,
as the paper's "mean ± std over 3 folds". Pooled = the same metric on all out-of-fold predictions of
an arm concatenated: with a minority class (LGG) a fold holds only a couple of dozen of it, and
the mean of per-fold F1 is a biased estimate of the F1 of the whole cohort.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from analysis.names import Arm, arm_frames

CLASS_METRICS = ["precision", "recall", "specificity", "f1"]
OVERALL_METRICS = ["accuracy", "macro_f1", "weighted_f1"]


def class_metrics(y_true, y_pred, classes: list[str]) -> pd.DataFrame:
    """One row per class: precision, recall, specificity, f1, support (sklearn, zero_division=0).

    Specificity = TN / (TN + FP), one-vs-rest, from sklearn's multilabel confusion matrix; it is NaN
    (undefined, not 0) when every sample belongs to the class. Likewise a class with no sample in these
    predictions has NaN recall, and NaN F1 and precision when it was never predicted either: sklearn's 0 would
    count a fold that could not measure the class as a fold that failed it, in every mean over folds.
    """
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average=None, zero_division=0)
    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=classes)
    tn, fp = mcm[:, 0, 0].astype(float), mcm[:, 0, 1].astype(float)
    absent, unused = support == 0, (support == 0) & (fp == 0)
    recall = np.where(absent, np.nan, recall)
    f1, precision = np.where(unused, np.nan, f1), np.where(unused, np.nan, precision)
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall,
                         "specificity": specificity, "f1": f1, "support": support.astype(int)})


def overall_metrics(y_true, y_pred, classes: list[str]) -> dict[str, float]:
    """Accuracy, macro F1 and weighted F1 over the classes these predictions can measure (zero_division=0): those
    with a sample or a prediction; a class with neither (absent from a fold) would add a 0 to the macro mean."""
    seen = set(pd.Series(y_true)) | set(pd.Series(y_pred))
    labels = [c for c in classes if c in seen]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
    }


@dataclass
class ArmMetrics:
    """All metric tables for the paper-protocol arms."""

    per_fold_class: pd.DataFrame    # model, pretrained, fold, trial_name, class, precision, recall, specificity, f1, support
    per_fold_overall: pd.DataFrame  # model, pretrained, fold, trial_name, n_test, accuracy, macro_f1, weighted_f1
    per_class: pd.DataFrame         # model, pretrained, class, metric, mean, std, pooled
    overall: pd.DataFrame           # model, pretrained, metric, mean, std, pooled
    support: pd.DataFrame           # model, pretrained, class, support (pooled count)


def arm_metrics(preds: pd.DataFrame, classes: list[str], arms: list[Arm]) -> ArmMetrics:
    """Metrics per fold and pooled for every arm that has predictions (arms without any get no rows)."""
    fold_class_rows, fold_overall_rows, class_rows, overall_rows, support_rows = [], [], [], [], []
    for (model, pretrained), arm_df in arm_frames(preds, arms):
        arm_fold_class, arm_fold_overall = [], []
        for (fold, trial), fold_df in arm_df.groupby(["fold", "trial_name"], sort=True):
            cm = class_metrics(fold_df["label"], fold_df["pred"], classes)
            cm.insert(0, "trial_name", trial)
            cm.insert(0, "fold", int(fold))
            cm.insert(0, "pretrained", pretrained)
            cm.insert(0, "model", model)
            arm_fold_class.append(cm)
            arm_fold_overall.append({"model": model, "pretrained": pretrained, "fold": int(fold), "trial_name": trial,
                                     "n_test": len(fold_df), **overall_metrics(fold_df["label"], fold_df["pred"], classes)})
        fold_class_rows.extend(arm_fold_class)
        fold_overall_rows.extend(arm_fold_overall)
        pooled_class = class_metrics(arm_df["label"], arm_df["pred"], classes).set_index("class")
        pooled_overall = overall_metrics(arm_df["label"], arm_df["pred"], classes)
        fc = pd.concat(arm_fold_class, ignore_index=True)
        for cls in classes:
            per_fold = fc[fc["class"] == cls]
            for metric in CLASS_METRICS:
                class_rows.append({"model": model, "pretrained": pretrained, "class": cls, "metric": metric,
                                   **_summary(per_fold[metric]), "pooled": float(pooled_class.loc[cls, metric])})
            support_rows.append({"model": model, "pretrained": pretrained, "class": cls,
                                 "support": int(pooled_class.loc[cls, "support"])})
        fo = pd.DataFrame(arm_fold_overall)
        for metric in OVERALL_METRICS:
            overall_rows.append({"model": model, "pretrained": pretrained, "metric": metric,
                                 **_summary(fo[metric]), "pooled": pooled_overall[metric]})
    return ArmMetrics(
        per_fold_class=_frame(fold_class_rows, ["model", "pretrained", "fold", "trial_name", "class", "precision",
                                                "recall", "specificity", "f1", "support"]),
        per_fold_overall=_frame(fold_overall_rows, ["model", "pretrained", "fold", "trial_name", "n_test", *OVERALL_METRICS]),
        per_class=_frame(class_rows, ["model", "pretrained", "class", "metric", "mean", "std", "pooled"]),
        overall=_frame(overall_rows, ["model", "pretrained", "metric", "mean", "std", "pooled"]),
        support=_frame(support_rows, ["model", "pretrained", "class", "support"]),
    )


def _summary(values: pd.Series) -> dict[str, float]:
    """Mean and sample std (ddof=1) over folds; std is NaN with a single fold rather than a fake 0."""
    values = values.astype(float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.notna().sum() > 1 else np.nan}


def _frame(rows: list, columns: list[str]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.concat(rows, ignore_index=True) if isinstance(rows[0], pd.DataFrame) else pd.DataFrame(rows)
    return frame[columns].reset_index(drop=True)


def confusion_counts(preds: pd.DataFrame, classes: list[str], arms: list[Arm]) -> pd.DataFrame:
    """Confusion matrix per arm, counts summed over folds, with row-normalised fractions.

    Long format: model, pretrained, true, pred, count, row_fraction (rows = true class, as in the paper).
    """
    rows = []
    for (model, pretrained), arm_df in arm_frames(preds, arms):
        counts = np.zeros((len(classes), len(classes)), dtype=int)
        for _, fold_df in arm_df.groupby("fold", sort=True):
            counts += confusion_matrix(fold_df["label"], fold_df["pred"], labels=classes)
        row_sums = counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            fractions = np.where(row_sums > 0, counts / np.maximum(row_sums, 1), np.nan)
        for i, true in enumerate(classes):
            for j, pred in enumerate(classes):
                rows.append({"model": model, "pretrained": pretrained, "true": true, "pred": pred,
                             "count": int(counts[i, j]), "row_fraction": float(fractions[i, j])})
    return _frame(rows, ["model", "pretrained", "true", "pred", "count", "row_fraction"])


def roc_per_class(preds: pd.DataFrame, classes: list[str], arms: list[Arm]) -> tuple[pd.DataFrame, dict, list[str]]:
    """One-vs-rest AUC per (arm, class): per-fold mean/std and pooled, plus pooled curves for plotting.

    A class with a single label value in the data (all or none of the subjects) has no ROC curve; it is
    skipped and named in the returned notes.
    """
    rows, curves, notes = [], {}, []
    for (model, pretrained), arm_df in arm_frames(preds, arms):
        for cls in classes:
            y_pooled = (arm_df["label"] == cls).to_numpy()
            score_pooled = arm_df[f"prob_{cls}"].to_numpy(dtype=float)
            fold_aucs = []
            for fold, fold_df in arm_df.groupby("fold", sort=True):
                y = (fold_df["label"] == cls).to_numpy()
                if y.all() or not y.any():
                    notes.append(f"{model} pretrained={pretrained} fold {fold}: class {cls} has a single label value; no AUC")
                    continue
                fold_aucs.append(roc_auc_score(y, fold_df[f"prob_{cls}"].to_numpy(dtype=float)))
            if y_pooled.all() or not y_pooled.any():
                notes.append(f"{model} pretrained={pretrained}: class {cls} has a single label value in the pooled "
                             f"predictions; ROC skipped")
                pooled = np.nan
            else:
                pooled = float(roc_auc_score(y_pooled, score_pooled))
                fpr, tpr, _ = roc_curve(y_pooled, score_pooled)
                curves[(model, pretrained, cls)] = (fpr, tpr, pooled)
            summary = _summary(pd.Series(fold_aucs, dtype=float)) if fold_aucs else {"mean": np.nan, "std": np.nan}
            rows.append({"model": model, "pretrained": pretrained, "class": cls, **summary, "pooled": pooled,
                         "folds": len(fold_aucs)})
    return _frame(rows, ["model", "pretrained", "class", "mean", "std", "pooled", "folds"]), curves, notes
