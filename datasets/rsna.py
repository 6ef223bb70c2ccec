"""RSNA-MICCAI BraTS 2021 (MGMT promoter methylation): find the subjects, their series and their labels.

Kaggle layout: ``train/<BraTS21ID>/<FLAIR|T1w|T1wCE|T2w>/Image-<k>.dcm`` with ``train_labels.csv``
(``BraTS21ID,MGMT_value``) beside ``train/``. The CSV writes ids as integers (2) where folders are
zero-padded to five digits (00002); they are matched as numbers. Discovery only lists folders: reading
the series (and saying what is wrong with them) is ``datasets.dicom``'s job, run by ``datasets.prepare``.

The release names no acquisition sites, so ``site`` is "" and per-site results are unavailable.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from datasets.records import SubjectRecord

log = logging.getLogger(__name__)

RSNA_SEQUENCES = ("FLAIR", "T1w", "T1wCE", "T2w")
# --contrasts names, case-insensitive: the release's own, and BraTS's (so the default ``t1ce`` works).
SEQUENCE_ALIASES = {"flair": "FLAIR", "t1w": "T1w", "t1wce": "T1wCE", "t2w": "T2w",
                    "t1": "T1w", "t1ce": "T1wCE", "t2": "T2w"}
# Methylated second: analysis/binary.py takes the second class of the run's order as the positive one.
MGMT_CLASSES = ("unmethylated", "methylated")
MGMT_VALUES = {"0": "unmethylated", "1": "methylated"}
LABELS_FILENAME = "train_labels.csv"
TRAIN_DIRNAME = "train"
ID_COLUMN, LABEL_COLUMN = "BraTS21ID", "MGMT_value"
SUBJECT_FOLDER = re.compile(r"^\d+$")


@dataclass(frozen=True)
class RsnaLayout:
    """Where the subject folders and their labels are."""

    train_dir: Path
    labels_file: Path


def find_rsna_layout(data_root: str | os.PathLike) -> RsnaLayout | None:
    """The RSNA layout at ``data_root`` (the folder holding ``train/`` and ``train_labels.csv``, or ``train/``
    itself), None when ``data_root`` is not one; FileNotFoundError when it is one without its labels."""
    root = Path(data_root)
    if (root / LABELS_FILENAME).is_file():
        if not (root / TRAIN_DIRNAME).is_dir():
            raise FileNotFoundError(f"--data-root {root} has {LABELS_FILENAME} but no {TRAIN_DIRNAME}/ folder beside "
                                    "it; unpack the RSNA-MICCAI release's train/ there")
        return RsnaLayout(root / TRAIN_DIRNAME, root / LABELS_FILENAME)
    if root.name == TRAIN_DIRNAME and (root.parent / LABELS_FILENAME).is_file():
        return RsnaLayout(root, root.parent / LABELS_FILENAME)
    for folder in (root / TRAIN_DIRNAME, root):
        if _holds_rsna_subjects(folder):
            raise FileNotFoundError(
                f"{folder} holds RSNA-MICCAI subject folders (<BraTS21ID>/<FLAIR|T1w|T1wCE|T2w>/) but no "
                f"{LABELS_FILENAME} was found beside {TRAIN_DIRNAME}/ (the release's test/ part has no labels); point "
                f"--data-root at the folder holding {TRAIN_DIRNAME}/ and {LABELS_FILENAME}")
    return None


def _holds_rsna_subjects(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    sequences = {s.casefold() for s in RSNA_SEQUENCES}
    for subject in folder.iterdir():
        if subject.is_dir() and SUBJECT_FOLDER.match(subject.name):
            return any(p.is_dir() and p.name.casefold() in sequences for p in subject.iterdir())
    return False


def rsna_sequences(contrasts: Sequence[str]) -> tuple[str, ...]:
    """The release's sequence folders for ``--contrasts`` names (any case; BraTS aliases t1, t1ce, t2), in order."""
    if isinstance(contrasts, str):
        contrasts = (contrasts,)
    if not contrasts:
        raise ValueError(f"--contrasts must name at least one of {', '.join(RSNA_SEQUENCES)}")
    chosen: list[str] = []
    for name in contrasts:
        sequence = SEQUENCE_ALIASES.get(name.strip().casefold())
        if sequence is None:
            raise ValueError(f"--contrasts {name!r} is not an RSNA-MICCAI sequence; use some of "
                             f"{', '.join(s.lower() for s in RSNA_SEQUENCES)} (or the BraTS names t1, t1ce, t2)")
        if sequence in chosen:
            raise ValueError(f"--contrasts names {sequence} twice ({','.join(contrasts)}; t1=t1w, t1ce=t1wce, t2=t2w); "
                             "list each sequence once")
        chosen.append(sequence)
    return tuple(chosen)


