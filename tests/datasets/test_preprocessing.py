"""The preprocessing cache: canonical resampled float16 volumes, reused, invalidated, crash-safe."""
import os

import nibabel as nib
import numpy as np
import pytest

import datasets.preprocessing as preprocess_module
from datasets.preprocessing import PreprocessConfig, preprocess
from datasets.records import SubjectRecord
from tests.conftest import write_ellipsoid


@pytest.fixture
def two_sources(tmp_path):
    # BraTS-like (LPS, 4 mm) and IXI-like (other axis order and voxel size): one grid after preprocessing.
    brats = write_ellipsoid(tmp_path / "brats.nii.gz", shape=(30, 30, 20), zooms=(4, 4, 4), codes_flip=(-1, -1, 1))
    ixi = write_ellipsoid(tmp_path / "ixi.nii.gz", shape=(40, 40, 25), zooms=(3.0, 3.0, 4.8), codes_flip=(1, 1, 1), seed=1)
    return [SubjectRecord("b", "HGG", (str(brats),), "b"), SubjectRecord("i", "Healthy", (str(ixi),), "i")]


def test_volumes_share_one_grid_in_float16_and_percentile_range(tmp_path, two_sources):
    cached = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "cache", num_workers=1)
    volumes = cached.volumes()
    assert volumes.dtype == np.float16 and volumes.shape[:2] == (2, 1)
    assert cached.meta["shape"] == list(volumes.shape[2:])
    assert float(volumes.min()) == 0.0 and float(volumes.max()) == 1.0  # rescaled to the percentile range
    assert list(cached.table["subject_id"]) == ["b", "i"]
    # The largest brain bounding box sets the shape: the ellipsoid spans ~0.77 of a 120 mm field -> ~12 voxels of 8 mm.
    assert all(9 <= n <= 14 for n in cached.meta["shape"])


def test_a_rerun_reuses_the_entry_and_a_change_makes_a_new_one(tmp_path, two_sources, monkeypatch):
    first = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "cache", num_workers=1)
    calls = []
    monkeypatch.setattr(preprocess_module, "_resample_and_crop", lambda *a: calls.append(a))
    again = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "cache", num_workers=1)
    assert again.directory == first.directory and calls == []
    monkeypatch.undo()
    other_spacing = preprocess(two_sources, PreprocessConfig(spacing=10.0), tmp_path / "cache", num_workers=1)
    assert other_spacing.directory != first.directory
    path = two_sources[0].paths[0]
    os.utime(path, ns=(1, 1))  # same bytes, new identity: must not trust the old entry
    assert preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "cache", num_workers=1).directory != first.directory


def test_a_crash_while_writing_leaves_no_entry_that_is_trusted(tmp_path, two_sources, monkeypatch):
    def crash(volume, shape):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(preprocess_module, "_centre_to_shape", crash)
    with pytest.raises(KeyboardInterrupt, match=r"^Preprocessing interrupted while the cache entry was written \(no "
                                                r"part of it is left\): 2 of 2 volumes are kept in .*in-progress; "
                                                r"rerun the same command to finish it\.$"):
        preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "cache", num_workers=1)
    # No entry, not even a partial one: only the volumes done, kept for the rerun (each .npy written atomically).
    [kept] = (tmp_path / "cache").iterdir()
    assert kept.name == "in-progress" and len(list(kept.iterdir())) == 2
    monkeypatch.undo()
    monkeypatch.setattr(preprocess_module, "_resample_and_crop", lambda *a: pytest.fail("preprocessed again"))
    cached = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "cache", num_workers=1)
    assert cached.volumes().shape[0] == 2 and cached.verify() == []
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.directory.name]  # in-progress/ is gone


def test_explicit_target_shape_and_multichannel(tmp_path):
    a = write_ellipsoid(tmp_path / "a_t1.nii.gz", shape=(30, 30, 20))
    b = write_ellipsoid(tmp_path / "a_t2.nii.gz", shape=(30, 30, 20), seed=4)
    cached = preprocess([SubjectRecord("a", "x", (str(a), str(b)), "a")],
                        PreprocessConfig(spacing=8.0, target_shape=(16, 8, 10)), tmp_path / "cache", num_workers=1)
    assert cached.volumes().shape == (1, 2, 16, 8, 10)


def test_a_second_contrast_is_interpolated_once_onto_the_first_ones_grid(tmp_path):
    """The same fine texture given as channel 1 on a grid offset by one native voxel (2 mm, half the 4 mm target
    voxel): resampled once, straight onto channel 0's grid, it matches channel 0 inside the volume (correlation
    0.99994; each channel keeps its own percentile rescaling); resampled first to its own 4 mm grid and then again
    onto channel 0's, as before, it correlated 0.66 with channel 0."""
    rng = np.random.default_rng(0)
    data = (100 + 50 * rng.random((40, 40, 30))).astype(np.float32)
    data[:, :, :2] = data[:, :, -2:] = 0  # background at both ends, as around a brain
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "c0.nii.gz"))
    shifted = affine.copy()
    shifted[0, 3] = 2.0  # channel 1's voxel i is channel 0's voxel i + 1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[1:]), shifted), str(tmp_path / "c1.nii.gz"))
    cached = preprocess([SubjectRecord("a", "x", (str(tmp_path / "c0.nii.gz"), str(tmp_path / "c1.nii.gz")), "a")],
                        PreprocessConfig(spacing=4.0), tmp_path / "cache", num_workers=1)
    first, second = cached.volumes()[0].astype(np.float32)
    inner = (slice(2, -2),) * 3  # away from the edge channel 1 lacks
    assert second[inner].std() == pytest.approx(first[inner].std(), rel=0.05)
    assert np.corrcoef(first[inner].ravel(), second[inner].ravel())[0, 1] > 0.999


