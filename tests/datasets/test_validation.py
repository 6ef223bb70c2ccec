"""``python -m datasets check`` on a tree with planted bad files: each is named with its reason."""
import gzip
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from datasets.__main__ import main
from datasets.records import SubjectRecord
from datasets.validation import InvalidDataError, check_volume, require_valid, validate_records
from tests.conftest import write_ellipsoid


@pytest.fixture
def planted_tree(tmp_path):
    root = tmp_path / "data"
    # Distinct seeds: two subjects with the very same volume are refused as one scan under two ids.
    for seed, sid in enumerate(("H1", "H2")):
        write_ellipsoid(root / f"HGG/{sid}/{sid}_t1ce.nii.gz", seed=seed)
    write_ellipsoid(root / "LGG/L1/L1_t1ce.nii.gz", seed=2)
    write_ellipsoid(root / "IXI/IXI001-HH-0001-T1.nii.gz", seed=3)
    good = (root / "HGG/H1/H1_t1ce.nii.gz").read_bytes()
    bad = {}
    bad["truncated"] = root / "HGG/T1/T1_t1ce.nii.gz"
    bad["truncated"].parent.mkdir(parents=True)
    bad["truncated"].write_bytes(good[: len(good) // 2])
    bad["notnifti"] = root / "HGG/N1/N1_t1ce.nii.gz"
    bad["notnifti"].parent.mkdir(parents=True)
    bad["notnifti"].write_bytes(gzip.compress(b"this is a text file, not an image" * 20))
    bad["empty"] = root / "LGG/E1/E1_t1ce.nii.gz"
    bad["empty"].parent.mkdir(parents=True)
    bad["empty"].write_bytes(b"")
    bad["4d"] = root / "LGG/F1/F1_t1ce.nii.gz"
    bad["4d"].parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), str(bad["4d"]))
    bad["nan"] = root / "LGG/NA/NA_t1ce.nii.gz"
    bad["nan"].parent.mkdir(parents=True)
    data = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad["nan"]))
    bad["constant"] = root / "IXI/IXI002-HH-0002-T1.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 6, 6), 3.0, np.float32), np.eye(4)), str(bad["constant"]))
    bad["zscored"] = root / "LGG/Z1/Z1_t1ce.nii.gz"  # normalised over the brain: half of it below zero
    write_ellipsoid(bad["zscored"])
    image = nib.load(str(bad["zscored"]))
    brain = np.asarray(image.dataobj)
    brain[brain != 0] = (brain[brain != 0] - brain[brain != 0].mean()) / brain[brain != 0].std()
    nib.save(nib.Nifti1Image(brain, image.affine), str(bad["zscored"]))
    bad["missing"] = root / "LGG/M1/M1_t1ce.nii.gz"
    bad["missing"].parent.mkdir(parents=True)  # folder without its file
    return root, bad


REASONS = {"truncated": "unreadable or truncated", "notnifti": "not a NIfTI image", "empty": "empty file",
           "4d": "not 3-D", "nan": "non-finite voxels", "constant": "constant image", "missing": "file not found",
           "zscored": "% of the non-zero voxels are negative: the intensities look normalised already"}


