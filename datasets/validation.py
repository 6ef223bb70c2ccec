"""Open every volume once and say, file by file, what is wrong before any training starts.

Results are remembered per file (path, size, modification time) so re-running a check or an
experiment on the same data does not decompress hundreds of volumes again.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from datasets.acquisition import volume_profile
from datasets.atomic import write_text_atomic
from datasets.records import SubjectRecord


@dataclass(frozen=True)
class Problem:
    """Why one subject (and which of its files) cannot be used."""

    subject_id: str
    path: str
    reason: str


@dataclass
class ValidationReport:
    valid: list[SubjectRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    # Per readable file: header and intensity profile (datasets.acquisition), measured while checking.
    profiles: dict[str, dict] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        found = Counter(r.label for r in self.valid)
        return {c: found.get(c, 0) for c in self.classes}

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{len(self.valid)} valid subjects: " + ", ".join(f"{c} {n}" for c, n in self.counts.items())]
        if self.problems:
            lines.append(f"{len(self.problems)} invalid:")
            lines += [f"  {p.path or '-'}: {p.reason} (subject {p.subject_id})" for p in self.problems]
        return "\n".join(lines)


class InvalidDataError(ValueError):
    """Raised when a run would train on invalid data; the message lists every problem."""


# Above this share of negative voxels among the non-zero ones a volume counts as already normalised. MR magnitude
# images have none; interpolation ringing at the brain's edge after a registration leaves a few percent at most,
# while a z-scored or [-1, 1]-scaled brain has about half.
NEGATIVE_SHARE_LIMIT = 0.10


def check_volume(path: str | os.PathLike) -> str | None:
    """Return why ``path`` is not a usable 3-D volume, or None when it is."""
    return inspect_volume(path)[0]


def inspect_volume(path: str | os.PathLike) -> tuple[str | None, dict | None]:
    """(why ``path`` is not a usable 3-D volume or None, its acquisition profile when readable)."""
    path = Path(path)
    if not str(path) or not path.exists():
        return "file not found", None
    if path.stat().st_size == 0:
        return "empty file (0 bytes)", None
    try:
        image = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as error:
        return f"not a NIfTI image ({error})", None
    except (EOFError, OSError, zlib.error) as error:
        return f"unreadable or truncated ({type(error).__name__}: {error})", None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        return f"not a NIfTI image ({type(image).__name__})", None
    shape = tuple(image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        return f"not 3-D (shape {tuple(image.shape)})", None
    if min(shape) == 0:
        return f"empty image (shape {shape})", None
    if min(shape) == 1:
        return (f"a single slice, not a 3-D volume (shape {shape}); give the whole series as one 3-D NIfTI "
                "(e.g. dcm2niix)"), None
    pixdim = _voxel_sizes_without_orientation(path, image)
    if pixdim is not None and min(pixdim) <= 0:
        # Without a qform/sform the affine comes from pixdim, and nibabel turns a 0 into 1 mm: resampled wrongly.
        return (f"voxel size {', '.join(f'{z:g}' for z in pixdim)} mm in the header (pixdim) and no qform/sform: "
                f"a size must be positive; {AFFINE_FIX}"), None
    if not np.issubdtype(image.get_data_dtype(), np.number) or np.issubdtype(image.get_data_dtype(), np.complexfloating):
        return (f"voxel type {image.get_data_dtype()} is not a real number (RGB or complex data); give a "
                "single-channel intensity volume"), None
    unplaceable = affine_problem(image.affine)
    if unplaceable is not None:
        return unplaceable, None
    implausible = voxel_size_problem(image)
    if implausible is not None:
        return implausible, None
    try:
        data = np.asanyarray(image.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as error:
        return f"unreadable or truncated ({type(error).__name__}: {error})", None
    if not np.isfinite(data).all():
        return f"non-finite voxels ({int((~np.isfinite(data)).sum())} NaN/Inf)", None
    if data.min() == data.max():
        return f"constant image (every voxel is {float(data.min()):g})", None
    nonzero = data[data != 0]
    negative = float((nonzero < 0).mean()) if nonzero.size else 0.0
    if negative > NEGATIVE_SHARE_LIMIT:
        # Preprocessing takes voxels <= 0 for background (inputs are skull-stripped), so a z-scored brain would
        # lose its darker half to the background and train without a word.
        return (f"{negative:.0%} of the non-zero voxels are negative: the intensities look normalised already "
                "(z-scored?), and preprocessing takes voxels <= 0 for background, so that share of the brain would "
                "be lost; give the volumes before intensity normalisation (as scanned, or bias-corrected)"), None
    return None, {**volume_profile(image, data), CONTENT_DIGEST: content_digest(image, data),
                  FOREGROUND_BOX: foreground_box_mm(image.affine, data)}


# The profile key of ``content_digest``. validate_records refuses two subject ids whose files share one: the same scan
# under two ids (a copy, a hard link, .nii beside .nii.gz, a re-save as another data type) would be two groups, so it
# could be trained on in one part of a fold and tested on in another, which the split audit (ids and groups) cannot
# see. subjects.csv records each subject's first file's digest, so that prediction recognises a run volume by it.
CONTENT_DIGEST = "content_sha256"


def content_digest(image, data: np.ndarray) -> str:
    """sha256 (hex) of a volume's voxel values on its voxel grid, whatever file holds them.

    Hashed: the voxel intensities as nibabel scales them (``data``: float32, scl_slope/inter applied), reoriented to
    the closest canonical (RAS+) axis order with ``nib.orientations.io_orientation`` (a lossless permutation and flip
    of the array), -0.0 written as 0.0, as little-endian float32 in Fortran order (NIfTI's own voxel order, so the
    usual file costs one contiguous copy), after the reoriented shape. So .nii and .nii.gz, int16 and float32 of the
    same intensities, a copy, a hard link, and the same array re-saved in another axis order (fslreorient2std) give
    one digest. Not hashed: the rest of the header (affine, pixdim, units, descriptions), because a header rewritten
    (e.g. fixing the voxel size or the sform) leaves the very same acquisition; two different acquisitions never share
    every voxel value of a 3-D volume (and constant images are refused before this). A resampled, registered,
    re-stripped or otherwise re-computed copy has other values and is not caught: this is for exact duplicates.
    """
    canonical = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(image.affine))
    voxels = np.empty(canonical.shape, dtype="<f4", order="F")
    np.add(canonical, np.float32(0), out=voxels)  # the one copy; -0.0 + 0.0 is +0.0
    digest = hashlib.sha256(b"voxels-f4-F-RAS:1;")
    digest.update(np.asarray(voxels.shape, dtype="<i8").tobytes())
    digest.update(voxels.ravel(order="F"))  # a view (Fortran-contiguous): no second copy
    return digest.hexdigest()


AFFINE_FIX = "fix the header's qform/sform, e.g. with nibabel or fslorient"

# The profile key of ``foreground_box_mm``: where each file's non-zero voxels lie in world space, so that the channels of
# one subject can be checked to cover the same head (``channel_placement_problem``).
FOREGROUND_BOX = "foreground_box_mm"


def foreground_box_mm(affine: np.ndarray, data: np.ndarray) -> list[float]:
    """The world-space (scanner mm) axis-aligned box around the non-zero voxels: [x0, y0, z0, x1, y1, z1].

    Voxel edges, not centres (a one-voxel object has a size), through the affine's eight corners, so an oblique or
    reoriented grid gives the box around its rotated foreground."""
    mask = data != 0
    low, high = [], []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        low.append(hit[0] - 0.5)
        high.append(hit[-1] + 0.5)
    corners = np.array(list(itertools.product(*zip(low, high))), dtype=float)  # the box's 8 corners, in voxels
    world = corners @ np.asarray(affine, dtype=float)[:3, :3].T + np.asarray(affine, dtype=float)[:3, 3]
    return [round(float(v), 3) for v in (*world.min(axis=0), *world.max(axis=0))]


def _voxel_sizes_without_orientation(path: Path, image) -> tuple[float, ...] | None:
    """pixdim[1:4] as written when no qform/sform places the volume (nibabel's checked header turns a 0 into 1 mm
    on load); None when a qform or sform gives the affine, or the header cannot be read raw."""
    try:
        with nib.openers.ImageOpener(str(path)) as handle:
            raw = type(image.header).from_fileobj(handle, check=False)
    except Exception:  # noqa: BLE001 - an unusual container: nibabel's own reading stands
        return None
    if int(raw["qform_code"]) > 0 or int(raw["sform_code"]) > 0:
        return None
    return tuple(float(v) for v in raw["pixdim"][1:4])


def affine_problem(affine: np.ndarray) -> str | None:
    """Why the voxel-to-world affine cannot place the volume, or None: resampling inverts it, so a
    singular or non-finite one fails inside preprocessing with an error that names no file."""
    affine = np.asarray(affine, dtype=float)
    if not np.isfinite(affine).all():
        return f"affine is not finite (NaN/Inf in the header's voxel-to-world matrix): {AFFINE_FIX}"
    linear = affine[:3, :3]
    sizes = np.sqrt((linear**2).sum(axis=0))
    listed = ", ".join(f"{s:g}" for s in sizes)
    if sizes.min() == 0:
        return f"affine is singular (voxel sizes {listed}): {AFFINE_FIX}"
    if abs(np.linalg.det(linear)) <= 1e-6 * np.prod(sizes):  # relative: voxel axes (nearly) parallel
        return f"affine is singular (voxel axes are parallel; voxel sizes {listed}): {AFFINE_FIX}"
    return None


# Voxel sizes (mm) an MR volume can plausibly have. Clinical and research brain MRI runs from ~0.2 mm (7 T,
# high-resolution in-plane) to ~10 mm (thick 2-D slices plus gap); 0.1-20 mm leaves a factor of two on each side
# (ex vivo scans below 0.1 mm are not this pipeline's data). The headers it exists to catch are out by a factor of
# 1000, written in metres (1 mm -> 0.001) or micrometres (1 mm -> 1000), or by a broken converter, so the range
# need not be tight. Without it (measured on 4 mm test blobs, --spacing 2) such a file passed validation and then:
# 0.004 mm voxels failed in preprocessing as "no voxel above zero after resampling" (blaming the image), 4000 mm
# ones as ITK's "Failed to allocate memory for image", and 30 mm ones did not fail at all: the crop shape is the
# largest brain in the data, so that one file made every subject's cached volume 284x314x224 instead of 38x42x30.
VOXEL_SIZE_RANGE_MM = (0.1, 20.0)


def voxel_size_problem(image) -> str | None:
    """Why the header's voxel sizes are not plausible MRI voxel sizes in mm (``VOXEL_SIZE_RANGE_MM``), or None.

    Both the affine (what resampling uses: the qform/sform, or pixdim when neither is set) and pixdim (what the
    acquisition profile reports) are checked; the message says which is off, a likely cause and the fix."""
    low, high = VOXEL_SIZE_RANGE_MM
    placed = np.sqrt((np.asarray(image.affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    pixdim = np.abs(np.asarray(image.header.get_zooms()[:3], dtype=float))
    if _plausible(placed) and _plausible(pixdim):
        return None
    units = image.header.get_xyzt_units()[0] if hasattr(image.header, "get_xyzt_units") else "unknown"
    declared = f"; its units field says {units}" if units not in ("mm", "unknown") else ""
    outside = f"outside the plausible {low:g}-{high:g} mm for MRI"
    if _plausible(placed):  # the qform/sform places the voxels right, pixdim misreports them
        return (f"voxel size {_listed(pixdim)} mm in the header's pixdim (its qform/sform says {_listed(placed)} mm), "
                f"{outside}{declared}; rewrite the header with the voxel size in mm, e.g. with nibabel: "
                f"img.header.set_zooms(({_listed(placed)})), then nib.save")
    if _plausible(placed * 1000):
        guess, to_mm = "written in metres?", "np.diag([1000, 1000, 1000, 1]) @ img.affine"
    elif _plausible(placed / 1000):
        guess, to_mm = "written in micrometres?", "np.diag([0.001, 0.001, 0.001, 1]) @ img.affine"
    else:
        guess, to_mm = "a broken converter?", "the affine in mm"
    return (f"voxel size {_listed(placed)} mm in the header, {outside} ({guess}{declared}); rewrite the header with "
            f"the voxel size in mm, e.g. with nibabel: nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), {to_mm}, "
            "img.header), path), which sets pixdim, qform and sform (img.header.set_zooms alone leaves the "
            "qform/sform in the old unit)")


def _plausible(sizes: np.ndarray) -> bool:
    low, high = VOXEL_SIZE_RANGE_MM
    return bool(low <= sizes.min() and sizes.max() <= high)


def _listed(sizes) -> str:
    return ", ".join(f"{size:g}" for size in sizes)


# Bumped whenever inspect_volume checks something new, so results cached by an older check are redone.
# 2: the affine is checked (singular or non-finite). 3: single slices, zero voxel sizes, RGB/complex data.
# 4: implausible voxel sizes (outside VOXEL_SIZE_RANGE_MM: a header in metres or micrometres).
# 5: the profile holds the content digest (CONTENT_DIGEST), which the duplicate-scan check needs.
# 6: volumes already intensity-normalised (over NEGATIVE_SHARE_LIMIT of the non-zero voxels negative).
# 7: the profile holds the foreground's world-space box (FOREGROUND_BOX), which the channel placement check needs.
CHECK_VERSION = 7


class _CheckCache:
    """Per-file results keyed by (size, mtime): a changed file is checked again.

    The file records ``CHECK_VERSION``; a cache written by another version (or the unversioned
    format before it) is dropped whole, since its "valid" verdicts come from fewer checks. A "valid" entry
    whose profile lacks the content digest is measured again too, so the duplicate-scan check never
    goes without it.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
            except json.JSONDecodeError:
                stored = {}  # A damaged cache costs one re-check, never a wrong answer.
            if isinstance(stored, dict) and stored.get("version") == CHECK_VERSION:
                self.entries = dict(stored.get("files", {}))

    def check(self, file: str) -> tuple[str | None, dict | None]:
        try:
            stat = os.stat(file)
        except OSError:
            return inspect_volume(file)
        stamp = [stat.st_size, stat.st_mtime_ns]
        cached = self.entries.get(file)
        if isinstance(cached, dict) and cached.get("stamp") == stamp:
            reason, profile = cached.get("reason"), cached.get("profile")
            if reason is not None or (isinstance(profile, dict) and {CONTENT_DIGEST, FOREGROUND_BOX} <= set(profile)):
                return reason, profile
        reason, profile = inspect_volume(file)
        self.entries[file] = {"stamp": stamp, "reason": reason, "profile": profile}
        return reason, profile

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({"version": CHECK_VERSION, "files": self.entries}, sort_keys=True))


