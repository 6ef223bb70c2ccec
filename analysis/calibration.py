"""Calibration of the predicted probabilities: Brier score, expected calibration error, reliability curves.

Definitions (the same for two-class and multi-class runs, on each arm's pooled out-of-fold test predictions):

- Brier score = mean over classes of the one-vs-rest Brier score, sklearn's brier_score_loss of
  (label == class) against prob_<class>. For two classes this equals the usual binary Brier score of
  either class (both classes have the same squared error); it is 1/K of the K-class "multi-class Brier" sum
  (a half for two classes, a third for LGG / HGG / Healthy).
- Expected calibration error (ECE) on the top-class confidence c = max_k prob_k, whose prediction is
  the argmax class: 10 equal-width bins closed on the right, [0, 0.1], (0.1, 0.2], ..., (0.9, 1.0] (the
  binning of sklearn.calibration.calibration_curve, strategy="uniform", which draws the reliability figure,
  so a confidence of exactly 0.8 is counted with 0.75, not with 0.85); ECE = sum over non-empty bins b of
  (n_b / N) * |accuracy_b - mean confidence_b|.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from analysis.names import Arm, arm_frames

N_BINS = 10
CALIBRATION_COLUMNS = ["model", "pretrained", "n_predictions", "n_subjects", "brier", "ece", "n_bins"]

BRIER_DEFINITION = ("Brier = mean over classes of the one-vs-rest Brier score (sklearn brier_score_loss of "
                    "label == class against prob_<class>; with two classes this is the ordinary binary Brier score)")
ECE_DEFINITION = ("ECE = expected calibration error on the top-class confidence (the largest prob_, whose class is "
                  "the prediction): 10 equal-width bins [0, 0.1], (0.1, 0.2], ..., (0.9, 1], as the reliability figure; ECE = Σ_b (n_b / N) × "
                  "|accuracy_b − mean confidence_b| over non-empty bins; 0 is perfectly calibrated")


def _label_index(labels, classes: list[str]) -> np.ndarray:
    codes = {c: i for i, c in enumerate(classes)}
    return np.asarray([codes[label] for label in labels], dtype=int)


def _probabilities(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return frame[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)


def top_class(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, predicted class index): the largest probability and its argmax (ties: the earlier class)."""
    probs = np.asarray(probs, dtype=float)
    pred = probs.argmax(axis=1)
    return probs[np.arange(len(probs)), pred], pred


def brier_ovr(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean over classes of sklearn's one-vs-rest Brier score; y_true holds class indices (columns of probs)."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    scores = [brier_score_loss((y_true == k).astype(int), probs[:, k], pos_label=1, labels=[0, 1])
              for k in range(probs.shape[1])]
    return float(np.mean(scores))


def bin_ids(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Equal-width bin of each confidence, as calibration_curve(strategy="uniform") assigns them: closed on the right."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(confidence, dtype=float), side="left")


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE on the top-class confidence (see the module docstring); y_true holds class indices."""
    confidence, pred = top_class(probs)
    correct = (pred == np.asarray(y_true, dtype=int)).astype(float)
    if len(correct) == 0:
        return np.nan
    ids = bin_ids(confidence, n_bins)
    counts = np.bincount(ids, minlength=n_bins).astype(float)
    acc = np.bincount(ids, weights=correct, minlength=n_bins)
    conf = np.bincount(ids, weights=confidence, minlength=n_bins)
    nonempty = counts > 0
    gaps = np.abs(acc[nonempty] - conf[nonempty]) / counts[nonempty]
    return float(np.sum(counts[nonempty] / len(correct) * gaps))


def calibration_table(preds: pd.DataFrame, classes: list[str], arms: list[Arm]) -> pd.DataFrame:
    """One row per arm with predictions: Brier (one-vs-rest mean) and ECE (10 bins) on pooled test predictions."""
    rows = []
    for (model, pretrained), arm_df in arm_frames(preds, arms):
        y = _label_index(arm_df["label"], classes)
        probs = _probabilities(arm_df, classes)
        rows.append({"model": model, "pretrained": pretrained, "n_predictions": len(arm_df),
                     "n_subjects": int(arm_df["subject_id"].nunique()), "brier": brier_ovr(y, probs),
                     "ece": expected_calibration_error(y, probs), "n_bins": N_BINS})
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def reliability_curves(preds: pd.DataFrame, classes: list[str], arms: list[Arm]) -> dict:
    """arm -> (mean confidence, accuracy) per non-empty bin, from sklearn's calibration_curve on
    (top-class prediction correct, top-class confidence) with 10 uniform bins."""
    curves = {}
    for (model, pretrained), arm_df in arm_frames(preds, arms):
        confidence, pred = top_class(_probabilities(arm_df, classes))
        correct = (pred == _label_index(arm_df["label"], classes)).astype(int)
        accuracy, mean_confidence = calibration_curve(correct, confidence, pos_label=1, n_bins=N_BINS,
                                                         strategy="uniform")
        curves[(model, pretrained)] = (mean_confidence, accuracy)
    return curves
