"""Ray Tune orchestration end to end on tiny phantoms (Ray with 2 CPUs, no GPU).

These tests run real Ray Tune, Optuna and TorchIO; they are the slowest of the suite (~3 min).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from torchvision.models.video import r2plus1d_18

import tune_main
from models import weights_filename
from search_spaces import PAPER_DEFAULTS

REPO = Path(__file__).resolve().parents[2]
TINY = ["--spacing", "16", "--epochs", "1", "--set", "batch_size=4", "--no-report"]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A Kinetics-400 state dict with torchvision's exact layout (random values: no download here)."""
    folder = tmp_path_factory.mktemp("kinetics")
    torch.save(r2plus1d_18(weights=None, num_classes=400).state_dict(), folder / weights_filename("r2plus1d_18"))
    return folder


@pytest.fixture(scope="module")
def grid_run(phantom_root, weights_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "out"
    argv = ["--experiment", "paper", "--data-root", str(phantom_root), "--output", str(out), "--models", "r2plus1d_18",
            "--pretrained", "both", "--weights-dir", str(weights_dir), "--folds", "2", *TINY]
    assert tune_main.main(argv) == 0
    return out, argv


def tune_run(out: Path, kind: str) -> Path:
    """The experiment's own Tune run of ``kind`` (``<storage>/<kind>-<run_id>``), as OUT/experiment.json records it."""
    run_id = json.loads((out / "experiment.json").read_text())["run_id"]
    path = json.loads((out / "experiment.json").read_text())["tune_runs"][kind]
    assert run_id and path == f"{out}/ray/{kind}-{run_id}"
    return Path(path)


def trial_folders(storage: Path) -> list[Path]:
    return sorted(p for p in storage.iterdir() if p.is_dir() and (p / "params.json").is_file())


def test_grid_runs_one_trial_per_model_pretraining_and_fold(grid_run, phantom_root):
    out, _ = grid_run
    trials = pd.read_csv(out / "trials.csv")
    assert sorted(zip(trials["pretrained"], trials["fold"])) == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert set(trials["status"]) == {"TERMINATED"}
    assert set(trials["loss"]) == {"class_weighted_per_sample"}  # what the report's "What ran" says
    predictions = pd.read_csv(out / "predictions.csv")
    splits = json.loads((out / "splits.json").read_text())
    for (pretrained, fold), rows in predictions.groupby(["pretrained", "fold"]):
        assert sorted(rows["subject_id"]) == sorted(splits["folds"][fold]["test"])
    # Each trial's validation part, scored with its chosen weights, collected beside the test predictions.
    val_predictions = pd.read_csv(out / "val_predictions.csv")
    assert list(val_predictions.columns) == list(predictions.columns)
    for (pretrained, fold), rows in val_predictions.groupby(["pretrained", "fold"]):
        assert sorted(rows["subject_id"]) == sorted(splits["folds"][fold]["val"])
    assert sorted(set(val_predictions["trial_name"])) == sorted(trials["trial_name"])
    assert list(predictions.columns[:9]) == ["experiment", "model", "pretrained", "fold", "config_id", "trial_name",
                                             "subject_id", "label", "pred"]
    assert np.allclose(predictions[["prob_LGG", "prob_HGG", "prob_Healthy"]].sum(axis=1), 1, atol=1e-5)
    record = json.loads((out / "experiment.json").read_text())
    assert sorted(record["planned_trials"]) == sorted(trials["trial_name"])
    assert record["classes"] == ["LGG", "HGG", "Healthy"]
    assert record["channel_names"] == ["t1ce"]  # what prediction compares a new manifest's path columns with


def test_a_run_records_source_site_cohort_and_fits_the_baselines_on_the_same_folds(grid_run):
    out, _ = grid_run
    subjects = pd.read_csv(out / "subjects.csv", dtype={"site": str}, keep_default_na=False)
    predictions = pd.read_csv(out / "predictions.csv", dtype={"site": str}, keep_default_na=False)
    site_of = dict(zip(subjects["subject_id"], subjects["site"]))
    assert [site_of[s] for s in predictions["subject_id"]] == list(predictions["site"])
    healthy = predictions["label"] == "Healthy"
    assert set(predictions.loc[healthy, "source"]) == {"ixi"} and set(predictions.loc[~healthy, "source"]) == {"brats"}
    assert set(predictions.loc[healthy, "site"]) <= {"Guys", "HH", "IOP"} and "" not in set(predictions["site"])
    assert subjects["stripped"].all()
    record = json.loads((out / "experiment.json").read_text())
    assert record["stripping"]["unstripped"] == [] and record["register"] == "none"
    assert record["cohort"]["drawn"] == record["cohort"]["available"] == {"LGG": 8, "HGG": 8, "Healthy": 8}
    baselines = pd.read_csv(out / "baseline_predictions.csv")
    splits = json.loads((out / "splits.json").read_text())
    for (model, fold), rows in baselines.groupby(["model", "fold"]):
        assert sorted(rows["subject_id"]) == sorted(splits["folds"][fold]["test"])
    assert sorted(baselines["model"].unique()) == ["acquisition_baseline", "histogram_baseline"]


def test_unstripped_healthy_is_refused_then_allowed_drawn_and_reported(tmp_path, capsys):
    """IXI heads as downloaded beside stripped BraTS: stopped before Ray; with --allow-unstripped, said at the top."""
    from datasets.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "raw", n_hgg=8, n_lgg=8, n_healthy=11, seed=4, downsample=4, ixi="raw")
    out = tmp_path / "out"
    argv = ["--experiment", "paper", "--data-root", str(root), "--output", str(out), "--models", "mc3_18",
            "--pretrained", "none", "--folds", "2", *[a for a in TINY if a != "--no-report"]]
    assert tune_main.main(argv) == 2
    err = capsys.readouterr().err
    assert "Skull-stripped and unstripped volumes are mixed" in err and "IXI001-Guys" in err
    assert not (out / "ray").exists() and not (out / "experiment.json").exists()

    allowed = [*argv, "--allow-unstripped", "--max-per-class", "Healthy=8"]
    assert tune_main.main(allowed) == 0
    cohort = json.loads((out / "cohort.json").read_text())
    assert len(cohort["subjects"]["Healthy"]) == 8 and cohort["available"]["Healthy"] == 11
    subjects = pd.read_csv(out / "subjects.csv")
    assert (subjects["label"] == "Healthy").sum() == 8
    assert set(subjects.loc[subjects["label"] == "Healthy", "subject_id"]) == set(cohort["subjects"]["Healthy"])
    assert not subjects.loc[subjects["label"] == "Healthy", "stripped"].any()
    top, what_ran = (out / "report" / "report.md").read_text().split("## What ran")[:2]
    assert "--allow-unstripped" in top
    assert "Loss: the class weights W_c = 1 − n_c/N of the fold's training part weigh each sample's" in what_ran
    before = (out / "cohort.json").read_text()
    assert tune_main.main(allowed) == 0  # resumed: the same draw, nothing retrained
    assert (out / "cohort.json").read_text() == before


