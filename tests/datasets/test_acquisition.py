"""The per-volume acquisition profile: hand-computed values on tiny arrays and files."""
import nibabel as nib
import numpy as np

from datasets.acquisition import border_zero_fraction, looks_stripped, volume_profile
from tests.conftest import write_ellipsoid, write_head


def test_border_zero_fraction_counts_the_six_faces():
    data = np.zeros((4, 4, 4))
    data[0, 0, 0] = 7  # a corner sits on three faces: 3 of the 6 x 16 face voxels are non-zero
    assert border_zero_fraction(data) == (96 - 3) / 96
    data[1:3, 1:3, 1:3] = 1  # interior voxels are not on any face
    assert border_zero_fraction(data) == (96 - 3) / 96
    assert border_zero_fraction(np.ones((4, 4, 4))) == 0.0


def test_profile_of_a_small_volume_by_hand():
    data = np.zeros((4, 5, 6), np.float32)
    data[1:3, 1:4, 1:5] = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1  # 24 voxels, values 1..24
    image = nib.Nifti1Image(data.astype(np.int16), np.diag([-2.0, -2.0, 3.0, 1.0]))
    profile = volume_profile(image, data)
    assert (profile["voxel_x"], profile["voxel_y"], profile["voxel_z"]) == (2.0, 2.0, 3.0)
    assert (profile["shape_x"], profile["shape_y"], profile["shape_z"]) == (4, 5, 6)
    assert profile["fg_volume_ml"] == 24 * 12 / 1000
    assert profile["fg_median"] == 12.5 and np.isclose(profile["fg_p99"], np.percentile(np.arange(1, 25), 99))
    assert profile["zero_fraction"] == round(1 - 24 / 120, 6)
    assert profile["border_zero_fraction"] == 1.0
    assert profile["orientation"] == "LPS" and profile["dtype"] == "int16"


def test_stripped_and_unstripped_files_are_told_apart(tmp_path):
    for path, stripped in ((write_ellipsoid(tmp_path / "brain.nii.gz"), True), (write_head(tmp_path / "head.nii.gz"), False)):
        image = nib.load(path)
        profile = volume_profile(image, np.asanyarray(image.dataobj, dtype=np.float32))
        assert looks_stripped(profile) is stripped, (path, profile["border_zero_fraction"])
