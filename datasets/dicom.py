"""DICOM series -> NIfTI, once, so the rest of the pipeline reads NIfTI (nibabel, TorchIO) unchanged.

A series folder (one ``.dcm`` file per slice, as in the RSNA-MICCAI release) is read with SimpleITK's
GDCM-based ImageSeriesReader, checked (one series, enough evenly spaced slices, every file readable) and
written as ``<cache>/<stem>.<key>.nii.gz``. ``sitk.WriteImage`` turns ITK's LPS direction cosines into the
NIfTI RAS qform/sform, so world coordinates survive the conversion; no DICOM tag is parsed by hand.

The key hashes the folder's absolute path and every ``.dcm`` file's name, size and modification time
(as ``datasets.registration`` keys its outputs), so a series is read once and an edited, added or removed
file makes a new conversion. Outputs are written under a hidden name and renamed: an interrupted
conversion never leaves a file that looks complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import locale
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from datasets.atomic import write_via_temp_file
from datasets.records import SubjectRecord
from datasets.validation import Problem

log = logging.getLogger(__name__)

# A brain MR series has 20-600 slices in the RSNA-MICCAI release; fewer than 10 is a localiser, a partial
# copy or a scout, which would be resampled into a volume that is mostly interpolation.
MIN_SLICES = 10
# ImagePositionPatient is a rounded decimal string, so gaps jitter by far less than this; a missing slice
# doubles one gap and a duplicated one makes a gap zero, both far beyond it.
SPACING_TOLERANCE = 0.1
# ImageOrientationPatient is written with 6-10 significant digits: one orientation differs from itself by far less.
ORIENTATION_TOLERANCE = 1e-3
# Bump when the NIfTI written for the same files changes: old conversions are then unused.
# 2: a series whose slices differ in rescale slope or intercept is read as float32 (it wrapped around in int16).
CONVERSION_VERSION = 2
CACHE_DIRNAME = "dicom-nifti"
DICOM_SOURCES = frozenset({"rsna"})  # record sources whose paths are DICOM series folders, not NIfTI files
PROGRESS_EVERY = 50  # series between progress lines


class SeriesError(ValueError):
    """A series folder that cannot become a volume: ``folder`` and ``reason`` (which names the sequence)."""

    def __init__(self, folder: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{folder}: {reason}")
        self.folder, self.reason = str(folder), reason


def dicom_cache_dir(cache_root: str | os.PathLike | None) -> Path:
    """Where conversions go: beside the run's preprocessed cache, else a per-user folder in the system temp
    directory, so repeated ``python -m datasets check`` calls without --cache-dir reuse their conversions."""
    if cache_root is not None:
        return Path(cache_root) / CACHE_DIRNAME
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    return Path(tempfile.gettempdir()) / f"{CACHE_DIRNAME}-{user}"


def series_files(folder: str | os.PathLike) -> list[Path]:
    """The folder's ``.dcm`` files (any case), by name; hidden files (our own temporary ones) are not slices."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() == ".dcm" and not p.name.startswith(".") and p.is_file())


def series_key(folder: str | os.PathLike, files: Sequence[Path]) -> str:
    """Identity of a series' files (names, sizes, mtimes) and of the conversion code."""
    identity = []
    for path in files:
        stat = path.stat()
        identity.append([path.name, stat.st_size, stat.st_mtime_ns])
    payload = json.dumps({"version": CONVERSION_VERSION, "folder": os.path.abspath(folder), "files": identity},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def convert_series(folder: str | os.PathLike, cache_dir: str | os.PathLike, min_slices: int = MIN_SLICES,
                   stem: str | None = None) -> Path:
    """The cached NIfTI of the series in ``folder``, converting it on first use; SeriesError when it is unusable.

    ``min_slices`` is checked on every call (a cached conversion made under a lower limit is not trusted for
    a higher one); the other checks depend only on the files, which the key identifies.
    """
    return _convert(Path(folder), Path(cache_dir), min_slices, stem)[0]


def _convert(folder: Path, cache_dir: Path, min_slices: int, stem: str | None) -> tuple[Path, bool]:
    """(NIfTI path, whether it was converted now rather than found)."""
    _check_min_slices(min_slices)
    files = _existing_files(folder)
    output = cache_dir / f"{stem or folder.name}.{series_key(folder, files)}.nii.gz"
    shape = _cached_shape(output)
    if shape is not None:
        _require_slices(folder, shape[2] if len(shape) > 2 else 1, min_slices)
        return output, False
    image = read_series(folder, min_slices)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_via_temp_file(str(output), lambda tmp: sitk.WriteImage(image, tmp, useCompression=True))
    return output, True


def read_series(folder: str | os.PathLike, min_slices: int = MIN_SLICES) -> sitk.Image:
    """The one DICOM series in ``folder`` as a 3-D image; SeriesError (naming sequence and reason) if there is not
    exactly one readable series of at least ``min_slices`` evenly spaced slices."""
    _check_min_slices(min_slices)
    folder = Path(folder)
    files = _existing_files(folder)
    with _quiet_itk():  # ITK's own warnings would repeat, less clearly, what the SeriesError says
        names = _one_series_in_order(folder, files)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(p) for p in names])
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            image = reader.Execute()
            if _rescale_varies(reader):
                # ITK picks the pixel type from the first slice: a later slice with a larger RescaleSlope (or another
                # intercept) would wrap around in int16 or lose its fraction. Read such a series as float32.
                reader.SetOutputPixelType(sitk.sitkFloat32)
                image = reader.Execute()
        except RuntimeError as error:
            raise SeriesError(folder, f"sequence {folder.name}: unreadable series ({_itk_message(error)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SeriesError(folder, f"sequence {folder.name}: {image.GetNumberOfComponentsPerPixel()}-component "
                                  "(colour) pixels; expected a grey-level MR series")
    _require_slices(folder, image.GetSize()[2] if image.GetDimension() == 3 else 1, min_slices)
    _require_even_spacing(folder, reader, image)
    return image