def test_trials_get_cpu_only_resources_without_a_gpu(grid_run):
    out, _ = grid_run
    for folder in trial_folders(tune_run(out, "paper")):
        params = json.loads((folder / "params.json").read_text())
        assert params["model"] == "r2plus1d_18" and "gpu" not in json.dumps(params)
    state = next((tune_run(out, "paper")).glob("experiment_state*.json")).read_text()
    assert '"GPU": 0' not in state and "'GPU'" not in state.replace("'GPU': 0", "")


def test_trials_get_a_gpu_share_where_the_cluster_has_a_gpu(tmp_path):
    """Four trials per device by default: Ray counts the GPU (declared here, as a GPU node reports it)."""
    import ray

    from trainables.experiment import ExperimentConfig
    from trainables.tuning import trial_resources

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)  # its own, even beside another
    try:
        assert trial_resources(ExperimentConfig(output=str(tmp_path))) == {"cpu": 1.0, "gpu": 0.25}
        assert trial_resources(ExperimentConfig(output=str(tmp_path), gpus_per_trial=0.5, cpus_per_trial=4)) == \
            {"cpu": 4, "gpu": 0.5}
    finally:
        ray.shutdown()


@pytest.mark.parametrize("share", [0, -0.5, 1.5, 2])
def test_a_gpu_share_outside_zero_to_one_is_refused(tmp_path, share):
    """A trial trains on one device: two GPUs for it would sit half idle, so a whole number above 1 is refused too."""
    from trainables.experiment import ExperimentConfig

    with pytest.raises(ValueError, match=r"--gpus-per-trial must be in \(0, 1\] \(a trial uses one GPU"):
        ExperimentConfig(output=str(tmp_path), gpus_per_trial=share)
    assert ExperimentConfig(output=str(tmp_path), gpus_per_trial=1).gpus_per_trial == 1


