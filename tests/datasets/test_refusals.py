"""Every refusal comes before preprocessing or Ray, and names the file or option and the fix."""
import json
import logging
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from datasets import DataSpec, PreprocessConfig, SplitSpec, check_data, prepare_data
from datasets.__main__ import main
from datasets.records import SubjectRecord
from datasets.sources import class_order, discover_brats_ixi, read_manifest
from datasets.splits import check_class_counts, fewest_inner_subjects, plan_splits
from datasets import validation
from datasets.validation import InvalidDataError, check_volume, validate_records
from tests.conftest import write_brats_tree, write_ellipsoid

AFFINE_FIX = "fix the header's qform/sform, e.g. with nibabel or fslorient"


def write_with_affine(path: Path, affine: np.ndarray) -> Path:
    """A readable volume whose sform is ``affine`` as given (nibabel refuses to build such an image itself)."""
    data = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[:3]
    header["sform_code"], header["qform_code"] = 1, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, None, header=header), str(path))
    return path


def write_manifest(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- manifests -------------------------------------------------------------------------------------------


def test_an_empty_manifest_is_named_with_the_columns_it_needs(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.csv", "")
    with pytest.raises(ValueError, match=r"Manifest .*m\.csv is empty; write a header row with subject_id, label "
                                         r"and path \(or path_<contrast>\) columns, then one row per subject"):
        read_manifest(manifest)
    assert main(["check", "--manifest", str(manifest)]) == 2
    assert capsys.readouterr().err.startswith(f"error: Manifest {manifest} is empty")


def test_a_manifest_with_a_header_and_no_rows_has_no_subjects(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", "subject_id,label,path\n")
    with pytest.raises(ValueError, match=r"m\.csv has no subjects \(a header and no rows\); add one row per subject"):
        read_manifest(manifest)


def test_labels_are_trimmed_and_matched_regardless_of_case_with_a_warning(tmp_path, caplog):
    rows = [(" s1", "HGG "), ("s2", "HGG "), ("s3", "HGG "), ("s4", "hgg"), ("s5", "HGG"),
            ("s6", "methylated"), ("s7", "Methylated "), ("s8", "lgg")]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"subject_id": [r[0] for r in rows], "label": [r[1] for r in rows],
                  "path": ["x.nii.gz"] * len(rows)}).to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="datasets.sources"):
        records = read_manifest(manifest)
    assert [(r.subject_id, r.label) for r in records] == [
        ("s1", "HGG"), ("s2", "HGG"), ("s3", "HGG"), ("s4", "HGG"), ("s5", "HGG"),
        ("s6", "methylated"), ("s7", "methylated"), ("s8", "LGG")]
    assert records[0].group == "s1"
    message = caplog.text
    assert "'HGG ' (3 rows), 'hgg' (1 row) -> 'HGG'" in message
    assert "'Methylated ' (1 row) -> 'methylated'" in message
    assert "'lgg' (1 row) -> 'LGG'" in message


def test_classes_option_is_matched_like_the_labels():
    records = [SubjectRecord("a", "HGG", ("a.nii.gz",), "a"), SubjectRecord("b", "methylated", ("b.nii.gz",), "b")]
    assert class_order(records, [" hgg", "METHYLATED ", "healthy"]) == ("HGG", "methylated", "Healthy")
    with pytest.raises(ValueError, match="--classes names HGG twice .* list each class once"):
        class_order(records, ["HGG", "hgg "])


def test_one_id_with_two_labels_names_both_labels_and_files(tmp_path, capsys):
    a, b = write_ellipsoid(tmp_path / "a.nii.gz"), write_ellipsoid(tmp_path / "b.nii.gz", seed=1)
    pd.DataFrame({"subject_id": ["s1", "s1", "s2"], "label": ["HGG", "LGG", "LGG"],
                  "path": [a.name, b.name, a.name]}).to_csv(tmp_path / "m.csv", index=False)
    assert main(["check", "--manifest", str(tmp_path / "m.csv")]) == 1
    out = capsys.readouterr().out
    reason = (f"duplicate subject id (2 entries) with conflicting labels 'HGG' ({a}), 'LGG' ({b}); give the subject "
              "one label, or distinct ids if these are different subjects (subject s1)")
    assert out.count(reason) == 2
    # A subset that keeps one of the two labels must not hide the conflict (it trained s1 as HGG).
    assert main(["check", "--manifest", str(tmp_path / "m.csv"), "--classes", "HGG,Healthy"]) == 1
    assert reason in capsys.readouterr().out


def test_check_applies_the_groups_rule_of_the_run(tmp_path, capsys):
    """`datasets check --folds 3` refuses what the run would: HGG in two patients cannot fill three test folds."""
    rows = []
    for i in range(6):
        rows.append({"subject_id": f"h{i}", "label": "HGG", "group": f"P{i % 2}",
                     "path": write_ellipsoid(tmp_path / f"h{i}.nii.gz", seed=i).name})
        rows.append({"subject_id": f"l{i}", "label": "LGG", "group": "",
                     "path": write_ellipsoid(tmp_path / f"l{i}.nii.gz", seed=50 + i).name})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    assert main(["check", "--manifest", str(tmp_path / "m.csv"), "--folds", "3"]) == 1
    out = capsys.readouterr().out
    assert "Class counts: Too few groups" in out and "--folds 3: HGG has 2; each class needs subjects in at least 3" in out


