"""collect: the experiment tables from finished trials' final checkpoints (real ``tune.Checkpoint`` folders written
as a fold writes them; no Ray run needed), validation predictions included, older checkpoints without them too."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from ray import tune

from trainables.collect import KEY_COLUMNS, collect, write_tables
from trainables.ray_trainable import trial_name

CLASSES = ["Healthy", "tumour"]


def finished_trial(folder: Path, fold: int, with_validation: bool) -> SimpleNamespace:
    """A Tune result whose final checkpoint holds a finished fold's output files (val_predictions.csv optional)."""
    folder.mkdir(parents=True)
    config = {"model": "mc3_18", "pretrained": False, "fold": fold, "lr": 1e-4, "_experiment": "paper"}
    subjects = {"train": [f"a{fold}"], "val": [f"v{fold}-0", f"v{fold}-1"], "test": [f"t{fold}-0", f"t{fold}-1"]}
    (folder / "result.json").write_text(json.dumps({"epochs_run": 1, "best_epoch": 1, "best_val_macro_f1": 0.5,
                                                    "n_train": 1, "n_val": 2, "n_test": 2, "subjects": subjects}))
    pd.DataFrame({"epoch": [1], "train_loss": [0.7], "val_loss": [0.6]}).to_csv(folder / "epochs.csv", index=False)

    def table(ids: list[str], tumour: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"subject_id": ids, "label": ["Healthy", "tumour"],
                             "pred": [CLASSES[int(p > 0.5)] for p in tumour],
                             "prob_Healthy": [1 - p for p in tumour], "prob_tumour": tumour})

    table(subjects["test"], [0.2, 0.9]).to_csv(folder / "predictions.csv", index=False)
    if with_validation:
        table(subjects["val"], [0.3, 0.6]).to_csv(folder / "val_predictions.csv", index=False)
    return SimpleNamespace(config=config, metrics={"node_id": "n", "hostname": "h"}, error=None,
                           checkpoint=tune.Checkpoint(str(folder)))


def test_collect_writes_validation_predictions_with_the_keys_of_predictions(tmp_path):
    new = finished_trial(tmp_path / "new", fold=0, with_validation=True)
    old = finished_trial(tmp_path / "old", fold=1, with_validation=False)  # written before folds saved them
    subjects = pd.DataFrame({"subject_id": ["t0-0", "t0-1", "t1-0", "t1-1", "v0-0", "v0-1"],
                             "source": ["ixi", "brats", "ixi", "brats", "ixi", "brats"],
                             "site": ["Guys", "", "HH", "", "IOP", ""]})
    tables = collect([[new, old]], subjects=subjects)
    write_tables(tables, tmp_path)
    val = pd.read_csv(tmp_path / "val_predictions.csv", dtype={"subject_id": str, "site": str}, keep_default_na=False)
    test = pd.read_csv(tmp_path / "predictions.csv", dtype={"subject_id": str, "site": str}, keep_default_na=False)
    assert list(val.columns) == list(test.columns) == [*KEY_COLUMNS, "subject_id", "label", "pred", "prob_Healthy",
                                                      "prob_tumour", "source", "site"]
    # Only the trial that saved them; its keys are those of its test rows.
    assert list(val["subject_id"]) == ["v0-0", "v0-1"] and list(val["prob_tumour"]) == [0.3, 0.6]
    assert set(val["trial_name"]) == {trial_name(new.config)}
    assert val[KEY_COLUMNS].drop_duplicates().values.tolist() == \
        test[test["fold"] == 0][KEY_COLUMNS].drop_duplicates().values.tolist()
    assert list(val["source"]) == ["ixi", "brats"] and list(val["site"]) == ["IOP", ""]
    assert sorted(test["subject_id"]) == ["t0-0", "t0-1", "t1-0", "t1-1"]  # the older trial's test rows still count
    assert list(pd.read_csv(tmp_path / "trials.csv")["status"]) == ["TERMINATED", "TERMINATED"]


def test_a_run_whose_trials_saved_no_validation_predictions_writes_a_header_only_table(tmp_path):
    tables = collect([[finished_trial(tmp_path / "old", fold=0, with_validation=False)]])
    write_tables(tables, tmp_path)
    assert (tmp_path / "val_predictions.csv").read_text().strip() == ",".join(KEY_COLUMNS)
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 2


def test_a_finished_trial_whose_final_checkpoint_lost_a_file_is_named_with_the_file_and_the_fix(tmp_path):
    """Its last report says the fold finished, but a file of its final checkpoint was deleted since."""
    trial = finished_trial(tmp_path / "ckpt", fold=0, with_validation=True)
    trial.metrics["fold_finished"] = True
    (tmp_path / "ckpt" / "best_weights.pt").write_bytes(b"weights")
    assert list(collect([[trial]])["trials"]["status"]) == ["TERMINATED"]
    (tmp_path / "ckpt" / "predictions.csv").unlink()
    (row,) = collect([[trial]])["trials"].to_dict("records")
    assert row["status"] == "INCOMPLETE" and row["checkpoint"] == ""
    assert row["error"].startswith(f"LostFinalCheckpoint: {trial_name(trial.config)} finished, but its final "
                                   f"checkpoint {tmp_path / 'ckpt'} lacks predictions.csv (deleted?)")
    assert "Fix: rerun the same command with the same --output" in row["error"]
    # Not reported finished (stopped by Ctrl-C before its end): INCOMPLETE without an error, as before.
    trial.metrics["fold_finished"] = False
    assert collect([[trial]])["trials"]["error"].tolist() == [""]


def test_one_configuration_trained_twice_on_a_fold_is_collected_once_preferring_the_finished_trial(tmp_path, caplog):
    """A study's enqueued grid point can be trained twice (a driver died between the Optuna and Tune saves): two
    trials share a name, and rows under both would count the fold's test subjects twice."""
    unfinished = finished_trial(tmp_path / "a", fold=0, with_validation=True)
    unfinished.metrics.update(trial_id="aaaa", fold_finished=False)
    (tmp_path / "a" / "result.json").unlink()  # stopped before its end: no outputs
    finished = finished_trial(tmp_path / "b", fold=0, with_validation=True)
    finished.metrics.update(trial_id="bbbb", fold_finished=True)
    other = finished_trial(tmp_path / "c", fold=1, with_validation=True)
    with caplog.at_level("WARNING", logger="trainables.collect"):
        tables = collect([[unfinished, other], [finished]])
    assert sorted(tables["trials"]["status"]) == ["TERMINATED", "TERMINATED"]
    assert tables["trials"]["trial_name"].is_unique
    assert len(tables["predictions"]) == 4 and tables["predictions"].groupby("trial_name").size().tolist() == [2, 2]
    assert f"Two Tune trials are named {trial_name(finished.config)}" in caplog.text
    assert "keep Tune trial bbbb, not aaaa" in caplog.text
    # Of two finished ones, the smaller Tune trial id, whatever the order they come in.
    unfinished_too = finished_trial(tmp_path / "d", fold=0, with_validation=True)
    unfinished_too.metrics.update(trial_id="0000", fold_finished=True)
    (tmp_path / "d" / "predictions.csv").write_text("subject_id,label,pred,prob_Healthy,prob_tumour\n"
                                                     "t0-0,Healthy,Healthy,0.99,0.01\nt0-1,tumour,tumour,0.01,0.99\n")
    kept = collect([[finished, unfinished_too]])["predictions"]
    assert kept["prob_tumour"].tolist() == [0.01, 0.99]