def test_tensorboard_tags_read_back_from_event_files(grid_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = grid_run
    folder = trial_folders(tune_run(out, "paper"))[0]
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for metric in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_f1_LGG", "val_f1_HGG", "val_f1_Healthy", "lr"):
        assert f"ray/tune/{metric}" in tags
    assert events.Scalars("ray/tune/lr")[0].value == pytest.approx(PAPER_DEFAULTS["lr"])
    # The HParams dashboard's records (written by Ray's TensorBoard logger when the trial ends).
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))
    assert folder.name.startswith("r2plus1d_18-")  # readable trial names


def test_rerunning_a_finished_experiment_runs_nothing_again(grid_run):
    out, argv = grid_run
    before = {p.name: (p / "progress.csv").read_text() for p in trial_folders(tune_run(out, "paper"))}
    assert tune_main.main(argv) == 0
    after = {p.name: (p / "progress.csv").read_text() for p in trial_folders(tune_run(out, "paper"))}
    assert after == before
    assert len(pd.read_csv(out / "trials.csv")) == 4


def test_resume_reads_the_saved_options_and_runs_nothing_again(grid_run, capsys):
    out, _ = grid_run
    before = {p.name: (p / "progress.csv").read_text() for p in trial_folders(tune_run(out, "paper"))}
    assert tune_main.main(["--resume", "--output", str(out), "--no-report"]) == 0
    printed = capsys.readouterr().out
    assert '"experiment": "paper"' in printed and '"epochs": 1' in printed and '"batch_size": 4' in printed
    assert {p.name: (p / "progress.csv").read_text() for p in trial_folders(tune_run(out, "paper"))} == before
    assert tune_main.main(["--resume", "--output", str(out), "--epochs", "5"]) == 2
    assert "other options (epochs)" in capsys.readouterr().err


