"""The command line as a new user meets it: bad values are refused at once, naming the option and the fix.

Every case here stops before any data is read or Ray starts (seconds, no training).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import tune_main
from trainables.experiment import ExperimentConfig


@pytest.fixture
def paper_argv(tmp_path) -> list[str]:
    data = tmp_path / "data"
    data.mkdir()  # discovery happens after the checks below: an empty folder is enough
    return ["--experiment", "paper", "--data-root", str(data), "--output", str(tmp_path / "out"),
            "--models", "mc3_18", "--pretrained", "none"]


def refused(argv: list[str], capsys) -> str:
    assert tune_main.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    # Out of numpy's seed range: the splits failed after preprocessing, or every trial in its worker (FAILED).
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967, got -1"),
    (["--seed", "4294967296"], "--seed must be a whole number from 0 to 4294967, got 4294967296"),
    (["--seed", "4294968"], "--seed must be a whole number from 0 to 4294967, got 4294968"),
    (["--set", "seed=-1"], "--set seed must be a whole number from 0 to 4294967, got -1"),
    # resolve_config's messages name the key only: the option that set it is named too.
    (["--epochs", "0"], "--epochs: epochs must be positive, got 0"),
    (["--patience", "0"], "--patience: patience must be at least 1"),
    (["--set", "lr=-1"], "--set lr: lr must be positive, got -1"),
    (["--set", "dropout=1.5"], "--set dropout: dropout must be in [0, 1), got 1.5"),
    (["--set", "batch_size=0"], "--set batch_size: batch_size must be positive, got 0"),
    # An empty comma list ran the default classes instead of refusing (--classes ,), or said "unknown []".
    (["--classes", ","], "--classes ',' names nothing; give a comma list, e.g. --classes LGG,HGG"),
    (["--models", ","], "--models ',' names nothing; give a comma list, e.g. --models mc3_18"),
    (["--contrasts", ""], "--contrasts '' names nothing; give a comma list, e.g. --contrasts t1ce"),
    # An unknown contrast listed every subject's missing <id>_t9.nii.gz (or blamed IXI for "T9 tumours").
    (["--contrasts", "t9"], "--contrasts: unknown t9; BraTS has t1, t1ce, t2, flair, RSNA-MICCAI flair, t1w, t1wce, t2w"),
    # ray.init raised "ValueError: Invalid address format: headnode" after the preprocessing, as a traceback.
    (["--address", "headnode", "--storage", "s3://bucket/runs"],
     "--address headnode: not a Ray cluster address; give the head node's HOST:PORT"),
    (["--address", "10.0.0.1:", "--storage", "s3://bucket/runs"], "--address 10.0.0.1:: not a Ray cluster address"),
])
def test_bad_values_are_refused_before_anything_is_written(paper_argv, tmp_path, capsys, options, message):
    assert message in refused([*paper_argv, *options], capsys)
    assert not (tmp_path / "out").exists()


def test_a_seed_within_range_for_the_splits_only_is_accepted_with_a_training_seed_of_its_own(paper_argv):
    tune_main.config_from_args(tune_main.build_parser().parse_args([*paper_argv, "--seed", "5000000", "--set", "seed=3"]))
    with pytest.raises(ValueError, match="--seed must be a whole number from 0 to 4294967"):
        tune_main.config_from_args(tune_main.build_parser().parse_args([*paper_argv, "--seed", "5000000"]))


def test_a_file_or_folder_of_the_wrong_kind_is_named_as_such(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    argv = ["--experiment", "paper", "--output", str(tmp_path / "out"), "--pretrained", "none"]
    assert f"--data-root {a_file}: is a file, not a folder" in refused([*argv, "--data-root", str(a_file)], capsys)
    assert f"--manifest {tmp_path}: is a folder, not a file" in refused([*argv, "--manifest", str(tmp_path)], capsys)
    assert f"--data-root {tmp_path / 'no'}: no such folder" in refused([*argv, "--data-root", str(tmp_path / "no")], capsys)


def test_a_storage_that_is_a_file_is_refused_before_the_data_is_read(paper_argv, tmp_path, capsys):
    # It used to end in a pyarrow NotADirectoryError traceback (exit 1) after preprocessing.
    a_file = tmp_path / "afile"
    a_file.write_text("")
    err = refused([*paper_argv, "--storage", str(a_file)], capsys)
    assert f"--storage {a_file}: {a_file} is a file, not a folder" in err
    assert not (tmp_path / "out").exists()


def test_more_cpus_per_trial_than_this_machine_has_is_refused(paper_argv, tmp_path, capsys, monkeypatch):
    # Without --address, Ray left every trial PENDING forever ("No available node types can fulfill ...").
    monkeypatch.setattr(tune_main.os, "cpu_count", lambda: 2)
    err = refused([*paper_argv, "--cpus-per-trial", "100"], capsys)
    assert "--cpus-per-trial 100: this machine has 2 CPU(s), so no trial could start" in err
    assert not (tmp_path / "out").exists()
    config = tune_main.config_from_args(tune_main.build_parser().parse_args(
        [*paper_argv, "--cpus-per-trial", "100", "--address", "auto", "--storage", str(tmp_path / "st")]))
    tune_main.check_local_cpus(config)  # a cluster's nodes may have more


@pytest.mark.parametrize("address", ["auto", "10.0.0.1:6379", "head-node.example.org:6379", "[::1]:6379",
                                     "ray://10.0.0.1:10001"])
def test_every_form_of_cluster_address_ray_takes_is_accepted(paper_argv, tmp_path, address):
    config = tune_main.config_from_args(tune_main.build_parser().parse_args(
        [*paper_argv, "--address", address, "--storage", str(tmp_path / "st")]))
    assert config.address == address


def test_a_damaged_weights_file_is_refused_before_any_data_is_read(paper_argv, tmp_path, capsys):
    """Only the file's presence was checked: preprocessing ran, then every pre-trained trial failed on it, and with
    --pretrained both the from-scratch arms trained for hours first."""
    from models import weights_filename

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / weights_filename("mc3_18")).write_bytes(bytes(range(256)) * 4)  # not a PyTorch file
    argv = [*paper_argv[:-2], "--pretrained", "both", "--weights-dir", str(weights)]
    err = refused(argv, capsys)
    assert f"Kinetics-400 weights file {weights / weights_filename('mc3_18')} for mc3_18 is not a state dict" in err
    assert not (tmp_path / "out").exists()


def test_an_unreachable_address_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    import ray

    config = ExperimentConfig(experiment="paper", output=str(tmp_path / "out"), data_root=str(tmp_path),
                              models=("mc3_18",), pretrained="none", address="10.9.9.9:6379",
                              storage=str(tmp_path / "st"))
    data = SimpleNamespace(cached=SimpleNamespace(table=[]), classes=("a", "b"), cache_dir=str(tmp_path),
                           plan=SimpleNamespace(folds=[0, 1, 2]), subjects=None)
    monkeypatch.setattr(tune_main, "prepare_data", lambda *a, **k: data)
    monkeypatch.setattr(tune_main, "write_csv_atomic", lambda *a, **k: None)
    monkeypatch.setattr(tune_main, "fit_baselines", lambda *a, **k: None)
    monkeypatch.setattr(tune_main, "save_experiment_record", lambda *a, **k: None)

    def unreachable(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.9.9.9:6379.")

    monkeypatch.setattr(ray, "init", unreachable)
    assert tune_main.run_experiment(config) == 2
    err = capsys.readouterr().err
    assert "error: --address 10.9.9.9:6379: Failed to connect to Ray cluster at 10.9.9.9:6379. Start the cluster" in err


def test_an_address_where_nothing_listens_is_refused_in_seconds_before_any_work(tmp_path, capsys):
    """ray.init would retry a closed port for minutes (measured: over 5 minutes); a TCP probe answers at once."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["--experiment", "paper", "--data-root", str(tmp_path), "--output", str(tmp_path / "out"),
            "--storage", str(tmp_path / "st"), "--address", f"127.0.0.1:{port}", "--models", "mc3_18",
            "--pretrained", "none"]
    err = refused(argv, capsys)
    assert f"--address 127.0.0.1:{port}: nothing accepted a connection at 127.0.0.1:{port}" in err
    assert f"ray start --head --port {port}" in err
    assert not (tmp_path / "out").exists()


