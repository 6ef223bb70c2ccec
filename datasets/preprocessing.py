"""Preprocess every volume once with TorchIO and cache the result as one float16 array.

The cache key is made of the input files' identity (path, size, modification time) and the
preprocessing parameters, so every trial and every rerun reads the same entry and a changed
file or parameter makes a new one. An entry is built in a temporary folder and renamed into
place only when complete, so a crash never leaves a half-written entry that is later trusted.

Each volume is also kept as soon as it is done, in ``<cache_root>/in-progress/`` (one .npy per subject, named by a
hash of its files' identity and the parameters, written atomically too), so a run that is interrupted (Ctrl-C) or
stopped (files that failed, a full disk) goes on where it was when it runs again, even with some files fixed or
left out; a subject's file is deleted once an entry holds its volume.

An entry is not trusted for existing, either: meta.json records the size and sha256 of each data
file, a found entry is verified in full before it is reused, and a damaged one is moved aside and
rebuilt. Free space is checked before the (large) write, and a full disk during it is reported as a
DiskFullError that says how much is needed and what to do. A file that cannot be preprocessed is
named with its reason (VolumeFailure) instead of ending the run at the first such file.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torchio as tio

from datasets.atomic import file_digest, write_bytes_atomic, write_chunks_atomic, write_text_atomic
from datasets.disk_space import DiskFullError, free_bytes, is_disk_full, require_free_space, space_message
from datasets.records import SubjectRecord
from datasets.registration import REGISTRATION_CHOICES
from datasets.validation import InvalidDataError, Problem
from datasets.workers import run_in_workers, stopped

log = logging.getLogger(__name__)

# 2: subjects.csv carries source and site. 3: meta.json records each data file's size and sha256, and the
# subjects left out ("failed"); older entries have other keys, so they are never found, let alone trusted.
CACHE_FORMAT_VERSION = 3
# Several contrasts per subject: the ones after the first are resampled once, straight onto the first one's grid
# (before: twice, to their own grid first). Part of the key of multi-contrast volumes only, so single-contrast
# entries, whose arrays did not change, stay valid.
MULTI_CONTRAST_RESAMPLING = 2


def _key_payload(config: PreprocessConfig, files: list, channels: int) -> str:
    fields = {"version": CACHE_FORMAT_VERSION, "config": asdict(config), "files": files}
    if channels > 1:
        fields["multi_contrast_resampling"] = MULTI_CONTRAST_RESAMPLING
    return json.dumps(fields, sort_keys=True)
_META_BYTES = 64 * 1024  # room for meta.json in the free-space estimate (its list of failures included)


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters that change the cached arrays (and so the cache key)."""

    spacing: float = 2.0
    percentiles: tuple[float, float] = (0.5, 99.5)
    target_shape: tuple[int, int, int] | None = None  # None: the largest brain bounding box in the data
    register: str = "none"  # "mni": inputs were N4-corrected and affinely registered first (datasets.registration)

    def __post_init__(self) -> None:
        if self.register not in REGISTRATION_CHOICES:
            raise ValueError(f"--register must be one of {', '.join(REGISTRATION_CHOICES)}, got {self.register!r}")
        if not self.spacing > 0:
            raise ValueError(f"spacing must be positive (mm), got {self.spacing}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.target_shape is not None and (len(self.target_shape) != 3 or min(self.target_shape) < 1):
            raise ValueError(f"target_shape must be three positive integers, got {self.target_shape}")


DATA_FILES = ("volumes.npy", "subjects.csv")  # what meta.json's "files" records a size and sha256 for


@dataclass(frozen=True)
class CachedDataset:
    """A finished cache entry: ``volumes.npy`` (N, C, X, Y, Z) float16 in RAS order, and its subject table
    (``index, subject_id, label, group, source, site``)."""

    directory: Path

    @property
    def table(self) -> pd.DataFrame:
        return pd.read_csv(self.directory / "subjects.csv", dtype=str, keep_default_na=False).astype({"index": int})

    @property
    def meta(self) -> dict:
        return json.loads((self.directory / "meta.json").read_text())

    def volumes(self) -> np.ndarray:
        """Memory-mapped, read-only: trials share the page cache instead of copies."""
        return np.load(self.directory / "volumes.npy", mmap_mode="r")

    def verify(self, full: bool = True) -> list[str]:
        """What is wrong with this entry, one line per problem ([] for a sound one), so a damaged copy is caught
        before a trial memory-maps it and crashes ("mmap length is greater than file size").

        ``full=False``: presence and sizes only (a few stat calls; for every trial at its start).
        ``full=True``: also the sha256 of every data file. Measured on the project's 2-core machine (AMD EPYC
        with SHA extensions): sha256 runs at ~1.8 GB/s; a full verify of a 1 GiB entry took 0.6 s from the page
        cache (1.8-2.3 s while other jobs loaded both cores), plus the disk read when the file is not cached.
        """
        try:
            meta = self.meta
        except FileNotFoundError:
            return ["meta.json is missing (the entry was never finished, or lost its files)"]
        except (OSError, ValueError) as error:
            return [f"meta.json is unreadable ({type(error).__name__}: {error})"]
        recorded = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(recorded, dict) or meta.get("version") != CACHE_FORMAT_VERSION:
            version = meta.get("version") if isinstance(meta, dict) else None
            return [f"old format (version {version}; version {CACHE_FORMAT_VERSION} records each file's size and "
                    f"sha256 in meta.json, which this entry cannot be checked against)"]
        problems = (_file_problem(self.directory / name, recorded.get(name), full) for name in DATA_FILES)
        return [problem for problem in problems if problem is not None]


def _file_problem(path: Path, recorded: object, full: bool) -> str | None:
    """Why ``path`` does not match what meta.json recorded when it was written, or None when it does."""
    if not isinstance(recorded, dict) or not {"bytes", "sha256"} <= recorded.keys():
        return f"meta.json records no size and sha256 for {path.name}"
    try:
        size = path.stat().st_size
        if size != recorded["bytes"]:
            return f"{path.name} is {size} bytes, meta.json says {recorded['bytes']} (truncated or overwritten)"
        if full and (actual := file_digest(path).sha256) != recorded["sha256"]:
            return (f"{path.name} checksum mismatch: sha256 {actual[:16]}..., meta.json says "
                    f"{recorded['sha256'][:16]}... (its content changed after it was written)")
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as error:
        return f"{path.name} is unreadable ({type(error).__name__}: {error})"
    return None


def cache_key(records: Sequence[SubjectRecord], config: PreprocessConfig) -> str:
    identity = []
    for record in sorted(records, key=lambda r: r.subject_id):
        files = []
        for path in record.paths:
            stat = os.stat(path)
            files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
        identity.append([record.subject_id, record.label, record.group, files])
    channels = max((len(record.paths) for record in records), default=1)
    return hashlib.sha256(_key_payload(config, identity, channels).encode()).hexdigest()[:16]


def _foreground(tensor: torch.Tensor) -> torch.Tensor:
    # Inputs are skull-stripped: the brain is whatever is not background zero.
    return tensor > 0


class VolumeFailure(ValueError):
    """One input file that could not be preprocessed: ``path`` and ``reason`` ("ExceptionType: message")."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):
        return VolumeFailure, (self.path, self.reason)  # crosses the worker pool as a value


@contextlib.contextmanager
def _blame(path: str) -> Iterator[None]:
    """Whatever goes wrong inside is ``path``'s fault: re-raised as a VolumeFailure that names it."""
    try:
        yield
    except (VolumeFailure, MemoryError):
        raise
    except Exception as error:
        raise VolumeFailure(path, f"{type(error).__name__}: {error}") from error


def _read_float32(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A channel's voxels as float32 (3-D) and its affine; NaN or inf voxels are refused, since resampling
    spreads them and the percentile rescaling then makes the whole volume NaN."""
    nifti = nib.load(path)
    with np.errstate(over="ignore"):  # an overflow reads as inf: handled just below
        data = np.asanyarray(nifti.dataobj, dtype=np.float32)
    if not np.isfinite(data).all():
        data = _scaled_into_float32(np.asanyarray(nifti.dataobj))
    return (data[..., 0] if data.ndim == 4 else data), nifti.affine


def _scaled_into_float32(native: np.ndarray) -> np.ndarray:
    """float64 voxels beyond float32's range (~3.4e38) read as inf: scale by a power of two first, then cast.

    A power of two is exact, and the percentile rescaling to [0, 1] gives the same result for any positive factor.
    """
    bad = int(np.count_nonzero(~np.isfinite(native)))
    if bad:
        raise ValueError(f"NaN or inf in {bad} of {native.size} voxels: replace them (e.g. by 0) or leave this "
                         f"file out")
    _, exponent = np.frexp(np.abs(native).max())
    return (native * 2.0 ** -int(exponent)).astype(np.float32)


def _rescale_to_unit(image: tio.ScalarImage, percentiles: tuple[float, float]) -> None:
    """TorchIO's RescaleIntensity(out_min_max=(0, 1), percentiles, masking_method=_foreground), computed as it
    does, minus its silent fall-back: with no voxel above zero, or a constant brain, it only warns and keeps the
    raw intensities, which the float16 cast turned into inf (1e6 -> inf; float16 ends at 65504)."""
    array = image.data.numpy().astype(np.float32)  # a copy: rescaled in place below
    brain = _foreground(torch.from_numpy(array)).numpy()
    if not brain.any():
        raise ValueError("no voxel above zero after resampling, so nothing to take as brain "
                         "(an empty or all-negative volume?)")
    np.clip(array, *np.percentile(array[brain], percentiles), out=array)
    low, high = array.min(), array.max()
    if not high > low:
        raise ValueError(f"every brain voxel between the {percentiles[0]:g}th and {percentiles[1]:g}th percentiles "
                         f"is {float(low):g}: nothing to rescale to [0, 1] (a constant image?)")
    array -= low
    array /= high - low
    image.set_data(torch.from_numpy(array))


def _resample_and_crop(paths: tuple[str, ...], config: PreprocessConfig) -> np.ndarray:
    """Canonical orientation, resampling, percentile rescaling to [0, 1], crop to the brain's bounding box.

    Scaled in float32 first, cast to float16 last, so the cache never holds inf or NaN. Raises VolumeFailure
    naming the file at fault.
    """
    images = {}
    for channel, path in enumerate(paths):
        with _blame(path):
            data, affine = _read_float32(path)
        images[f"channel{channel}"] = tio.ScalarImage(tensor=torch.from_numpy(data[None].copy()), affine=affine)
    subject = tio.ToCanonical()(tio.Subject(images))
    subject = tio.Resample(config.spacing, include=["channel0"])(subject)
    if len(paths) > 1:  # every other contrast straight onto the first one's grid: one interpolation, not two
        reference = subject["channel0"]
        subject = tio.Resample((reference.spatial_shape, reference.affine), include=list(images)[1:])(subject)
    brain = torch.zeros_like(subject["channel0"].data, dtype=torch.uint8)
    for name in images:
        brain |= _foreground(subject[name].data).to(torch.uint8)
    for name, path in zip(images, paths):
        with _blame(path):
            _rescale_to_unit(subject[name], config.percentiles)
    subject.add_image(tio.LabelMap(tensor=brain, affine=subject["channel0"].affine), "brain")
    subject = tio.CropOrPad(target_shape=None, mask_name="brain")(subject)  # pads with 0: stays in [0, 1]
    volume = np.concatenate([subject[name].data.numpy() for name in images])
    if not (np.isfinite(volume).all() and volume.min() >= 0 and volume.max() <= 1):
        raise VolumeFailure(";".join(paths), f"RuntimeError: preprocessed values outside [0, 1] (min {volume.min()}, "
                                             f"max {volume.max()}); this is a bug in datasets/preprocessing.py")
    return volume.astype(np.float16)


def _centre_to_shape(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    # float16 -> float32 -> float16 is exact and padding adds zeros: values stay in [0, 1].
    image = tio.ScalarImage(tensor=torch.from_numpy(volume.astype(np.float32)))
    return tio.CropOrPad(shape)(image).data.numpy().astype(np.float16)


def _preprocess_subject(paths: tuple[str, ...], config: PreprocessConfig) -> np.ndarray | VolumeFailure:
    """One subject (in a worker): a failure is returned, not raised, so that every other subject still finishes."""
    try:
        return _resample_and_crop(paths, config)
    except VolumeFailure as failure:
        return failure
    except MemoryError:
        raise  # this machine's limit, not the file's fault: must not be recorded as a bad file
    except Exception as error:
        return VolumeFailure(";".join(paths), f"{type(error).__name__}: {error}")


def preprocess(
    records: Sequence[SubjectRecord],
    config: PreprocessConfig,
    cache_root: str | os.PathLike,
    num_workers: int | None = None,
    skip_invalid: bool = False,
) -> CachedDataset:
    """Return the cache entry for ``records`` under ``config``, building it if there is none or it is damaged.

    Files that cannot be preprocessed stop the run with an InvalidDataError naming each of them; with
    ``skip_invalid`` their subjects are left out instead and listed in ``meta["failed"]``. A failure depends
    only on the files, which the key identifies, so one entry serves both: found again without
    ``skip_invalid``, its list stops the run without preprocessing anything again.

    Ctrl-C raises :class:`datasets.workers.Interrupted` (a KeyboardInterrupt) after the workers are stopped, its
    message logged: the volumes done so far are kept in ``<cache_root>/in-progress/`` and a rerun goes on from them.
    """
    if not records:
        raise ValueError("No subjects to preprocess")
    cache_root = Path(cache_root)
    key = cache_key(records, config)
    cached = _sound_entry(cache_root / key)
    if cached is None:
        records = sorted(records, key=lambda r: r.subject_id)
        progress = _Progress(cache_root / IN_PROGRESS_DIRNAME, config)
        results = _preprocess_all(records, config, cache_root / key, num_workers, progress)
        problems = [Problem(r.subject_id, f.path, f.reason) for r, f in zip(records, results)
                    if isinstance(f, VolumeFailure)]
        _require_preprocessed(problems, len(records), skip_invalid)
        kept = [(r, v) for r, v in zip(records, results) if not isinstance(v, VolumeFailure)]
        try:
            entry = _write_entry(cache_root, key, config, kept, problems, progress)
        except KeyboardInterrupt:
            raise stopped(_interrupted_message(results, progress, writing=True), log) from None
        progress.remove([r for r, _ in kept])
        return entry
    failed = [Problem(**failure) for failure in cached.meta["failed"]]
    _require_preprocessed(failed, cached.meta["n_subjects"] + len(failed), skip_invalid)
    return cached


IN_PROGRESS_DIRNAME = "in-progress"


class _Progress:
    """Volumes done but in no entry yet, one ``.npy`` per subject in ``<cache_root>/in-progress/``: saved
    (atomically) as each is done and found again by the next run, so an interrupted build goes on where it stopped.

    A file is named by a hash of the subject's files (path, size, modification time) and the parameters, as the
    entry is, so it is found again whatever else changed (a file fixed or left out, --skip-invalid given).
    ``directory=None``: nothing is kept (volumes preprocessed for prediction are not cached). Keeping is a help,
    never a reason to stop: a volume that cannot be saved (a full disk) ends the keeping, not the run.
    """

    def __init__(self, directory: Path | None, config: PreprocessConfig | None = None) -> None:
        self.directory = directory
        self.config = config
        self.saving = directory is not None
        self.count = 0  # volumes there: found, or saved by this run

    def _file(self, record: SubjectRecord) -> Path:
        files = [[os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
                 for path, stat in ((path, os.stat(path)) for path in record.paths)]
        payload = _key_payload(self.config, files, len(record.paths))
        return self.directory / f"{hashlib.sha256(payload.encode()).hexdigest()[:16]}.npy"

    def load(self, record: SubjectRecord) -> np.ndarray | None:
        if self.directory is None or not self.directory.is_dir():
            return None
        try:
            volume = np.load(self._file(record), allow_pickle=False)
        except (OSError, ValueError, EOFError):  # not there (or a file gone): preprocessed (and reported) as usual
            return None
        if not _is_preprocessed(volume, len(record.paths)):
            return None
        self.count += 1
        return volume

    def save(self, record: SubjectRecord, volume: np.ndarray) -> None:
        if not self.saving:
            return
        buffer = io.BytesIO()
        np.save(buffer, volume, allow_pickle=False)
        try:
            write_bytes_atomic(self._file(record), buffer.getvalue())
        except OSError as error:
            self.saving = False
            log.warning("Could not keep the preprocessed volume of subject %s in %s (%s: %s); the next ones are held "
                        "in memory only, so an interrupted run would preprocess them again", record.subject_id,
                        self.directory, type(error).__name__, error)
            return
        self.count += 1

    def size(self, records: Sequence[SubjectRecord]) -> int:
        """Bytes the kept volumes of ``records`` take."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        total = 0
        for record in records:
            with contextlib.suppress(OSError):
                total += self._file(record).stat().st_size
        return total

    def remove(self, records: Sequence[SubjectRecord]) -> None:
        """Delete the files of ``records`` (now in an entry, or held in memory), and the folder once it is empty."""
        if self.directory is None or not self.directory.is_dir():
            return
        for record in records:
            try:
                self._file(record).unlink()
            except OSError:  # not kept (or an input file gone): nothing to delete
                continue
            self.count -= 1
        with contextlib.suppress(OSError):  # not empty: other subjects, or another run's volumes
            self.directory.rmdir()


def _is_preprocessed(volume: np.ndarray, channels: int) -> bool:
    """What :func:`_resample_and_crop` returns: (C, X, Y, Z) float16 in [0, 1]."""
    return (volume.dtype == np.float16 and volume.ndim == 4 and volume.shape[0] == channels and volume.size > 0
            and bool(np.isfinite(volume).all()) and volume.min() >= 0 and volume.max() <= 1)


def _sound_entry(directory: Path) -> CachedDataset | None:
    """The entry at ``directory`` if it passes a full verify; a damaged one is moved aside (None: build it)."""
    if not directory.exists():
        return None
    cached = CachedDataset(directory)
    problems = cached.verify(full=True)
    if not problems:
        log.info("Preprocessed cache hit: %s", directory)
        return cached
    _move_aside(directory, problems)
    return None


def _move_aside(directory: Path, problems: list[str]) -> None:
    """Rename rather than delete: instant, and whatever damaged it (a full disk, a crash, a tool) can be looked at."""
    aside = directory.with_name(f"{directory.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        directory.rename(aside)
    except FileNotFoundError:
        return  # another process moved it first and rebuilds it too; the first to finish wins (_publish)
    log.warning("Preprocessed cache entry %s is damaged (%s); moved to %s and rebuilding it. Delete %s once it "
                "is no longer needed.", directory, "; ".join(problems), aside.name, aside)


def _preprocess_all(records: list[SubjectRecord], config: PreprocessConfig, final: Path | str,
                    num_workers: int | None, progress: _Progress | None = None) -> list[np.ndarray | VolumeFailure]:
    """Each record's volume or VolumeFailure, in order; the volumes ``progress`` holds are not preprocessed again.

    Ctrl-C stops the workers and raises :class:`datasets.workers.Interrupted`, whose message (logged) says how many
    volumes are done and whether they are kept.
    """
    progress = progress or _Progress(None)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    results: list[np.ndarray | VolumeFailure | None] = [progress.load(record) for record in records]
    todo = [index for index, result in enumerate(results) if result is None]
    if progress.count:
        log.info("Preprocessing: %d of %d volumes were done by an earlier run that was stopped (kept in %s)",
                 progress.count, len(records), progress.directory)
    if todo:
        log.info("Preprocessing %d subjects into %s with %d worker(s)", len(todo), final, workers)

    def finished(index: int, result: np.ndarray | VolumeFailure) -> None:
        results[index] = result
        if not isinstance(result, VolumeFailure):
            progress.save(records[index], result)

    try:
        if workers > 1 and todo:
            run_in_workers(_preprocess_subject, [(records[i].paths, config) for i in todo], workers,
                           lambda job, result: finished(todo[job], result))
        else:
            for index in todo:
                finished(index, _preprocess_subject(records[index].paths, config))
    except KeyboardInterrupt:
        raise stopped(_interrupted_message(results, progress), log) from None
    return results


def _interrupted_message(results: list, progress: _Progress, writing: bool = False) -> str:
    """What was interrupted, what is kept and what the same command does when run again, in one line."""
    total, done = len(results), sum(result is not None for result in results)
    if writing and progress.count:
        return (f"Preprocessing interrupted while the cache entry was written (no part of it is left): "
                f"{progress.count} of {total} volumes are kept in {progress.directory}; rerun the same command to "
                f"finish it.")
    if progress.directory is None:
        when = f"after {done} of {total} volumes" if done else f"before the first of {total} volumes was done"
        return (f"Preprocessing interrupted {when} (volumes preprocessed for prediction are not cached); rerunning "
                f"the same command preprocesses them again.")
    if progress.count:
        return (f"Preprocessing interrupted: {progress.count} of {total} volumes are done and kept in "
                f"{progress.directory}; rerun the same command to preprocess the other {total - progress.count}.")
    if done:
        return (f"Preprocessing interrupted after {done} of {total} volumes, none of which could be kept (see the "
                f"warning above); rerunning the same command preprocesses them again.")
    return (f"Preprocessing interrupted before the first of {total} volumes was done; rerun the same command to "
            f"start it again.")


def preprocess_volumes(records: Sequence[SubjectRecord], config: PreprocessConfig,
                       num_workers: int | None = None) -> tuple[np.ndarray, list[Problem]]:
    """``records`` preprocessed as a cache entry's volumes are, but in memory and not cached: new scans to predict
    (``trainables/predict.py``) must reach the models in exactly the form their training data had.

    ``config.target_shape`` is required: the entry's crop shape (its meta.json ``shape``), to which each volume is
    centred as ``_write_entry`` does. Returns the (N, C, X, Y, Z) float16 volumes of the subjects that could be
    preprocessed, in the order given, and one Problem per subject that could not (the caller decides whether that
    stops it).
    """
    if config.target_shape is None:
        raise ValueError("preprocess_volumes needs config.target_shape: the crop shape of the cache entry the models "
                         "were trained on (its meta.json 'shape')")
    records = list(records)
    results = _preprocess_all(records, config, "memory (not cached)", num_workers) if records else []
    problems = [Problem(r.subject_id, v.path, v.reason) for r, v in zip(records, results) if isinstance(v, VolumeFailure)]
    kept = []
    for record, volume in zip(records, results):
        if isinstance(volume, VolumeFailure):
            continue
        if any(size > limit for size, limit in zip(volume.shape[1:], config.target_shape)):
            # The training crop was the largest brain of the run's data: a larger brain loses its edges here.
            log.warning("Subject %s: brain bounding box %s is larger than the run's crop %s; its edges are cut off",
                        record.subject_id, "x".join(map(str, volume.shape[1:])), "x".join(map(str, config.target_shape)))
        kept.append(_centre_to_shape(volume, config.target_shape))
    channels = len(records[0].paths) if records else 1
    empty = np.empty((0, channels, *config.target_shape), dtype=np.float16)
    return (np.stack(kept) if kept else empty), problems


def _require_preprocessed(problems: list[Problem], total: int, skip_invalid: bool) -> None:
    """Stop on any file that failed, unless the user chose to leave such subjects out (but never all of them)."""
    if not problems:
        return
    lines = "\n".join(f"  {p.path}: {p.reason} (subject {p.subject_id})" for p in problems)
    if len(problems) == total:
        raise InvalidDataError(f"None of the {total} subjects could be preprocessed; fix these files:\n{lines}")
    if not skip_invalid:
        raise InvalidDataError(f"{len(problems)} of {total} subjects could not be preprocessed; fix or remove these "
                               f"files, or pass --skip-invalid to leave them out:\n{lines}")
    log.warning("Left out (--skip-invalid), %d of %d subjects could not be preprocessed:\n%s", len(problems), total,
                lines)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The header np.save writes for a C-ordered float16 array of ``shape``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _volume_chunks(header: bytes, volumes: list[np.ndarray], shape: tuple[int, int, int]) -> Iterator[bytes]:
    # Plain file writes, never a memory map of a sparse file: a full disk then raises ENOSPC, not SIGBUS.
    yield header
    for volume in volumes:
        yield np.ascontiguousarray(_centre_to_shape(volume, shape)).tobytes()


def _write_entry(cache_root: Path, key: str, config: PreprocessConfig,
                 kept: list[tuple[SubjectRecord, np.ndarray]], problems: list[Problem],
                 progress: _Progress | None = None) -> CachedDataset:
    """Write the entry in a temporary folder and rename it into place once complete (checked for space first).

    The volumes kept in ``progress`` take about as much space as the entry. Where the disk holds the entry only
    without them, they are deleted first (every volume is in memory by now): keeping them would turn a build that
    fits into a "disk full" that the same command meets again. An interruption while the entry is written then
    preprocesses those volumes again.
    """
    records, volumes = [r for r, _ in kept], [v for _, v in kept]
    shape = config.target_shape or tuple(int(max(v.shape[axis + 1] for v in volumes)) for axis in range(3))
    channels = int(volumes[0].shape[0])
    header = _npy_header((len(volumes), channels, *shape))
    volume_bytes = len(header) + len(volumes) * channels * math.prod(shape) * np.dtype(np.float16).itemsize
    table = pd.DataFrame(
        {"index": range(len(records)), "subject_id": [r.subject_id for r in records],
         "label": [r.label for r in records], "group": [r.group for r in records],
         "source": [r.source for r in records], "site": [r.site for r in records]}
    )
    table_bytes = table.to_csv(index=False, lineterminator="\n").encode("utf-8")
    what = f"the preprocessed cache entry {key} ({len(volumes)} x {channels} x {' x '.join(map(str, shape))} float16)"
    needed = volume_bytes + len(table_bytes) + _META_BYTES
    fix = (f"Free space on that disk (entries under {cache_root} that no run uses any more, and any *.damaged-* "
           f"folders there, can be deleted; so can {IN_PROGRESS_DIRNAME}/ while no run is preprocessing) or pass "
           f"--cache-dir on a larger disk.")
    cache_root.mkdir(parents=True, exist_ok=True)
    free = free_bytes(cache_root)
    if progress is not None and free < needed <= free + progress.size(records):
        count = progress.count
        progress.remove(records)
        log.warning("Too little free space in %s for the cache entry beside the %d volume(s) kept in %s: deleted "
                    "those (they are in memory) to make room; an interruption now would preprocess them again",
                    cache_root, count - progress.count, progress.directory)
    require_free_space(cache_root, what, needed, fix)
    partial = cache_root / f"{key}.partial-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir()
        files = {"volumes.npy": write_chunks_atomic(partial / "volumes.npy", _volume_chunks(header, volumes, shape),
                                                    size=volume_bytes),
                 "subjects.csv": write_bytes_atomic(partial / "subjects.csv", table_bytes)}
        meta = {"key": key, "config": asdict(config), "shape": list(shape), "channels": channels,
                "n_subjects": len(records), "spacing_mm": config.spacing, "axes": "N,C,X,Y,Z (RAS)",
                "dtype": "float16", "version": CACHE_FORMAT_VERSION,
                "files": {name: {"bytes": digest.size, "sha256": digest.sha256} for name, digest in files.items()},
                "failed": [asdict(problem) for problem in problems]}
        # meta.json last: its presence marks a complete entry even before the rename.
        write_text_atomic(partial / "meta.json", json.dumps(meta, indent=2))
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if is_disk_full(error):  # e.g. another process filled the disk after the check above
            raise DiskFullError(space_message(cache_root, what, needed, free_bytes(cache_root), fix)) from error
        raise
    return _publish(partial, cache_root / key)


def _publish(partial: Path, final: Path) -> CachedDataset:
    try:
        os.replace(partial, final)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if CachedDataset(final).verify(full=False):  # not another process's finished copy of the same entry
            raise
    return CachedDataset(final)