def test_resume_without_a_saved_experiment_says_so(tmp_path, capsys):
    assert tune_main.main(["--resume", "--output", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "experiment.json is missing" in err


def test_a_binary_manifest_runs_end_to_end_with_its_own_labels(phantom_root, tmp_path, capsys):
    """Any label set from a CSV manifest: here tumour vs healthy, through training, predictions and report."""
    rows = [{"subject_id": p.name.split("_t1ce")[0], "label": "tumour", "path": str(p)}
            for p in sorted(phantom_root.rglob("*_t1ce.nii.gz"))]
    rows += [{"subject_id": p.name.split("-T1")[0], "label": "healthy", "path": str(p)}
             for p in sorted(phantom_root.rglob("IXI*-T1.nii*"))]
    manifest = tmp_path / "binary.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    out = tmp_path / "binary"
    argv = ["--experiment", "paper", "--manifest", str(manifest), "--classes", "healthy,tumour", "--output", str(out),
            "--models", "mc3_18", "--pretrained", "none", "--folds", "2", *[a for a in TINY if a != "--no-report"]]
    assert tune_main.main(argv) == 0
    # The positive class of the two-class scores is said before training, with how to change it.
    assert "classes Healthy, tumour (positive: tumour; --classes sets the order)" in capsys.readouterr().out
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == len(rows)  # every subject tested once over the two folds
    # Labels matching a paper class whatever their case take the paper's spelling (here and in --classes).
    assert [c for c in predictions.columns if c.startswith("prob_")] == ["prob_Healthy", "prob_tumour"]
    assert set(predictions["label"]) == {"Healthy", "tumour"}
    per_class = pd.read_csv(out / "report" / "tables" / "per_class.csv")
    assert set(per_class["class"]) == {"Healthy", "tumour"}
    overall = pd.read_csv(out / "report" / "tables" / "overall.csv")
    macro = overall[overall["metric"] == "macro_f1"].iloc[0]
    f1 = per_class[per_class["metric"] == "f1"]
    assert macro["pooled"] == pytest.approx(f1["pooled"].mean())  # macro F1 = mean of the two classes' F1
    # Two classes: sensitivity/specificity also at each fold's threshold chosen on its validation part.
    from analysis.binary import youden_threshold

    thresholds = pd.read_csv(out / "report" / "tables" / "thresholds.csv")
    val_predictions = pd.read_csv(out / "val_predictions.csv")
    assert sorted(thresholds["fold"]) == [0, 1]
    for row in thresholds.itertuples():  # each from its own trial's validation rows, none missing
        part = val_predictions[val_predictions["trial_name"] == row.trial_name]
        assert row.n_val == len(part) > 0
        assert (row.threshold, row.chosen_by) == youden_threshold(part["label"] == "tumour", part["prob_tumour"])
    report = (out / "report" / "report.md").read_text()
    assert "chosen by Youden's J (sensitivity + specificity - 1, from scikit-learn roc_curve)" in report
    assert "Sensitivity (validation threshold)" in report
    # Started in another class order (as a version that ordered these labels otherwise would have): continuing
    # would score its checkpoints' outputs with the classes swapped, so the rerun stops before Ray starts.
    record_file = out / "experiment.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "classes": ["tumour", "Healthy"]}))
    capsys.readouterr()
    assert tune_main.main(argv) == 2
    assert (f"error: {out} was started with the classes tumour, Healthy, but its data now gives Healthy, tumour: its "
            "checkpoints' outputs follow the first") in capsys.readouterr().err


def test_a_resumed_run_keeps_the_class_order_it_was_started_with(phantom_root, tmp_path):
    """Without --classes the order comes from experiment.json, so a version that orders the same labels otherwise
    (MGMT labels in any case, since 2026-11-25) continues an older run in that run's order."""
    from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data

    config = tune_main.config_from_args(tune_main.build_parser().parse_args(
        ["--experiment", "paper", "--data-root", str(phantom_root), "--output", str(tmp_path / "out")]))
    assert tune_main.recorded_classes(config) is None  # a new experiment
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "experiment.json").write_text(json.dumps({"classes": ["HGG", "Healthy", "LGG"]}))
    recorded = tune_main.recorded_classes(config)
    assert recorded == ["HGG", "Healthy", "LGG"]
    data = prepare_data(DataSpec(str(phantom_root), classes=config.classes or recorded), PreprocessConfig(spacing=16.0),
                        SplitSpec(n_splits=2), tmp_path / "cache", num_workers=1)
    assert data.classes == ("HGG", "Healthy", "LGG")
    assert tune_main.class_order_problem(recorded, data.classes, tmp_path) is None
    assert tune_main.class_order_problem(recorded, ("LGG", "HGG", "Healthy"), tmp_path).startswith(
        f"{tmp_path} was started with the classes HGG, Healthy, LGG, but its data now gives LGG, HGG, Healthy")


def test_changed_options_on_the_same_output_are_refused(grid_run, capsys):
    out, argv = grid_run
    assert tune_main.main([*argv, "--seed", "9"]) == 2
    assert "other options (seed)" in capsys.readouterr().err


def test_missing_kinetics_weights_stop_the_run_before_training(phantom_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    code = tune_main.main(["--experiment", "paper", "--data-root", str(phantom_root), "--output", str(tmp_path / "o"),
                           "--models", "mc3_18", "--pretrained", "kinetics", "--weights-dir", str(tmp_path / "none")])
    assert code == 2
    assert "mc3_18-a90a0ba3.pth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_set_option_is_named(phantom_root, tmp_path, capsys):
    assert tune_main.main(["--experiment", "paper", "--data-root", str(phantom_root), "--set", "learning_rate=1"]) == 2
    assert "--set learning_rate: not a training option" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be positive (a trial needs a CPU to drive it), got 0"),
    (["--max-concurrent", "0"], "--max-concurrent must be at least 1 (leave it out for no cap), got 0"),
    (["--folds", "1"], "--folds must be at least 2 for --split kfold, got 1"),
    (["--split", "shuffle", "--folds", "0"], "--folds must be at least 1 for --split shuffle, got 0"),
    (["--set", "augmentation=medium"], "augmentation must be one of none, light, heavy, got 'medium'"),
    (["--set", "lr=abc"], "lr must be a number, got 'abc'"),
])
def test_bad_options_stop_before_any_file_is_read_or_written(phantom_root, tmp_path, capsys, options, message):
    out = tmp_path / "never"
    argv = ["--experiment", "paper", "--data-root", str(phantom_root), "--output", str(out), "--pretrained", "none"]
    assert tune_main.main([*argv, *options]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_output_that_is_a_file_or_read_only_and_a_damaged_record_are_named(phantom_root, tmp_path, capsys):
    argv = ["--experiment", "paper", "--data-root", str(phantom_root), "--pretrained", "none"]
    a_file = tmp_path / "afile"
    a_file.write_text("")
    assert tune_main.main([*argv, "--output", str(a_file)]) == 2
    assert f"--output {a_file}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert tune_main.main([*argv, "--output", str(a_file / "sub")]) == 2  # its would-be parent is the file
    assert f"--output {a_file / 'sub'}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert tune_main.main([*argv, "--output", str(tmp_path / "out"), "--cache-dir", str(a_file)]) == 2
    assert f"--cache-dir {a_file}: {a_file} is a file" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "experiment.json").write_text('{"options": {,}')
    assert tune_main.main([*argv, "--output", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"{damaged / 'experiment.json'} is damaged (not valid JSON:" in err and "another --output" in err
    assert tune_main.main(["--resume", "--output", str(damaged)]) == 2
    assert "is damaged (not valid JSON" in capsys.readouterr().err


def test_results_without_their_experiment_record_are_not_trained_over(phantom_root, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "ray" / "paper-1a2b3c4d").mkdir(parents=True)
    (out / "optuna").mkdir()
    (out / "optuna" / "search.db").write_bytes(b"")
    assert tune_main.main(["--experiment", "paper", "--data-root", str(phantom_root), "--pretrained", "none",
                           "--output", str(out)]) == 2
    assert (f"{out} holds an earlier experiment's results (optuna/search.db, ray/paper-1a2b3c4d) but no "
            "experiment.json, which records its options: restore that file") in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["optuna", "ray"]  # nothing written


def test_a_read_only_output_is_refused_before_any_data_is_read(monkeypatch, phantom_root, tmp_path, capsys):
    # As on a read-only mount: os.access says no (root passes permission bits, so the answer is stood in for).
    read_only = tmp_path / "ro"
    read_only.mkdir()
    monkeypatch.setattr(tune_main.os, "access", lambda path, mode: Path(path) != read_only)
    assert tune_main.main(["--experiment", "paper", "--data-root", str(phantom_root), "--pretrained", "none",
                           "--output", str(read_only / "run")]) == 2
    assert f"--output {read_only / 'run'} cannot be written ({read_only} is read-only for this user)" in \
        capsys.readouterr().err
    assert not (read_only / "run").exists()


def test_a_missing_data_root_is_named(tmp_path, capsys):
    assert tune_main.main(["--experiment", "paper", "--data-root", str(tmp_path / "brats"), "--pretrained", "none"]) == 2
    assert f"--data-root {tmp_path / 'brats'}: no such folder" in capsys.readouterr().err


def logged_finished(storage: Path) -> list[Path]:
    """Trial folders whose progress.csv (written by the driver) records the fold as finished."""
    done = []
    for progress in storage.glob("*/progress.csv"):
        try:
            rows = pd.read_csv(progress)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            continue  # being written
        if "fold_finished" in rows and rows["fold_finished"].astype(str).eq("True").any():
            done.append(progress.parent)
    return done


def recorded_terminated(storage: Path) -> list[Path]:
    """Trial folders that Tune's saved experiment state records as TERMINATED: what a restore honours.

    Tune logs a result (progress.csv) before it registers that result's checkpoint and marks the trial
    done; a Ctrl-C between the two leaves the last epoch to be recomputed from the previous checkpoint.
    """
    from ray.tune import ExperimentAnalysis

    return [Path(t.path) for t in ExperimentAnalysis(str(storage.resolve())).trials if t.status == "TERMINATED"]


def _search_argv(phantom_root, out):
    return ["--experiment", "search", "--data-root", str(phantom_root), "--output", str(out), "--models", "r2plus1d_18",
            "--pretrained", "none", "--folds", "2", "--num-samples", "2", "--max-concurrent", "2",
            "--spacing", "16", "--epochs", "2", "--set", "batch_size=4", "--no-report"]


def fold_studies(out: Path) -> dict[str, optuna.Study]:
    url = f"sqlite:///{out / 'optuna' / 'search.db'}"
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=url)
            for s in optuna.get_all_study_summaries(url)}


