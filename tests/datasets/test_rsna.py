"""RSNA-MICCAI 2021 (MGMT): discovery, labels, contrast names, the synthetic DICOM tree, and the tree through
check and prepare (validation failures named, --skip-invalid leaving subjects out)."""
import logging
import shutil
import tempfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from datasets.__main__ import main
from datasets.dicom import CACHE_DIRNAME
from datasets.prepare import DataSpec, PreprocessConfig, SplitSpec, check_data, load_records, prepare_data
from datasets.rsna import discover_rsna, find_rsna_layout, read_rsna_labels, rsna_sequences
from datasets.sources import class_order
from datasets.synthetic import synthesize_subject
from datasets.synthetic_rsna import mgmt_parameters, rsna_subject_ids, write_synthetic_rsna
from datasets.validation import InvalidDataError, require_valid


def _folders(root, ids, sequences=("FLAIR", "T1wCE")):
    for subject in ids:
        for sequence in sequences:
            (root / "train" / subject / sequence).mkdir(parents=True)


def _labels(root, rows, header="BraTS21ID,MGMT_value"):
    (root / "train_labels.csv").write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))


@pytest.fixture(scope="module")
def rsna_tree(tmp_path_factory):
    """12 phantoms (6 methylated), FLAIR (sagittal for every second subject) and T1wCE, 4x downsampled."""
    root = tmp_path_factory.mktemp("rsna")
    return write_synthetic_rsna(root, n_methylated=6, n_unmethylated=6, seed=5, downsample=4,
                                sequences=("flair", "t1wce"), sagittal=("flair",))


def test_zero_padded_folders_match_integer_ids_and_strays_are_named(tmp_path, caplog):
    _folders(tmp_path, ["00000", "00002", "00017", "00099"])
    _labels(tmp_path, [(0, 1), (2, 0), (17, 1), (5, 0)])
    caplog.set_level(logging.WARNING)
    for root in (tmp_path, tmp_path / "train"):  # the folder holding train/, or train/ itself
        records = discover_rsna(root, contrasts=("flair", "t1ce"))
        assert [(r.subject_id, r.label) for r in records] == [
            ("00000", "methylated"), ("00002", "unmethylated"), ("00017", "methylated")]
    record = records[0]
    assert record.paths == (str(tmp_path / "train/00000/FLAIR"), str(tmp_path / "train/00000/T1wCE"))
    assert (record.source, record.site, record.group) == ("rsna", "", "00000")
    assert "without a row in train_labels.csv: 00099" in caplog.text
    assert "row(s) of" in caplog.text and "without a subject folder" in caplog.text and "BraTS21ID 5" in caplog.text
    assert class_order(records) == ("unmethylated", "methylated")  # methylated second: the positive class


def test_contrast_names_are_aliased_case_insensitively_in_the_order_given(tmp_path):
    assert rsna_sequences(["T2", "flair", "T1CE", "t1w"]) == ("T2w", "FLAIR", "T1wCE", "T1w")
    assert rsna_sequences("t1ce") == ("T1wCE",)
    with pytest.raises(ValueError, match=r"--contrasts names T1wCE twice"):
        rsna_sequences(["t1ce", "T1wCE"])
    with pytest.raises(ValueError, match=r"--contrasts 'dwi' is not an RSNA-MICCAI sequence; use some of flair, t1w"):
        rsna_sequences(["dwi"])
    # Folders are found whatever their case; a missing one keeps its expected path for conversion to report.
    _folders(tmp_path, ["00003"], sequences=("t2w", "FLAIR"))
    _labels(tmp_path, [(3, 1)])
    (record,) = discover_rsna(tmp_path, contrasts=("T2", "t1ce"))
    assert record.paths == (str(tmp_path / "train/00003/t2w"), str(tmp_path / "train/00003/T1wCE"))


@pytest.mark.parametrize("rows, header, message", [
    ([(0, 1), (2, 2)], "BraTS21ID,MGMT_value", r"line 3 \(BraTS21ID 2\): MGMT_value '2' is not 0 or 1"),
    ([(0, 1), ("x7", 0)], "BraTS21ID,MGMT_value", r"line 3: BraTS21ID 'x7' is not a whole number"),
    ([(0, 1), ("000", 0)], "BraTS21ID,MGMT_value", r"line 3: BraTS21ID 0 is listed again \(first on line 2\)"),
    ([(0, 1)], "BraTS21ID,label", r"lacks column\(s\) MGMT_value; it has BraTS21ID, label"),
])
def test_bad_label_rows_are_errors_naming_the_line(tmp_path, rows, header, message):
    _labels(tmp_path, rows, header)
    with pytest.raises(ValueError, match=message):
        read_rsna_labels(tmp_path / "train_labels.csv")


