"""What a raw volume says about how it was acquired and pre-processed, measured once per file.

Two uses, one measurement:

* the **skull-stripping check**: a skull-stripped volume (BraTS, or IXI after FSL BET) has an
  exact-zero background, so the faces of its field of view are (almost) all zero; a head as it left
  the scanner has noise there. ``border_zero_fraction`` is that fraction;
* the **acquisition-only baseline**: header and intensity-scale features that carry no anatomy
  (voxel size, matrix, orientation, data type, raw intensity scale, foreground volume). If a
  classifier on these alone matches a deep model, the deep model's score may reflect which data
  set a scan came from.

The profile is computed from the array validation already decompressed, so it costs no extra read.
"""
from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

# A stripped volume's faces are ~100 % zero (a brainstem cut by the field of view costs a few %);
# an unstripped head's are ~0 %. Half-way between is far from both.
STRIPPED_MIN_BORDER_ZERO = 0.5

PROFILE_NUMERIC = ("voxel_x", "voxel_y", "voxel_z", "shape_x", "shape_y", "shape_z", "fg_volume_ml",
                   "fg_median", "fg_p99", "zero_fraction", "border_zero_fraction")
PROFILE_CATEGORICAL = ("orientation", "dtype")
PROFILE_COLUMNS = PROFILE_NUMERIC + PROFILE_CATEGORICAL


def border_zero_fraction(data: np.ndarray) -> float:
    """Fraction of the voxels on the six outer faces of a 3-D array that are exactly zero."""
    faces = [data[0], data[-1], data[:, 0], data[:, -1], data[:, :, 0], data[:, :, -1]]
    zeros = sum(int(np.count_nonzero(face == 0)) for face in faces)
    return zeros / sum(face.size for face in faces)


def orientation_code(affine: np.ndarray) -> str:
    """nibabel's axis codes (e.g. 'LPS'); '?' when the affine has no clear orientation."""
    try:
        return "".join(code or "?" for code in nib.aff2axcodes(affine))
    except (ValueError, np.linalg.LinAlgError):
        return "???"


def volume_profile(image: nib.Nifti1Image, data: np.ndarray) -> dict[str, Any]:
    """Header and intensity-scale features of one volume (``data``: its 3-D float array)."""
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    nonzero = data[data != 0]
    voxel_ml = float(np.prod(zooms)) / 1000.0
    return {
        "voxel_x": zooms[0], "voxel_y": zooms[1], "voxel_z": zooms[2],
        "shape_x": int(data.shape[0]), "shape_y": int(data.shape[1]), "shape_z": int(data.shape[2]),
        "fg_volume_ml": round(nonzero.size * voxel_ml, 3),
        "fg_median": float(np.median(nonzero)) if nonzero.size else 0.0,
        "fg_p99": float(np.percentile(nonzero, 99)) if nonzero.size else 0.0,
        "zero_fraction": round(1.0 - nonzero.size / data.size, 6),
        "border_zero_fraction": round(border_zero_fraction(data), 6),
        "orientation": orientation_code(image.affine),
        "dtype": str(image.get_data_dtype()),
    }


def looks_stripped(profile: dict[str, Any]) -> bool:
    return float(profile["border_zero_fraction"]) >= STRIPPED_MIN_BORDER_ZERO
