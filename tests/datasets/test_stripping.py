"""The skull-stripping check: unstripped files named with their figure, a mixed run refused before preprocessing."""
import json

import pytest

from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
from datasets.__main__ import main
from datasets.stripping import UnstrippedDataError
from tests.conftest import write_brats_tree, write_head


@pytest.fixture
def mixed_tree(tmp_path):
    """Stripped BraTS-like tumours, unstripped IXI-like heads: the confound of the real download."""
    root = tmp_path / "data"
    write_brats_tree(root, per_grade=4)
    heads = [write_head(root / f"IXI/IXI00{i}-HH-000{i}-T1.nii.gz", seed=i) for i in range(1, 5)]
    return root, heads


def test_check_names_each_unstripped_volume_with_its_figure_and_the_fix(mixed_tree, capsys):
    root, heads = mixed_tree
    assert main(["check", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "Skull stripping (exact-zero background): LGG 4/4 stripped, HGG 4/4 stripped, Healthy 0/4 stripped" in out
    for head in heads:
        line = next(l for l in out.splitlines() if str(head) in l)
        assert "background not zero (0% of the border voxels are 0" in line and "looks unstripped" in line
    assert "bet" in out and "--allow-unstripped" in out
    assert main(["check", "--data-root", str(root), "--allow-unstripped"]) == 0


def test_a_mixed_run_stops_before_preprocessing_and_explains_the_confound(mixed_tree, tmp_path):
    root, heads = mixed_tree
    cache = tmp_path / "cache"
    with pytest.raises(UnstrippedDataError) as error:
        prepare_data(DataSpec(data_root=str(root)), PreprocessConfig(spacing=8.0), SplitSpec(n_splits=3), cache,
                     cohort_file=tmp_path / "cohort.json")
    message = str(error.value)
    assert "mixed" in message and "confound" in message and "--allow-unstripped" in message
    assert all(str(h) in message for h in heads)
    assert sorted(p.name for p in cache.iterdir()) == ["validation.json"]  # nothing preprocessed
    assert not (tmp_path / "cohort.json").exists()


def test_allow_unstripped_goes_on_and_records_what_it_let_through(mixed_tree, tmp_path):
    root, heads = mixed_tree
    data = prepare_data(DataSpec(data_root=str(root), allow_unstripped=True), PreprocessConfig(spacing=8.0),
                        SplitSpec(n_splits=2, val_fraction=0.5), tmp_path / "cache")
    assert data.stripping["by_class"] == {"LGG": {"stripped": 4, "unstripped": 0}, "HGG": {"stripped": 4, "unstripped": 0},
                                          "Healthy": {"stripped": 0, "unstripped": 4}}
    assert sorted(u["path"] for u in data.stripping["unstripped"]) == sorted(str(h) for h in heads)
    subjects = data.subjects.set_index("subject_id")
    assert subjects.loc["IXI001-HH-0001", "stripped"] == False and subjects.loc["HGG0", "stripped"] == True  # noqa: E712
    assert list(subjects["site"].loc[["IXI001-HH-0001", "HGG0"]]) == ["HH", ""]
    json.dumps(data.stripping)  # plain data: saved in experiment.json as is


def test_a_run_without_any_stripped_volume_is_not_refused(tmp_path):
    root = tmp_path / "data"
    for i in range(4):
        write_head(root / f"HGG/H{i}/H{i}_t1ce.nii.gz", seed=i)
        write_head(root / f"LGG/L{i}/L{i}_t1ce.nii.gz", seed=10 + i)
    data = prepare_data(DataSpec(data_root=str(root)), PreprocessConfig(spacing=8.0),
                        SplitSpec(n_splits=2, val_fraction=0.5), tmp_path / "cache")
    assert len(data.stripping["unstripped"]) == 8