def test_rsna_trees_without_labels_are_explained(tmp_path):
    _folders(tmp_path, ["00000"])
    with pytest.raises(FileNotFoundError, match=r"holds RSNA-MICCAI subject folders .* no train_labels.csv"):
        find_rsna_layout(tmp_path)
    _labels(tmp_path, [(0, 1)])
    (tmp_path / "test" / "00001" / "T2w").mkdir(parents=True)  # the release's unlabelled part
    assert find_rsna_layout(tmp_path).train_dir == tmp_path / "train"
    with pytest.raises(FileNotFoundError, match=r"test/ part has no labels"):
        find_rsna_layout(tmp_path / "test")
    (tmp_path / "HGG" / "BraTS19_x_1").mkdir(parents=True)
    assert find_rsna_layout(tmp_path / "HGG") is None  # not RSNA: BraTS/IXI discovery takes it
    (tmp_path / "train").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"has train_labels.csv but no train/ folder beside it"):
        find_rsna_layout(tmp_path)


def test_synthetic_tree_layout_labels_and_phantom_classes(rsna_tree, tmp_path):
    labels = pd.read_csv(rsna_tree / "train_labels.csv")
    assert list(labels["BraTS21ID"]) == rsna_subject_ids(12) == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17]
    assert sorted(labels["MGMT_value"]) == [0] * 6 + [1] * 6
    assert sorted(p.name for p in (rsna_tree / "train").iterdir())[:3] == ["00000", "00002", "00003"]
    flair = sorted((rsna_tree / "train/00002/FLAIR").glob("*.dcm"))
    assert len(flair) == 60 and {p.name for p in flair} == {f"Image-{k}.dcm" for k in range(1, 61)}  # sagittal
    assert len(list((rsna_tree / "train/00000/T1wCE").glob("*.dcm"))) == 39  # axial, 155 mm / 4
    # The phantom property: a methylated lesion has a smaller necrotic core and a weaker T1wCE rim.
    hgg = mgmt_parameters(5, 0, "unmethylated").lesion
    methylated = mgmt_parameters(5, 0, "methylated").lesion
    assert methylated.core_fraction < hgg.core_fraction
    assert methylated.appearance["t1ce"].tumour < hgg.appearance["t1ce"].tumour
    assert methylated.appearance["flair"] == hgg.appearance["flair"]
    # Same arguments, same bytes.
    small = [write_synthetic_rsna(tmp_path / name, 1, 1, seed=2, downsample=8, sequences=("t2w",), sagittal=("t2",))
             for name in ("a", "b")]
    files = sorted(p.relative_to(small[0]) for p in small[0].rglob("*") if p.is_file())
    assert len(files) == 1 + 19 + 30  # labels, an axial and a sagittal T2w series
    assert all((small[0] / f).read_bytes() == (small[1] / f).read_bytes() for f in files)


def test_converted_series_lands_on_the_phantom_in_world_coordinates(rsna_tree, tmp_path):
    """The sagittal FLAIR of subject 00002 (the tree's second), mapped back through the phantom's RAS affine."""
    spec = DataSpec(data_root=str(rsna_tree), contrasts=("flair",))
    report = check_data(spec, tmp_path)
    record = next(r for r in report.valid if r.subject_id == "00002")
    nifti = nib.load(record.paths[0])
    assert nib.aff2axcodes(nifti.affine) == ("P", "I", "R")
    phantom = synthesize_subject(mgmt_parameters(5, 1, record.label), ["flair"], 4)
    data = np.asarray(nifti.dataobj)
    index = np.argwhere(data > 0)
    back = np.linalg.solve(phantom.affine, nifti.affine @ np.c_[index, np.ones(len(index))].T)[:3]
    assert np.abs(back - np.rint(back)).max() < 1e-4
    assert np.array_equal(phantom.images["flair"][tuple(np.rint(back).astype(int))], data[tuple(index.T)])
    assert len(index) == int(phantom.brain_mask.sum())


