"""One-fold training, plain Python first; Ray Tune wraps it without changing it."""
from trainables.fold_training import DEFAULT_CONFIG, PAPER_DEFAULTS, FoldResult, resolve_config, train_fold
from trainables.metrics import class_weights, classification_metrics

__all__ = ["DEFAULT_CONFIG", "PAPER_DEFAULTS", "FoldResult", "class_weights", "classification_metrics",
           "resolve_config", "train_fold"]
