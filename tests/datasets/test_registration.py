"""N4 + affine registration to MNI152 (datasets.registration) on small phantoms at 4 mm."""
from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import shutil
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from datasets.records import SubjectRecord
from datasets.registration import CACHE_DIRNAME, register_records
from datasets.synthetic import mni_template_path, write_synthetic_dataset
from datasets.validation import Problem

SPACING = 4.0


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, SubjectRecord]:
    """One tilted IXI-like T1 and one two-channel BraTS-like subject (4 mm voxels)."""
    root = write_synthetic_dataset(tmp_path_factory.mktemp("phantoms"), n_hgg=1, n_lgg=0, n_healthy=1, seed=3,
                                   downsample=4, contrasts=("t1ce", "flair"))
    (ixi,) = sorted(root.glob("IXI/*.nii.gz"))
    (brats,) = sorted(root.glob("MICCAI_BraTS_2019_Data_Training/HGG/*"))
    return {
        "ixi": SubjectRecord("IXI001", "Healthy", (str(ixi),), "ixi", source="ixi"),
        "brats": SubjectRecord(brats.name, "HGG", tuple(str(p) for p in (sorted(brats.glob("*_t1ce.nii.gz"))
                                                                          + sorted(brats.glob("*_flair.nii.gz")))),
                               brats.name, source="brats"),
    }


@pytest.fixture(scope="module")
def registered(phantoms, tmp_path_factory) -> tuple[dict[str, SubjectRecord], Path]:
    """Both phantoms registered once (serially) into a module-wide cache."""
    cache_root = tmp_path_factory.mktemp("cache")
    records, problems = register_records(list(phantoms.values()), cache_root, spacing=SPACING, num_workers=1)
    assert problems == []
    return {r.source: r for r in records}, cache_root


@pytest.fixture(scope="module")
def template_grid(tmp_path_factory) -> nib.Nifti1Image:
    """The template's brain on the output grid, built here with ANTs independently of the module."""
    template = ants.resample_image(ants.image_read(str(mni_template_path("t1"))), (SPACING,) * 3,
                                   use_voxels=False, interp_type=1)
    path = tmp_path_factory.mktemp("template") / "template.nii.gz"
    ants.image_write(template, str(path))
    return nib.load(path)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _data(path: str) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj, dtype=np.float32)


def test_registration_aligns_brains_better_than_resampling(phantoms, registered, template_grid):
    outputs, _ = registered
    template_brain = template_grid.get_fdata() > 0
    for source, record in phantoms.items():
        unregistered = resample_from_to(nib.load(record.paths[0]), template_grid, order=0).get_fdata() > 0
        aligned = _data(outputs[source].paths[0]) > 0
        before, after = _dice(unregistered, template_brain), _dice(aligned, template_brain)
        # Measured: IXI 0.86 -> 0.96, BraTS (already near the template pose) 0.93 -> 0.97.
        assert after > 0.95, (source, before, after)
        assert after > before + 0.02, (source, before, after)


def test_every_channel_lands_on_the_template_grid(registered, template_grid):
    outputs, _ = registered
    assert len(outputs["brats"].paths) == 2  # t1ce and flair, both moved
    for record in outputs.values():
        for path in record.paths:
            image = nib.load(path)
            assert image.shape == template_grid.shape
            np.testing.assert_allclose(image.affine, template_grid.affine, atol=1e-4)


def test_records_keep_everything_but_paths(phantoms, registered):
    outputs, cache_root = registered
    for source, record in phantoms.items():
        assert dataclasses.replace(outputs[source], paths=record.paths) == record
        assert all(Path(p).parent == cache_root / CACHE_DIRNAME for p in outputs[source].paths)