def test_an_address_that_accepts_connections_passes_the_probe():
    import socket

    from trainables.cluster import check_address_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_address_reachable(f"127.0.0.1:{port}")
        check_address_reachable(f"ray://127.0.0.1:{port}")
    check_address_reachable("auto")  # left to Ray, which fails fast without a recorded cluster


def saved_run(folder: Path, **options) -> ExperimentConfig:
    """An experiment.json as a finished run leaves it (only its options matter here)."""
    config = ExperimentConfig(experiment="paper", output=str(folder), models=("mc3_18",), pretrained="none",
                              run_id="ab12cd34", **options)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experiment.json").write_text(json.dumps({"options": config.to_dict()}))
    return config


def test_resume_with_another_demo_task_is_refused_not_ignored(tmp_path, capsys):
    out = tmp_path / "run"
    saved_run(out, data_root=str(tmp_path))
    err = refused(["--resume", "--output", str(out), "--demo-task", "mgmt"], capsys)
    assert "other options (demo_task)" in err


def test_a_renamed_experiment_folder_still_resumes(tmp_path, capsys):
    # A renamed or copied run was refused as "other options (data_root, output)": the demo's data lives inside it.
    first = tmp_path / "first"
    (first / "cache" / "demo-data").mkdir(parents=True)
    saved_run(first, data_root=str(first / "cache" / "demo-data"))
    moved = tmp_path / "moved"
    first.rename(moved)  # the saved data_root is gone with it: --resume looks for it inside the new folder
    config = tune_main.config_from_args(tune_main.build_parser().parse_args(["--resume", "--output", str(moved)]))
    assert config.data_root == str(moved / "cache" / "demo-data")
    tune_main.refuse_changed_options(config)
    assert tune_main.main(["--experiment", "paper", "--data-root", str(moved / "cache" / "demo-data"), "--models",
                           "mc3_18", "--pretrained", "none", "--output", str(moved), "--seed", "1"]) == 2
    assert "other options (seed)" in capsys.readouterr().err  # the same command, but for the seed, reaches the check
    # Data outside the folder is still compared: another --data-root is another experiment.
    config.data_root = str(tmp_path)
    with pytest.raises(ValueError, match=r"other options \(data_root\)"):
        tune_main.refuse_changed_options(config)


