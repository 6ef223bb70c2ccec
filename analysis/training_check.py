"""Did training learn? Per fold and per arm, from epochs.csv, predictions.csv and the bootstrap intervals.

Why: a short run can end with numbers that look like results although the network learned nothing:
the training loss never fell, validation predicted one class in most epochs (so model selection chose
by noise), or the test fold got one class for every subject. A reviewer must see that before reading
any score, so the report says it in a section of its own and in its warnings.

A fold is flagged when any of these holds (thresholds are module constants, printed in the report):

- **training loss did not fall**: the mean training loss of the last ``LOSS_TAIL`` epochs is at least
  ``LOSS_FALL`` times the first epoch's (with one epoch there is nothing to compare: not judged);
- **validation predicted one class** in at least ``ONE_CLASS_SHARE`` of the epochs (``val_predicted_classes``
  in epochs.csv; runs written before that column existed are not judged on it, and the report says so);
- **the test fold got one class** for every subject (from predictions.csv).

An arm is *not above chance* when the lower end of its pooled macro-F1 bootstrap interval is at or below
``1 / K``: a guess that follows the class frequencies scores macro F1 ``1 / K`` in expectation (each
class's precision and recall are its prevalence ``p``, so its F1 is ``p``, and the ``p`` sum to 1).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.document import Document
from analysis.names import Arm, arm_frames, arm_label, arm_mask

LOSS_TAIL = 3  # epochs averaged at the end: one epoch's training loss jumps with its batches and augmentation
LOSS_FALL = 0.9  # "fell" means by more than 10 % of the first epoch's loss
ONE_CLASS_SHARE = 0.5
FOLD_COLUMNS = ["model", "pretrained", "fold", "epochs_run", "train_loss_first", "train_loss_end",
                "val_one_class_epochs", "test_predicted_classes", "learned", "reasons"]
ARM_COLUMNS = ["model", "pretrained", "folds", "folds_not_learned", "macro_f1_pooled", "macro_f1_low",
               "macro_f1_high", "chance", "above_chance"]


def fold_learning(epochs: pd.DataFrame | None, preds: pd.DataFrame, arms: list[Arm]) -> pd.DataFrame:
    """One row per (arm, fold) with test predictions: the numbers behind the verdict and the verdict."""
    rows = []
    for arm, arm_preds in arm_frames(preds, arms):
        for fold, fold_preds in arm_preds.groupby("fold", sort=True):
            history = None
            if epochs is not None:
                history = epochs[arm_mask(epochs, arm) & (epochs["fold"] == fold)].sort_values("epoch")
            rows.append({"model": arm[0], "pretrained": arm[1], "fold": int(fold),
                         **_judge(history, fold_preds["pred"].nunique())})
    return pd.DataFrame(rows, columns=FOLD_COLUMNS)


def _judge(history: pd.DataFrame | None, test_classes: int) -> dict:
    reasons = []
    first = end = np.nan
    n_epochs = 0 if history is None else len(history)
    one_class = np.nan
    if n_epochs:
        losses = history["train_loss"].to_numpy(dtype=float)
        first, end = losses[0], float(np.mean(losses[1:][-LOSS_TAIL:])) if n_epochs > 1 else np.nan
        if not np.isfinite(losses).all():  # diverged (inf / NaN): no fall to measure, and nothing learned from it
            bad = int((~np.isfinite(losses)).sum())
            reasons.append(f"training loss not finite (inf or NaN) in {bad} of {n_epochs} epochs")
        elif n_epochs > 1 and end >= LOSS_FALL * first:
            reasons.append(f"training loss did not fall ({first:.3f} in epoch 1, {end:.3f} at the end)")
        predicted = pd.to_numeric(history.get("val_predicted_classes", pd.Series(dtype=float)), errors="coerce")
        if len(predicted) == n_epochs and predicted.notna().all():
            one_class = int((predicted == 1).sum())
            if one_class >= ONE_CLASS_SHARE * n_epochs:
                reasons.append(f"validation predicted one class in {one_class} of {n_epochs} epochs")
    if test_classes == 1:
        reasons.append("the test fold got one class for every subject")
    return {"epochs_run": n_epochs, "train_loss_first": first, "train_loss_end": end, "val_one_class_epochs": one_class,
            "test_predicted_classes": int(test_classes), "learned": not reasons, "reasons": "; ".join(reasons)}


def arm_learning(folds: pd.DataFrame, boot: pd.DataFrame, arms: list[Arm], n_classes: int) -> pd.DataFrame:
    """One row per arm with results: folds flagged, and the pooled macro F1 interval against chance (1 / K)."""
    chance = 1.0 / n_classes
    rows = []
    for arm, arm_folds in arm_frames(folds, arms):
        ci = boot[arm_mask(boot, arm) & (boot["metric"] == "macro_f1")]
        pooled, low, high = (ci.iloc[0][["pooled", "low", "high"]].astype(float) if len(ci) else (np.nan,) * 3)
        rows.append({"model": arm[0], "pretrained": arm[1], "folds": len(arm_folds),
                     "folds_not_learned": int((~arm_folds["learned"]).sum()), "macro_f1_pooled": pooled,
                     "macro_f1_low": low, "macro_f1_high": high, "chance": chance,
                     "above_chance": bool(low > chance) if np.isfinite(low) else None})
    return pd.DataFrame(rows, columns=ARM_COLUMNS)


def warnings(arms: pd.DataFrame) -> list[str]:
    """Top-of-report lines: folds that did not learn, arms whose interval reaches chance."""
    items = []
    for row in arms.itertuples(index=False):
        label = arm_label(row.model, row.pretrained)
        if row.folds_not_learned:
            items.append(f"**Training did not learn** for {label} in {row.folds_not_learned} of {row.folds} fold(s) "
                         "(see *Did training learn?*).")
        if row.above_chance is not None and not row.above_chance:
            items.append(f"**Not above chance**: {label}'s pooled macro F1 is {row.macro_f1_pooled:.3f} with 95% "
                         f"interval [{row.macro_f1_low:.3f}, {row.macro_f1_high:.3f}], which reaches chance "
                         f"({row.chance:.3f}).")
    return items


def section(doc: Document, folds: pd.DataFrame, arms: pd.DataFrame, n_boot: int) -> None:
    doc.heading("Did training learn?", 2)
    doc.para(f"Per fold, from epochs.csv and the test predictions. A fold is flagged when its training loss did not "
             f"fall (the mean of its last {LOSS_TAIL} epochs after the first is at least {LOSS_FALL:g} x the first "
             f"epoch's), when validation predicted a single class in at least {ONE_CLASS_SHARE:.0%} of its epochs "
             "(model selection then chose among near-constant predictions), or when every test subject got the same "
             "class. Per arm, *above chance* means the lower end of the pooled macro-F1 95% bootstrap interval "
             f"({n_boot} subject resamples, see *Bootstrap 95% confidence intervals*) is above 1/K, what a guess "
             "following the class frequencies scores in expectation.")
    # Judged per fold (_judge): a fold without the column's values, e.g. an older trial, was not checked.
    unjudged = int(folds["val_one_class_epochs"].isna().sum())
    if unjudged:
        doc.para(f"epochs.csv has no `val_predicted_classes` values for {unjudged} of {len(folds)} fold(s) (trials "
                 "written before the column existed): for them the one-class-validation check was not made.")
    if arms.empty:
        doc.para("No paper-protocol predictions.")
        return
    table = pd.DataFrame({
        "Arm": [arm_label(m, p) for m, p in zip(arms["model"], arms["pretrained"])],
        "Folds flagged": [f"{n} / {f}" for n, f in zip(arms["folds_not_learned"], arms["folds"])],
        "Pooled macro F1 [95% CI]": [f"{p:.3f} [{lo:.3f}, {hi:.3f}]"
                                     for p, lo, hi in zip(arms["macro_f1_pooled"], arms["macro_f1_low"], arms["macro_f1_high"])],
        "Chance (1/K)": [f"{c:.3f}" for c in arms["chance"]],
        "Above chance": ["unknown" if a is None else ("yes" if a else "**no**") for a in arms["above_chance"]],
    })
    doc.table(table)
    flagged = folds[~folds["learned"]]
    if flagged.empty:
        doc.para("No fold was flagged.")
    else:
        doc.bullets([f"{arm_label(r.model, r.pretrained)}, fold {r.fold}: {r.reasons}." for r in flagged.itertuples()])