def test_the_resampling_change_renews_multi_contrast_entries_only(tmp_path, monkeypatch):
    from datasets import preprocessing

    a = write_ellipsoid(tmp_path / "a_t1.nii.gz")
    b = write_ellipsoid(tmp_path / "a_t2.nii.gz", seed=4)
    one, two = [SubjectRecord("a", "x", (str(a),), "a")], [SubjectRecord("a", "x", (str(a), str(b)), "a")]
    config = PreprocessConfig(spacing=8.0)
    keys = preprocessing.cache_key(one, config), preprocessing.cache_key(two, config)
    monkeypatch.setattr(preprocessing, "MULTI_CONTRAST_RESAMPLING", 1)  # the arrays an older version wrote
    assert preprocessing.cache_key(one, config) == keys[0]  # a single contrast was resampled once all along
    assert preprocessing.cache_key(two, config) != keys[1]


def test_parallel_workers_give_the_same_arrays(tmp_path, two_sources):
    serial = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "one", num_workers=1).volumes()
    parallel = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "two", num_workers=2).volumes()
    np.testing.assert_array_equal(serial, parallel)


@pytest.mark.parametrize("kwargs, message", [({"spacing": 0}, "spacing"), ({"percentiles": (50, 10)}, "percentiles"),
                                             ({"target_shape": (4, 4)}, "target_shape")])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)


def _rewrite(path, transform, dtype=np.float32):
    """The ellipsoid at ``path`` with its voxels passed through ``transform``, stored as ``dtype``."""
    image = nib.load(path)
    data = transform(image.get_fdata(dtype=np.float64)).astype(dtype)
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    return str(path)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spacing", [4.0, 8.0])  # the file's own grid (no interpolation) and a coarser one
def test_values_up_to_1e6_preprocess_to_finite_values_in_the_unit_range(tmp_path, dtype, spacing):
    path = _rewrite(write_ellipsoid(tmp_path / "bright.nii.gz"), lambda d: d * (1e6 / d.max()), dtype)
    assert nib.load(path).get_fdata().max() == pytest.approx(1e6)
    volumes = preprocess([SubjectRecord("s", "HGG", (path,), "s")], PreprocessConfig(spacing=spacing),
                         tmp_path / "cache", num_workers=1).volumes()
    assert np.isfinite(volumes).all() and float(volumes.min()) == 0.0 and float(volumes.max()) == 1.0


def test_float64_beyond_float32_range_is_scaled_before_the_cast(tmp_path):
    # Read as float32 these voxels were inf, and the whole volume NaN; scaled first, they match the 1e6 volume.
    huge = _rewrite(write_ellipsoid(tmp_path / "huge.nii.gz"), lambda d: d * (1e300 / d.max()), np.float64)
    bright = _rewrite(write_ellipsoid(tmp_path / "bright.nii.gz"), lambda d: d * (1e6 / d.max()), np.float64)
    config = PreprocessConfig(spacing=8.0)
    from_huge = preprocess_module._resample_and_crop((huge,), config)
    assert np.isfinite(from_huge).all() and from_huge.min() == 0 and from_huge.max() == 1
    np.testing.assert_allclose(from_huge.astype(np.float32), preprocess_module._resample_and_crop((bright,), config),
                               atol=1e-3)


def test_a_brain_that_cannot_be_rescaled_is_refused_instead_of_cached_as_inf(tmp_path):
    # TorchIO's RescaleIntensity leaves a constant brain as it is (with a warning): 1e6 became inf in float16.
    path = _rewrite(write_ellipsoid(tmp_path / "mask.nii.gz"), lambda d: np.where(d > 0, 1e6, 0.0))
    with pytest.raises(preprocess_module.VolumeFailure,
                       match=f"{path}: ValueError: every brain voxel between the 0.5th and 99.5th percentiles is "
                             f"1e\\+06: nothing to rescale to \\[0, 1\\]"):
        preprocess_module._resample_and_crop((path,), PreprocessConfig(spacing=4.0))


def test_non_finite_voxels_fail_with_the_file_named(tmp_path):
    def one_nan(data):
        data[12, 14, 10] = np.nan
        return data

    path = _rewrite(write_ellipsoid(tmp_path / "nan.nii.gz"), one_nan)
    with pytest.raises(preprocess_module.VolumeFailure, match=f"{path}: ValueError: NaN or inf in 1 of 13440 voxels"):
        preprocess_module._resample_and_crop((path,), PreprocessConfig(spacing=8.0))
