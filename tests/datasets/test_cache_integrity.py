"""The preprocessing cache checks what it finds and what it writes: checksums, a damaged entry rebuilt,
a full disk reported as a message, and files that fail named (or left out with --skip-invalid)."""
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections import namedtuple

import nibabel as nib
import numpy as np
import pytest

import datasets.atomic as atomic_module
import datasets.preprocessing as preprocess_module
from datasets.disk_space import DiskFullError, human_bytes, is_disk_full
from datasets.preprocessing import PreprocessConfig, VolumeFailure, preprocess
from datasets.records import SubjectRecord
from datasets.validation import InvalidDataError
from tests.conftest import write_ellipsoid

CONFIG = PreprocessConfig(spacing=8.0)


@pytest.fixture
def subjects(tmp_path):
    return [SubjectRecord(name, "HGG", (str(write_ellipsoid(tmp_path / f"{name}.nii.gz", seed=seed)),), name)
            for seed, name in enumerate(("a", "b", "c"))]


@pytest.fixture
def entry(tmp_path, subjects):
    return preprocess(subjects, CONFIG, tmp_path / "cache", num_workers=1)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_meta_records_size_and_sha256_of_each_data_file(entry):
    files = entry.meta["files"]
    for name in ("volumes.npy", "subjects.csv"):
        path = entry.directory / name
        assert files[name] == {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    assert entry.meta["failed"] == [] and entry.meta["version"] == preprocess_module.CACHE_FORMAT_VERSION
    assert entry.verify(full=True) == [] and entry.verify(full=False) == []
    assert entry.volumes().shape[0] == 3  # the streamed .npy reads back like np.save's


def test_a_truncated_volume_file_is_moved_aside_and_rebuilt(tmp_path, subjects, entry, caplog):
    volumes = entry.directory / "volumes.npy"
    original = np.array(entry.volumes())
    size = volumes.stat().st_size
    os.truncate(volumes, size // 2)
    assert entry.verify(full=False) == [f"volumes.npy is {size // 2} bytes, meta.json says {size} "
                                        f"(truncated or overwritten)"]
    with caplog.at_level(logging.WARNING, logger="datasets.preprocessing"):
        rebuilt = preprocess(subjects, CONFIG, tmp_path / "cache", num_workers=1)
    assert rebuilt.directory == entry.directory and rebuilt.verify() == []
    np.testing.assert_array_equal(rebuilt.volumes(), original)
    aside = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(f"{entry.directory.name}.damaged-")]
    assert len(aside) == 1 and (aside[0] / "volumes.npy").stat().st_size == size // 2  # kept for inspection
    assert f"Preprocessed cache entry {entry.directory} is damaged (volumes.npy is {size // 2} bytes" in caplog.text
    assert aside[0].name in caplog.text


def test_a_changed_byte_is_caught_only_by_the_full_check_and_rebuilt(tmp_path, subjects, entry):
    volumes = entry.directory / "volumes.npy"
    data = bytearray(volumes.read_bytes())
    data[-1] ^= 0xFF
    volumes.write_bytes(bytes(data))
    assert entry.verify(full=False) == []  # same size: the cheap check cannot tell
    assert len(problems := entry.verify(full=True)) == 1
    assert problems[0].startswith("volumes.npy checksum mismatch: sha256 ")
    assert preprocess(subjects, CONFIG, tmp_path / "cache", num_workers=1).verify() == []


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "meta.json").write_text("{not json"), "meta.json is unreadable \\(JSONDecodeError"),
    (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    (lambda d: (d / "subjects.csv").unlink(), "subjects.csv is missing"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"version": 2, "channels": 1})), "old format \\(version 2;"),
])
def test_every_kind_of_damage_is_named(entry, damage, problem):
    damage(entry.directory)
    problems = entry.verify(full=False)
    assert len(problems) == 1 and re.match(problem, problems[0]), problems


Usage = namedtuple("Usage", "total used free")


