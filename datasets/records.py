"""The one record type every data source produces: a subject, its label and its volume files."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

# Order used for class indices, tables and prob_ columns (the paper's Tables 2-4 order).
PAPER_CLASSES = ("LGG", "HGG", "Healthy")


@dataclass(frozen=True)
class SubjectRecord:
    """One subject: ``paths`` holds one NIfTI file per input channel (contrast)."""

    subject_id: str
    label: str
    paths: tuple[str, ...]
    group: str
    source: str = "manifest"
    # Acquisition site (BraTS: the <site> of BraTS19_<site>_<n>_1; IXI: Guys/HH/IOP); "" when unknown.
    site: str = ""


def records_to_frame(records: list[SubjectRecord]) -> pd.DataFrame:
    """A table with one row per subject (paths joined by ``;``), handy for printing and saving."""
    return pd.DataFrame(
        {
            "subject_id": [r.subject_id for r in records],
            "label": [r.label for r in records],
            "group": [r.group for r in records],
            "source": [r.source for r in records],
            "site": [r.site for r in records],
            "paths": [";".join(r.paths) for r in records],
        }
    )