# --- affine -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine, reason", [
    (np.diag([0.0, 1, 1, 1]), "affine is singular (voxel sizes 0, 1, 1): "),
    (np.array([[2.0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
     "affine is singular (voxel axes are parallel; voxel sizes 2, 2, 1): "),
    (np.diag([np.nan, 1, 1, 1]), "affine is not finite (NaN/Inf in the header's voxel-to-world matrix): "),
    (np.diag([1.0, np.inf, 1, 1]), "affine is not finite (NaN/Inf in the header's voxel-to-world matrix): "),
])
def test_a_degenerate_affine_is_a_problem_of_its_file(tmp_path, affine, reason):
    assert check_volume(write_with_affine(tmp_path / "bad.nii.gz", affine)) == reason + AFFINE_FIX


def test_check_lists_a_degenerate_affine_and_skip_invalid_leaves_it_out(tmp_path, capsys):
    root = tmp_path / "data"
    write_brats_tree(root, per_grade=2)
    bad = write_with_affine(root / "HGG/Z/Z_t1ce.nii.gz", np.diag([0.0, 1, 1, 1]))
    assert main(["check", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"  {bad}: affine is singular (voxel sizes 0, 1, 1): {AFFINE_FIX} (subject Z)" in out
    assert main(["check", "--data-root", str(root), "--skip-invalid"]) == 0
    assert "--skip-invalid: 1 subject(s) will be left out" in capsys.readouterr().out


def test_results_cached_by_an_older_check_are_not_trusted(tmp_path):
    path = write_with_affine(tmp_path / "bad.nii.gz", np.diag([0.0, 1, 1, 1]))
    stat = os.stat(path)
    cache = tmp_path / "validation.json"
    # What the previous, unversioned cache said about this very file: valid.
    cache.write_text(json.dumps({str(path): {"stamp": [stat.st_size, stat.st_mtime_ns], "reason": None,
                                             "profile": {"voxel_x": 0.0}}}))
    record = SubjectRecord("bad", "HGG", (str(path),), "bad")
    report = validate_records([record], ("HGG",), cache)
    assert [p.reason for p in report.problems] == [f"affine is singular (voxel sizes 0, 1, 1): {AFFINE_FIX}"]
    assert json.loads(cache.read_text())["version"] == validation.CHECK_VERSION == 7


def test_a_single_slice_an_rgb_volume_and_a_zero_voxel_size_are_named_with_the_fix(tmp_path):
    import gzip
    import struct

    single = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((60, 60, 1)).astype(np.float32), np.eye(4)), single)
    assert check_volume(single) == ("a single slice, not a 3-D volume (shape (60, 60, 1)); give the whole series as "
                                    "one 3-D NIfTI (e.g. dcm2niix)")
    rgb = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4)), rgb)
    assert check_volume(rgb).startswith("voxel type [('R', 'u1'), ('G', 'u1'), ('B', 'u1')] is not a real number")
    # pixdim[1] = 0 and no qform/sform, written byte by byte: nibabel itself would never save such a header.
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4)), good)
    raw = bytearray(gzip.open(good).read())
    raw[80:84] = struct.pack("<f", 0.0)
    raw[252:256] = struct.pack("<hh", 0, 0)
    zero = tmp_path / "zero.nii"
    zero.write_bytes(bytes(raw))
    assert check_volume(zero) == (f"voxel size 0, 1, 1 mm in the header (pixdim) and no qform/sform: a size must be "
                                  f"positive; {AFFINE_FIX}")
    raw[252:254] = struct.pack("<h", 1)  # with a qform the affine does not come from pixdim: nothing to refuse
    placed = tmp_path / "placed.nii"
    placed.write_bytes(bytes(raw))
    assert check_volume(good) is None and check_volume(placed) is None



# --- voxel size -----------------------------------------------------------------------------------------------

VOXEL_FIX = ("rewrite the header with the voxel size in mm, e.g. with nibabel: nib.save(nib.Nifti1Image("
             "np.asanyarray(img.dataobj), {to_mm}, img.header), path), which sets pixdim, qform and sform "
             "(img.header.set_zooms alone leaves the qform/sform in the old unit)")


@pytest.mark.parametrize("zooms, found, guess, to_mm", [
    ((0.004, 0.004, 0.004), "0.004, 0.004, 0.004", "written in metres?", "np.diag([1000, 1000, 1000, 1]) @ img.affine"),
    ((4000.0, 4000.0, 4000.0), "4000, 4000, 4000", "written in micrometres?",
     "np.diag([0.001, 0.001, 0.001, 1]) @ img.affine"),
    ((4.0, 4.0, 30.0), "4, 4, 30", "a broken converter?", "the affine in mm"),
    ((0.05, 1.0, 1.0), "0.05, 1, 1", "a broken converter?", "the affine in mm"),
])
def test_an_implausible_voxel_size_is_named_with_the_range_and_the_fix(tmp_path, zooms, found, guess, to_mm):
    path = write_ellipsoid(tmp_path / "odd.nii.gz", zooms=zooms)
    assert check_volume(path) == (f"voxel size {found} mm in the header, outside the plausible 0.1-20 mm for MRI "
                                  f"({guess}); " + VOXEL_FIX.format(to_mm=to_mm))
    assert validation.VOXEL_SIZE_RANGE_MM == (0.1, 20.0)