def test_nested_search_interrupted_and_resumed_runs_each_trial_once_in_its_fold_study(phantom_root, tmp_path):
    out = tmp_path / "search"
    argv = _search_argv(phantom_root, out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "tune_main.py", *argv], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "experiment.json").is_file():  # written before Ray starts
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    storage = tune_run(out, "search")
    # Interrupt soon after one trial has logged its last epoch (the others are running or pending),
    # leaving Tune a moment to register that trial's checkpoint and mark it done.
    while time.time() < deadline and not logged_finished(storage):
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "rerun the same command" in output
    assert "test F1" not in output and "test_macro_f1" not in output  # no peeking while it runs
    finished_first = {folder.name: (folder / "progress.csv").read_text() for folder in recorded_terminated(storage)}
    assert 1 <= len(finished_first) < 4

    assert tune_main.main(argv) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and trials["trial_name"].is_unique and set(trials["status"]) == {"TERMINATED"}
    for name, progress in finished_first.items():
        assert (storage / name / "progress.csv").read_text() == progress  # not run again
    assert len(trial_folders(storage)) == 4

    studies = fold_studies(out)
    assert sorted(studies) == ["r2plus1d_18-scratch-fold0", "r2plus1d_18-scratch-fold1"]
    record = json.loads((out / "experiment.json").read_text())
    assert record["search_design"] == "nested"
    assert sorted(s["study_name"] for s in record["optuna_studies"]) == sorted(studies)
    for fold in (0, 1):
        study = studies[f"r2plus1d_18-scratch-fold{fold}"]
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(study.trials) == len(complete) == 2  # neither lost nor duplicated by the Ctrl-C
        assert complete[0].params == {k: PAPER_DEFAULTS[k] for k in ("lr", "weight_decay", "dropout", "aug_strength")}
        fold_trials = trials[trials["fold"] == fold]
        # Each study was told exactly its own fold's scores, no mean over folds.
        assert sorted(t.value for t in complete) == pytest.approx(sorted(fold_trials["best_val_macro_f1"]))
    # Every candidate of fold k trained and validated on fold k's training part only (checked against splits.json).
    splits = json.loads((out / "splits.json").read_text())["folds"]
    used = pd.read_csv(out / "trial_subjects.csv")
    assert set(used["trial_name"]) == set(trials["trial_name"])
    for row in trials.itertuples():
        mine = used[used["trial_name"] == row.trial_name]
        assert sorted(mine.loc[mine["part"] == "test", "subject_id"]) == sorted(splits[row.fold]["test"])
        assert not set(mine.loc[mine["part"].isin(["train", "val"]), "subject_id"]) & set(splits[row.fold]["test"])