def test_background_is_exactly_zero_outside_the_moved_brain(phantoms, tmp_path):
    """An input with a slightly negative background (as some scanners write): outputs are exactly 0 off the
    brain and never negative, so "non-zero" still means "brain" downstream."""
    source = nib.load(phantoms["ixi"].paths[0])
    data = np.asanyarray(source.dataobj).astype(np.float32)
    background = data == 0
    data[background] = -np.random.default_rng(0).uniform(0.5, 5.0, int(background.sum()))
    path = tmp_path / "IXI900-negative-T1.nii.gz"
    nib.save(nib.Nifti1Image(data, source.affine, source.header), path)

    (record,), problems = register_records([dataclasses.replace(phantoms["ixi"], paths=(str(path),))],
                                           tmp_path / "cache", spacing=SPACING, num_workers=1)
    assert problems == []
    output = ants.image_read(record.paths[0])
    (transform,) = (tmp_path / "cache" / CACHE_DIRNAME).glob("*.mat")
    brain = ants.image_read(str(path)).new_image_like((data > 0).astype(np.float32))
    moved_brain = ants.apply_transforms(output, brain, [str(transform)], interpolator="nearestNeighbor").numpy() > 0.5
    values = output.numpy()
    assert values.min() == 0.0
    assert np.all(values[~moved_brain] == 0.0)
    assert (values[moved_brain] > 0).mean() > 0.99


def test_second_call_is_a_cache_hit(phantoms, registered, monkeypatch):
    outputs, cache_root = registered
    stamps = {p: os.stat(p).st_mtime_ns for r in outputs.values() for p in r.paths}

    def refuse(*args, **kwargs):
        raise AssertionError("registration ran on a cache hit")

    monkeypatch.setattr(ants, "registration", refuse)
    monkeypatch.setattr(ants, "n4_bias_field_correction", refuse)
    again, problems = register_records(list(phantoms.values()), cache_root, spacing=SPACING, num_workers=1)
    assert problems == []
    assert [r.paths for r in again] == [outputs["ixi"].paths, outputs["brats"].paths]
    assert {p: os.stat(p).st_mtime_ns for r in again for p in r.paths} == stamps


def test_a_changed_file_is_registered_again_and_a_failure_names_the_step(phantoms, registered, tmp_path,
                                                                         monkeypatch):
    _, cache_root = registered
    copy = tmp_path / Path(phantoms["ixi"].paths[0]).name
    shutil.copy2(phantoms["ixi"].paths[0], copy)
    record = dataclasses.replace(phantoms["ixi"], paths=(str(copy),))
    register_records([record], cache_root, spacing=SPACING, num_workers=1)  # cached under the copy's identity
    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 10**9))

    def diverge(*args, **kwargs):
        raise RuntimeError("optimizer diverged")

    monkeypatch.setattr(ants, "registration", diverge)
    records, problems = register_records([record], cache_root, spacing=SPACING, num_workers=1)
    assert records == []
    assert problems == [Problem("IXI001", str(copy),
                                "affine registration to MNI152 failed (RuntimeError: optimizer diverged)")]


def test_corrupt_file_is_a_problem_and_the_others_still_register(phantoms, tmp_path, caplog):
    good = phantoms["brats"]
    truncated = tmp_path / "IXI901-Guys-0001-T1.nii.gz"
    payload = Path(phantoms["ixi"].paths[0]).read_bytes()
    truncated.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(EOFError):  # the file really is truncated (ITK alone would read it without complaint)
        gzip.decompress(truncated.read_bytes())
    bad = SubjectRecord("IXI901", "Healthy", (str(truncated),), "IXI901", source="ixi")

    with caplog.at_level(logging.INFO, logger="datasets.registration"):
        records, problems = register_records([bad, good], tmp_path / "cache", spacing=SPACING, num_workers=1)

    assert [r.subject_id for r in records] == [good.subject_id]
    assert all(Path(p).is_file() for p in records[0].paths)
    (problem,) = problems
    assert (problem.subject_id, problem.path) == ("IXI901", str(truncated))
    assert problem.reason.startswith("reading failed (")
    assert "Registered 2/2 subjects to MNI152 (1 failed)" in caplog.text


def test_same_input_gives_identical_outputs_in_parallel_workers(phantoms, tmp_path):
    """The same volume under two names, so two fresh computations in spawned workers: a fixed seed and one
    ITK thread per worker make them identical (with more threads ANTs' metric varies from run to run)."""
    original = phantoms["ixi"]
    copy = tmp_path / "IXI902-Guys-0002-T1.nii.gz"
    shutil.copyfile(original.paths[0], copy)
    twin = dataclasses.replace(original, subject_id="IXI902", paths=(str(copy),))

    records, problems = register_records([original, twin], tmp_path / "cache", spacing=SPACING, num_workers=2)

    assert problems == []
    first, second = (_data(r.paths[0]) for r in records)
    assert records[0].paths != records[1].paths and first.any()
    np.testing.assert_array_equal(first, second)