def test_the_fix_the_message_gives_makes_the_file_valid_with_its_voxels_in_mm(tmp_path):
    for zooms, scale in (((0.004, 0.004, 0.004), 1000), ((4000.0, 4000.0, 4000.0), 0.001)):
        path = write_ellipsoid(tmp_path / "odd.nii.gz", zooms=zooms)
        assert check_volume(path).startswith(f"voxel size {zooms[0]:g}, ")
        img = nib.load(path)
        fixed = nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([scale, scale, scale, 1]) @ img.affine, img.header)
        nib.save(fixed, path)
        reason, profile = validation.inspect_volume(path)
        assert reason is None and (profile["voxel_x"], profile["voxel_y"], profile["voxel_z"]) == (4.0, 4.0, 4.0)
        assert np.allclose(nib.load(path).affine, np.diag([-4.0, -4.0, 4.0, 1.0]))


def test_the_range_is_inclusive_and_only_pixdim_out_of_it_is_named_as_such(tmp_path):
    assert check_volume(write_ellipsoid(tmp_path / "fine.nii.gz", zooms=(0.1, 0.1, 20.0))) is None
    # A qform/sform in mm but pixdim in metres, declared so: the acquisition profile would report pixdim.
    data = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_zooms((0.004, 0.004, 0.004))
    header.set_xyzt_units("meter")
    header.set_sform(np.diag([4.0, 4.0, 4.0, 1.0]), code=1)
    pixdim_only = tmp_path / "pixdim.nii.gz"
    nib.save(nib.Nifti1Image(data, None, header=header), str(pixdim_only))
    assert check_volume(pixdim_only) == (
        "voxel size 0.004, 0.004, 0.004 mm in the header's pixdim (its qform/sform says 4, 4, 4 mm), outside the "
        "plausible 0.1-20 mm for MRI; its units field says meter; rewrite the header with the voxel size in mm, e.g. "
        "with nibabel: img.header.set_zooms((4, 4, 4)), then nib.save")


def test_an_implausible_voxel_size_stops_a_run_before_preprocessing_unless_skipped(small_tree, tmp_path, capsys):
    write_ellipsoid(small_tree / "LGG/LGG4/LGG4_t1ce.nii.gz", seed=4)
    metres = write_ellipsoid(small_tree / "HGG/M/M_t1ce.nii.gz", zooms=(0.004, 0.004, 0.004))
    assert main(["check", "--data-root", str(small_tree)]) == 1
    out = capsys.readouterr().out
    assert (f"  {metres}: voxel size 0.004, 0.004, 0.004 mm in the header, outside the plausible 0.1-20 mm for MRI "
            f"(written in metres?); ") in out and out.count("(subject M)") == 1
    cache = tmp_path / "cache"
    spec = DataSpec(data_root=str(small_tree))
    with pytest.raises(InvalidDataError, match=rf"pass --skip-invalid to leave them out:\n.*\n.*\n  "
                                               rf"{re.escape(str(metres))}: voxel size 0\.004, 0\.004, 0\.004 mm"):
        prepare_data(spec, PreprocessConfig(spacing=8.0), SplitSpec(n_splits=2, val_fraction=0.5), cache)
    assert sorted(p.name for p in cache.iterdir()) == ["validation.json"]  # nothing preprocessed
    data = prepare_data(DataSpec(data_root=str(small_tree), skip_invalid=True), PreprocessConfig(spacing=8.0),
                        SplitSpec(n_splits=2, val_fraction=0.5), cache, num_workers=1)
    assert data.excluded == ("M",) and "M" not in set(data.cached.table["subject_id"])
    assert len(data.cached.table) == 9


def test_manifest_rows_with_an_extra_field_or_no_id_are_named_by_line(tmp_path):
    extra = write_manifest(tmp_path / "extra.csv", "subject_id,label,path\na,HGG,a.nii.gz,oops\nb,LGG,b.nii.gz\n")
    with pytest.raises(ValueError, match=r"extra.csv: line\(s\) 2 have more fields than the header; remove the "
                                         r"extra commas"):
        read_manifest(extra)
    no_id = write_manifest(tmp_path / "no_id.csv", "subject_id,label,path\na,HGG,a.nii.gz\n,LGG,b.nii.gz\n")
    with pytest.raises(ValueError, match=r"no_id.csv: line\(s\) 3 have no subject_id"):
        read_manifest(no_id)