def validate_records(
    records: Sequence[SubjectRecord], classes: Sequence[str], cache_file: str | os.PathLike | None = None
) -> ValidationReport:
    """Check labels, subject ids and every file of every subject, and that no scan is under two subject ids (the same
    path, or files with the same voxels: ``content_digest``)."""
    report = ValidationReport(classes=tuple(classes))
    cache = _CheckCache(Path(cache_file) if cache_file else None)
    entries: dict[str, list[SubjectRecord]] = {}
    resolved = {file: str(Path(file).resolve()) for record in records for file in record.paths if file}
    users: dict[str, set[str]] = {}  # resolved file -> the subjects that name it
    for record in records:
        entries.setdefault(record.subject_id, []).append(record)
        for file in record.paths:
            if file:
                users.setdefault(resolved[file], set()).add(record.subject_id)
    verdicts: list[Problem | None] = []
    for record in records:
        problem = None
        shared = sorted({other for file in record.paths if file for other in users[resolved[file]]} - {record.subject_id})
        if len(entries[record.subject_id]) > 1:
            problem = Problem(record.subject_id, ";".join(record.paths), _duplicate_reason(entries[record.subject_id]))
        elif record.label not in report.classes:
            problem = Problem(record.subject_id, ";".join(record.paths), f"unknown label {record.label!r} (expected one of {', '.join(report.classes)})")
        elif shared:
            # One scan under two ids can sit in a training part and a test part at once (and may carry two labels).
            problem = Problem(record.subject_id, ";".join(record.paths),
                              f"the same file as subject(s) {', '.join(shared[:5])}: one scan under two ids would be "
                              "trained and tested on; keep one of the ids")
        else:
            for file in record.paths:
                reason, profile = cache.check(file)
                if reason is not None:
                    problem = Problem(record.subject_id, file, reason)
                    break
                report.profiles[file] = profile
            else:
                problem = channel_placement_problem(record, report.profiles)
        verdicts.append(problem)
    # The same scan in two files (a copy, a hard link, .nii and .nii.gz, ...), among the subjects valid so far.
    usable = [record for record, problem in zip(records, verdicts) if problem is None]
    copies = _same_content(usable, report.profiles)
    for record, problem in zip(records, verdicts):
        problem = problem or copies.get(record.subject_id)
        if problem is None:
            report.valid.append(record)
        else:
            report.problems.append(problem)
    cache.save()
    return report