def test_unknown_method_names_the_allowed_values(phantoms, tmp_path):
    with pytest.raises(ValueError, match="none, mni"):
        register_records(list(phantoms.values()), tmp_path, method="affine-please")


def test_method_none_leaves_records_alone(phantoms, tmp_path):
    records = list(phantoms.values())
    assert register_records(records, tmp_path, method="none") == (records, [])
    assert not (tmp_path / CACHE_DIRNAME).exists()


def test_prepare_data_registers_before_caching_and_names_a_failure(tmp_path, monkeypatch):
    """--register mni through the whole data step: cached on the template grid, a failure stops or is skipped."""
    import ants

    from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
    from datasets.validation import InvalidDataError

    root = write_synthetic_dataset(tmp_path / "data", n_hgg=5, n_lgg=0, n_healthy=5, seed=7, downsample=4)
    spec, split = DataSpec(data_root=str(root)), SplitSpec(n_splits=2, val_fraction=0.5)
    data = prepare_data(spec, PreprocessConfig(spacing=8.0, register="mni"), split, tmp_path / "cache", num_workers=1)
    assert data.register == "mni" and data.cached.meta["config"]["register"] == "mni"
    assert len(data.cached.table) == 10 and (tmp_path / "cache" / "registered-mni").is_dir()
    # The acquisition profile stays that of the raw files: registration must not hide the source's grid.
    assert set(data.subjects.loc[data.subjects["source"] == "ixi", "orientation"]) == {"PSR"}
    unregistered = prepare_data(spec, PreprocessConfig(spacing=8.0), split, tmp_path / "cache", num_workers=1)
    assert unregistered.cache_dir != data.cache_dir  # part of the cache key

    broken = next(p for p in sorted((root / "IXI").glob("*.nii.gz")))
    os.utime(broken, ns=(1, 1))  # a changed file: registered again, and this time ANTs fails
    real = ants.registration

    def failing(fixed, moving, *args, **kwargs):
        if moving.shape == nib.load(broken).shape:
            raise RuntimeError("optimizer diverged")
        return real(fixed, moving, *args, **kwargs)

    monkeypatch.setattr(ants, "registration", failing)
    with pytest.raises(InvalidDataError, match="Registration to MNI152 failed.*--skip-invalid") as error:
        prepare_data(spec, PreprocessConfig(spacing=8.0, register="mni"), split, tmp_path / "cache", num_workers=1)
    assert str(broken) in str(error.value) and "optimizer diverged" in str(error.value)
    skipped = prepare_data(dataclasses.replace(spec, skip_invalid=True), PreprocessConfig(spacing=8.0, register="mni"),
                           split, tmp_path / "cache", num_workers=1)
    sid = broken.name.split("-T1")[0]
    assert sid in skipped.excluded and sid not in set(skipped.cached.table["subject_id"])


@pytest.mark.parametrize("headers", ["qform and sform disagree", "neither set"])
def test_registration_reads_a_volume_where_validation_and_preprocessing_place_it(tmp_path, headers):
    """ITK (ants.image_read) picked the qform where nibabel takes the sform, and mirrored a header without either:
    the brain would have been registered as its mirror image. The ANTs image now follows nibabel's affine."""
    from datasets.registration import _read

    data = np.zeros((10, 12, 14), np.float32)
    data[1, 2, 3] = 1
    image = nib.Nifti1Image(data, None)
    if headers == "qform and sform disagree":
        sform = np.diag([-1.0, 1, 1, 1])
        sform[0, 3] = 9
        image.set_qform(np.eye(4), code=1)
        image.set_sform(sform, code=2)
    else:
        image = nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1]))
        image.set_qform(None, code=0)
        image.set_sform(None, code=0)
    nib.save(image, str(tmp_path / "v.nii.gz"))
    expected_ras = (nib.load(tmp_path / "v.nii.gz").affine @ [1, 2, 3, 1])[:3]
    read = _read(str(tmp_path / "v.nii.gz"))
    lps = np.array(read.origin) + np.array(read.direction) @ (np.array(read.spacing) * [1, 2, 3])
    np.testing.assert_allclose(lps * [-1, -1, 1], expected_ras, atol=1e-5)
    assert read.numpy()[1, 2, 3] == 1 and read.numpy().sum() == 1