def test_ixi_beside_another_contrast_than_t1_is_refused_as_a_shortcut(tmp_path):
    from datasets.sources import discover_brats_ixi
    from datasets.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data", n_hgg=1, n_lgg=1, n_healthy=1, seed=0, downsample=8,
                                   contrasts=("t1ce", "flair"))
    with pytest.raises(ValueError, match=r"--contrasts flair was asked for: every Healthy volume would be a T1 while "
                                         r"the tumours are FLAIR"):
        discover_brats_ixi(root, ("flair",))
    assert {r.label for r in discover_brats_ixi(root, ("t1ce",))} == {"HGG", "LGG", "Healthy"}


# --- class counts -------------------------------------------------------------------------------------------


def test_a_class_asked_for_without_subjects_names_the_classes_found():
    with pytest.raises(ValueError, match=r"No valid subject has the label Healthy \(asked for with --classes, .*\); "
                                         r"subjects found per class: LGG 5, HGG 6\. Add subjects of Healthy, or "
                                         r"leave it out of --classes"):
        check_class_counts({"LGG": 5, "HGG": 6, "Healthy": 0})


def test_one_class_is_refused():
    with pytest.raises(ValueError, match=r"Only one class has subjects \(HGG 9\); a classifier needs at least two"):
        check_class_counts({"HGG": 9})


def test_fewer_subjects_than_folds_says_how_many():
    with pytest.raises(ValueError, match=r"Every class needs at least 3 subjects for 3 folds \(one per test part\); "
                                         r"LGG: 2\. Add subjects, use fewer --folds, or leave the class out \(--classes without it\)"):
        check_class_counts({"HGG": 9, "LGG": 2}, n_splits=3)


def test_k_fold_counts_that_leave_a_validation_part_without_a_class():
    # 4/4/4, 3 folds: each training part is 2/3/3 of 8; the inner split draws ceil(0.2 * 8) = 2 for validation
    # and 6 for fitting, 1.5/2.25/2.25 -> 1/2/2 plus the largest remainder (0.5): 2/2/2, leaving 0/1/1.
    # 6/6/6: training parts 4/4/4 of 12, validation ceil(2.4) = 3 -> 1/1/1. 5/5/5 can still leave one out.
    assert fewest_inner_subjects({"LGG": 4, "HGG": 4, "Healthy": 4}, "kfold", 3, 0.3, 0.2) == \
        {"LGG": 0, "HGG": 0, "Healthy": 0}
    assert min(fewest_inner_subjects({"LGG": 5, "HGG": 5, "Healthy": 5}, "kfold", 3, 0.3, 0.2).values()) == 0
    with pytest.raises(ValueError, match=r"inner training and validation parts to hold each class \(--split kfold, "
                                         r"--folds 3, val_fraction 0\.2\): LGG has 4, HGG has 4, Healthy has 4; "
                                         r"each needs at least 6\. .* Fix: add subjects, use fewer --folds, or leave "
                                         r"the class out \(--classes without it\)"):
        check_class_counts({"LGG": 4, "HGG": 4, "Healthy": 4}, "kfold", 3)
    check_class_counts({"LGG": 6, "HGG": 6, "Healthy": 6}, "kfold", 3)


def test_shuffle_counts_that_leave_a_validation_part_without_a_class():
    # 4/4, test_size 0.3: 8 - ceil(2.4) = 5 train (3/2), validation ceil(0.2 * 5) = 1 subject for 2 classes.
    # 5/5: 7 train (4/3), validation ceil(1.4) = 2, fit 5 = 2.86/2.14 -> 3/2, validation 1/1.
    with pytest.raises(ValueError, match=r"\(--split shuffle, --folds 2, test_size 0\.3, val_fraction 0\.2\): a has "
                                         r"4, b has 4; each needs at least 5\. .*whatever --folds\)"):
        check_class_counts({"a": 4, "b": 4}, "shuffle", 2)
    check_class_counts({"a": 5, "b": 5}, "shuffle", 2)


def test_counts_the_check_accepts_give_every_class_a_validation_subject_in_every_fold():
    table = pd.DataFrame({"label": ["LGG"] * 6 + ["HGG"] * 6 + ["Healthy"] * 6})
    table["subject_id"] = table["group"] = [f"s{i:02d}" for i in range(len(table))]
    label = dict(zip(table["subject_id"], table["label"]))
    for seed in range(3):
        for fold in plan_splits(table, "kfold", 3, seed=seed).folds:
            assert {label[s] for s in fold.val} == {"LGG", "HGG", "Healthy"}


@pytest.fixture
def small_tree(tmp_path):
    root = tmp_path / "data"
    write_brats_tree(root, per_grade=4)
    return root


def test_class_counts_stop_a_run_before_anything_is_written(small_tree, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="LGG has 4, HGG has 4; each needs at least 5"):
        prepare_data(DataSpec(data_root=str(small_tree)), PreprocessConfig(spacing=8.0), SplitSpec(n_splits=3),
                     cache, cohort_file=tmp_path / "cohort.json")
    with pytest.raises(ValueError, match="No valid subject has the label Healthy .*subjects found per class: HGG 4, "
                                         "LGG 4"):
        prepare_data(DataSpec(data_root=str(small_tree), classes=("hgg", "lgg", "healthy")),
                     PreprocessConfig(spacing=8.0), SplitSpec(n_splits=2, val_fraction=0.5), cache)
    with pytest.raises(ValueError, match=r"Only one class has subjects \(HGG 4\)"):
        prepare_data(DataSpec(data_root=str(small_tree), classes=("HGG",), skip_invalid=True),
                     PreprocessConfig(spacing=8.0), SplitSpec(n_splits=2, val_fraction=0.5), cache)
    assert sorted(p.name for p in cache.iterdir()) == ["validation.json"]  # nothing preprocessed
    assert not (tmp_path / "cohort.json").exists()


