"""The published numbers (Chatterjee et al. 2022, Tables 2-6), shipped with the package."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.names import display_name, normalise_name

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
PAPER_CITATION = ("Chatterjee, Nizamani, Nuernberger, Speck. Classification of brain tumours in MR images using deep "
                  "spatiospatial models. Scientific Reports 12, 1505 (2022)")


@lru_cache(maxsize=1)
def paper_results() -> pd.DataFrame:
    """table, model, pretrained (True/False/NaN), class, metric, mean, std; plus a normalised model key."""
    frame = pd.read_csv(PAPER_RESULTS, dtype=str, keep_default_na=False)
    frame["pretrained"] = frame["pretrained"].map({"True": True, "False": False, "": None})
    for col in ("mean", "std"):
        frame[col] = pd.to_numeric(frame[col].where(frame[col] != "", np.nan))
    frame["table"] = frame["table"].astype(int)
    frame["model_key"] = frame["model"].map(normalise_name)
    return frame


PAPER_TASK = frozenset({"LGG", "HGG", "Healthy"})


def is_paper_task(classes) -> bool:
    """True when a run classifies exactly the paper's three classes: only then are its numbers comparable with the
    published ones (an LGG-vs-HGG run's LGG F1, or an MGMT run's macro F1, answers another question)."""
    return frozenset(classes) == PAPER_TASK


def published(model: str, pretrained: bool, metric: str, cls: str = "") -> tuple[float, float, int | None]:
    """(mean, std, table) published for this arm; NaNs and None when the paper has no such number.

    `model` is the project's key (e.g. "mc3_18"); the paper's rows use display names, matched ignoring
    spaces and case because the paper writes "ResNet(2+1)D" and DISPLAY_NAMES "ResNet (2+1)D".
    """
    frame = paper_results()
    sel = frame[(frame["model_key"] == normalise_name(display_name(model))) & (frame["pretrained"] == pretrained)
                & (frame["metric"] == metric) & (frame["class"] == (cls or ""))]
    if sel.empty:
        return np.nan, np.nan, None
    row = sel.iloc[0]
    return float(row["mean"]), float(row["std"]), int(row["table"])


def table_for(metric: str, cls: str = "") -> int | None:
    """The paper's table number holding this metric (e.g. F1 of LGG -> 2), or None."""
    frame = paper_results()
    sel = frame[(frame["metric"] == metric) & (frame["class"] == (cls or ""))]
    return int(sel["table"].iloc[0]) if len(sel) else None
