"""Discovery of BraTS/IXI trees and CSV manifests."""
import pandas as pd
import pytest

from datasets.sources import class_order, discover_brats_ixi, read_manifest
from tests.conftest import write_ellipsoid


def test_discovers_brats_and_ixi_wherever_they_sit(tmp_path):
    write_ellipsoid(tmp_path / "a/b/MICCAI_BraTS_2019_Data_Training/HGG/S1/S1_t1ce.nii.gz")
    write_ellipsoid(tmp_path / "a/b/MICCAI_BraTS_2019_Data_Training/LGG/S2/S2_t1ce.nii.gz")
    write_ellipsoid(tmp_path / "elsewhere/IXI/IXI002-Guys-0828-T1.nii")
    write_ellipsoid(tmp_path / "elsewhere/IXI/IXI002-Guys-0828-T2.nii.gz")  # not T1: ignored
    records = {r.subject_id: r for r in discover_brats_ixi(tmp_path)}
    assert {k: r.label for k, r in records.items()} == {"S1": "HGG", "S2": "LGG", "IXI002-Guys-0828": "Healthy"}
    assert records["IXI002-Guys-0828"].paths[0].endswith("IXI002-Guys-0828-T1.nii")
    assert class_order(records.values()) == ("LGG", "HGG", "Healthy")


def test_several_contrasts_become_channels_and_a_missing_one_is_still_listed(tmp_path):
    write_ellipsoid(tmp_path / "HGG/S1/S1_t1ce.nii.gz")
    write_ellipsoid(tmp_path / "HGG/S1/S1_flair.nii.gz")
    write_ellipsoid(tmp_path / "LGG/S2/S2_t1ce.nii.gz")
    records = {r.subject_id: r for r in discover_brats_ixi(tmp_path, contrasts=("t1ce", "flair"))}
    assert [p.rsplit("_", 1)[1] for p in records["S1"].paths] == ["t1ce.nii.gz", "flair.nii.gz"]
    assert records["S2"].paths[1].endswith("S2_flair.nii.gz")  # validation will call it missing


def test_ixi_with_several_contrasts_is_refused(tmp_path):
    write_ellipsoid(tmp_path / "IXI/IXI002-Guys-0828-T1.nii.gz")
    with pytest.raises(ValueError, match="IXI provides T1 only"):
        discover_brats_ixi(tmp_path, contrasts=("t1ce", "flair"))


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No BraTS"):
        discover_brats_ixi(tmp_path)


def test_manifest_relative_paths_groups_and_channels(tmp_path):
    write_ellipsoid(tmp_path / "img/a_t1.nii.gz")
    write_ellipsoid(tmp_path / "img/a_t2.nii.gz")
    pd.DataFrame({"subject_id": ["a"], "label": ["methylated"], "path_t1": ["img/a_t1.nii.gz"],
                  "path_t2": ["img/a_t2.nii.gz"], "group": ["patient7"]}).to_csv(tmp_path / "m.csv", index=False)
    (record,) = read_manifest(tmp_path / "m.csv")
    assert record.paths == (str(tmp_path / "img/a_t1.nii.gz"), str(tmp_path / "img/a_t2.nii.gz"))
    assert record.group == "patient7" and record.label == "methylated"


