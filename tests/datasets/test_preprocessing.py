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
    with pytest.raises(KeyboardInterrupt):
        preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "cache", num_workers=1)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    cached = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "cache", num_workers=1)
    assert cached.volumes().shape[0] == 2


def test_explicit_target_shape_and_multichannel(tmp_path):
    a = write_ellipsoid(tmp_path / "a_t1.nii.gz", shape=(30, 30, 20))
    b = write_ellipsoid(tmp_path / "a_t2.nii.gz", shape=(30, 30, 20), seed=4)
    cached = preprocess([SubjectRecord("a", "x", (str(a), str(b)), "a")],
                        PreprocessConfig(spacing=8.0, target_shape=(16, 8, 10)), tmp_path / "cache", num_workers=1)
    assert cached.volumes().shape == (1, 2, 16, 8, 10)


def test_parallel_workers_give_the_same_arrays(tmp_path, two_sources):
    serial = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "one", num_workers=1).volumes()
    parallel = preprocess(two_sources, PreprocessConfig(spacing=8.0), tmp_path / "two", num_workers=2).volumes()
    np.testing.assert_array_equal(serial, parallel)


@pytest.mark.parametrize("kwargs, message", [({"spacing": 0}, "spacing"), ({"percentiles": (50, 10)}, "percentiles"),
                                             ({"target_shape": (4, 4)}, "target_shape")])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)