def convert_records(records: Sequence[SubjectRecord], cache_dir: str | os.PathLike,
                    min_slices: int = MIN_SLICES) -> tuple[list[SubjectRecord], list[Problem]]:
    """Records of DICOM sources with their paths swapped for cached NIfTI files, and one Problem per subject
    with an unusable series (left out of the records; validation's caller decides whether that stops the run).
    Records of other sources pass through unchanged."""
    cache_dir = Path(cache_dir)
    converted, problems, counts = [], [], {"found": 0, "converted": 0}
    for record in records:
        if record.source not in DICOM_SOURCES:
            converted.append(record)
            continue
        try:
            paths = []
            for folder in map(Path, record.paths):
                path, fresh = _convert(folder, cache_dir, min_slices, f"{record.subject_id}_{folder.name}")
                paths.append(str(path))
                counts["converted" if fresh else "found"] += 1
                if fresh and counts["converted"] % PROGRESS_EVERY == 0:
                    log.info("DICOM -> NIfTI: %d series converted so far", counts["converted"])
        except SeriesError as error:
            problems.append(Problem(record.subject_id, error.folder, error.reason))
            continue
        converted.append(dataclasses.replace(record, paths=tuple(paths)))
    if counts["found"] or counts["converted"]:
        log.info("DICOM series as NIfTI in %s: %d converted now, %d found from earlier runs, %d subject(s) with an "
                 "unusable series", cache_dir, counts["converted"], counts["found"], len(problems))
    return converted, problems


def _cached_shape(output: Path) -> tuple[int, ...] | None:
    """The shape of an earlier conversion (its header only), or None when there is none or it cannot be read
    (then it is converted again and replaced)."""
    if not output.is_file():
        return None
    try:
        return tuple(nib.load(output).shape)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError):
        return None


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def _check_min_slices(min_slices: int) -> None:
    if isinstance(min_slices, bool) or not isinstance(min_slices, (int, np.integer)) or min_slices < 1:
        raise ValueError(f"min_slices must be a positive integer, got {min_slices!r}")


def _existing_files(folder: Path) -> list[Path]:
    """The series' files; SeriesError for a missing folder or one without ``.dcm`` files."""
    if not folder.is_dir():
        present = sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) if folder.parent.is_dir() else []
        has = f"the subject has {', '.join(present)}" if present else "the subject folder has no sequence folders"
        raise SeriesError(folder, f"sequence {folder.name}: missing sequence folder ({has})")
    files = series_files(folder)
    if not files:
        raise SeriesError(folder, f"sequence {folder.name}: empty folder (no .dcm files)")
    return files


def _one_series_in_order(folder: Path, files: Sequence[Path]) -> list[Path]:
    """The folder's ``.dcm`` files in slice order, as GDCM sorts them; SeriesError when some file is in no series
    (unreadable) or the folder holds more than one series.

    Every GDCM call below scans the whole folder, parsing every file's header (the series read parses them once
    more). A folder holding one series, the normal case, costs one scan: GDCM's first series, when it holds every
    ``.dcm`` file, is that series, sorted as asking for it by its SeriesInstanceUID sorts it. Only otherwise are all
    series listed, one scan more per series, to say what is wrong. Measured on the synthetic RSNA tree (16 series,
    2650 files, page cache): a scan costs ~0.08 ms per file, a third of the series read itself (~0.24 ms); without
    the second scan read_series took ~30 % less time, and gave identical images.
    """
    # GDCM reads every file in the folder; only the .dcm files are the series the key identifies.
    wanted = {path.name for path in files}
    first = _dcm_files(folder, sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)), wanted)
    if {path.name for path in first} == wanted:
        return first
    series = _group_by_series(folder, wanted)
    unreadable = sorted(set(files) - {path for paths in series.values() for path in paths})
    if unreadable:
        raise SeriesError(folder, _unreadable_reason(folder, unreadable, len(files)))
    if len(series) > 1:
        listed = ", ".join(f"{uid} ({len(paths)} files)" for uid, paths in series.items())
        raise SeriesError(folder, f"sequence {folder.name}: mixed series, {len(series)} SeriesInstanceUIDs in one "
                                  f"folder ({listed}); keep one series per folder")
    (names,) = series.values()
    return names