def test_too_little_free_space_stops_before_writing_with_the_sizes_and_the_fix(tmp_path, subjects, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    cache = tmp_path / "cache"
    with pytest.raises(DiskFullError, match=(f"Not enough disk space in {cache}: the preprocessed cache entry \\w+ "
                                             f"\\(3 x 1 x .* float16\\) needs .* KiB, 1000 B free\\. Free space on "
                                             f"that disk .* or pass --cache-dir on a larger disk\\.")):
        preprocess(subjects, CONFIG, cache, num_workers=1)
    assert _left_in(cache) == ["in-progress"] and len(list((cache / "in-progress").iterdir())) == 3  # for the rerun


def test_a_disk_with_room_for_the_entry_but_not_beside_the_kept_volumes_still_gets_the_entry(tmp_path, subjects,
                                                                                                 monkeypatch, caplog):
    """The volumes kept in in-progress/ take about as much as the entry: on a disk with room for one of the two, the
    kept ones (all in memory by then) make way, instead of a "disk full" that every rerun meets again."""
    reference = preprocess(subjects, CONFIG, tmp_path / "reference", num_workers=1)
    entry_bytes = sum(f.stat().st_size for f in reference.directory.iterdir())
    cache = tmp_path / "cache"

    kept_bytes = 3 * (128 + reference.volumes()[0].nbytes)  # the three kept .npy files: header and volume each

    def small_disk(path):  # room for the entry and half the kept volumes, less what the cache folder holds now
        held = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0
        return Usage(10**9, 10**9, entry_bytes + kept_bytes // 2 - held)

    # The check reserves room for meta.json by a fixed allowance far above these tiny volumes; count it exactly.
    monkeypatch.setattr(preprocess_module, "_META_BYTES", 0)
    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    with caplog.at_level(logging.WARNING, logger="datasets.preprocessing"):
        entry = preprocess(subjects, CONFIG, cache, num_workers=1)
    assert _left_in(cache) == [entry.directory.name] and entry.verify(full=True) == []
    np.testing.assert_array_equal(entry.volumes(), reference.volumes())
    assert (f"Too little free space in {cache} for the cache entry beside the 3 volume(s) kept in "
            f"{cache / 'in-progress'}: deleted those") in caplog.text


def _left_in(cache) -> list[str]:
    """What a stopped build left: no entry and no partial one, only in-progress/ (the volumes done, kept)."""
    return sorted(p.name for p in cache.iterdir())


def test_no_room_for_the_reservation_is_the_same_message_and_leaves_no_entry(tmp_path, subjects, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_module.os, "posix_fallocate", full)
    cache = tmp_path / "cache"
    with pytest.raises(DiskFullError, match=f"Not enough disk space in {cache}: .* --cache-dir") as caught:
        preprocess(subjects, CONFIG, cache, num_workers=1)
    assert is_disk_full(caught.value.__cause__)
    assert _left_in(cache) == ["in-progress"]  # the partial folder is gone


def test_a_disk_that_fills_during_the_write_is_the_same_message(tmp_path, subjects, monkeypatch):
    # volumes.npy's temporary file is /dev/full: every write to it fails with the kernel's own ENOSPC.
    real_mkstemp = tempfile.mkstemp

    def onto_dev_full(dir, prefix, suffix):
        if prefix.startswith(".volumes.npy"):
            return os.open("/dev/full", os.O_WRONLY), os.path.join(dir, prefix + "dev-full" + suffix)
        return real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)

    monkeypatch.setattr(atomic_module.tempfile, "mkstemp", onto_dev_full)
    cache = tmp_path / "cache"
    with pytest.raises(DiskFullError, match=f"Not enough disk space in {cache}: the preprocessed cache entry"):
        preprocess(subjects, CONFIG, cache, num_workers=1)
    assert _left_in(cache) == ["in-progress"]


def _write(path, data: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), str(path))
    return str(path)


@pytest.fixture
def with_bad_files(tmp_path, subjects):
    data = nib.load(write_ellipsoid(tmp_path / "source.nii.gz")).get_fdata(dtype=np.float32)
    negative = _write(tmp_path / "negative.nii.gz", -np.abs(data) - 1)
    data[10, 10, 10] = np.nan
    nan = _write(tmp_path / "nan.nii.gz", data)
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti")
    bad = [SubjectRecord("d_nan", "LGG", (nan,), "d"), SubjectRecord("e_neg", "LGG", (negative,), "e"),
           SubjectRecord("f_two", "LGG", (subjects[0].paths[0], str(tmp_path / "garbage.nii.gz")), "f")]
    return subjects + bad


