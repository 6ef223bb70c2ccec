"""Epoch metrics from scikit-learn, keyed the way reporters and TensorBoard show them, and the weighted loss."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from torch import nn


def class_weights(targets: Sequence[int], n_classes: int) -> np.ndarray:
    """The paper's W_c = 1 - n_c / N over the training part: rarer classes weigh more."""
    counts = np.bincount(np.asarray(targets, dtype=int), minlength=n_classes)
    if counts.sum() == 0:
        raise ValueError("class_weights needs at least one training target")
    return 1.0 - counts / counts.sum()


# result.json's "loss": how the class weights entered the loss. Folds written before it lack the key: they used
# torch's per-batch weighted mean, under which a batch of one sample ignores its weight.
LOSS_PER_SAMPLE = "class_weighted_per_sample"
LOSS_PER_BATCH = "class_weighted_per_batch"  # trials.csv's name for those older folds


class WeightedCrossEntropy(nn.Module):
    """The paper's weighted cross-entropy, with each class weight acting on its own samples.

    torch's ``CrossEntropyLoss(weight=w)`` returns sum(w_y nll) / sum(w_y) within each batch: at the paper's batch
    size 1 the weight cancels (plain cross-entropy), and at batch 4 a batch of one class counts as much as any other.
    Here a batch's loss is mean(w_y nll) / w_mean, where ``w_mean`` is the mean weight over the training part
    (sum_c n_c w_c / N): over an epoch's batches it sums to the weighted mean over the whole training part, whatever
    the batch size, and its gradients keep an unweighted loss's size on average (the learning rate means the same).
    """

    def __init__(self, weights: Sequence[float], mean_weight: float) -> None:
        super().__init__()
        if mean_weight <= 0:
            raise ValueError(f"mean_weight must be positive, got {mean_weight}")
        self.register_buffer("weight", torch.as_tensor(np.asarray(weights, dtype=np.float32)))
        self.mean_weight = float(mean_weight)

    @classmethod
    def for_training_part(cls, targets: Sequence[int], n_classes: int) -> "WeightedCrossEntropy":
        weights = class_weights(targets, n_classes)
        return cls(weights, float(weights[np.asarray(targets, dtype=int)].mean()))

    def _weighted_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, weight=self.weight, reduction="sum")  # sum of w_y * nll

    def sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sum(w_y nll) and sum(w_y) over the batch: their ratio, summed over a whole part, is its weighted mean."""
        return self._weighted_nll(logits, labels), self.weight[labels].sum()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._weighted_nll(logits, labels) / (len(labels) * self.mean_weight)


def classification_metrics(prefix: str, targets: Sequence[int], predictions: Sequence[int], classes: Sequence[str]) -> dict[str, float]:
    labels = list(range(len(classes)))
    per_class = f1_score(targets, predictions, labels=labels, average=None, zero_division=0)
    metrics = {
        f"{prefix}_accuracy": float(accuracy_score(targets, predictions)),
        f"{prefix}_macro_f1": float(f1_score(targets, predictions, labels=labels, average="macro", zero_division=0)),
    }
    metrics.update({f"{prefix}_f1_{name}": float(value) for name, value in zip(classes, per_class)})
    return metrics
