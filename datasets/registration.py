"""Optional N4 bias-field correction and affine registration of every volume to MNI152 (``--register mni``).

Why: BraTS volumes were co-registered to one atlas, while IXI heads are in native scanner space,
tilted and shifted. The class is therefore predictable from pose and field of view alone, a
shortcut a CNN can learn instead of anatomy. Registering every volume to one template removes
most of it. This follows ClinicaDL's ``t1-linear`` pipeline, which does the same with ANTs (N4,
then an affine registration to MNI152), here with ANTsPy.

What: for each subject, channel 0 is N4-corrected and affinely registered to nilearn's
brain-extracted MNI152 2009a T1 (registration runs on a fixed 2-4 mm copy of it: twelve
parameters gain nothing from 1 mm and cost 5x the time). Every channel is N4-corrected and moved
with that one transform onto the template's field of view at the run's ``spacing``, so the later
resampling is a no-op and the outputs stay small (2 mm: 99x117x95). Voxels outside the moved
input's non-zero support are set to exactly 0 and interpolation undershoot is clipped to 0, so the
outputs stay skull-stripped-looking for code that takes zero as background. A fixed seed and one
ITK thread per worker make reruns identical.

Cache: one file per input under ``<cache_root>/registered-mni/``, named by a hash of the input's
identity (absolute path, size, mtime), the method, the spacing, :data:`REGISTRATION_VERSION` and the
channel's role (channels after the first also hash channel 0's identity, whose transform they
use). Files are written under a hidden temporary name and renamed, so an interrupted run never
leaves an output that looks complete; an existing output is reused. The forward transform is kept
beside channel 0's output (``.mat``) for quality control.

Off by default: the paper did not register, and the reproduction must match it unless asked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

from datasets.atomic import write_via_temp_file
from datasets.records import SubjectRecord
from datasets.synthetic import mni_template_path
from datasets.validation import Problem
from datasets.workers import run_in_workers, stopped

# ``import ants`` sits inside the functions that use it: a spawned worker must set its ITK thread count
# before ANTs first runs, and runs without --register mni never pay for loading ANTs.

log = logging.getLogger(__name__)

REGISTRATION_CHOICES = ("none", "mni")
REGISTRATION_VERSION = 1  # bump when the outputs change for the same inputs: old cache files are then ignored
CACHE_DIRNAME = "registered-mni"
RANDOM_SEED = 20190  # ANTs samples the metric at random points; a fixed seed makes reruns identical
# Registration grid (mm): the run's spacing clamped to this range. Finer costs ~5x for no better affine;
# coarser leaves too few voxels at ANTs' coarsest pyramid level (6x shrink).
REGISTRATION_GRID_MM = (2.0, 4.0)
PROGRESS_EVERY = 10  # subjects between progress lines


@dataclasses.dataclass(frozen=True)
class _Job:
    """One subject's work, picklable for a spawned worker: inputs, where each output goes, the grid."""

    subject_id: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    transform: str
    spacing: float

    @property
    def done(self) -> bool:
        return all(os.path.isfile(path) for path in self.outputs)