def test_check_reports_class_counts_for_the_folds_asked_for(small_tree, capsys):
    assert main(["check", "--data-root", str(small_tree), "--folds", "3"]) == 1
    out = capsys.readouterr().out
    assert "Class counts: Too few subjects for every fold's inner training and validation parts" in out
    assert main(["check", "--data-root", str(small_tree)]) == 0  # prepare's default folds: a note only
    assert "Note, for the default --folds 3 --split kfold (pass --folds to check your run's)" in capsys.readouterr().out
    assert main(["check", "--data-root", str(small_tree), "--folds", "2", "--classes", "HGG,LGG,Healthy"]) == 1
    assert "Class counts: No valid subject has the label Healthy" in capsys.readouterr().out


# --- failures in preprocessing --------------------------------------------------------------------------------


def damage_keeping_size_and_time(path: Path) -> None:
    """Corrupt the compressed voxels after validation vouched for the file: its cached verdict still holds."""
    stat = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_file_that_fails_in_preprocessing_is_left_out_and_the_counts_rechecked(small_tree, tmp_path, caplog):
    write_ellipsoid(small_tree / "LGG/LGG4/LGG4_t1ce.nii.gz", seed=4)
    bad_affine = write_with_affine(small_tree / "HGG/Z/Z_t1ce.nii.gz", np.diag([0.0, 1, 1, 1]))
    spec, cache = DataSpec(data_root=str(small_tree), skip_invalid=True), tmp_path / "cache"
    check_data(spec, cache)  # validation.json now vouches for LGG4's file
    damaged = small_tree / "LGG/LGG4/LGG4_t1ce.nii.gz"
    damage_keeping_size_and_time(damaged)
    with caplog.at_level(logging.WARNING, logger="datasets.prepare"):
        data = prepare_data(spec, PreprocessConfig(spacing=8.0), SplitSpec(n_splits=2, val_fraction=0.5), cache,
                            num_workers=1)
    assert data.excluded == ("Z", "LGG4")
    assert "LGG4" not in set(data.cached.table["subject_id"]) and "LGG4" not in set(data.subjects["subject_id"])
    assert f"Left out (--skip-invalid): {damaged}: " in caplog.text
    assert bad_affine.exists()
    # 4/5 passes 3 folds at val_fraction 0.2; the 4/4 left after preprocessing does not (the entry is reused).
    with pytest.raises(ValueError, match=r"After the subjects that preprocessing left out \(--skip-invalid\): Too few "
                                         r"subjects .*LGG has 4, HGG has 4; each needs at least 5"):
        prepare_data(spec, PreprocessConfig(spacing=8.0), SplitSpec(n_splits=3), cache, num_workers=1)


def test_splits_saved_with_other_options_are_refused_before_any_file_is_read(tmp_path):
    """A run that stopped before saving its options leaves splits.json; a new run there must not reuse it silently."""
    from datasets.splits import SplitPlan

    splits = tmp_path / "splits.json"
    SplitPlan(scheme="kfold", n_splits=3, test_size=0.3, val_fraction=0.2, seed=0).save(splits)
    missing = tmp_path / "no-data-here"  # never opened: the refusal comes first
    with pytest.raises(ValueError, match=r"splits.json holds splits drawn with other options: scheme 'kfold' "
                                         r"\(asked: 'shuffle'\); n_splits 3 \(asked: 5\); seed 0 \(asked: 7\)\. "
                                         r"Use another --output \(tune_main\) or --splits-file \(datasets prepare\), "
                                         r"or delete .*splits.json to draw the splits again"):
        prepare_data(DataSpec(data_root=str(missing)), PreprocessConfig(spacing=8.0),
                     SplitSpec(scheme="shuffle", n_splits=5, seed=7), tmp_path / "cache", splits_file=splits)


def test_a_class_in_fewer_groups_than_folds_is_refused_before_preprocessing():
    from datasets.prepare import require_class_counts

    def records(hgg_patients: int) -> list[SubjectRecord]:
        return ([SubjectRecord(f"h{i}", "HGG", ("x.nii.gz",), group=f"P{i % hgg_patients}") for i in range(6)]
                + [SubjectRecord(f"l{i}", "LGG", ("x.nii.gz",), group=f"l{i}") for i in range(6)])

    # Six subjects per class, but every HGG scan belongs to one of two patients: three folds cannot all hold HGG.
    with pytest.raises(ValueError, match=r"Too few groups .* for --split kfold, --folds 3: HGG has 2; each class needs "
                                         r"subjects in at least 3 groups .*Fix: add subjects of other patients"):
        require_class_counts(records(2), ("HGG", "LGG"), SplitSpec(n_splits=3))
    # Two folds of three patients: one fold trains on a single patient, which cannot fill inner training and
    # validation both; three folds of three patients train on two each.
    with pytest.raises(ValueError, match=r"--folds 2: HGG has 3; each class needs subjects in at least 4 groups .*"
                                         r"Fix: use --folds 3, add subjects"):
        require_class_counts(records(3), ("HGG", "LGG"), SplitSpec(n_splits=2))
    require_class_counts(records(3), ("HGG", "LGG"), SplitSpec(n_splits=3))