def test_manifest_without_label_column_names_it(tmp_path):
    pd.DataFrame({"subject_id": ["a"], "path": ["x.nii.gz"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match="lacks column\\(s\\) label"):
        read_manifest(tmp_path / "m.csv")


def test_bet_output_is_preferred_to_the_raw_ixi_file_of_the_same_subject(tmp_path):
    write_ellipsoid(tmp_path / "IXI/IXI002-Guys-0828-T1.nii.gz")
    write_ellipsoid(tmp_path / "IXI/IXI002-Guys-0828-T1_brain.nii.gz")
    write_ellipsoid(tmp_path / "IXI/IXI012-HH-1211-T1.nii.gz")  # no stripped file: the raw one is used
    write_ellipsoid(tmp_path / "stripped/IXI013-IOP-0764-T1_brain.nii")  # BET's output alone, uncompressed
    records = {r.subject_id: r for r in discover_brats_ixi(tmp_path)}
    assert sorted(records) == ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-IOP-0764"]
    assert records["IXI002-Guys-0828"].paths == (str(tmp_path / "IXI/IXI002-Guys-0828-T1_brain.nii.gz"),)
    assert records["IXI012-HH-1211"].paths[0].endswith("IXI012-HH-1211-T1.nii.gz")
    assert records["IXI013-IOP-0764"].paths[0].endswith("IXI013-IOP-0764-T1_brain.nii")


def test_site_is_parsed_from_brats_and_ixi_ids_and_read_from_a_manifest(tmp_path):
    for grade, sid in (("HGG", "BraTS19_CBICA_AAB_1"), ("HGG", "BraTS19_2013_10_1"), ("LGG", "BraTS19_TCIA10_103_1"),
                       ("LGG", "Unusual")):
        write_ellipsoid(tmp_path / f"MICCAI_BraTS_2019_Data_Training/{grade}/{sid}/{sid}_t1ce.nii.gz")
    write_ellipsoid(tmp_path / "IXI/IXI002-Guys-0828-T1.nii.gz")
    write_ellipsoid(tmp_path / "IXI/IXI035-IOP-0873-T1.nii.gz")
    records = {r.subject_id: r for r in discover_brats_ixi(tmp_path)}
    assert {k: (r.source, r.site) for k, r in records.items()} == {
        "BraTS19_CBICA_AAB_1": ("brats", "CBICA"), "BraTS19_2013_10_1": ("brats", "2013"),
        "BraTS19_TCIA10_103_1": ("brats", "TCIA10"), "Unusual": ("brats", ""),
        "IXI002-Guys-0828": ("ixi", "Guys"), "IXI035-IOP-0873": ("ixi", "IOP")}
    pd.DataFrame({"subject_id": ["a", "b"], "label": ["x", "y"], "path": ["IXI/IXI002-Guys-0828-T1.nii.gz"] * 2,
                  "site": ["Leeds", ""]}).to_csv(tmp_path / "m.csv", index=False)
    assert [(r.source, r.site) for r in read_manifest(tmp_path / "m.csv")] == [("manifest", "Leeds"), ("manifest", "")]


def test_hidden_and_macosx_folders_are_not_subjects(tmp_path):
    """An unzipped archive's ``__MACOSX/HGG/<id>`` copy made the real id a duplicate; ``.ipynb_checkpoints`` under
    a grade folder became a subject without files. Both stopped the run."""
    write_ellipsoid(tmp_path / "HGG/BraTS19_A_1/BraTS19_A_1_t1ce.nii.gz")
    write_ellipsoid(tmp_path / "__MACOSX/HGG/BraTS19_A_1/BraTS19_A_1_t1ce.nii.gz")
    (tmp_path / "HGG/.ipynb_checkpoints").mkdir()
    write_ellipsoid(tmp_path / ".trash/IXI002-Guys-0828-T1.nii.gz")
    records = discover_brats_ixi(tmp_path)
    assert [(r.subject_id, r.paths) for r in records] == [
        ("BraTS19_A_1", (str(tmp_path / "HGG/BraTS19_A_1/BraTS19_A_1_t1ce.nii.gz"),))]


def test_a_capitalised_path_column_or_an_empty_path_cell_is_named(tmp_path):
    write_ellipsoid(tmp_path / "a.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,label,path_t1ce,Path_FLAIR\ns1,HGG,a.nii.gz,a.nii.gz\n")
    # Before: Path_FLAIR was not a channel, and the run trained on T1ce alone without a word.
    with pytest.raises(ValueError, match=r"column\(s\) Path_FLAIR look like input files but path columns are "
                                         r"spelled in lower case \(path, or path_<contrast>\); rename them"):
        read_manifest(manifest)
    manifest.write_text("subject_id,label,path_t1ce,path_flair\ns1,HGG,a.nii.gz,a.nii.gz\ns2,LGG,a.nii.gz,\n")
    # Before: the empty cell became the manifest's folder, reported as '-: not a NIfTI image'.
    with pytest.raises(ValueError, match=r"line\(s\) 3 have no file in column path_flair"):
        read_manifest(manifest)


@pytest.mark.parametrize("labels, expected", [
    (["Methylated", "Unmethylated"], ("Unmethylated", "Methylated")),  # sorted, Methylated came first
    (["METHYLATED", "unmethylated"], ("unmethylated", "METHYLATED")),
    (["tumour", "control"], ("control", "tumour")),                    # other labels: sorted, as documented
])
def test_mgmt_labels_in_any_case_keep_methylated_as_the_positive_second_class(labels, expected):
    from datasets.records import SubjectRecord

    records = [SubjectRecord(f"s{i}", label, ("x.nii.gz",), f"s{i}") for i, label in enumerate(labels)]
    assert class_order(records) == expected