def _search_with_grid_scores(config, phantom_root: Path, known: dict):
    """``run_search`` of the config's one model (scratch) on 2 folds at 16 mm, each fold study handed ``known``."""
    import ray

    from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
    from trainables.tuning import run_search

    out = config.output_path
    data = prepare_data(DataSpec(data_root=str(phantom_root)), PreprocessConfig(spacing=16.0), SplitSpec(n_splits=2),
                        out / "cache", splits_file=out / "splits.json", num_workers=1)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        return run_search(config, data, {"cpu": 1}, [(config.models[0], False)], known)
    finally:
        ray.shutdown()


def test_a_search_after_the_grid_hands_each_fold_study_its_grid_score(grid_run, phantom_root):
    """As in the demo: every fold study records the grid's score of that fold and trains only new suggestions."""
    from trainables.experiment import ExperimentConfig

    out, _ = grid_run
    config = ExperimentConfig(experiment="demo", output=str(out), models=("r2plus1d_18",), pretrained="none",
                              folds=2, spacing=16.0, epochs=1, num_samples=2, overrides={"batch_size": 4})
    known = {("r2plus1d_18", False, 0): (0.4321, "grid-f0"), ("r2plus1d_18", False, 1): (0.1234, "grid-f1")}
    grid = _search_with_grid_scores(config, phantom_root, known)
    assert sorted(result.config["fold"] for result in grid) == [0, 1]  # one new suggestion per fold study
    for fold, value in ((0, 0.4321), (1, 0.1234)):
        study = fold_studies(out)[f"r2plus1d_18-scratch-fold{fold}"]
        values = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert values[0] == value and study.trials[0].params["lr"] == PAPER_DEFAULTS["lr"]
        (new,) = [r for r in grid if r.config["fold"] == fold]
        assert len(values) == 2 and values[1] == pytest.approx(new.metrics["val_macro_f1_best"])
    # experiment.json names the grid trial each study was handed when it was created, not whatever the grid holds
    # on a later run (a grid trial that failed then and finished since was never handed over).
    later = {("r2plus1d_18", False, 0): (0.9, "grid-f0-rerun"), ("r2plus1d_18", False, 1): (0.9, "grid-f1-rerun")}
    from trainables.tuning import search_studies
    studies = search_studies(config, [("r2plus1d_18", False)], 2, later)
    assert [s["grid_trial"] for s in studies] == ["grid-f0", "grid-f1"]