# Below this overlap of two channels' foreground boxes (as a share of the smaller box) a subject's channels are taken
# to sit in different places. Co-registered contrasts of one head overlap almost wholly; series with other fields of
# view (a sagittal FLAIR down to the neck beside an axial T1 of the brain) still hold the smaller box nearly whole,
# which is why the share is of the smaller box. A header whose origin was reset (a corner instead of the centre)
# moves the head by half its field of view, about 100 mm, which leaves an eighth of the box or less.
CHANNEL_OVERLAP_MIN = 0.5


def box_overlap(first: Sequence[float], second: Sequence[float]) -> float:
    """The volume two [x0, y0, z0, x1, y1, z1] boxes share, as a share of the smaller one (0 to 1)."""
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    shared = np.clip(np.minimum(first[3:], second[3:]) - np.maximum(first[:3], second[:3]), 0, None).prod()
    smaller = min((first[3:] - first[:3]).prod(), (second[3:] - second[:3]).prod())
    return float(shared / smaller) if smaller > 0 else 0.0


def channel_placement_problem(record: SubjectRecord, profiles: dict[str, dict]) -> Problem | None:
    """Why a multi-contrast subject's channels cannot be stacked, or None.

    Preprocessing resamples every channel onto the first one's grid through their headers. A channel that its header
    places elsewhere (origin reset, another scanner's coordinates, the wrong subject's file) comes out mostly or
    wholly zero there, and nothing else would say so."""
    boxes = [(profiles.get(file) or {}).get(FOREGROUND_BOX) for file in record.paths]
    if len(boxes) < 2 or boxes[0] is None:
        return None
    for channel, (file, box) in enumerate(zip(record.paths[1:], boxes[1:]), start=2):
        if box is None:
            continue
        share = box_overlap(boxes[0], box)
        if share < CHANNEL_OVERLAP_MIN:
            return Problem(record.subject_id, file, (
                f"channel {channel}'s brain lies elsewhere in world space than channel 1's ({record.paths[0]}): "
                f"their non-zero boxes share {share:.0%} of the smaller one (co-registered contrasts share almost "
                f"all; under {CHANNEL_OVERLAP_MIN:.0%} is refused), so resampling it onto channel 1's grid would "
                f"leave it mostly empty (boxes in mm: {_box_text(boxes[0])} and {_box_text(box)}); fix the header "
                "that is off (if the volumes are already co-registered on one grid, copy channel 1's affine, e.g. "
                "fslcpgeom), or register the channels to each other first"))
    return None


