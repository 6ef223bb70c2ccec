"""Fault injection on real Ray Tune runs: a killed worker, a killed driver, a permanent error.

Tiny phantoms (24 subjects at 16 mm, mc3_18, 2 folds, 1-4 epochs of about a second each); each test starts and
stops its own Ray instance (in this process, or in a driver subprocess whose leftovers are killed with its process
group), so no Ray process outlives its test. About 2-2.5 minutes on 2 cores shared with other work.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from ray import tune
from torchvision.models.video import mc3_18

from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
from models import weights_filename
from trainables.collect import collect
from trainables.errors import error_text
from trainables.ray_trainable import (FAULT_LOG_KEY, SLEEP_ONCE_KEY, check_cache, fold_trial, node_identity,
                                      trial_name)
from trainables.tuning import METRIC, MODE

REPO = Path(__file__).resolve().parents[2]
TRIAL = {"model": "mc3_18", "pretrained": False, "batch_size": 4, "checkpoint_every": 1, "_experiment": "paper"}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(phantom_root, cache_root):
    """The phantoms cached at 16 mm, as tune_main caches them (the driver test reuses the entry via --cache-dir)."""
    return prepare_data(DataSpec(data_root=str(phantom_root)), PreprocessConfig(spacing=16.0), SplitSpec(n_splits=2),
                        cache_root, num_workers=1)


def start_ray(tmp_path: Path) -> None:
    """Ray in this process; no torch hub cache, so only --weights-dir holds Kinetics weights.

    ``address="local"``: a Ray instance of its own, even where another one runs on this machine (``ray.init()``
    would join that one).
    """
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"TORCH_HOME": str(tmp_path / "torch_home")}})


@pytest.fixture
def ray_here(tmp_path):
    """Ray for one test, stopped after it (its processes with it)."""
    start_ray(tmp_path)
    yield
    ray.shutdown()


def tuner(data, param_space: dict, storage: Path, max_failures: int) -> tune.Tuner:
    """As trainables.tuning builds it: Tune's metric (which a failure report must carry), one checkpoint kept."""
    return tune.Tuner(
        tune.with_parameters(fold_trial, data=data), param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE),
        run_config=tune.RunConfig(storage_path=str(storage), name="faults",
                                  failure_config=tune.FailureConfig(max_failures=max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def events(log_dir: Path, name: str) -> list[dict]:
    path = log_dir / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def epochs_by_attempt(log_dir: Path, name: str) -> list[list[int]]:
    """The epochs each process of a trial reached (logged before each report), in order of the processes."""
    attempts: dict[int, list[int]] = {}
    for event in events(log_dir, name):
        attempts.setdefault(event["pid"], [])
        if event["event"] == "epoch":
            attempts[event["pid"]].append(event["epoch"])
    return list(attempts.values())


def assert_each_subject_predicted_once_per_arm(predictions: pd.DataFrame, data) -> None:
    everyone = sorted(data.cached.table["subject_id"])
    for arm, rows in predictions.groupby(["model", "pretrained"]):
        assert sorted(rows["subject_id"]) == everyone, arm


def kill_when_sleeping(log_dir: Path, killed: list[int], timeout: float = 240) -> None:
    """Wait for the trial that sleeps in its epoch (SLEEP_ONCE_KEY) and SIGKILL its worker process."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in log_dir.glob("*.jsonl"):
            for event in (json.loads(line) for line in path.read_text().splitlines()):
                if event["event"] == "sleeping":
                    os.kill(event["pid"], signal.SIGKILL)  # a Ray worker of this test's own Ray instance
                    killed.append(event["pid"])
                    return
        time.sleep(0.2)


def test_a_killed_worker_resumes_from_its_checkpoint_and_every_subject_is_predicted_once(data, tmp_path, ray_here):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    space = {**TRIAL, "fold": tune.grid_search([0, 1]), "epochs": 2, FAULT_LOG_KEY: str(log_dir), SLEEP_ONCE_KEY: 2}
    killed: list[int] = []
    killer = threading.Thread(target=kill_when_sleeping, args=(log_dir, killed), daemon=True)
    killer.start()
    grid = tuner(data, space, tmp_path / "ray", max_failures=1).fit()
    killer.join(timeout=1)
    assert len(killed) == 1
    assert [result.error for result in grid] == [None, None]

    tables = collect([grid])
    trials = tables["trials"]
    assert list(trials["status"]) == ["TERMINATED", "TERMINATED"] and list(trials["error"]) == ["", ""]
    assert set(trials["node_id"]) == {ray.get_runtime_context().get_node_id()}
    assert_each_subject_predicted_once_per_arm(tables["predictions"], data)

    (victim,) = [name for name in trials["trial_name"] if killed[0] in {e["pid"] for e in events(log_dir, name)}]
    # Killed in epoch 2 (after its training, before its report): the restarted process continued from epoch 1's
    # checkpoint, so it trained epoch 2 only; epoch 1 ran once.
    assert epochs_by_attempt(log_dir, victim) == [[1, 2], [2]]
    (other,) = set(trials["trial_name"]) - {victim}
    assert epochs_by_attempt(log_dir, other) == [[1, 2]]
    (result,) = [r for r in grid if trial_name(r.config) == victim]
    assert list(result.metrics_dataframe["epoch"]) == [1, 2]  # each epoch reported to Tune once
    epochs = tables["epochs"]
    assert list(epochs[epochs["trial_name"] == victim]["epoch"]) == [1, 2]


def test_a_permanent_error_fails_at_once_with_its_message_and_runs_again_after_the_fix(data, tmp_path, ray_here):
    """Missing Kinetics weights: no retry does any work, trials.csv says FAILED with the real message and the
    node, and after the weights are put in place the same run, restored as the driver restores it, finishes."""
    log_dir, weights_dir = tmp_path / "log", tmp_path / "kinetics"
    log_dir.mkdir()
    weights_dir.mkdir()
    space = {**TRIAL, "pretrained": True, "weights_dir": str(weights_dir), "fold": 0, "epochs": 1,
             FAULT_LOG_KEY: str(log_dir)}
    name = trial_name(space)
    grid = tuner(data, space, tmp_path / "ray", max_failures=1).fit()
    (result,) = grid

    kinds = [event["event"] for event in events(log_dir, name)]
    # The first attempt found the problem before building a model (no epoch); the restart by Tune did nothing.
    assert kinds == ["start", "no-op restart"]
    history = result.metrics_dataframe
    assert len(history) == 1 and bool(history["fold_failed"].iloc[0])  # one result: the failure report
    trials = collect([grid])["trials"]
    row = trials.iloc[0]
    node = ray.get_runtime_context().get_node_id()
    assert row["status"] == "FAILED" and row["node_id"] == node
    error = row["error"]
    assert error.startswith(f"PermanentTrialError: node {node_identity()['hostname']} (Ray node {node}) has no "
                            "Kinetics-400 weights for mc3_18")
    assert str(weights_dir / weights_filename("mc3_18")) in error and "shared storage" in error
    assert "(at trainables/ray_trainable.py:" in error and "in check_weights)" in error
    assert "ray::" not in error and "\n" not in error
    assert_a_crash_is_told_by_its_own_exception()

    from trainables.tuning import unreadable_state_problem

    path = str(tmp_path / "ray" / "faults")
    assert unreadable_state_problem(path) is None

    # The user copies the weights and runs the same command again: a new driver process, with a new Ray instance.
    torch.save(mc3_18(weights=None, num_classes=400).state_dict(), weights_dir / weights_filename("mc3_18"))
    ray.shutdown()
    start_ray(tmp_path)
    restored = tune.Tuner.restore(str(tmp_path / "ray" / "faults"),
                                  trainable=tune.with_parameters(fold_trial, data=data),
                                  resume_unfinished=True, resume_errored=True)  # as trainables.tuning restores
    grid = restored.fit()
    assert [result.error for result in grid] == [None]
    tables = collect([grid])
    assert list(tables["trials"]["status"]) == ["TERMINATED"] and list(tables["trials"]["error"]) == [""]
    assert sorted(tables["predictions"]["subject_id"]) == sorted(data.plan.folds[0].test)
    assert epochs_by_attempt(log_dir, name)[-1] == [1]  # the rerun trained
    # A state file cut short (a kill while Tune wrote it): Ray's own restore would log "Restarting experiment" and
    # train every trial again; the check before it names the file to move aside.
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    states = sorted(damaged.glob("experiment_state-*.json"))
    assert len(states) == 2  # one per driver session: the failed run's and the rerun's
    newest = states[-1]
    newest.write_text(newest.read_text()[:100])
    problem = unreadable_state_problem(str(damaged))
    assert problem.startswith(f"{damaged}: Ray Tune's saved state {newest.name} cannot be read ("), problem
    assert "Restoring it would start every trial over. Move that file aside" in problem
    newest.unlink()  # moved aside: the state saved before it (the first run's) is read
    assert unreadable_state_problem(str(damaged)) is None


def assert_a_crash_is_told_by_its_own_exception() -> None:
    """Any error from a Ray worker (a trial that ends as ERROR, too): its type, message and frame, not Ray's header."""
    @ray.remote(max_retries=0)
    def read_volume():
        try:
            {}["volumes"]
        except KeyError as error:  # a chained exception: the last traceback block is the one to tell
            raise OSError("volumes.npy is unreadable\nin /cache/abc") from error

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(read_volume.remote())
    text = error_text(caught.value)
    assert text.startswith("OSError: volumes.npy is unreadable | in /cache/abc (at tests/trainables/test_faults.py:")
    assert text.endswith(" in read_volume)") and "KeyError" not in text


def test_a_live_exception_is_told_with_the_library_frame_and_the_project_frame_that_called_it(tmp_path):
    import numpy as np

    from trainables.errors import MAX_MESSAGE_CHARS, describe_exception, is_permanent

    try:
        np.load(tmp_path / "volumes.npy")
    except FileNotFoundError as error:
        text, permanent = describe_exception(error), is_permanent(error)
    assert text.startswith(f"FileNotFoundError: [Errno 2] No such file or directory: '{tmp_path / 'volumes.npy'}' "
                           "(at numpy/")
    assert ", via tests/trainables/test_faults.py:" in text and text.endswith(
        " in test_a_live_exception_is_told_with_the_library_frame_and_the_project_frame_that_called_it)")
    assert permanent and not is_permanent(RuntimeError("CUDA out of memory")) and not is_permanent(SystemExit(0))
    try:
        raise RuntimeError("x" * 1000 + "\nsecond line")
    except RuntimeError as error:
        text = describe_exception(error)
    assert text.startswith("RuntimeError: xxx") and f"{'x' * (MAX_MESSAGE_CHARS - 16)}…" in text and "\n" not in text


def test_the_preflight_names_the_node_the_missing_file_and_the_fix(data, tmp_path):
    import shutil

    from trainables.errors import PermanentTrialError

    entry = tmp_path / "entry"
    shutil.copytree(data.cache_dir, entry)
    node = {"node_id": "abc123", "hostname": "worker-7"}
    check_cache(entry, node)  # a sound copy passes
    (entry / "volumes.npy").unlink()
    with pytest.raises(PermanentTrialError) as caught:
        check_cache(entry, node)
    message = str(caught.value)
    assert message.startswith(f"node worker-7 (Ray node abc123) cannot use the preprocessing cache entry {entry}: ")
    assert "volumes.npy is missing" in message and "--cache-dir on shared storage" in message
    with pytest.raises(PermanentTrialError, match="does not exist here"):
        check_cache(tmp_path / "elsewhere", node)


# ------------------------------------------------------------------------------------------ the driver
def run_dirs(out: Path) -> list[Path]:
    """The Tune run folders under OUT/ray (whatever their name): those with a saved experiment state."""
    return sorted({p.parent for p in (out / "ray").glob("*/experiment_state*.json")})


def recorded_terminated(out: Path) -> list[Path]:
    """Trial folders that Tune's saved experiment state records as TERMINATED: what a restore keeps."""
    from ray.tune import ExperimentAnalysis

    folders = []
    for run in run_dirs(out):
        try:
            folders += [Path(t.path) for t in ExperimentAnalysis(str(run)).trials if t.status == "TERMINATED"]
        except Exception:  # noqa: BLE001 - the state file is being replaced; look again
            pass
    return folders


def progress_rows(folder: Path) -> int:
    try:
        return len(pd.read_csv(folder / "progress.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return 0


def group_alive(group: int) -> list[int]:
    """Processes of a process group still running (zombies excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def kill_group(group: int) -> None:
    """SIGKILL of a driver leaves its Ray instance (GCS, raylet, trial workers) behind; they share its process
    group (the driver runs in its own session), so end them with it: nothing else on this machine is touched."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + 30
    while group_alive(group) and time.time() < deadline:
        time.sleep(0.2)
    assert not group_alive(group)


def run_driver(command: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """The driver in its own session; whatever Ray left behind in its process group is ended afterwards."""
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        output, _ = driver.communicate(timeout=timeout)
    finally:
        kill_group(driver.pid)
    return driver.returncode, output


def test_a_killed_driver_is_resumed_by_the_same_command_without_retraining_finished_trials(phantom_root, data,
                                                                                         cache_root, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "tune_main.py", "--experiment", "paper", "--data-root", str(phantom_root),
               "--output", str(out), "--cache-dir", str(cache_root), "--models", "mc3_18", "--pretrained", "none",
               "--folds", "2", "--spacing", "16", "--epochs", "4", "--set", "batch_size=4", "--max-concurrent", "1",
               "--no-report"]
    # RAY_ADDRESS=local: the driver starts its own Ray instance even where another one runs on this machine.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 240
        # Kill once one trial is recorded as finished and the other has reported an epoch (one at a time).
        while time.time() < deadline:
            assert driver.poll() is None, driver.stdout.read()
            done = recorded_terminated(out)
            running = [p for run in run_dirs(out) for p in run.iterdir()
                       if p.is_dir() and p not in done and progress_rows(p) >= 1]
            if done and running:
                break
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        kill_group(driver.pid)
    assert driver.returncode == -signal.SIGKILL
    finished_first = {folder: (folder / "progress.csv").read_text() for folder in recorded_terminated(out)}
    assert len(finished_first) == 1, finished_first

    returncode, output = run_driver(command, env)
    assert returncode == 0, output[-5000:]
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["status"]) == ["TERMINATED", "TERMINATED"] and trials["node_id"].notna().all()
    predictions = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    subjects = pd.read_csv(out / "subjects.csv", dtype={"subject_id": str})
    for arm, rows in predictions.groupby(["model", "pretrained"]):
        assert sorted(rows["subject_id"]) == sorted(subjects["subject_id"]), arm
    for folder, progress in finished_first.items():
        assert (folder / "progress.csv").read_text() == progress  # the finished trial did not run again
    epochs = pd.read_csv(out / "epochs.csv")
    assert epochs.groupby("trial_name")["epoch"].apply(list).tolist() == [[1, 2, 3, 4]] * 2


# ------------------------------------------------------------------------------------------ lost files, dead searches
def experiment(tmp_path: Path, kind: str, **options) -> "ExperimentConfig":
    """tune_main's options for the tiny runs above (the `data` fixture: 2 folds at 16 mm), without the CLI."""
    from trainables.experiment import ExperimentConfig

    return ExperimentConfig(**{"experiment": kind, "output": str(tmp_path / "out"), "models": ("mc3_18",),
                               "pretrained": "none", "folds": 2, "spacing": 16.0, "epochs": 1,
                               "overrides": {"batch_size": 4}, **options})


def by_trial(tables: dict[str, pd.DataFrame]) -> dict[str, pd.Series]:
    return {row["trial_name"]: row for _, row in tables["trials"].iterrows()}


def test_a_finished_trial_whose_final_checkpoint_was_deleted_is_trained_again_by_the_rerun(data, tmp_path, ray_here,
                                                                                          caplog):
    """Tune records the trial as finished and never runs it again; the rerun (tuning's restore) trains it in a Tune
    run of its own, names the trial and the path, and the tables come from the retrained trial."""
    from trainables.tuning import _trainable, run_grid

    config = experiment(tmp_path, "paper")
    first = collect([run_grid(config, data, {"cpu": 1})])
    names = sorted(first["trials"]["trial_name"])
    assert list(first["trials"]["status"]) == ["TERMINATED"] * 2
    lost_name = names[0]
    lost_checkpoint = Path(by_trial(first)[lost_name]["checkpoint"])
    assert (lost_checkpoint / "best_weights.pt").is_file()
    shutil.rmtree(lost_checkpoint)  # the user deletes the final checkpoint of a finished trial

    # What a rerun collected before: the trial INCOMPLETE for ever, with no word why. Now it is named with the fix.
    run = tmp_path / "out" / "ray" / "paper"
    stale = by_trial(collect([tune.Tuner.restore(str(run), trainable=_trainable(data, {"cpu": 1})).get_results()]))
    assert stale[lost_name]["status"] == "INCOMPLETE"
    assert stale[lost_name]["error"].startswith(f"LostFinalCheckpoint: {lost_name} finished, but its final checkpoint "
                                                f"{lost_checkpoint} is gone (deleted?)")
    assert "Fix: rerun the same command with the same --output" in stale[lost_name]["error"]

    with caplog.at_level("WARNING", logger="trainables.tuning"):
        second = collect([run_grid(config, data, {"cpu": 1})])
    assert (f"{lost_name} finished, but its final checkpoint {lost_checkpoint} is gone (deleted?). Ray Tune never runs "
            f"a finished trial again: training it again from the start, in {run}-retrain-1") in caplog.text
    rows = by_trial(second)
    assert sorted(rows) == names and {row["status"] for row in rows.values()} == {"TERMINATED"}
    retrained = Path(rows[lost_name]["checkpoint"])
    assert retrained.parent.parent == Path(f"{run}-retrain-1") and (retrained / "best_weights.pt").is_file()
    assert rows[names[1]]["checkpoint"] == by_trial(first)[names[1]]["checkpoint"]  # the other is kept as it was
    assert_each_subject_predicted_once_per_arm(second["predictions"], data)
    # Trained again from the same seed, configuration and fold on the CPU: the same test predictions.
    pd.testing.assert_frame_equal(second["predictions"].reset_index(drop=True),
                                  first["predictions"].reset_index(drop=True))

    # A third run trains nothing; then a lost file of the other trial (its weights only) is retrained the same way.
    progress = (retrained.parent / "progress.csv").read_text()
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainables.tuning"):
        third = collect([run_grid(config, data, {"cpu": 1})])
    assert "finished, but" not in caplog.text and (retrained.parent / "progress.csv").read_text() == progress
    assert by_trial(third)[lost_name]["checkpoint"] == str(retrained)
    kept = Path(by_trial(third)[names[1]]["checkpoint"])
    (kept / "best_weights.pt").unlink()
    with caplog.at_level("WARNING", logger="trainables.tuning"):
        fourth = collect([run_grid(config, data, {"cpu": 1})])
    assert (f"{names[1]} finished, but its final checkpoint {kept} lacks best_weights.pt (deleted?)" in caplog.text)
    rows = by_trial(fourth)
    assert Path(rows[names[1]]["checkpoint"]).parent.parent == Path(f"{run}-retrain-2")
    assert rows[lost_name]["checkpoint"] == str(retrained) and set(fourth["trials"]["status"]) == {"TERMINATED"}
    assert sorted(p.name for p in run.parent.iterdir()) == ["paper", "paper-retrain-1", "paper-retrain-2"]


def test_a_restored_search_fails_the_optuna_trial_its_killed_driver_left_running(data, tmp_path, ray_here, caplog):
    """A driver killed right after its searcher asked Optuna for a trial, before Tune saved its state: the study
    holds a RUNNING trial that no Tune trial will ever report. The rerun's restore closes it as FAIL.

    The output folder is moved before the rerun (a copied or renamed --output resumes): Ray's pickled studies must
    open the new folder's database, not the old path (gone: "unable to open database file")."""
    import optuna

    from trainables.tuning import run_search, study_storage

    first = experiment(tmp_path / "before", "search", num_samples=1)
    run_search(first, data, {"cpu": 1}, [("mc3_18", False)])
    config = experiment(tmp_path / "after", "search", num_samples=1)
    shutil.move(first.output_path.parent, config.output_path.parent)
    study = optuna.load_study(study_name="mc3_18-scratch-fold0", storage=study_storage(config))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    study.ask()  # as OptunaSearch.suggest asks: recorded in the study at once, in Tune's state only at its next save

    with caplog.at_level("WARNING", logger="trainables.nested_search"):
        grid = run_search(config, data, {"cpu": 1}, [("mc3_18", False)])  # the rerun: Tuner.restore
    assert not (tmp_path / "before").exists()  # nothing written to where the run was
    assert len(grid) == 2 and {result.error for result in grid} == {None}
    for fold, states in ((0, ["COMPLETE", "FAIL"]), (1, ["COMPLETE"])):
        study = optuna.load_study(study_name=f"mc3_18-scratch-fold{fold}", storage=study_storage(config))
        assert [t.state.name for t in study.trials] == states
    assert ("Optuna study mc3_18-scratch-fold0: trial 1 was left RUNNING by a driver that stopped before Ray Tune "
            "saved it (no Tune trial will report it); marked FAIL") in caplog.text


def test_a_search_with_nothing_left_to_start_keeps_the_trials_it_ran(data, tmp_path, ray_here):
    """--num-samples 1: a study whose grid trial failed runs the grid's point itself. Once the grid trial is fixed,
    no study has a trial left to start, but the search's finished trials still belong in the results."""
    from trainables.tuning import run_search

    config = experiment(tmp_path, "search", num_samples=1)
    first = run_search(config, data, {"cpu": 1}, [("mc3_18", False)])  # no grid values: every grid trial failed
    assert len(first) == 2 and {result.error for result in first} == {None}
    fixed = {("mc3_18", False, fold): (0.5, f"grid-f{fold}") for fold in (0, 1)}
    again = run_search(config, data, {"cpu": 1}, [("mc3_18", False)], fixed)
    assert again is not None
    assert sorted(r.metrics["trial_id"] for r in again) == sorted(r.metrics["trial_id"] for r in first)


def test_a_search_trial_that_errored_gives_its_study_its_score_when_the_rerun_finishes_it(data, tmp_path, ray_here,
                                                                                        caplog):
    """Missing Kinetics weights: every search trial ends in ERROR and its study is told FAIL. After the fix the rerun
    (Tuner.restore, resume_errored) trains them; Ray's OptunaSearch would leave the studies FAIL (and, with
    --max-concurrent, Tune's ConcurrencyLimiter does not even pass the completion on): each study gets the score."""
    import optuna

    from trainables.nested_search import TUNE_TRIAL_ATTR
    from trainables.tuning import run_search, study_storage

    weights_dir = tmp_path / "kinetics"
    weights_dir.mkdir()
    config = experiment(tmp_path, "search", num_samples=1, pretrained="kinetics", weights_dir=str(weights_dir),
                        max_failures=0, max_concurrent=1)
    arms = [("mc3_18", True)]
    first = run_search(config, data, {"cpu": 1}, arms)
    assert len(first) == 2 and all(result.error is not None for result in first)
    names = [f"mc3_18-kinetics-fold{fold}" for fold in (0, 1)]

    def trials(name: str) -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name=name, storage=study_storage(config)).trials

    assert [[t.state.name for t in trials(name)] for name in names] == [["FAIL"], ["FAIL"]]

    torch.save(mc3_18(weights=None, num_classes=400).state_dict(), weights_dir / weights_filename("mc3_18"))
    ray.shutdown()
    start_ray(tmp_path)  # the rerun: a new driver and Ray instance
    with caplog.at_level("INFO", logger="trainables.nested_search"):
        second = run_search(config, data, {"cpu": 1}, arms)
    assert {result.error for result in second} == {None}
    final = {result.metrics["trial_id"]: result for result in second}
    for name in names:
        failed, told = trials(name)
        result = final[failed.user_attrs[TUNE_TRIAL_ATTR]]  # the same Tune trial, run again to its end
        assert (failed.state.name, told.state.name) == ("FAIL", "COMPLETE")
        assert told.value == result.metrics[METRIC] and told.params == failed.params
        assert {k: result.config[k] for k in told.params} == told.params
        assert (f"Optuna study {name}: trial 0 was told FAIL when Tune trial {result.metrics['trial_id']} ended in "
                "ERROR; Tune ran it again and it finished") in caplog.text