def _group_by_series(folder: Path, wanted: set[str]) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> its ``.dcm`` files (named in ``wanted``) in slice order, as GDCM groups and sorts them."""
    groups = {}
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        paths = _dcm_files(folder, sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid), wanted)
        if paths:
            groups[uid] = paths
    return groups


def _dcm_files(folder: Path, names: Sequence[str], wanted: set[str]) -> list[Path]:
    """GDCM's file names, in its order, kept when they are among the series' ``.dcm`` files."""
    return [folder / Path(name).name for name in names if Path(name).name in wanted]


def _unreadable_reason(folder: Path, unreadable: Sequence[Path], total: int) -> str:
    first = unreadable[0]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(first))
    try:
        reader.ReadImageInformation()
        why = "GDCM could not place it in any series"
    except RuntimeError as error:
        why = _itk_message(error)
    more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
    return (f"sequence {folder.name}: unreadable DICOM file {first.name}{more} ({len(unreadable)} of {total} files; "
            f"{first.name}: {why}); replace the file(s) from the download, or delete them if the series is complete "
            "without them")


def _require_slices(folder: Path, depth: int, min_slices: int) -> None:
    if depth < min_slices:
        raise SeriesError(folder, f"sequence {folder.name}: too few slices ({depth}; at least {min_slices} expected, "
                                  "real series have 20-600): an incomplete copy or a localiser?")


def _rescale_varies(reader: sitk.ImageSeriesReader) -> bool:
    """Whether the slices' RescaleSlope / RescaleIntercept (absent: 1 / 0) are not all the same."""
    def tag(index: int, key: str, default: str) -> str:
        return reader.GetMetaData(index, key).strip() if reader.HasMetaDataKey(index, key) else default

    count = len(reader.GetFileNames())
    pairs = {(float(tag(i, "0028|1053", "1") or 1), float(tag(i, "0028|1052", "0") or 0)) for i in range(count)}
    return len(pairs) > 1


def _require_even_spacing(folder: Path, reader: sitk.ImageSeriesReader, image: sitk.Image) -> None:
    """Slices must sit at equal steps along the slice normal: ITK only warns and stacks them anyway."""
    count = len(reader.GetFileNames())
    if count < 2:
        return  # a multi-frame file: one position, nothing to compare
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(count)])
    except (RuntimeError, ValueError) as error:
        raise SeriesError(folder, f"sequence {folder.name}: a slice lacks a readable ImagePositionPatient "
                                  f"({_itk_message(error)})") from None
    orientations = _slice_orientations(reader, count)
    if orientations is not None:
        # ITK stacks every slice with the first slice's orientation, and takes the slice spacing as the straight
        # step between positions: slices turned another way, or shifted within their plane from one to the next
        # (a sheared, gantry-tilted stack), would land in the wrong place without a word.
        if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
            raise SeriesError(folder, f"sequence {folder.name}: slices have different orientations "
                                      "(ImageOrientationPatient): several stacks, or a localiser, in one series")
        normal = np.cross(orientations[0][:3], orientations[0][3:])
    steps = np.diff(positions, axis=0)
    gaps = steps @ normal
    typical = float(np.median(gaps))
    if typical <= 0 or np.abs(gaps - typical).max() > SPACING_TOLERANCE * typical:
        raise SeriesError(folder, f"sequence {folder.name}: slices are not evenly spaced (gaps from {gaps.min():.3g} "
                                  f"to {gaps.max():.3g} mm along the slice normal, typically {typical:.3g} mm): a "
                                  "missing or duplicated slice?")
    drift = float(np.linalg.norm(steps - np.outer(gaps, normal), axis=1).max())
    if drift > SPACING_TOLERANCE * typical:
        raise SeriesError(folder, f"sequence {folder.name}: each slice is shifted by up to {drift:.3g} mm within the "
                                  "slice plane from the one before (a sheared or gantry-tilted stack), which the "
                                  "conversion cannot place; resample it to an orthogonal grid first")


def _slice_orientations(reader: sitk.ImageSeriesReader, count: int) -> np.ndarray | None:
    """Each slice's ImageOrientationPatient (row and column direction cosines), or None when a slice lacks it."""
    try:
        return np.array([[float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")] for i in range(count)])
    except (RuntimeError, ValueError):
        return None


def _itk_message(error: Exception) -> str:
    """The informative last line of an ITK exception (the rest is source-file locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__).removeprefix("sitk::ERROR: ")


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """Undo the process-wide ``setlocale`` that GDCM does when it reads or writes DICOM.

    Measured with SimpleITK 2.5.7: after the first DICOM read or write, LC_CTYPE is "C", so every later
    ``open()`` without an encoding in the same process reads and writes ASCII, and a report with "±" in it
    fails to load (found when a test read report.md after a DICOM conversion).
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with keep_locale():
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