class _StepFailed(Exception):
    """A step of one subject failed: carries the file and a reason worded for the user."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def check_method(method: str) -> None:
    """Refuse anything but :data:`REGISTRATION_CHOICES`, naming them."""
    if method not in REGISTRATION_CHOICES:
        raise ValueError(f"register method must be one of {', '.join(REGISTRATION_CHOICES)}, got {method!r}")


def register_records(
    records: Sequence[SubjectRecord],
    cache_root: str | os.PathLike,
    method: str = "mni",
    spacing: float = 2.0,
    num_workers: int | None = None,
) -> tuple[list[SubjectRecord], list[Problem]]:
    """Records whose ``paths`` point at their registered volumes, and one Problem per subject that failed.

    ``method="none"`` returns the records unchanged. Failed subjects are left out of the records; the
    caller decides whether that stops the run (``--skip-invalid``).
    """
    check_method(method)
    if not spacing > 0:
        raise ValueError(f"spacing must be positive (mm), got {spacing}")
    if method == "none":
        return list(records), []
    directory = Path(cache_root) / CACHE_DIRNAME
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [_plan_job(record, directory, method, float(spacing)) for record in records]
    pending = [index for index, job in enumerate(jobs) if not job.done]
    if len(pending) < len(jobs):
        log.info("Registration cache: %d/%d subjects already registered in %s", len(jobs) - len(pending),
                 len(jobs), directory)
    failures = _run_jobs([jobs[i] for i in pending], num_workers)
    problems = [failures[job] for job in jobs if job in failures]
    registered = [dataclasses.replace(record, paths=job.outputs)
                  for record, job in zip(records, jobs) if job not in failures]
    return registered, problems


# --------------------------------------------------------------------------------------------
# Cache layout
# --------------------------------------------------------------------------------------------
def _identity(path: str) -> list:
    """What makes an input "the same file": a replaced or edited file gets new outputs."""
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _key(path: str, method: str, spacing: float, role: object) -> str:
    try:
        identity = _identity(path)
    except OSError:
        identity = [os.path.abspath(path), None, None]  # missing: the worker reports it as a Problem
    payload = json.dumps({"file": identity, "method": method, "spacing": spacing,
                          "version": REGISTRATION_VERSION, "role": role}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _plan_job(record: SubjectRecord, directory: Path, method: str, spacing: float) -> _Job:
    """Output names for every channel; later channels are keyed by channel 0 too, since its transform moves them."""
    reference_key = _key(record.paths[0], method, spacing, "reference")
    outputs = [directory / f"{_stem(record.paths[0])}.{reference_key}.nii.gz"]
    for channel, path in enumerate(record.paths[1:], start=1):
        key = _key(path, method, spacing, {"channel": channel, "moved_with": reference_key})
        outputs.append(directory / f"{_stem(path)}.{key}.nii.gz")
    transform = directory / f"{_stem(record.paths[0])}.{reference_key}.mat"
    return _Job(record.subject_id, tuple(record.paths), tuple(str(p) for p in outputs), str(transform), spacing)


# --------------------------------------------------------------------------------------------
# Running jobs
# --------------------------------------------------------------------------------------------
def _run_jobs(jobs: list[_Job], num_workers: int | None) -> dict[_Job, Problem]:
    """Register every job, in this process (``num_workers == 1``) or in spawned workers; the failed ones.

    Workers run ITK with one thread each, which makes results identical from run to run (ANTs' metric
    varies with more threads even with a fixed seed); the serial path uses this process's ITK threads.
    """
    if not jobs:
        return {}
    requested = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if requested < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    # A pool even for one pending job: a rerun that completes a cache must compute as the first run did.
    workers = 1 if requested == 1 else min(requested, len(jobs))
    log.info("Registering %d subjects to MNI152 (N4 + affine, ANTsPy) %s", len(jobs),
             "in this process" if requested == 1 else f"with {workers} worker(s), one ITK thread each")
    progress = _Progress(len(jobs))
    failures: dict[_Job, Problem] = {}
    try:
        if requested == 1:
            for job in jobs:
                progress.record(failures, job, _register_job(job))
        else:
            run_in_workers(_register_job, [(job,) for job in jobs], workers,
                           lambda index, problem: progress.record(failures, jobs[index], problem),
                           initializer=_one_itk_thread)
    except KeyboardInterrupt:
        # Each subject's outputs are renamed into place once written: the ones done are cached, the others absent.
        registered = progress.done - len(failures)
        raise stopped(f"Registration to MNI152 interrupted: {registered} of the {len(jobs)} subjects left to register "
                      f"are done and kept in {Path(jobs[0].transform).parent}; rerun the same command to register the "
                      f"other {len(jobs) - registered}.", log) from None
    progress.finish(failures)
    return failures


def _one_itk_thread() -> None:
    """Worker initializer: ITK reads this once, at its first use in the process, so it must come before ANTs runs."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"


