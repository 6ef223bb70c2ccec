"""Synthetic RSNA-MICCAI BraTS 2021 tree (MGMT promoter methylation) written as DICOM series, for tests and demos.

The release cannot be redistributed, yet its DICOM path (series discovery, conversion, orientation,
labels from ``train_labels.csv``) has to run in CI. This module writes a small tree in the Kaggle layout::

    root/train/<BraTS21ID, 5 digits>/<FLAIR|T1w|T1wCE|T2w>/Image-<k>.dcm   (one file per slice)
    root/train_labels.csv                                                 (BraTS21ID as int, MGMT_value 0/1)

Ids skip numbers and are zero-padded like the release's (00000, 00002, 00003, 00005, ...), so matching
the CSV's integers to the folders is exercised. Every slice carries the tags a real series has (study,
series, SOP and frame-of-reference UIDs, ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
SliceThickness, InstanceNumber, Modality MR, SeriesDescription), written by SimpleITK/GDCM as in
SimpleITK's "Dicom Series From Array" example, with fixed dates and UIDs derived from the seed, so a tree
is byte-identical for the same arguments. Sequences named in ``sagittal`` are stored as sagittal stacks
for every second subject (the release mixes acquisition planes), which exercises orientation handling.

Every subject is a glioma-like phantom from :mod:`datasets.synthetic` (its HGG lesion: enhancing rim,
necrotic core, oedema). The two classes differ by a phantom property, not by biology: a methylated
phantom's necrotic core is smaller and its rim enhances less on T1wCE (:func:`draw_mgmt_effect`). Both
are drawn from overlapping ranges on top of the lesions' own variation, so the classes are learnable but
not separable at a glance. T2w is rendered from the FLAIR-like tissue template with its own lesion
appearance (fluid-bright necrosis), bias field, scanner scale and noise; real T2's bright CSF is not modelled.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from datasets.atomic import write_csv_atomic, write_via_temp_file
from datasets.dicom import keep_locale
from datasets.rsna import (ID_COLUMN, LABEL_COLUMN, LABELS_FILENAME, MGMT_CLASSES, RSNA_SEQUENCES, TRAIN_DIRNAME,
                           rsna_sequences)
from datasets.synthetic import Appearance, SubjectParameters, draw_subject_parameters, synthesize_subject

log = logging.getLogger(__name__)

# Which datasets.synthetic contrast each sequence is rendered as (T2w: "flair" with T2 parameters).
RENDERED_AS = {"FLAIR": "flair", "T1w": "t1", "T1wCE": "t1ce", "T2w": "flair"}
_STREAM = 2021  # keeps these draws apart from datasets.synthetic's [seed, class, index] generators
_LABEL_ORDER_DRAW, _EFFECT_DRAW, _T2_DRAW = 0, 1, 2
_MAX_SUBJECTS = 66_666  # ids run 0, 2, 3, 5, ...: the last must still have five digits
_UID_NAMESPACE = uuid.UUID("8f1d5c1e-3b0a-4d5e-9a57-2d1c0b5e2021")  # "2.25.<uuid>" UIDs need no registered root
_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_DATE, _TIME = "20210713", "120000"  # fixed (the competition's launch), so files are byte-identical
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class MgmtEffect:
    """How a phantom's lesion departs from its drawn HGG lesion: both factors multiply (a phantom property)."""

    core_scale: float  # necrotic core radius / the drawn one
    enhancement_scale: float  # T1wCE rim enhancement above white matter / the drawn one


# Overlapping ranges: methylated cores and enhancement are smaller on average, not always.
_EFFECT_RANGES = {"methylated": ((0.4, 0.8), (0.45, 0.8)), "unmethylated": ((0.7, 1.1), (0.75, 1.1))}


