"""Malformed experiment directories fail with errors naming the file and the column."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.load import load_experiment


def _edit_csv(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df)
    df.to_csv(path, index=False)


def test_loads_fixture_and_selects_paper_rows(paper_dir):
    exp = load_experiment(paper_dir)
    assert exp.classes == ["HGG", "LGG", "Healthy"]
    assert exp.predictions["pretrained"].dtype == bool
    assert exp.predictions["fold"].dtype.kind == "i"
    assert exp.main_selection()[:2] == ("experiment", "paper")
    assert exp.main_arms() == [("r3d_18", True), ("mc3_18", False), ("mc3_18", True)]  # the paper's order


def test_config_id_stays_text(paper_dir):
    # an id that looks like a number must not become a float
    _edit_csv(paper_dir / "predictions.csv", lambda df: df.__setitem__("config_id", "1e5"))
    exp = load_experiment(paper_dir)
    assert set(exp.predictions["config_id"]) == {"1e5"}


def test_missing_predictions_names_the_file(paper_dir):
    (paper_dir / "predictions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="predictions.csv"):
        load_experiment(paper_dir)


def test_missing_experiment_json_names_the_file(paper_dir):
    (paper_dir / "experiment.json").unlink()
    with pytest.raises(FileNotFoundError, match="experiment.json"):
        load_experiment(paper_dir)


@pytest.mark.parametrize("edit, words", [
    (lambda df: df.__delitem__("prob_Healthy"), ["predictions.csv", "prob_Healthy"]),
    (lambda df: df.__delitem__("subject_id"), ["predictions.csv", "subject_id"]),
    (lambda df: df.__setitem__("fold", "first"), ["predictions.csv", "'fold'", "first"]),
    (lambda df: df.__setitem__("pretrained", "maybe"), ["predictions.csv", "'pretrained'", "maybe"]),
    (lambda df: df.loc.__setitem__((0, "label"), "Meningioma"), ["predictions.csv", "'label'", "Meningioma"]),
    (lambda df: df.loc.__setitem__((0, "prob_HGG"), "0.9"), ["predictions.csv", "sum to"]),
    (lambda df: df.loc.__setitem__((2, "prob_HGG"), "nan"),
     ["predictions.csv", "column 'prob_HGG' row 4 is 'nan', not a number (a trial that diverged?)"]),
    (lambda df: df.loc.__setitem__((2, "prob_HGG"), ""), ["predictions.csv", "column 'prob_HGG' row 4 is empty"]),
    (lambda df: df.loc.__setitem__((1, "subject_id"), df.loc[0, "subject_id"]), ["predictions.csv", "more than once"]),
])
def test_malformed_predictions(paper_dir, edit, words):
    _edit_csv(paper_dir / "predictions.csv", edit)
    with pytest.raises(ValueError) as info:
        load_experiment(paper_dir)
    for word in words:
        assert word in str(info.value)


def test_malformed_trials_and_epochs(paper_dir):
    _edit_csv(paper_dir / "trials.csv", lambda df: df.__setitem__("n_test", "ten"))
    with pytest.raises(ValueError, match=r"trials.csv.*'n_test'"):
        load_experiment(paper_dir)


def test_malformed_epochs(paper_dir):
    _edit_csv(paper_dir / "epochs.csv", lambda df: df.__setitem__("epoch", "1.5"))
    with pytest.raises(ValueError, match=r"epochs.csv.*'epoch'"):
        load_experiment(paper_dir)


def test_bad_classes_in_experiment_json(paper_dir):
    meta = json.loads((paper_dir / "experiment.json").read_text())
    meta["classes"] = ["HGG"]
    (paper_dir / "experiment.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"experiment.json.*'classes'"):
        load_experiment(paper_dir)


def test_optional_files_missing_become_notes(paper_dir):
    (paper_dir / "epochs.csv").unlink()
    (paper_dir / "trials.csv").unlink()
    exp = load_experiment(paper_dir)
    assert exp.epochs is None and exp.trials is None
    assert any("epochs.csv" in n for n in exp.notes) and any("trials.csv" in n for n in exp.notes)


def test_all_failed_run_with_key_only_headers_loads(paper_dir):
    # every trial failed: the orchestrator writes header-only tables, possibly with the key columns only
    keys = "experiment,model,pretrained,fold,config_id,trial_name\n"
    (paper_dir / "predictions.csv").write_text(keys)
    (paper_dir / "epochs.csv").write_text(keys)
    exp = load_experiment(paper_dir)
    assert exp.predictions.empty and "prob_LGG" in exp.predictions.columns
    assert exp.epochs is not None and exp.epochs.empty


def test_missing_trial_rows_with_blank_fields_load(partial_dir):
    exp = load_experiment(partial_dir)
    blank = exp.trials[exp.trials["status"] == "MISSING"]
    assert len(blank) == 3 and blank["pretrained"].isna().all() and blank["fold"].isna().all()