def test_a_search_without_augmentation_keeps_the_strength_fixed(phantom_root, tmp_path):
    """aug_strength changes nothing without augmentation: its studies do not search it, and trials run the constant."""
    from trainables.experiment import ExperimentConfig

    out = tmp_path / "out"
    config = ExperimentConfig(experiment="search", output=str(out), data_root=str(phantom_root),
                              models=("mc3_18",), pretrained="none", folds=2, spacing=16.0, epochs=1, num_samples=2,
                              overrides={"batch_size": 4, "augmentation": "none"})
    grid = _search_with_grid_scores(config, phantom_root,
                                    {("mc3_18", False, 0): (0.5, "grid-f0"), ("mc3_18", False, 1): (0.5, "grid-f1")})
    assert {(r.config["augmentation"], r.config["aug_strength"]) for r in grid} == {("none", PAPER_DEFAULTS["aug_strength"])}
    for study in fold_studies(out).values():
        assert all(set(t.params) == {"lr", "weight_decay", "dropout"} for t in study.trials)


def test_run_paths_keep_a_storage_uri_intact(tmp_path):
    from trainables.experiment import ExperimentConfig
    from trainables.tuning import experiment_path

    assert experiment_path(ExperimentConfig(output=str(tmp_path), storage="s3://bucket/runs/"), "paper") == "s3://bucket/runs/paper"
    assert experiment_path(ExperimentConfig(output=str(tmp_path)), "search-mc3_18-scratch") == f"{tmp_path}/ray/search-mc3_18-scratch"


def test_run_names_carry_the_run_id_and_experiments_saved_without_one_keep_the_bare_names(tmp_path):
    from trainables.experiment import ExperimentConfig
    from trainables.tuning import GRID_RUN, SEARCH_RUN, run_path

    shared = ExperimentConfig(output=str(tmp_path / "a"), storage="s3://bucket/runs/", run_id="ab12cd34")
    assert run_path(shared, GRID_RUN) == "s3://bucket/runs/paper-ab12cd34"
    assert run_path(shared, SEARCH_RUN) == "s3://bucket/runs/search-ab12cd34"
    legacy = ExperimentConfig(output=str(tmp_path / "b"))
    assert (run_path(legacy, GRID_RUN), run_path(legacy, SEARCH_RUN)) == (f"{tmp_path}/b/ray/paper", f"{tmp_path}/b/ray/search")