def test_one_file_under_two_subject_ids_is_refused_for_both(tmp_path):
    scan = write_ellipsoid(tmp_path / "scan.nii.gz")
    other = write_ellipsoid(tmp_path / "other.nii.gz", seed=1)
    records = [SubjectRecord("a", "HGG", (str(scan),), "a"),
               SubjectRecord("b", "LGG", (str(tmp_path / "sub" / ".." / "scan.nii.gz"),), "b"),  # the same file
               SubjectRecord("c", "LGG", (str(other),), "c")]
    report = validate_records(records, ("HGG", "LGG"))
    assert [(p.subject_id, p.reason) for p in report.problems] == [
        ("a", "the same file as subject(s) b: one scan under two ids would be trained and tested on; keep one of the ids"),
        ("b", "the same file as subject(s) a: one scan under two ids would be trained and tested on; keep one of the ids")]
    assert [r.subject_id for r in report.valid] == ["c"]


SAME_SCAN_FIX = ("one scan under two ids would be trained and tested on; keep one of the ids and remove the other "
                 "file(s) or manifest row(s) (a rescan never has identical voxels: if two scans were meant, one file "
                 "overwrote the other)")


def write_integer_ellipsoid(path: Path, seed: int) -> Path:
    """An ellipsoid with whole-number intensities, so that int16 holds them exactly."""
    image = nib.load(write_ellipsoid(path, seed=seed))
    nib.save(nib.Nifti1Image(np.round(image.get_fdata()).astype(np.float32), image.affine), str(path))
    return path


def the_same_volume_again(kind: str, source: Path, folder: Path) -> Path:
    """``source``'s voxels in another file, as a data set can come to hold them."""
    image = nib.load(source)
    data = np.asanyarray(image.dataobj)
    if kind == "copy":
        return Path(shutil.copy(source, folder / "copy.nii.gz"))
    if kind == "hard link":
        os.link(source, folder / "link.nii.gz")
        return folder / "link.nii.gz"
    target = folder / {"uncompressed": "plain.nii"}.get(kind, f"{kind.replace(' ', '_')}.nii.gz")
    if kind == "uncompressed":
        nib.save(image, str(target))  # other bytes on disk, the same voxels
    elif kind == "int16":
        nib.save(nib.Nifti1Image(data.astype(np.int16), image.affine), str(target))
    elif kind == "reoriented":  # the array flipped to RAS and the affine with it (as fslreorient2std does)
        nib.save(nib.as_closest_canonical(image), str(target))
    elif kind == "header rewritten":  # another voxel size and origin in the header: still the same acquisition
        affine = image.affine.copy()
        affine[:3, :3] /= 2
        affine[:3, 3] += 9
        nib.save(nib.Nifti1Image(data, affine), str(target))
    return target


@pytest.mark.parametrize("kind", ["copy", "hard link", "uncompressed", "int16", "reoriented", "header rewritten"])
def test_one_volume_in_two_files_under_two_ids_is_refused_for_both(tmp_path, kind):
    scan = write_integer_ellipsoid(tmp_path / "scan.nii.gz", seed=0)
    again = the_same_volume_again(kind, scan, tmp_path)
    assert again.read_bytes() != scan.read_bytes() or kind in ("copy", "hard link")
    other = write_integer_ellipsoid(tmp_path / "other.nii.gz", seed=1)  # the same shape, another volume
    records = [SubjectRecord("a", "HGG", (str(scan),), "a"), SubjectRecord("b", "LGG", (str(again),), "b"),
               SubjectRecord("c", "LGG", (str(other),), "c")]
    report = validate_records(records, ("HGG", "LGG"))
    labels = "(one volume copied, linked or re-saved; labelled 'HGG', 'LGG': at most one is right)"
    assert [(p.subject_id, p.path, p.reason) for p in report.problems] == [
        ("a", str(scan), f"the same voxels as subject b ({again}) {labels}: {SAME_SCAN_FIX}"),
        ("b", str(again), f"the same voxels as subject a ({scan}) {labels}: {SAME_SCAN_FIX}")]
    assert [r.subject_id for r in report.valid] == ["c"]


def test_different_volumes_of_one_shape_are_not_taken_for_one_scan(tmp_path):
    scan = write_integer_ellipsoid(tmp_path / "scan.nii.gz", seed=0)
    image = nib.load(scan)
    data = image.get_fdata().astype(np.float32)
    data[12, 14, 10] += 1  # one voxel off
    nearly = tmp_path / "nearly.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), str(nearly))
    mirrored = tmp_path / "mirrored.nii.gz"  # flipped left-right in the array only: another image in the world
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[::-1].copy(), image.affine), str(mirrored))
    files = [scan, nearly, mirrored, write_integer_ellipsoid(tmp_path / "other.nii.gz", seed=1)]
    records = [SubjectRecord(f"s{i}", "HGG", (str(f),), f"s{i}") for i, f in enumerate(files)]
    report = validate_records(records, ("HGG",))
    assert report.ok and len(report.valid) == 4
    assert len({profile[validation.CONTENT_DIGEST] for profile in report.profiles.values()}) == 4


