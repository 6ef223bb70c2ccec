"""The paper's training recipe as plain data, and where this tool's defaults leave it (and why).

The bottom layer that the trainable, the search space and the report all read.

Chatterjee et al. 2022: Adam with learning rate 1e-5 and weight decay 1e-3, batch size 1, dropout 0.3
before the final layer, and TorchIO's light augmentation (RandomAffine scales (0.9, 1.2), 10 degrees,
left-right flip p = 0.25) at full strength. Any option can be overridden per run (``--set``), so the
published recipe itself stays one command away: ``--set batch_size=1 lr=1e-5 bn_recalibration=false``.
"""
from __future__ import annotations

from typing import Any

PAPER_RECIPE: dict[str, Any] = {
    "lr": 1e-5,
    "weight_decay": 1e-3,
    "dropout": 0.3,
    "augmentation": "light",
    "aug_strength": 1.0,
    "batch_size": 1,
    "bn_recalibration": False,
}

# Measured on the demo phantoms (mc3_18, fold 0, 8 mm, 10 epochs): at batch size 1 the training loss stayed at
# chance (1.18 -> 1.13) with or without BN recalibration, and with batch statistics at evaluation too, and the
# validation predictions were a single class in 9 of 10 epochs. Train-mode BatchNorm over one volume normalises
# each channel of that volume by its own statistics; in the last blocks only a few positions remain, so the
# signal is normalised away. With batch size 4 the loss fell (1.11 -> 0.86 at lr 4e-5). On an independent phantom
# set (mc3_18, 6 mm, 10 epochs, 3 folds) batch size decided whether the loss fell and recalibration whether
# validation saw more than one class (pooled test macro F1: paper recipe 0.40, batch 4 alone 0.57, both 0.64);
# the README's "Which part matters" table has every combination.
DEVIATIONS: dict[str, tuple[Any, str]] = {
    "batch_size": (4, "BatchNorm in training mode needs several volumes per batch: at batch size 1 the models did "
                      "not reduce the training loss in the measurements (see search_spaces/recipe.py)"),
    "lr": (4e-5, "the paper's 1e-5 per sample-step, scaled linearly with the batch size (4 x 1e-5), so each "
                 "subject moves the weights as much as in the paper"),
    "bn_recalibration": (True, "BatchNorm's running averages are recomputed on the un-augmented training part before "
                               "every evaluation; without it, validation predicted one class in the first epochs and "
                               "model selection chose by noise"),
}

# The defaults every run starts from: the published recipe with the deviations above.
PAPER_DEFAULTS: dict[str, Any] = {**PAPER_RECIPE, **{key: value for key, (value, _) in DEVIATIONS.items()}}


def deviations_from_paper(constants: dict[str, Any]) -> list[dict[str, Any]]:
    """Every option of a run that differs from the published recipe, with the reason (``--set`` if the user's)."""
    rows = []
    for key, paper in PAPER_RECIPE.items():
        used = constants.get(key, paper)
        if used != paper:
            default, reason = DEVIATIONS.get(key, (None, ""))
            rows.append({"option": key, "paper": paper, "used": used,
                         "reason": reason if used == default else "set for this run (--set)"})
    return rows