class _Progress:
    """A log line every few subjects, so a run of hundreds of volumes shows it is alive and how fast."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.monotonic()

    def record(self, failures: dict[_Job, Problem], job: _Job, problem: Problem | None) -> None:
        self.done += 1
        if problem is not None:
            failures[job] = problem
            log.warning("Registration failed: %s: %s (subject %s)", problem.path, problem.reason, problem.subject_id)
        if self.done % PROGRESS_EVERY == 0 and self.done < self.total:
            elapsed = time.monotonic() - self.start
            log.info("Registered %d/%d subjects to MNI152 (%d failed), %.0f s, about %.0f s left", self.done,
                     self.total, len(failures), elapsed, elapsed / self.done * (self.total - self.done))

    def finish(self, failures: dict[_Job, Problem]) -> None:
        log.info("Registered %d/%d subjects to MNI152 (%d failed) in %.0f s", self.done, self.total, len(failures),
                 time.monotonic() - self.start)


# --------------------------------------------------------------------------------------------
# One subject (runs in a worker)
# --------------------------------------------------------------------------------------------
def _register_job(job: _Job) -> Problem | None:
    """Register one subject and write its outputs; a failure becomes a Problem, never an exception."""
    try:
        _register_subject(job)
    except _StepFailed as failure:
        return Problem(job.subject_id, failure.path, failure.reason)
    return None


@contextlib.contextmanager
def _step(name: str, path: str) -> Iterator[None]:
    """Name the step and the file in whatever goes wrong inside, e.g. "affine registration to MNI152 failed (...)"."""
    try:
        yield
    except Exception as error:
        raise _StepFailed(path, f"{name} failed ({type(error).__name__}: {error})") from error


def _register_subject(job: _Job) -> None:
    """Channel 0 decides the transform; every channel (0 included) is moved with it and written."""
    fixed, grid = _template_grids(job.spacing)
    reference = job.inputs[0]
    corrected, support = _read_and_correct(reference)
    with tempfile.TemporaryDirectory(prefix="register-") as scratch:
        with _step("affine registration to MNI152", reference):
            transform = _affine(fixed, corrected, scratch)
        with _step("saving the transform", reference):
            write_via_temp_file(job.transform, functools.partial(shutil.copyfile, transform))
        for channel, (path, output) in enumerate(zip(job.inputs, job.outputs)):
            if channel > 0:
                corrected, support = _read_and_correct(path)
            _move_and_write(corrected, support, grid, transform, path, output)


def _read_and_correct(path: str):
    """(N4-corrected image, its brain mask) of one input file."""
    with _step("reading", path):
        image = _read(path)
    with _step("N4 bias-field correction", path):
        return _n4(image)


def _move_and_write(image, support, grid, transform: str, path: str, output: str) -> None:
    import ants

    with _step("resampling onto the MNI152 grid", path):
        moved = _move(image, support, grid, transform)
    with _step("writing", path):
        write_via_temp_file(output, functools.partial(ants.image_write, moved))


@functools.lru_cache(maxsize=4)
def _template_grids(spacing: float):
    """(registration target, output grid) from the MNI152 template, built once per process and spacing."""
    import ants

    template = ants.image_read(str(mni_template_path("t1")))
    low, high = REGISTRATION_GRID_MM
    registration_mm = min(max(spacing, low), high)
    fixed = ants.resample_image(template, (registration_mm,) * 3, use_voxels=False, interp_type=0)
    grid = ants.resample_image(template, (spacing,) * 3, use_voxels=False, interp_type=0)
    return fixed, grid


# ITK's physical space is LPS; nibabel's affines map voxels to RAS.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _read(path: str):
    """The volume as a 3-D float ANTs image, placed by nibabel's affine.

    Read by nibabel, not ``ants.image_read``: ITK returns a truncated .nii.gz without complaint, as if it were
    complete (its unread voxels hold whatever was in memory), and it chooses between a header's qform and sform
    otherwise than nibabel, which validation, the acquisition profile and ``--register none`` use: with the two
    disagreeing, or neither set, the brain could be registered mirrored (which an affine registration cannot undo).
    """
    import ants

    try:
        nifti = nib.load(path)
        values = nifti.get_fdata(dtype=np.float32)  # scl_slope / scl_inter applied, as ITK did
    except (EOFError, zlib.error) as error:
        raise OSError(f"truncated or corrupt file ({type(error).__name__}: {error})") from error
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {values.shape}")
    linear = _RAS_TO_LPS @ nifti.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError("the header's voxel axes are not perpendicular (a sheared affine), which registration's "
                         "image grid cannot hold; resample the volume to an orthogonal grid first")
    return ants.from_numpy(np.ascontiguousarray(values), origin=tuple(_RAS_TO_LPS @ nifti.affine[:3, 3]),
                           spacing=tuple(spacing), direction=direction)


def _n4(image):
    """(bias-corrected image, float mask of the brain = voxels above 0).

    The mask is made by ANTs, not from a numpy array: N4 crashes (segfault) on full-size uint8 masks
    built from numpy in ANTsPy 0.6.3.
    """
    import ants

    # Voxels in [min, 0] -> 0, the rest -> 1; ITK refuses an empty range, hence min(..., 0). Integer
    # in/out values: ANTs' ThresholdImage takes a float-looking one for a mask file name and says so.
    low = min(float(image.min()), 0.0)
    support = ants.threshold_image(image, low_thresh=low, high_thresh=0.0, inval=0, outval=1)
    if not support.numpy().any():
        raise ValueError("no voxel above 0")
    return ants.n4_bias_field_correction(image, mask=support), support


def _affine(fixed, moving, scratch: str) -> str:
    """Path of the forward affine (moving -> template), computed with a fixed seed.

    ANTsPy 0.6.3 reads the seed from ``ants.config`` only (a ``random_seed=`` argument is silently
    ignored), so it is set there for the call and put back afterwards.
    """
    import ants

    previous = ants.config._random_seed
    ants.config._random_seed = RANDOM_SEED
    try:
        result = ants.registration(fixed, moving, type_of_transform="Affine", outprefix=os.path.join(scratch, "fwd_"))
    finally:
        ants.config._random_seed = previous
    return result["fwdtransforms"][0]


def _move(image, support, grid, transform: str):
    """``image`` on ``grid`` (linear), exactly 0 outside its moved support, never negative."""
    import ants

    moved = ants.apply_transforms(grid, image, [transform], interpolator="linear")
    inside = ants.apply_transforms(grid, support, [transform], interpolator="nearestNeighbor").numpy() > 0.5
    data = np.where(inside, np.maximum(moved.numpy(), 0.0), 0.0).astype(np.float32)
    return grid.new_image_like(data)
