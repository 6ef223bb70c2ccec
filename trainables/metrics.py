"""Epoch metrics from scikit-learn, keyed the way reporters and TensorBoard show them."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def class_weights(targets: Sequence[int], n_classes: int) -> np.ndarray:
    """The paper's W_c = 1 - n_c / N over the training part: rarer classes weigh more."""
    counts = np.bincount(np.asarray(targets, dtype=int), minlength=n_classes)
    if counts.sum() == 0:
        raise ValueError("class_weights needs at least one training target")
    return 1.0 - counts / counts.sum()


def classification_metrics(prefix: str, targets: Sequence[int], predictions: Sequence[int], classes: Sequence[str]) -> dict[str, float]:
    labels = list(range(len(classes)))
    per_class = f1_score(targets, predictions, labels=labels, average=None, zero_division=0)
    metrics = {
        f"{prefix}_accuracy": float(accuracy_score(targets, predictions)),
        f"{prefix}_macro_f1": float(f1_score(targets, predictions, labels=labels, average="macro", zero_division=0)),
    }
    metrics.update({f"{prefix}_f1_{name}": float(value) for name, value in zip(classes, per_class)})
    return metrics