def _box_text(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{low:g}..{high:g}" for low, high in zip(box[:3], box[3:])) + "]"


# Other subjects named in one refusal for a shared scan; the rest are counted.
SHARED_SHOWN = 5


def _same_content(records: Sequence[SubjectRecord], profiles: dict[str, dict]) -> dict[str, Problem]:
    """subject id -> why it is refused, for each subject with a file whose voxels (``CONTENT_DIGEST``) equal a file of
    another subject. Compared file by file, whatever the contrast: a FLAIR copied in as another subject's T1 is caught;
    two files of one subject that are equal are not this check's concern (no second id)."""
    holders: dict[str, list[tuple[str, str, str]]] = {}  # digest -> (subject id, file, label) of every file with it
    for record in records:
        for file in record.paths:
            digest = (profiles.get(file) or {}).get(CONTENT_DIGEST)
            if digest is not None:
                holders.setdefault(digest, []).append((record.subject_id, file, record.label))
    refused: dict[str, Problem] = {}
    for record in records:
        for file in record.paths:
            same = holders.get((profiles.get(file) or {}).get(CONTENT_DIGEST), [])
            others = [(sid, path, label) for sid, path, label in same if sid != record.subject_id]
            if others:
                refused[record.subject_id] = Problem(record.subject_id, file, _same_content_reason(record, others))
                break
    return refused