def test_the_content_digest_ignores_how_a_volume_is_stored_but_not_its_values():
    data = np.round(np.random.default_rng(0).uniform(-50, 50, (6, 7, 8))).astype(np.float32)
    data[data < 0] = 0
    image = nib.Nifti1Image(data, np.diag([-1.0, 1, 1, 1]))
    digest = validation.content_digest(image, data)
    signed = data.copy()
    signed[data == 0] = -0.0  # a float file may hold -0.0 where its int16 twin holds 0
    assert np.signbit(signed).any() and validation.content_digest(image, signed) == digest
    assert validation.content_digest(image, np.asfortranarray(data)) == digest
    assert validation.content_digest(image, data.reshape(7, 6, 8)) != digest  # the same bytes on another grid
    assert validation.content_digest(nib.Nifti1Image(data, np.eye(4)), data) != digest  # another orientation


def test_multi_contrast_subjects_are_compared_file_by_file(tmp_path):
    t1 = [write_ellipsoid(tmp_path / f"s{i}_t1ce.nii.gz", seed=i) for i in range(4)]
    flair = [write_ellipsoid(tmp_path / f"s{i}_flair.nii.gz", seed=10 + i) for i in range(3)]
    s1_flair = Path(shutil.copy(t1[0], tmp_path / "s1_flair_copy.nii.gz"))  # s1's FLAIR is s0's T1
    s3_flair = Path(shutil.copy(t1[3], tmp_path / "s3_flair_copy.nii.gz"))  # s3's FLAIR is its own T1: no second id
    records = [SubjectRecord("s0", "HGG", (str(t1[0]), str(flair[0])), "s0"),
               SubjectRecord("s1", "HGG", (str(t1[1]), str(s1_flair)), "s1"),
               SubjectRecord("s2", "LGG", (str(t1[2]), str(flair[2])), "s2"),
               SubjectRecord("s3", "LGG", (str(t1[3]), str(s3_flair)), "s3")]
    report = validate_records(records, ("HGG", "LGG"))
    assert [(p.subject_id, p.path, p.reason) for p in report.problems] == [
        ("s0", str(t1[0]), f"the same voxels as subject s1 ({s1_flair}) (one volume copied, linked or re-saved): "
                           f"{SAME_SCAN_FIX}"),
        ("s1", str(s1_flair), f"the same voxels as subject s0 ({t1[0]}) (one volume copied, linked or re-saved): "
                              f"{SAME_SCAN_FIX}")]
    assert [r.subject_id for r in report.valid] == ["s2", "s3"]


def test_a_cached_profile_without_the_content_digest_is_measured_again(tmp_path, monkeypatch):
    scan = write_ellipsoid(tmp_path / "scan.nii.gz")
    copy = shutil.copy(scan, tmp_path / "copy.nii.gz")
    records = [SubjectRecord("a", "HGG", (str(scan),), "a"), SubjectRecord("b", "HGG", (str(copy),), "b")]
    cache = tmp_path / "validation.json"
    assert [p.subject_id for p in validate_records(records, ("HGG",), cache).problems] == ["a", "b"]
    measured = json.loads(cache.read_text())
    opened = []
    inspect = validation.inspect_volume
    monkeypatch.setattr(validation, "inspect_volume", lambda path: opened.append(str(path)) or inspect(path))
    # Profiles as a cache written before the digest holds them: the current version's, and version 4's (dropped whole).
    for version in (validation.CHECK_VERSION, 4):
        stale = {file: {**entry, "profile": {k: v for k, v in entry["profile"].items() if k != validation.CONTENT_DIGEST}}
                 for file, entry in measured["files"].items()}
        cache.write_text(json.dumps({"version": version, "files": stale}))
        opened.clear()
        report = validate_records(records, ("HGG",), cache)
        assert opened == [str(scan), str(copy)], version
        assert [p.subject_id for p in report.problems] == ["a", "b"] and not report.valid
        assert json.loads(cache.read_text()) == measured  # the digest is back in the cache
    opened.clear()
    assert [p.subject_id for p in validate_records(records, ("HGG",), cache).problems] == ["a", "b"]
    assert opened == []  # a complete cache is trusted: no file is opened again


