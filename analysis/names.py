"""Arms (model, pretrained): display names, orderings, and an arm's rows in a table.

`models` imports torch (seconds), so its DISPLAY_NAMES is fetched lazily and only once; the
analysis still works without torch (names then fall back to the model key, and the report says so).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    import pandas as pd

# The paper's table order (ResNet3D, ResNet (2+1)D, ResNet Mixed Convolution); other models follow, sorted.
PAPER_MODEL_ORDER = ("r3d_18", "r2plus1d_18", "mc3_18")

Arm = tuple[str, bool]

# The scikit-learn baselines (trainables/baselines.py) share the prediction format of the deep arms.
# They are named in words, not as models, so no reader mistakes them for a paper arm.
BASELINE_NAMES = {"acquisition_baseline": "acquisition-only baseline",
                  "histogram_baseline": "intensity-histogram baseline"}


# What "pre-trained" means when the arm label does not say: the paper's video models start from Kinetics-400.
DEFAULT_PRETRAINING = "Kinetics-400"


@lru_cache(maxsize=1)
def _model_tables() -> tuple[dict[str, str], dict[str, str], str | None]:
    """(display names, pre-training data set per model, why they fell back), from `models` once."""
    try:
        from models import DISPLAY_NAMES, PRETRAINING_DATASETS  # heavy: pulls in torch
    except Exception as exc:  # noqa: BLE001 - any import failure only costs us pretty names
        return {}, {}, (f"could not import models.DISPLAY_NAMES ({type(exc).__name__}: {exc}); model keys shown "
                        "instead, and no published value shown (the paper's rows are matched by display name)")
    return dict(DISPLAY_NAMES), dict(PRETRAINING_DATASETS), None


def _display_names() -> tuple[dict[str, str], str | None]:
    names, _, note = _model_tables()
    return names, note


def display_names_note() -> str | None:
    """Why display names fell back to keys, or None when they did not."""
    return _display_names()[1]


def display_name(model: str) -> str:
    if model in BASELINE_NAMES:
        return BASELINE_NAMES[model]
    return _display_names()[0].get(model, model)


def is_baseline(model: str) -> bool:
    return model in BASELINE_NAMES


def normalise_name(name: str) -> str:
    """Key for matching names across sources: the paper CSV writes 'ResNet(2+1)D', models writes 'ResNet (2+1)D'."""
    return re.sub(r"\s+", "", str(name)).casefold()


def pretraining_label(model: str) -> str:
    """'pre-trained' for a Kinetics-400 model (the paper's word); else the data set, e.g. 'ImageNet pre-trained'.

    The 2-D baseline's pre-training is ImageNet, and a reader comparing arms must not take it for Kinetics.
    """
    dataset = _model_tables()[1].get(model, DEFAULT_PRETRAINING)
    return "pre-trained" if dataset == DEFAULT_PRETRAINING else f"{dataset} pre-trained"


def arm_label(model: str, pretrained: bool) -> str:
    """'ResNet3D (pre-trained)', '2-D baseline: ResNet18 on axial slices (ImageNet pre-trained)'; a scikit-learn
    baseline has no pre-training to speak of, so just its name."""
    if is_baseline(model):
        return display_name(model)
    return f"{display_name(model)} ({pretraining_label(model) if pretrained else 'scratch'})"


def arm_slug(model: str, pretrained: bool) -> str:
    """File-name-safe, stable identifier of an arm."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
    return f"{safe}-{'pretrained' if pretrained else 'scratch'}"


def arm_sort_key(arm: Arm) -> tuple[int, str, bool]:
    model, pretrained = arm
    rank = PAPER_MODEL_ORDER.index(model) if model in PAPER_MODEL_ORDER else len(PAPER_MODEL_ORDER)
    return (rank, model, bool(pretrained))


def baseline_sort_key(arm: Arm) -> tuple[int, str, bool]:
    """The acquisition baseline first (the stronger shortcut warning), then the histogram, then others."""
    order = list(BASELINE_NAMES)
    return (order.index(arm[0]) if arm[0] in order else len(order), arm[0], bool(arm[1]))


def sort_arms(arms) -> list[Arm]:
    return sorted({(str(m), bool(p)) for m, p in arms}, key=arm_sort_key)


def arm_mask(frame: pd.DataFrame, arm: Arm) -> pd.Series:
    """Which rows of ``frame`` belong to ``arm``: every analysis table names an arm by its ``model`` and
    ``pretrained`` columns, so this one test selects an arm everywhere."""
    return (frame["model"] == arm[0]) & (frame["pretrained"] == arm[1])


def arm_frames(frame: pd.DataFrame, arms: Iterable[Arm]) -> Iterator[tuple[Arm, pd.DataFrame]]:
    """(arm, its rows of ``frame``) in the order of ``arms``, skipping an arm without rows: an arm with no
    results gets no table row (it is reported as missing), never a row of zeros."""
    for arm in arms:
        rows = frame[arm_mask(frame, arm)]
        if not rows.empty:
            yield arm, rows