def test_check_names_every_bad_file_and_fails(planted_tree, capsys):
    root, bad = planted_tree
    assert main(["check", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "4 valid subjects: LGG 1, HGG 2, Healthy 1" in out
    assert "8 invalid:" in out
    for kind, path in bad.items():
        line = next(l for l in out.splitlines() if str(path) in l)
        assert REASONS[kind] in line, (kind, line)


def test_skip_invalid_lists_and_exits_zero(planted_tree, capsys):
    root, _ = planted_tree
    assert main(["check", "--data-root", str(root), "--skip-invalid"]) == 0
    assert "8 subject(s) will be left out" in capsys.readouterr().out


def test_duplicate_ids_and_unknown_labels_from_a_manifest(tmp_path, capsys, caplog):
    a, b = write_ellipsoid(tmp_path / "a.nii.gz"), write_ellipsoid(tmp_path / "b.nii.gz", seed=1)
    pd.DataFrame({"subject_id": ["s1", "s1", "s2", "s3"], "label": ["yes", "yes", "maybe", "no"],
                  "path": [a.name, a.name, a.name, b.name]}).to_csv(tmp_path / "m.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="datasets.prepare"):
        assert main(["check", "--manifest", str(tmp_path / "m.csv"), "--classes", "yes,no"]) == 1
    out = capsys.readouterr().out
    assert out.count("duplicate subject id (2 entries) (subject s1)") == 2
    # --classes selects: the subject of another label is left out with a count, not reported as a problem
    assert "--classes yes,no: leaving out 1 subject(s) with another label: maybe (1)" in caplog.text
    assert "maybe" not in out
    assert "1 valid subjects: yes 0, no 1" in out
    # A label outside the classes given to validation itself is still a problem of that subject.
    report = validate_records([SubjectRecord("s2", "maybe", (str(a),), "s2")], ("yes", "no"))
    assert report.problems[0].reason == "unknown label 'maybe' (expected one of yes, no)"


def test_training_refuses_invalid_data_unless_told(planted_tree):
    from datasets.sources import discover_brats_ixi

    root, _ = planted_tree
    report = validate_records(discover_brats_ixi(root), ("LGG", "HGG", "Healthy"))
    with pytest.raises(InvalidDataError, match="pass --skip-invalid"):
        require_valid(report, skip_invalid=False)
    assert len(require_valid(report, skip_invalid=True)) == 4


def test_results_are_cached_per_file_and_rechecked_when_it_changes(tmp_path):
    path = write_ellipsoid(tmp_path / "x.nii.gz")
    record = SubjectRecord("x", "HGG", (str(path),), "x")
    cache = tmp_path / "validation.json"
    assert validate_records([record], ("HGG",), cache).ok
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4)), str(path))  # now constant
    report = validate_records([record], ("HGG",), cache)
    assert report.problems[0].reason.startswith("constant image")


def test_a_good_volume_has_no_problem(tmp_path):
    assert check_volume(write_ellipsoid(tmp_path / "ok.nii.gz")) is None


@pytest.mark.parametrize("negative, reason", [(3, "30% of the non-zero voxels are negative"), (1, None)])
def test_an_already_normalised_volume_is_refused_by_its_share_of_negative_voxels(tmp_path, negative, reason):
    """10 non-zero voxels in a 6^3 box, ``negative`` of them below zero: 30% is a normalised brain, 10% (the
    limit, as interpolation ringing may leave) is not."""
    data = np.zeros((6, 6, 6), np.float32)
    data[1, 1:, 1:3] = 50.0  # 10 voxels
    data[1, 1:1 + negative, 1] = -5.0
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    problem = check_volume(path)
    assert (problem is None) if reason is None else problem.startswith(reason), problem


def test_a_valid_verdict_cached_before_the_normalisation_check_is_redone(tmp_path, monkeypatch):
    """The validation cache trusts a "valid" entry of its own version; one written before the check existed
    (version 5) would let a z-scored volume through on every rerun."""
    import json

    from datasets import validation

    path = tmp_path / "HGG/Z1/Z1_t1ce.nii.gz"
    write_ellipsoid(path)
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    data[data != 0] -= data[data != 0].mean()
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    records = [SubjectRecord("Z1", "HGG", (str(path),), "Z1")]
    cache = tmp_path / "validation.json"
    monkeypatch.setattr(validation, "NEGATIVE_SHARE_LIMIT", 1.0)  # as the check before version 6 saw it
    assert validate_records(records, ("HGG",), cache).valid
    monkeypatch.undo()
    written = json.loads(cache.read_text())
    assert written["version"] == validation.CHECK_VERSION == 7
    cache.write_text(json.dumps({**written, "version": 5}))
    problems = validate_records(records, ("HGG",), cache).problems
    assert len(problems) == 1 and "of the non-zero voxels are negative" in problems[0].reason