def test_check_names_a_copied_volume_under_two_ids_and_skip_invalid_leaves_both_out(tmp_path, capsys):
    scan = write_ellipsoid(tmp_path / "scan.nii.gz")
    copy = shutil.copy(scan, tmp_path / "copy.nii.gz")
    others = [write_ellipsoid(tmp_path / f"o{i}.nii.gz", seed=i + 1) for i in range(2)]
    manifest = write_manifest(tmp_path / "m.csv", "subject_id,label,path\n" + "".join(
        f"{sid},{label},{Path(path).name}\n"
        for sid, label, path in [("a", "HGG", scan), ("b", "HGG", copy), ("c", "HGG", others[0]),
                                 ("d", "LGG", others[1])]))
    assert main(["check", "--manifest", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert (f"  {scan}: the same voxels as subject b ({copy}) (one volume copied, linked or re-saved): "
            f"{SAME_SCAN_FIX} (subject a)") in out
    assert f"  {copy}: the same voxels as subject a ({scan}) " in out and "2 valid subjects: LGG 1, HGG 1" in out
    assert main(["check", "--manifest", str(manifest), "--skip-invalid"]) == 0
    assert "--skip-invalid: 2 subject(s) will be left out" in capsys.readouterr().out


def test_a_damaged_splits_file_is_named_with_the_way_out(tmp_path):
    from datasets.splits import SplitPlan

    damaged = tmp_path / "splits.json"
    damaged.write_text('{"scheme": "kfold", "n_splits": 3, "fol')
    with pytest.raises(ValueError, match=r"splits.json is damaged \(JSONDecodeError: .*\); delete it to draw the "
                                         r"splits again \(the same seed and data give the same splits\)"):
        SplitPlan.load(damaged)


def test_ixi_files_with_unexpected_names_are_named_when_left_out(tmp_path, caplog):
    from datasets.sources import discover_brats_ixi

    write_brats_tree(tmp_path, per_grade=1)
    write_ellipsoid(tmp_path / "IXI" / "IXI002-HH-1600-T1.nii.gz")
    write_ellipsoid(tmp_path / "IXI" / "IXI001-Guys-1211_T1.nii.gz", seed=1)  # underscore: not IXI's name
    with caplog.at_level(logging.WARNING):
        records = discover_brats_ixi(tmp_path)
    assert [r.subject_id for r in records if r.label == "Healthy"] == ["IXI002-HH-1600"]
    assert "left out: " in caplog.text and "IXI001-Guys-1211_T1.nii.gz" in caplog.text
    assert "IXI002-HH-1600-T1.nii.gz" not in caplog.text


def test_classes_select_a_subset_of_the_labels(phantom_root, tmp_path, caplog):
    """``--classes LGG,HGG`` trains LGG vs HGG: other labels are left out with a count, not refused."""
    records = discover_brats_ixi(phantom_root)
    manifest = tmp_path / "all.csv"
    pd.DataFrame({"subject_id": [r.subject_id for r in records], "label": [r.label for r in records],
                  "path": [r.paths[0] for r in records]}).to_csv(manifest, index=False)
    with caplog.at_level(logging.WARNING, logger="datasets.prepare"):
        data = prepare_data(DataSpec(manifest=str(manifest), classes=("hgg", "lgg")),
                            PreprocessConfig(spacing=12.0), SplitSpec(n_splits=2, val_fraction=0.25), tmp_path / "c")
    assert data.classes == ("HGG", "LGG")
    assert data.subjects["label"].value_counts().to_dict() == {"HGG": 8, "LGG": 8}
    assert "--classes HGG,LGG: leaving out 8 subject(s) with another label: Healthy (8)" in caplog.text
    # The subset's saved splits do not fit a run with all three classes: Healthy would be in no fold.
    splits = tmp_path / "splits.json"
    prepare_data(DataSpec(manifest=str(manifest), classes=("hgg", "lgg")), PreprocessConfig(spacing=12.0),
                 SplitSpec(n_splits=2, val_fraction=0.25), tmp_path / "c", splits_file=splits)
    with pytest.raises(ValueError, match=f"{splits} leaves out 8 subject\\(s\\) of this run's data \\(e.g. IXI.*\\): it was "
                                         "drawn for other data or --classes; delete it"):
        prepare_data(DataSpec(manifest=str(manifest)), PreprocessConfig(spacing=12.0),
                     SplitSpec(n_splits=2, val_fraction=0.25), tmp_path / "c", splits_file=splits)
    # On the BraTS/IXI tree itself IXI is not even discovered without the Healthy class: nothing to leave out.
    caplog.clear()
    tree = prepare_data(DataSpec(data_root=str(phantom_root), classes=("lgg", "hgg")),
                        PreprocessConfig(spacing=12.0), SplitSpec(n_splits=2, val_fraction=0.25), tmp_path / "c")
    assert tree.classes == ("LGG", "HGG") and set(tree.subjects["subject_id"]) == set(data.subjects["subject_id"])
    assert "leaving out" not in caplog.text


def test_classes_without_healthy_leave_ixi_out_of_discovery(phantom_root):
    # FLAIR beside IXI's T1 is refused as a contrast shortcut; without the Healthy class IXI is not read at all.
    with pytest.raises(ValueError, match="IXI provides T1 only"):
        discover_brats_ixi(phantom_root, ("flair",))
    records = discover_brats_ixi(phantom_root, ("flair",), classes=("LGG", "HGG"))
    assert {r.label for r in records} == {"LGG", "HGG"}
    assert all(r.paths[0].endswith("_flair.nii.gz") for r in records)
