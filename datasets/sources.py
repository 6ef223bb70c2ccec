"""Find subjects: BraTS 2019 + IXI under one root, or a CSV manifest for any other label set.

Discovery only lists files; whether they are readable is ``datasets.validation``'s job, so that
every problem is reported in one place.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import pandas as pd

from datasets.records import PAPER_CLASSES, SubjectRecord
from datasets.rsna import MGMT_CLASSES

log = logging.getLogger(__name__)

BRATS_GRADES = ("HGG", "LGG")
# BraTS 2019's per-contrast file suffixes: <subject>/<subject>_<contrast>.nii.gz (and _seg, the tumour labels).
BRATS_CONTRASTS = ("t1", "t1ce", "t2", "flair")
# Contrasts a BraTS volume may have beside IXI's T1 (both T1-weighted; T1ce is the paper's choice).
IXI_PAIRED_CONTRASTS = ("t1ce", "t1")
# IXI<nnn>-<Site>-<nnnn>-T1.nii[.gz] as downloaded, or FSL BET's skull-stripped ...-T1_brain.nii[.gz].
IXI_PATTERN = re.compile(r"^(IXI\d+-([A-Za-z]+)-\d+)-T1(_brain)?\.nii(\.gz)?$")
# BraTS19_<site>_<n>_1: the release names the contributing institution in the id (CBICA, TCIA01, 2013, ...).
BRATS_SITE = re.compile(r"^BraTS\d*_([A-Za-z0-9]+)_")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def brats_site(subject_id: str) -> str:
    """The contributing site of a BraTS subject id, or "" when the id does not follow the release's pattern."""
    match = BRATS_SITE.match(subject_id)
    return match.group(1) if match else ""


def ixi_site(subject_id: str) -> str:
    """Guys, HH or IOP: the hospital part of an IXI id (``IXI002-Guys-0828``)."""
    parts = subject_id.split("-")
    return parts[1] if len(parts) >= 3 else ""


def _ixi_preference(path: Path) -> tuple[int, int]:
    """Lower is better: the stripped file first (the paper stripped IXI with BET), then .nii.gz."""
    match = IXI_PATTERN.match(path.name)
    return (0 if match.group(3) else 1, 0 if path.name.endswith(".gz") else 1)


def _visible(path: Path, root: Path) -> bool:
    """False inside a hidden folder or macOS's ``__MACOSX`` (an unzipped archive's resource forks), where a copy
    of a subject (``__MACOSX/HGG/<id>``) or a stray folder (``.ipynb_checkpoints``) would become a duplicate id or
    a subject without files and stop the run."""
    return not any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts)


def _ixi_files(root: Path) -> dict[str, Path]:
    """One T1 file per IXI subject: BET's ``..._brain`` output preferred to the raw head of the same subject."""
    chosen: dict[str, Path] = {}
    odd: list[Path] = []
    for path in sorted(root.rglob("*.nii*")):  # one walk of the tree, which holds every BraTS file too
        if not _visible(path, root):
            continue
        match = IXI_PATTERN.match(path.name)
        name = path.name.casefold()
        if match is None:
            # A renamed or lower-case file would drop out of the Healthy class without a word (BET -m masks expected).
            if name.startswith("ixi") and "t1" in name and "mask" not in name:
                odd.append(path)
            continue
        sid = match.group(1)
        if sid not in chosen or _ixi_preference(path) < _ixi_preference(chosen[sid]):
            chosen[sid] = path
    if odd:
        log.warning("IXI-like file(s) not named IXI<nnn>-<Site>-<nnnn>-T1[_brain].nii[.gz], left out: %s%s",
                    ", ".join(str(p) for p in odd[:5]), f" (+{len(odd) - 5} more)" if len(odd) > 5 else "")
    return dict(sorted(chosen.items()))


def _find_nifti(folder: Path, stem: str) -> Path:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    # Not there: return the expected name so validation reports it as missing.
    return folder / f"{stem}.nii.gz"