@pytest.mark.parametrize("uri", [False, True])
def test_tune_runs_and_tensorboard_name_this_experiments_retrain_runs_in_a_shared_storage(tmp_path, uri):
    """<run>-retrain-<n> runs (a finished trial trained again after its final checkpoint was lost) are listed after
    their run, by n; other experiments' runs and stray names in the shared --storage are not. A URI storage is listed
    through pyarrow (file:// stands in for s3:// here)."""
    storage = tmp_path / "shared"
    for name in ["paper-ab12cd34", "paper-ab12cd34-retrain-10", "paper-ab12cd34-retrain-2", "paper-ab12cd34-retrain-1",
                 "search-ab12cd34", "search-ab12cd34-retrain-1", "paper-ff00ff00-retrain-1",
                 "paper-ab12cd34-retrain-x", "paper-ab12cd34-retrain-1-old", "paper-ab12cd34-retrain-01"]:
        (storage / name).mkdir(parents=True)
    (storage / "paper-ab12cd34-retrain-3").write_text("")  # a file, not a run
    root = f"file://{storage}" if uri else str(storage)
    config = ExperimentConfig(experiment="demo", output=str(tmp_path / "out"), models=("mc3_18",), pretrained="none",
                              run_id="ab12cd34", storage=root)
    runs = tune_main.tune_runs(config, searched=True)
    assert runs == {"paper": f"{root}/paper-ab12cd34", "paper-retrain-1": f"{root}/paper-ab12cd34-retrain-1",
                    "paper-retrain-2": f"{root}/paper-ab12cd34-retrain-2",
                    "paper-retrain-10": f"{root}/paper-ab12cd34-retrain-10",
                    "search": f"{root}/search-ab12cd34", "search-retrain-1": f"{root}/search-ab12cd34-retrain-1"}
    assert tune_main.tensorboard_command(config, searched=True) == \
        "tensorboard --logdir_spec " + ",".join(f"{kind}:{path}" for kind, path in runs.items())
    assert tune_main.tune_runs(config, searched=False) == {k: v for k, v in runs.items() if k.startswith("paper")}
    empty = ExperimentConfig(experiment="paper", output=str(tmp_path / "out"), models=("mc3_18",), pretrained="none",
                             run_id="ab12cd34", storage=f"{root}/none-yet")  # before Tune made the folder
    assert tune_main.tune_runs(empty, searched=False) == {"paper": f"{root}/none-yet/paper-ab12cd34"}


@pytest.mark.parametrize("changed, option", [(["--max-failures", "5"], "max_failures"),
                                             (["--max-concurrent", "2"], "max_concurrent"),
                                             (["--set", "checkpoint_every=5"], "overrides")])
def test_resume_refuses_options_that_tuner_restore_would_ignore(tmp_path, capsys, changed, option):
    """Ray 2.60's Tuner.restore keeps the RunConfig, TuneConfig and trial configs of the first run: a new
    --max-failures, --max-concurrent or checkpoint_every would be recorded in experiment.json and then ignored."""
    out = tmp_path / "run"
    saved_run(out, data_root=str(tmp_path))
    err = refused(["--resume", "--output", str(out), *changed], capsys)
    assert f"other options ({option})" in err


@pytest.mark.parametrize("argv, message", [
    (["--set", "epochs=7"], "--set epochs: give it as --epochs 7 instead"),
    (["--set", "weights_dir=rel/w"], "--set weights_dir: give it as --weights-dir rel/w instead"),
    (["--models", "mc3_18,r3d_18,mc3_18"], "--models names mc3_18 more than once"),
    (["--experiment", "search", "--set", "weight_decay=0"],
     "--set weight_decay=0: the search draws weight_decay on a log scale around this value, which needs it above 0"),
])
def test_options_that_would_be_ignored_or_fail_late_are_refused_first(tmp_path, capsys, argv, message):
    base = ["--data-root", str(tmp_path), "--output", str(tmp_path / "out"), "--pretrained", "none"]
    if "--experiment" not in argv:
        base = ["--experiment", "paper", *base]
    err = refused([*base, *argv], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_a_demo_on_other_models_searches_the_first_of_them():
    args = tune_main.build_parser().parse_args(["--experiment", "demo", "--models", "r3d_18,r2plus1d_18",
                                                "--pretrained", "none"])
    assert tune_main.config_from_args(args).search_models == ("r3d_18",)
    args = tune_main.build_parser().parse_args(["--experiment", "demo", "--pretrained", "none"])
    assert tune_main.config_from_args(args).search_models == ("mc3_18",)  # the default demo: unchanged