def test_the_foreground_box_is_in_world_mm_through_the_affine():
    """Voxels 2-4, 3-8 and 1 along the three axes (edges 1.5-4.5, 2.5-8.5, 0.5-1.5), 2 mm voxels; then with the
    first axis running the other way (x = 30 - 2 i), as in an LPS-stored volume: the box's low corner comes from the
    high voxel edge."""
    from datasets.validation import foreground_box_mm

    data = np.zeros((10, 12, 8), np.float32)
    data[2:5, 3:9, 1] = 7.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 0.0]
    assert foreground_box_mm(affine, data) == [-7.0, 10.0, 1.0, -1.0, 22.0, 3.0]
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, 30.0
    # x = 30 - 2 i: edges i = 1.5 and 4.5 give x 27 and 21, and the box runs from the smaller
    assert foreground_box_mm(flipped, data) == [21.0, 10.0, 1.0, 27.0, 22.0, 3.0]
    # the array reversed along i as well: voxels 5-7, edges 4.5-7.5, x from 15 to 21
    assert foreground_box_mm(flipped, data[::-1].copy()) == [15.0, 10.0, 1.0, 21.0, 22.0, 3.0]


@pytest.mark.parametrize("first, second, share", [
    ([0, 0, 0, 10, 10, 10], [5, 0, 0, 15, 10, 10], 0.5),  # half of either
    ([0, 0, 0, 10, 10, 10], [2, 2, 2, 4, 4, 4], 1.0),  # nested: all of the smaller one
    ([0, 0, 0, 10, 10, 10], [5, 5, 5, 25, 25, 25], 125 / 1000),  # an eighth of the smaller one
    ([0, 0, 0, 10, 10, 10], [10, 0, 0, 20, 10, 10], 0.0),  # touching faces share no volume
])
def test_box_overlap_is_the_share_of_the_smaller_box(first, second, share):
    from datasets.validation import box_overlap

    assert box_overlap(first, second) == pytest.approx(share)
    assert box_overlap(second, first) == pytest.approx(share)


def _second_channel(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine), str(path))
    return path


@pytest.mark.parametrize("variant", ["origin moved 100 mm", "stored flipped", "half the slices", "same grid"])
def test_a_channel_its_header_places_away_from_the_first_is_refused_by_name(tmp_path, variant):
    """Channel 2 of a two-contrast subject: placed 100 mm off (an origin reset) it is refused, naming its file; stored
    in another axis order, or covering half the brain (a slab), or on the same grid, it is not."""
    first = write_ellipsoid(tmp_path / "S1_t1.nii.gz", seed=0)
    image = nib.load(str(first))
    data = np.asarray(image.dataobj) * 0.5 + 20 * (np.asarray(image.dataobj) > 0)  # another contrast, same brain
    affine = image.affine.copy()
    if variant == "origin moved 100 mm":
        affine[:3, 3] += 100.0
    elif variant == "stored flipped":  # the first axis reversed in the array and in the affine: the same place
        affine[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)
        affine[:3, 0] *= -1
        data = data[::-1]
    elif variant == "half the slices":  # the slab's own header places it where those slices are
        data = data[:, :, 5:15]
        affine[:3, 3] += affine[:3, 2] * 5
    second = _second_channel(tmp_path / "S1_flair.nii.gz", data, affine)
    report = validate_records([SubjectRecord("S1", "HGG", (str(first), str(second)), "S1")], ("HGG",))
    if variant == "origin moved 100 mm":
        assert not report.valid and len(report.problems) == 1
        problem = report.problems[0]
        assert problem.path == str(second) and problem.subject_id == "S1"
        assert problem.reason.startswith(f"channel 2's brain lies elsewhere in world space than channel 1's ({first})")
        assert "share 0% of the smaller one" in problem.reason and "fslcpgeom" in problem.reason
    else:
        assert report.ok and [r.subject_id for r in report.valid] == ["S1"], report.format()