def _same_content_reason(record: SubjectRecord, others: list[tuple[str, str, str]]) -> str:
    named = ", ".join(f"subject {sid} ({path})" for sid, path, _ in others[:SHARED_SHOWN])
    more = f" and {len(others) - SHARED_SHOWN} more" if len(others) > SHARED_SHOWN else ""
    labels = sorted({record.label, *(label for _, _, label in others)})
    conflict = f"; labelled {', '.join(map(repr, labels))}: at most one is right" if len(labels) > 1 else ""
    return (f"the same voxels as {named}{more} (one volume copied, linked or re-saved{conflict}): one scan under two "
            "ids would be trained and tested on; keep one of the ids and remove the other file(s) or manifest row(s) "
            "(a rescan never has identical voxels: if two scans were meant, one file overwrote the other)")


def _duplicate_reason(entries: Sequence[SubjectRecord]) -> str:
    """Same id twice: harmless-looking when the labels agree, a labelling error to resolve when they do not."""
    if len({r.label for r in entries}) == 1:
        return f"duplicate subject id ({len(entries)} entries)"
    listed = ", ".join(f"{r.label!r} ({';'.join(r.paths) or 'no file'})" for r in entries)
    return (f"duplicate subject id ({len(entries)} entries) with conflicting labels {listed}; give the subject one "
            "label, or distinct ids if these are different subjects")


def require_valid(report: ValidationReport, skip_invalid: bool) -> list[SubjectRecord]:
    """The subjects to train on; stops the run on any problem unless the user chose to skip them."""
    if report.problems and not skip_invalid:
        raise InvalidDataError(
            "Invalid input data; fix or remove these files, or pass --skip-invalid to leave them out:\n" + report.format()
        )
    return report.valid