def test_synthetic_tree_through_prepare_data(rsna_tree, tmp_path):
    spec = DataSpec(data_root=str(rsna_tree / "train"), contrasts=("flair", "t1ce"))
    prepared = prepare_data(spec, PreprocessConfig(spacing=16), SplitSpec("kfold", 2), tmp_path, num_workers=1)
    assert prepared.classes == ("unmethylated", "methylated")
    table = prepared.cached.table
    assert len(table) == 12 and set(table["source"]) == {"rsna"} and set(table["site"]) == {""}
    assert table["subject_id"].tolist()[:3] == ["00000", "00002", "00003"]
    assert prepared.cached.meta["channels"] == 2
    volumes = prepared.cached.volumes()
    assert volumes.shape[:2] == (12, 2) and 0 <= volumes.min() and volumes.max() <= 1
    assert len(list((tmp_path / CACHE_DIRNAME).glob("*.nii.gz"))) == 24
    assert [len(fold.test) for fold in prepared.plan.folds] == [6, 6]


def test_check_cli_on_the_synthetic_tree(rsna_tree, tmp_path, capsys, monkeypatch):
    # Without --cache-dir, conversions go to a per-user folder of the temporary directory.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["check", "--data-root", str(rsna_tree), "--folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "12 valid subjects: unmethylated 6, methylated 6" in out
    assert "invalid" not in out
    assert len(list(tmp_path.glob(f"{CACHE_DIRNAME}-*/00000_T1wCE.*.nii.gz"))) == 1  # the default --contrasts t1ce


def test_each_broken_series_is_named_and_skip_invalid_leaves_its_subject_out(rsna_tree, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(rsna_tree, root)
    train = root / "train"
    labels = pd.read_csv(root / "train_labels.csv").set_index("BraTS21ID")["MGMT_value"]
    # Two subjects of each class, so that both classes keep enough subjects for two folds.
    by_class = {value: [f"{i:05d}" for i in labels.index if labels[i] == value] for value in (0, 1)}
    missing, mixed = by_class[0][:2]
    few, unreadable = by_class[1][:2]
    shutil.rmtree(train / missing / "T1wCE")
    for path in sorted((train / by_class[0][2] / "T1wCE").glob("*.dcm"))[:3]:
        shutil.copyfile(path, train / mixed / "T1wCE" / f"Extra-{path.name}")
    for path in (train / few / "T1wCE").glob("*.dcm"):
        if int(path.stem.split("-")[1]) > 5:
            path.unlink()
    (train / unreadable / "T1wCE" / "Image-3.dcm").write_bytes(b"not a DICOM file")

    report = check_data(DataSpec(data_root=str(root), contrasts=("t1ce",)), tmp_path / "cache")
    reasons = {p.subject_id: (p.path, p.reason) for p in report.problems}
    assert set(reasons) == {missing, mixed, few, unreadable}
    assert reasons[missing] == (str(train / missing / "T1wCE"),
                                "sequence T1wCE: missing sequence folder (the subject has FLAIR)")
    assert reasons[mixed][1].startswith("sequence T1wCE: mixed series, 2 SeriesInstanceUIDs in one folder")
    assert reasons[few][1].startswith("sequence T1wCE: too few slices (5; at least 10 expected")
    assert reasons[unreadable][1].startswith("sequence T1wCE: unreadable DICOM file Image-3.dcm (1 of 39 files")
    assert report.counts == {"unmethylated": 4, "methylated": 4}
    with pytest.raises(InvalidDataError, match=f"{train / few / 'T1wCE'}: sequence T1wCE: too few slices"):
        require_valid(report, skip_invalid=False)
    assert len(require_valid(report, skip_invalid=True)) == 8

    assert main(["check", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert "8 valid subjects: unmethylated 4, methylated 4" in out and "4 invalid:" in out
    assert f"  {train / mixed / 'T1wCE'}: sequence T1wCE: mixed series" in out and f"(subject {mixed})" in out
    assert main(["check", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--skip-invalid"]) == 0
    assert "--skip-invalid: 4 subject(s) will be left out" in capsys.readouterr().out

    # 4 subjects per class are left: too few for two k-fold folds' inner parts, enough for two shuffle splits.
    spec = DataSpec(data_root=str(root), contrasts=("t1ce",), skip_invalid=True)
    prepared = prepare_data(spec, PreprocessConfig(spacing=16), SplitSpec("shuffle", 2, test_size=0.25),
                            tmp_path / "cache", num_workers=1)
    assert sorted(prepared.excluded) == sorted([missing, mixed, few, unreadable])
    assert not set(prepared.cached.table["subject_id"]) & set(prepared.excluded)
    assert len(prepared.cached.table) == 8


def test_load_records_tells_rsna_from_brats(rsna_tree, phantom_root):
    assert {r.source for r in load_records(DataSpec(data_root=str(rsna_tree)))} == {"rsna"}
    assert {r.source for r in load_records(DataSpec(data_root=str(phantom_root)))} == {"brats", "ixi"}