def discover_brats_ixi(data_root: str | os.PathLike, contrasts: Sequence[str] = ("t1ce",),
                       classes: Sequence[str] | None = None) -> list[SubjectRecord]:
    """BraTS ``{HGG,LGG}/<subject>/<subject>_<contrast>.nii.gz`` and IXI ``IXI*-T1.nii[.gz]`` anywhere under ``data_root``.

    ``classes`` (``--classes``, any spelling) without Healthy leaves IXI out before its files are looked at, so
    ``--classes LGG,HGG --contrasts flair`` runs on BraTS alone instead of being refused for IXI's missing FLAIR.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root {root} is not a folder; point it at the folder holding the BraTS and IXI data")
    contrasts = tuple(c.lower() for c in contrasts)
    if not contrasts:
        raise ValueError("contrasts must name at least one contrast, e.g. ('t1ce',)")
    records: list[SubjectRecord] = []
    for grade_dir in sorted(p for p in root.rglob("*") if p.is_dir() and p.name in BRATS_GRADES and _visible(p, root)):
        for subject_dir in sorted(p for p in grade_dir.iterdir() if p.is_dir() and _visible(p, root)):
            sid = subject_dir.name
            paths = tuple(str(_find_nifti(subject_dir, f"{sid}_{c}")) for c in contrasts)
            records.append(SubjectRecord(sid, grade_dir.name, paths, group=sid, source="brats", site=brats_site(sid)))
    with_healthy = classes is None or "Healthy" in match_classes(classes, PAPER_CLASSES)
    ixi_files = _ixi_files(root) if with_healthy else {}
    if ixi_files and len(contrasts) > 1:
        raise ValueError(
            f"IXI provides T1 only, but {len(contrasts)} contrasts were asked for ({', '.join(contrasts)}); "
            "use one contrast with IXI, or a --manifest that names a file per contrast"
        )
    if ixi_files and contrasts[0] not in IXI_PAIRED_CONTRASTS:
        # T1ce beside IXI's T1 is the paper's pairing (both T1-weighted); FLAIR or T2 beside T1 would let a network
        # tell Healthy by the kind of scan alone.
        raise ValueError(
            f"IXI provides T1 only, but --contrasts {contrasts[0]} was asked for: every Healthy volume would be a T1 "
            f"while the tumours are {contrasts[0].upper()}, a shortcut a network learns instead of anatomy. Use "
            "--contrasts t1ce (the paper's pairing) or t1, or a --manifest with healthy scans of the same contrast"
        )
    for sid, path in ixi_files.items():
        records.append(SubjectRecord(sid, "Healthy", (str(path),), group=sid, source="ixi", site=ixi_site(sid)))
    if not records:
        raise FileNotFoundError(
            f"No BraTS ({'/'.join(BRATS_GRADES)}/<subject>/<subject>_{contrasts[0]}.nii.gz) or IXI "
            f"(IXI*-T1.nii.gz or BET's IXI*-T1_brain.nii.gz) files found under {root}"
        )
    return records


def channel_columns(columns) -> tuple[str, ...]:
    """A manifest's path columns in order: its input channels (``path``, or ``path_<contrast>`` each)."""
    return tuple(c for c in (str(c).strip() for c in columns) if c == "path" or c.startswith("path_"))


def manifest_path_columns(manifest: str | os.PathLike) -> tuple[str, ...]:
    """A manifest's input channels by name, from its header alone (recorded with a run, compared by prediction)."""
    return channel_columns(pd.read_csv(manifest, dtype=str, nrows=0, index_col=False).columns)


def read_manifest(manifest: str | os.PathLike, require_label: bool = True) -> list[SubjectRecord]:
    """Read a CSV with ``subject_id``, ``label``, ``path`` or ``path_<contrast>`` columns, optional ``group`` and ``site``.

    Several ``path_*`` columns become input channels in column order. Relative paths are taken
    relative to the manifest's folder, so a data set can be moved with its manifest. Labels are
    normalised (:func:`normalise_labels`): a stray space or another case must not make a new class.
    ``require_label`` False (prediction on new scans): the label column is optional, "" where absent.
    """
    manifest = Path(manifest)
    frame = _read_manifest_table(manifest, require_label)
    path_columns = list(channel_columns(frame.columns))
    labels, merged = normalise_labels(list(frame["label"])) if "label" in frame.columns else ([""] * len(frame), [])
    if merged:
        log.warning("Manifest %s: labels that differ only in case or surrounding spaces were merged: %s",
                    manifest, "; ".join(merged))
    records = []
    for label, (_, row) in zip(labels, frame.iterrows()):
        sid = row["subject_id"].strip()
        paths = tuple(str((manifest.parent / row[c].strip()).resolve()) for c in path_columns)
        group = row["group"].strip() if "group" in frame.columns and row["group"].strip() else sid
        site = row["site"].strip() if "site" in frame.columns else ""
        records.append(SubjectRecord(sid, label, paths, group=group, source="manifest", site=site))
    return records