def test_a_run_id_is_made_once_read_back_and_absent_for_old_experiments(tmp_path):
    from trainables.experiment import ExperimentConfig

    fresh = ExperimentConfig(output=str(tmp_path / "new"))
    tune_main.assign_run_id(fresh)
    other = ExperimentConfig(output=str(tmp_path / "other"))
    tune_main.assign_run_id(other)
    assert len(fresh.run_id) == 8 and int(fresh.run_id, 16) >= 0 and fresh.run_id != other.run_id
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "experiment.json").write_text(json.dumps({"options": {**fresh.to_dict(), "output": str(saved)}}))
    resumed = ExperimentConfig(output=str(saved))
    tune_main.assign_run_id(resumed)
    assert resumed.run_id == fresh.run_id
    (saved / "experiment.json").write_text(json.dumps({"options": {"experiment": "paper", "output": str(saved)}}))
    tune_main.assign_run_id(resumed)
    assert resumed.run_id is None and resumed.tune_run_name("paper") == "paper"


def test_storage_counts_as_an_option_and_no_storage_means_out_ray(tmp_path):
    from trainables.experiment import ExperimentConfig

    config = ExperimentConfig(output=str(tmp_path))
    saved = config.to_dict()
    assert config.differences({**saved, "storage": str(tmp_path / "ray")}) == []
    assert config.differences({**saved, "storage": "/shared/runs"}) == ["storage"]
    assert ExperimentConfig(output=str(tmp_path), storage="s3://b/runs/").differences({**saved, "storage": "s3://b/runs"}) == []
    assert config.differences({**saved, "address": "auto", "gpus_per_trial": 1.0}) == []  # execution only


def test_a_retrain_run_is_recorded_in_experiment_json_and_the_tensorboard_command(phantom_root, tmp_path, capsys):
    """A finished trial's final checkpoint deleted: the rerun trains it again in <run>-retrain-1, and experiment.json
    written after the runs lists that run (trainables.predict's fallback reads the checkpoints from there), as does
    the TensorBoard command, which names each run in a shared --storage."""
    import shutil

    from trainables.predict import load_run, tune_checkpoints

    out, storage = tmp_path / "out", tmp_path / "shared"
    argv = ["--experiment", "paper", "--data-root", str(phantom_root), "--output", str(out), "--storage", str(storage),
            "--models", "mc3_18", "--pretrained", "none", "--folds", "2", *TINY]
    assert tune_main.main(argv) == 0
    run_id = json.loads((out / "experiment.json").read_text())["run_id"]
    paper = f"{storage}/paper-{run_id}"
    assert f"TensorBoard: tensorboard --logdir_spec paper:{paper}\n" in capsys.readouterr().out
    trials = pd.read_csv(out / "trials.csv")
    lost_name, lost_checkpoint = trials["trial_name"].iloc[0], trials["checkpoint"].iloc[0]
    shutil.rmtree(lost_checkpoint)

    assert tune_main.main(argv) == 0
    runs = {"paper": paper, "paper-retrain-1": f"{paper}-retrain-1"}
    assert json.loads((out / "experiment.json").read_text())["tune_runs"] == runs
    assert (f"TensorBoard: tensorboard --logdir_spec paper:{paper},paper-retrain-1:{paper}-retrain-1\n"
            in capsys.readouterr().out)
    retrained = pd.read_csv(out / "trials.csv").set_index("trial_name")["checkpoint"][lost_name]
    assert retrained.startswith(f"{paper}-retrain-1/")
    # Tune's own records, run by run in experiment.json's order: the retrained trial's checkpoint wins.
    assert tune_checkpoints(load_run(out))[lost_name] == retrained


def test_more_cpus_per_trial_than_ray_sees_is_refused_after_it_starts(tmp_path):
    """os.cpu_count() counts the machine; Ray counts a container's CPU quota (here: a Ray given one CPU), and a
    trial asking for more would wait forever. tune_main asks the running Ray before any trial is started."""
    import ray

    from trainables.experiment import ExperimentConfig

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        asks = {cpus: tune_main.cpu_shortfall(ExperimentConfig(experiment="paper", output=str(tmp_path),
                                                               cpus_per_trial=cpus)) for cpus in (1.0, 2.0)}
    finally:
        ray.shutdown()
    assert asks == {1.0: None, 2.0: "--cpus-per-trial 2: Ray sees at most 1 CPU(s) on this machine (its CPU quota), so "
                                    "no trial could start (it would wait for the CPUs forever); give at most 1"}