def rsna_subject_ids(count: int) -> list[int]:
    """``count`` BraTS21IDs spaced like the release's first ones: 0, 2, 3, 5, 6, 8, ..."""
    return [k + (k + 1) // 2 for k in range(count)]


def draw_mgmt_effect(seed: int, number: int, label: str) -> MgmtEffect:
    """The class effect of subject ``number`` (0-based position in the tree), from its own generator."""
    if label not in _EFFECT_RANGES:
        raise ValueError(f"label must be one of {MGMT_CLASSES}, got {label!r}")
    rng = np.random.default_rng([seed, _STREAM, number, _EFFECT_DRAW])
    core, enhancement = _EFFECT_RANGES[label]
    return MgmtEffect(float(rng.uniform(*core)), float(rng.uniform(*enhancement)))


def mgmt_parameters(seed: int, number: int, label: str) -> SubjectParameters:
    """Subject ``number``: an HGG phantom of datasets.synthetic with the class effect applied to its lesion."""
    parameters = draw_subject_parameters(seed, number, "HGG")
    effect = draw_mgmt_effect(seed, number, label)
    lesion = parameters.lesion
    enhanced = lesion.appearance["t1ce"]
    appearance = {**lesion.appearance, "t1ce": dataclasses.replace(
        enhanced, tumour=1.0 + (enhanced.tumour - 1.0) * effect.enhancement_scale)}
    core_fraction = float(np.clip(lesion.core_fraction * effect.core_scale, 0.05, 0.8))
    lesion = dataclasses.replace(lesion, core_fraction=core_fraction, appearance=appearance)
    return dataclasses.replace(parameters, lesion=lesion)


def t2_parameters(parameters: SubjectParameters, seed: int, number: int) -> SubjectParameters:
    """``parameters`` with its "flair" contrast turned into a T2w one: own appearance, bias, scale and noise."""
    rng = np.random.default_rng([seed, _STREAM, number, _T2_DRAW])
    flair_bias = parameters.bias_coefs["flair"]
    look = Appearance(oedema_gain=0.35, oedema_offset=float(rng.uniform(0.9, 1.2)),
                      tumour=float(rng.uniform(1.0, 1.3)), core=float(rng.uniform(1.4, 1.8)))
    lesion = dataclasses.replace(parameters.lesion, appearance={**parameters.lesion.appearance, "flair": look})
    return dataclasses.replace(
        parameters, lesion=lesion,
        bias_coefs={**parameters.bias_coefs, "flair": rng.normal(0.0, 0.05, flair_bias.shape) * (flair_bias != 0)},
        scales={**parameters.scales, "flair": float(rng.uniform(350.0, 700.0))},
        noise_seed=int(rng.integers(0, 2**62)))


def render_sequences(seed: int, number: int, label: str, sequences: Sequence[str],
                     downsample: float) -> dict[str, sitk.Image]:
    """Subject ``number``'s sequences as int16 images in DICOM's LPS world, skull-stripped (0 outside the brain)."""
    parameters = mgmt_parameters(seed, number, label)
    images = {}
    plain = [s for s in sequences if s != "T2w"]
    if plain:
        subject = synthesize_subject(parameters, [RENDERED_AS[s] for s in plain], downsample)
        images.update({s: volume_to_itk(subject.images[RENDERED_AS[s]], subject.affine) for s in plain})
    if "T2w" in sequences:
        subject = synthesize_subject(t2_parameters(parameters, seed, number), ["flair"], downsample)
        images["T2w"] = volume_to_itk(subject.images["flair"], subject.affine)
    return {s: images[s] for s in sequences}


def volume_to_itk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A nibabel-style (x, y, z) array with its RAS voxel-to-world affine, as an ITK image (LPS world)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    linear = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((_LPS_FROM_RAS @ (linear / spacing)).ravel().tolist())
    image.SetOrigin((_LPS_FROM_RAS @ np.asarray(affine, dtype=float)[:3, 3]).tolist())
    return image


def as_sagittal(image: sitk.Image) -> sitk.Image:
    """The same voxels in the same places, stored as a sagittal stack (rows posterior, columns inferior, slices
    towards the right: a right-handed frame). Permute and flip keep every voxel's world position."""
    return sitk.Flip(sitk.PermuteAxes(image, [1, 2, 0]), [False, True, True])


def write_dicom_series(image: sitk.Image, folder: str | os.PathLike, *, patient_id: str, study_uid: str,
                       series_uid: str, series_number: int, description: str,
                       frame_uid: str | None = None) -> list[Path]:
    """One ``Image-<k>.dcm`` per slice (k from 1) of a 3-D int image; each file written atomically. ``.dcm``
    files of an earlier, longer series in ``folder`` are removed, so the folder holds exactly this series."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction = image.GetDirection()
    orientation = "\\".join(_ds(direction[i]) for i in (0, 3, 6, 1, 4, 7))  # row, then column direction
    thickness = _ds(image.GetSpacing()[2])
    tags = {
        "0008|0008": "DERIVED\\SECONDARY", "0008|0016": _MR_IMAGE_STORAGE, "0008|0060": "MR",
        "0008|0012": _DATE, "0008|0013": _TIME, "0008|0020": _DATE, "0008|0021": _DATE,
        "0008|0030": _TIME, "0008|0031": _TIME, "0008|103e": description,
        "0010|0010": patient_id, "0010|0020": patient_id,
        "0018|0050": thickness, "0018|0088": thickness,
        "0020|000d": study_uid, "0020|000e": series_uid, "0020|0011": str(series_number),
        "0020|0052": frame_uid or f"{study_uid}.0", "0020|0037": orientation,
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # ours, not fresh random ones: reruns stay byte-identical
    written = []
    voxels = sitk.GetArrayViewFromImage(image)  # (z, y, x); slicing the ITK image per plane is 10x slower
    for k in range(image.GetDepth()):
        plane = sitk.GetImageFromArray(voxels[k])
        plane.SetSpacing(image.GetSpacing()[:2])
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0020|0032", "\\".join(_ds(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        path = folder / f"Image-{k + 1}.dcm"

        def write(tmp: str, plane: sitk.Image = plane) -> None:
            writer.SetFileName(tmp)
            writer.Execute(plane)

        with keep_locale():  # GDCM's writer sets the C locale for the whole process
            write_via_temp_file(str(path), write)
        written.append(path)
    for stale in set(folder.glob("*.dcm")) - set(written):
        stale.unlink()
    return written


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters); -0 is written as 0."""
    return format(float(value) + 0.0, ".10g")


def dicom_uid(*parts: object) -> str:
    """A deterministic UID under the UUID-derived root 2.25 (no registered organisation root needed)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(map(str, parts))).int}"


def write_synthetic_rsna(
    root: str | os.PathLike,
    n_methylated: int,
    n_unmethylated: int,
    seed: int = 0,
    downsample: float = 1.0,
    sequences: Sequence[str] = RSNA_SEQUENCES,
    sagittal: Sequence[str] = ("FLAIR",),
) -> Path:
    """Write the tree (module docstring) under ``root`` and return ``root``; identical arguments give identical
    bytes. ``sequences`` and ``sagittal`` take --contrasts names (any case, BraTS aliases too); ``sagittal``
    sequences are stored sagittally for every second subject. Classes are shuffled over the ids with ``seed``."""
    counts = {"seed": seed, "n_methylated": n_methylated, "n_unmethylated": n_unmethylated}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    total = n_methylated + n_unmethylated
    if not 0 < total <= _MAX_SUBJECTS:
        raise ValueError(f"n_methylated + n_unmethylated must be 1..{_MAX_SUBJECTS} (5-digit ids), got {total}")
    sequences = rsna_sequences(sequences)
    sagittal = rsna_sequences(sagittal) if sagittal else ()
    if not set(sagittal) <= set(sequences):
        raise ValueError(f"sagittal names {', '.join(sorted(set(sagittal) - set(sequences)))}, which is not written "
                         f"(sequences: {', '.join(sequences)})")
    labels = ["methylated"] * n_methylated + ["unmethylated"] * n_unmethylated
    labels = [labels[i] for i in np.random.default_rng([seed, _STREAM, _LABEL_ORDER_DRAW]).permutation(total)]
    root = Path(root)
    ids = rsna_subject_ids(total)
    for number, (subject, label) in enumerate(zip(ids, labels)):
        patient = f"{subject:05d}"
        study = dicom_uid(seed, patient)
        images = render_sequences(seed, number, label, sequences, downsample)
        for series_number, (sequence, image) in enumerate(images.items(), start=1):
            plane = "SAG" if sequence in sagittal and number % 2 == 1 else "AX"
            folder = root / TRAIN_DIRNAME / patient / sequence
            write_dicom_series(as_sagittal(image) if plane == "SAG" else image, folder, patient_id=patient,
                               study_uid=study, series_uid=f"{study}.{series_number}", series_number=series_number,
                               description=f"{sequence} {plane} (phantom)")
        log.debug("wrote %s (%s)", patient, label)
    frame = pd.DataFrame({ID_COLUMN: ids, LABEL_COLUMN: [MGMT_CLASSES.index(label) for label in labels]})
    write_csv_atomic(frame, root / LABELS_FILENAME)
    return root