def test_failed_files_are_all_named_with_their_reason_and_the_fix(tmp_path, with_bad_files):
    cache = tmp_path / "cache"
    with pytest.raises(InvalidDataError) as caught:
        preprocess(with_bad_files, CONFIG, cache, num_workers=1)
    message = str(caught.value)
    assert message.startswith("3 of 6 subjects could not be preprocessed; fix or remove these files, or pass "
                              "--skip-invalid to leave them out:\n")
    assert f"\n  {tmp_path / 'nan.nii.gz'}: ValueError: NaN or inf in 1 of " in message
    assert "voxels: replace them (e.g. by 0) or leave this file out (subject d_nan)" in message
    assert (f"\n  {tmp_path / 'negative.nii.gz'}: ValueError: no voxel above zero after resampling, so nothing to "
            f"take as brain (an empty or all-negative volume?) (subject e_neg)") in message
    assert f"\n  {tmp_path / 'garbage.nii.gz'}: ImageFileError: " in message  # the second file of a two-file subject
    assert _left_in(cache) == ["in-progress"] and len(list((cache / "in-progress").iterdir())) == 3  # a, b, c


def test_a_build_stopped_by_bad_files_goes_on_from_the_volumes_done_once_they_are_left_out(tmp_path, with_bad_files,
                                                                                          monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(InvalidDataError):
        preprocess(with_bad_files, CONFIG, cache, num_workers=1)
    monkeypatch.setattr(preprocess_module, "_resample_and_crop", lambda *a: pytest.fail("preprocessed again"))
    entry = preprocess(with_bad_files[:3], CONFIG, cache, num_workers=1)  # another subject set: another entry key
    assert list(entry.table["subject_id"]) == ["a", "b", "c"] and entry.verify() == []
    assert _left_in(cache) == [entry.directory.name]  # in-progress/ is gone once its volumes are in an entry


def test_skip_invalid_leaves_them_out_records_why_and_a_later_strict_run_still_stops(tmp_path, with_bad_files,
                                                                                   monkeypatch):
    cache = tmp_path / "cache"
    entry = preprocess(with_bad_files, CONFIG, cache, num_workers=1, skip_invalid=True)
    assert list(entry.table["subject_id"]) == ["a", "b", "c"] and entry.volumes().shape[0] == 3
    failed = entry.meta["failed"]
    assert [(f["subject_id"], f["path"]) for f in failed] == [
        ("d_nan", str(tmp_path / "nan.nii.gz")), ("e_neg", str(tmp_path / "negative.nii.gz")),
        ("f_two", str(tmp_path / "garbage.nii.gz"))]
    assert failed[0]["reason"].startswith("ValueError: NaN or inf in 1 of ")
    monkeypatch.setattr(preprocess_module, "_resample_and_crop", lambda *a: pytest.fail("preprocessed again"))
    assert preprocess(with_bad_files, CONFIG, cache, num_workers=1, skip_invalid=True).directory == entry.directory
    with pytest.raises(InvalidDataError, match="3 of 6 subjects could not be preprocessed.*\n  .*nan.nii.gz: "):
        preprocess(with_bad_files, CONFIG, cache, num_workers=1)


def test_a_failure_crosses_the_worker_pool_as_a_value():
    # Spawned workers return failures pickled; a pool in the test would cost tens of seconds on 2 cores.
    failure = pickle.loads(pickle.dumps(VolumeFailure("/data/x.nii.gz", "ValueError: NaN or inf in 1 of 8 voxels")))
    assert (failure.path, failure.reason) == ("/data/x.nii.gz", "ValueError: NaN or inf in 1 of 8 voxels")
    assert str(failure) == "/data/x.nii.gz: ValueError: NaN or inf in 1 of 8 voxels"


def test_when_every_subject_fails_there_is_no_entry_even_with_skip_invalid(tmp_path, with_bad_files):
    with pytest.raises(InvalidDataError, match="None of the 3 subjects could be preprocessed; fix these files:\n  "):
        preprocess(with_bad_files[3:], CONFIG, tmp_path / "cache", num_workers=1, skip_invalid=True)


def test_human_sizes_use_binary_units_like_df():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