def read_rsna_labels(labels_file: str | os.PathLike) -> dict[int, str]:
    """BraTS21ID -> ``unmethylated``/``methylated``; ValueError naming the line of any id or value that is not
    a whole number or not 0/1, and of ids listed twice."""
    labels_file = Path(labels_file)
    try:
        frame = pd.read_csv(labels_file, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{labels_file} is empty; it needs a {ID_COLUMN},{LABEL_COLUMN} header and a row per "
                         "subject") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:  # as the manifest reader: name the file
        raise ValueError(f"{labels_file} is not a readable CSV ({error}); save it as comma-separated text with a "
                         f"{ID_COLUMN},{LABEL_COLUMN} header") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in (ID_COLUMN, LABEL_COLUMN) if c not in frame.columns]
    if missing:
        raise ValueError(f"{labels_file} lacks column(s) {', '.join(missing)}; it has {', '.join(frame.columns)}")
    labels: dict[int, str] = {}
    lines: dict[int, int] = {}
    for offset, (raw_id, raw_value) in enumerate(zip(frame[ID_COLUMN], frame[LABEL_COLUMN])):
        line = offset + 2  # 1-based, after the header: what an editor shows
        where = f"{labels_file} line {line}"
        if not SUBJECT_FOLDER.match(raw_id.strip()):
            raise ValueError(f"{where}: {ID_COLUMN} {raw_id!r} is not a whole number; fix or delete the row")
        subject = int(raw_id)
        label = MGMT_VALUES.get(raw_value.strip())
        if label is None:
            raise ValueError(f"{where} ({ID_COLUMN} {subject}): {LABEL_COLUMN} {raw_value!r} is not 0 or 1 "
                             "(0 = unmethylated, 1 = methylated); fix or delete the row")
        if subject in labels:
            raise ValueError(f"{where}: {ID_COLUMN} {subject} is listed again (first on line {lines[subject]}); keep "
                             "one row per subject")
        labels[subject], lines[subject] = label, line
    return labels


def discover_rsna(data_root: str | os.PathLike, contrasts: Sequence[str] = ("t1ce",)) -> list[SubjectRecord]:
    """One record per labelled subject folder; its paths are the chosen sequences' folders (DICOM series).

    A folder without a label row and a label row without a folder are warned about and left out. A missing
    sequence folder is kept as its expected path, so that conversion reports it with the other problems.
    """
    layout = find_rsna_layout(data_root)
    if layout is None:
        raise FileNotFoundError(f"--data-root {data_root} is not an RSNA-MICCAI tree: expected {TRAIN_DIRNAME}/"
                                f"<BraTS21ID>/<FLAIR|T1w|T1wCE|T2w>/*.dcm with {LABELS_FILENAME} beside "
                                f"{TRAIN_DIRNAME}/")
    sequences = rsna_sequences(contrasts)
    labels = read_rsna_labels(layout.labels_file)
    folders = _subject_folders(layout.train_dir)
    unlabelled = sorted(set(folders) - set(labels))
    if unlabelled:
        log.warning("Left out, %d subject folder(s) in %s without a row in %s: %s", len(unlabelled), layout.train_dir,
                    layout.labels_file.name, ", ".join(folders[i].name for i in unlabelled))
    without_folder = sorted(set(labels) - set(folders))
    if without_folder:
        log.warning("Left out, %d row(s) of %s without a subject folder in %s: %s %s", len(without_folder),
                    layout.labels_file, layout.train_dir, ID_COLUMN, ", ".join(map(str, without_folder)))
    records = []
    for subject in sorted(set(folders) & set(labels)):
        folder = folders[subject]
        paths = tuple(str(_sequence_folder(folder, sequence)) for sequence in sequences)
        records.append(SubjectRecord(folder.name, labels[subject], paths, group=folder.name, source="rsna", site=""))
    if not records:
        raise FileNotFoundError(f"No subject of {layout.train_dir} has a label in {layout.labels_file} (ids are "
                                f"matched as numbers: folder 00002 is {ID_COLUMN} 2)")
    log.info("RSNA-MICCAI 2021: %d labelled subjects in %s; series used as channels: %s (--contrasts %s)",
             len(records), layout.train_dir, ", ".join(sequences),
             contrasts if isinstance(contrasts, str) else ",".join(contrasts))
    return records


def _subject_folders(train_dir: Path) -> dict[int, Path]:
    """BraTS21ID -> its folder; other folders are warned about, two folders of one id are an error."""
    folders: dict[int, Path] = {}
    for folder in sorted(p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not SUBJECT_FOLDER.match(folder.name):
            log.warning("Ignored %s: not a subject folder (names are BraTS21IDs such as 00002)", folder)
            continue
        subject = int(folder.name)
        if subject in folders:
            raise ValueError(f"{folders[subject]} and {folder} are both {ID_COLUMN} {subject}; keep one of them")
        folders[subject] = folder
    return folders


def _sequence_folder(subject_folder: Path, sequence: str) -> Path:
    """The sequence's folder whatever its case; the expected name when absent (reported by conversion)."""
    for child in subject_folder.iterdir():
        if child.is_dir() and child.name.casefold() == sequence.casefold():
            return child
    return subject_folder / sequence