def _read_manifest_table(manifest: Path, require_label: bool = True) -> pd.DataFrame:
    """The manifest as strings, refused with its name and the fix when it is missing, empty or lacks columns."""
    if not manifest.is_file():
        raise FileNotFoundError(f"--manifest {manifest} does not exist")
    expected = ("subject_id, label and path (or path_<contrast>) columns" if require_label else
                "subject_id and path (or path_<contrast>) columns (label optional)")
    long_rows = _rows_longer_than_header(manifest)
    if long_rows:
        raise ValueError(f"Manifest {manifest}: line(s) {', '.join(map(str, long_rows[:10]))} have more fields than "
                         "the header; remove the extra commas (or quote a path that contains one)")
    try:
        # index_col=False: never take column 1 as an index (which pandas does when every row has an extra field).
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"Manifest {manifest} is empty; write a header row with {expected}, then one row per "
                         "subject") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"Manifest {manifest} is not a readable CSV ({error}); save it as comma-separated text "
                         f"with {expected}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    path_columns = channel_columns(frame.columns)
    misspelt = [c for c in frame.columns if c not in path_columns and (c.casefold() == "path" or
                                                                      c.casefold().startswith("path_"))]
    if misspelt:  # a "Path_FLAIR" column would otherwise drop that channel without a word
        raise ValueError(f"Manifest {manifest}: column(s) {', '.join(misspelt)} look like input files but path "
                         "columns are spelled in lower case (path, or path_<contrast>); rename them")
    missing = [c for c in ("subject_id", "label")[:2 if require_label else 1] if c not in frame.columns]
    if missing or not path_columns:
        need = missing + ([] if path_columns else ["path (or path_<contrast>)"])
        raise ValueError(f"Manifest {manifest} lacks column(s) {', '.join(need)}; it has {', '.join(frame.columns)}")
    if frame.empty:
        raise ValueError(f"Manifest {manifest} has no subjects (a header and no rows); add one row per subject "
                         f"with its {expected}")
    no_id = [i + 2 for i, sid in enumerate(frame["subject_id"]) if not str(sid).strip()]  # line 1 is the header
    if no_id:
        raise ValueError(f"Manifest {manifest}: line(s) {', '.join(map(str, no_id[:10]))} have no subject_id; give "
                         "every row an id, or delete empty rows")
    for column in path_columns:
        no_file = [i + 2 for i, cell in enumerate(frame[column]) if not str(cell).strip()]
        if no_file:
            raise ValueError(f"Manifest {manifest}: line(s) {', '.join(map(str, no_file[:10]))} have no file in column "
                             f"{column}; every subject needs a file in every path column (leave a subject out, or "
                             "drop the column for all)")
    return frame


def _rows_longer_than_header(manifest: Path) -> list[int]:
    """1-based line numbers of rows with more comma-separated fields than the header (pandas would shift them)."""
    with open(manifest, newline="", encoding="utf-8-sig", errors="replace") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return []
    width = len(rows[0])
    return [number for number, row in enumerate(rows[1:], start=2) if len(row) > width]


def _spelling(label: str) -> str:
    return label.strip().casefold()


def normalise_labels(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """Trimmed labels, each spelled as the paper's class it matches regardless of case, else as its
    first-seen spelling; and one note per class that was written in more than one way."""
    paper = {_spelling(c): c for c in PAPER_CLASSES}
    chosen: dict[str, str] = {}
    for label in labels:
        chosen.setdefault(_spelling(label), paper.get(_spelling(label), label.strip()))
    normalised = [chosen[_spelling(label)] for label in labels]
    variants: dict[str, Counter] = {}
    for raw, label in zip(labels, normalised):
        if raw != label:
            variants.setdefault(label, Counter())[raw] += 1
    notes = [", ".join(f"{raw!r} ({n} row{'s' if n > 1 else ''})" for raw, n in seen.items()) + f" -> {label!r}"
             for label, seen in variants.items()]
    return normalised, notes


def class_order(records: Sequence[SubjectRecord], classes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The label set, in a stable order: given explicitly, the paper's for BraTS/IXI labels, (unmethylated,
    methylated) for MGMT labels (methylated is then the positive class of two-class analyses), else sorted."""
    if classes:
        return match_classes(classes, [r.label for r in records])
    present = {r.label for r in records if r.label}
    if present <= set(PAPER_CLASSES):
        return tuple(c for c in PAPER_CLASSES if c in present)
    # Any case ("Methylated", "MGMT" spreadsheets vary): sorted, "Methylated" would come first and the
    # unmethylated class would silently become the positive one of every two-class score.
    by_case = {label.casefold(): label for label in present}
    if len(by_case) == len(present) and set(by_case) <= set(MGMT_CLASSES):
        return tuple(by_case[c] for c in MGMT_CLASSES if c in by_case)
    return tuple(sorted(present))


def match_classes(requested: Sequence[str], labels: Sequence[str]) -> tuple[str, ...]:
    """``--classes`` spelled as the data spells them (else as the paper does), matched regardless of case and
    surrounding spaces, in the order given."""
    known = {_spelling(c): c for c in PAPER_CLASSES}
    known.update({_spelling(label): label for label in labels if label})
    matched: list[str] = []
    for name in requested:
        if not name.strip():
            raise ValueError(f"--classes {','.join(requested)} has an empty name; list the labels separated by "
                             "single commas")
        label = known.get(_spelling(name), name.strip())
        if label in matched:
            raise ValueError(f"--classes names {label} twice ({','.join(requested)}; names match regardless of "
                             "case and spaces); list each class once")
        matched.append(label)
    return tuple(matched)
