"""The paper's training recipe as plain data: the bottom layer that the trainable and the search space both read.

Chatterjee et al. 2022: Adam with learning rate 1e-5 and weight decay 1e-3, batch size 1, dropout 0.3
before the final layer, and TorchIO's light augmentation (RandomAffine scales (0.9, 1.2), 10 degrees,
left-right flip p = 0.25) at full strength. Any of these can be overridden per trial (``--set``).
"""
from __future__ import annotations

from typing import Any

PAPER_DEFAULTS: dict[str, Any] = {
    "lr": 1e-5,
    "weight_decay": 1e-3,
    "dropout": 0.3,
    "augmentation": "light",
    "aug_strength": 1.0,
    "batch_size": 1,
}
