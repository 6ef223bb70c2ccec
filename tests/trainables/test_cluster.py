"""Runs on a Ray cluster: two nodes on this machine (``ray.cluster_utils.Cluster``, 1 CPU each), one shared storage.

Real Ray, Tune and training on tiny phantoms (mc3_18, 2 folds, 1 epoch at 16 mm): about 2-3 minutes on 2 cores.
Both nodes share this machine's file system, so a node that does not see a path is shown with a path that no
node sees.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import ray

import tune_main
from trainables.cluster import REPO_ROOT, TOKEN_PREFIX, ClusterCheckError, check_cluster, init_options
from trainables.experiment import ExperimentConfig

TINY = ["--models", "mc3_18", "--pretrained", "none", "--folds", "2", "--spacing", "16", "--epochs", "1",
        "--set", "batch_size=4", "--no-report"]


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, 1 CPU each: two concurrent trials must land on different nodes."""
    from ray.cluster_utils import Cluster

    two_nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        forget_as_this_machines_default(two_nodes.address)
        two_nodes.add_node(num_cpus=1)
        two_nodes.wait_for_nodes()
        yield two_nodes
    finally:
        ray.shutdown()  # a test that failed while connected
        two_nodes.shutdown()


def forget_as_this_machines_default(address: str) -> None:
    """Cluster() records its head where a bare ``ray.init()`` looks (/tmp/ray/ray_current_cluster): any other Ray
    program on this shared machine would join this test cluster while it runs. Forget it while it is still ours."""
    from ray._common.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    if record.is_file() and record.read_text().strip() == address:
        record.unlink()


def node_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster.list_all_nodes()}


def experiment_argv(phantom_root: Path, out: Path, storage: Path, address: str, *extra: str) -> list[str]:
    return ["--experiment", "paper", "--data-root", str(phantom_root), "--output", str(out), "--storage", str(storage),
            "--address", address, *TINY, *extra]


@pytest.fixture(scope="module")
def shared_runs(cluster, phantom_root, tmp_path_factory):
    """Two different experiments (seed 0 and 1: other splits), own --output each, the same --storage and cache."""
    base = tmp_path_factory.mktemp("cluster")
    storage, cache = base / "shared-runs", ["--cache-dir", str(base / "shared-cache")]
    first = experiment_argv(phantom_root, base / "first", storage, cluster.address, *cache)
    second = experiment_argv(phantom_root, base / "second", storage, cluster.address, "--seed", "1", *cache)
    assert tune_main.main(first) == 0
    assert tune_main.main(second) == 0
    return storage, base / "first", base / "second", first


def record(out: Path) -> dict:
    return json.loads((out / "experiment.json").read_text())


def trial_folders(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.is_dir() and (p / "params.json").is_file())


def test_a_grid_on_two_nodes_places_trials_on_both_and_records_each_trials_node(shared_runs, cluster):
    _, first, second, _ = shared_runs
    for out in (first, second):
        trials = pd.read_csv(out / "trials.csv")
        assert len(trials) == 2 and set(trials["status"]) == {"TERMINATED"}
        assert "node_id" in trials.columns, "trials.csv has no node_id column (added by trainables/collect.py)"
        assert set(trials["node_id"]) == node_ids(cluster)  # two 1-CPU trials at once: one per node


def test_experiments_sharing_a_storage_never_restore_each_others_trials(shared_runs):
    storage, first, second, _ = shared_runs
    ids = [record(out)["run_id"] for out in (first, second)]
    assert ids[0] and ids[1] and ids[0] != ids[1]
    assert sorted(p.name for p in storage.iterdir()) == sorted(f"paper-{i}" for i in ids)  # no token left behind
    for out, run_id in zip((first, second), ids):
        assert record(out)["tune_runs"] == {"paper": f"{storage}/paper-{run_id}"}
        assert len(trial_folders(storage / f"paper-{run_id}")) == 2  # each trained its own folds
    # The second experiment's predictions are for its own splits (seed 1), not the first's trials' test folds.
    splits = {out: json.loads((out / "splits.json").read_text())["folds"] for out in (first, second)}
    assert any(sorted(a["test"]) != sorted(b["test"]) for a, b in zip(splits[first], splits[second]))
    for out in (first, second):
        predictions = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
        for fold, rows in predictions.groupby("fold"):
            assert sorted(rows["subject_id"]) == sorted(splits[out][fold]["test"])


def test_changing_the_storage_of_an_experiment_is_refused_with_the_original(shared_runs, tmp_path, capsys):
    storage, first, _, argv = shared_runs
    moved = [str(tmp_path / "elsewhere") if arg == str(storage) else arg for arg in argv]
    assert tune_main.main(moved) == 2
    err = capsys.readouterr().err
    assert "other options (storage)" in err and f"rerun with --storage {storage}" in err
    assert tune_main.main(["--resume", "--output", str(first), "--storage", str(tmp_path / "elsewhere")]) == 2
    assert f"rerun with --storage {storage}" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_a_node_check_failure_stops_tune_main_before_the_tuner(shared_runs, monkeypatch, capsys):
    """The driver's view of the cache entry made to differ from the nodes' (as a node-local copy would)."""
    import trainables.cluster

    storage, first, _, argv = shared_runs
    real = trainables.cluster.trial_paths

    def driver_sees_another_size(config, cache_dir):
        return [dataclasses.replace(p, expected="999 bytes") for p in real(config, cache_dir)]

    monkeypatch.setattr(trainables.cluster, "trial_paths", driver_sees_another_size)
    run = storage / f"paper-{record(first)['run_id']}"
    before = {p.name: (p / "progress.csv").read_text() for p in trial_folders(run)}
    assert tune_main.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot run this experiment: 2 of 2 nodes are not ready" in err
    assert "; the driver sees 999 bytes): the preprocessing cache entry (--cache-dir) is not on a file system" in err
    assert "Fix: mount the shared file system" in err
    assert {p.name: (p / "progress.csv").read_text() for p in trial_folders(run)} == before
    assert not list(storage.glob(f"{TOKEN_PREFIX}*"))


def test_an_experiment_saved_without_a_run_id_resumes_its_run_under_the_old_name(shared_runs, cluster, tmp_path):
    """Made before run ids existed: OUT/experiment.json without one, the Tune run named just ``paper``."""
    storage, _, second, argv = shared_runs
    old_out, old_storage = tmp_path / "old", tmp_path / "old-runs"
    shutil.copytree(second, old_out)
    shutil.copytree(storage / f"paper-{record(second)['run_id']}", old_storage / "paper")
    saved = record(old_out)
    for part in (saved, saved["options"]):
        part.pop("run_id"), part.pop("tune_runs", None)
        part.update(output=str(old_out), storage=str(old_storage))
    (old_out / "experiment.json").write_text(json.dumps(saved))
    before = {p.name: (p / "progress.csv").read_text() for p in trial_folders(old_storage / "paper")}

    old_argv = experiment_argv(Path(argv[argv.index("--data-root") + 1]), old_out, old_storage, cluster.address,
                               "--seed", "1", "--cache-dir", saved["options"]["cache_dir"])
    assert tune_main.main(old_argv) == 0
    assert sorted(p.name for p in old_storage.iterdir()) == ["paper"]  # restored, no new run beside it
    assert {p.name: (p / "progress.csv").read_text() for p in trial_folders(old_storage / "paper")} == before
    assert set(pd.read_csv(old_out / "trials.csv")["status"]) == {"TERMINATED"}
    assert record(old_out).get("run_id") is None


def test_address_without_storage_is_refused_before_any_work(phantom_root, tmp_path, capsys):
    out = tmp_path / "never"
    argv = ["--experiment", "paper", "--data-root", str(phantom_root), "--output", str(out), "--address", "auto",
            *TINY]
    assert tune_main.main(argv) == 2
    err = capsys.readouterr().err
    assert "--address auto needs --storage" in err and "--storage /shared/runs" in err
    assert not out.exists()


def test_without_address_a_run_starts_its_own_instance_and_never_joins_a_cluster(cluster, tmp_path, monkeypatch):
    """$RAY_ADDRESS (or a `ray start` on this machine) would make a bare ray.init() join that cluster unchecked."""
    from trainables.cluster import ignored_ray_address

    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    config = ExperimentConfig(output=str(tmp_path))
    assert f"RAY_ADDRESS={cluster.address} is set, but without --address" in ignored_ray_address(config)
    ray.init(**init_options(config), num_cpus=1)
    try:
        assert not {node["NodeID"] for node in ray.nodes()} & node_ids(cluster)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def connected(cluster, tmp_path_factory):
    """Connected to the two-node cluster as tune_main connects (the code shipped in the runtime_env), with a cache."""
    base = tmp_path_factory.mktemp("connected")
    cache = base / "cache" / "entry"
    cache.mkdir(parents=True)
    (cache / "volumes.npy").write_bytes(b"\0" * 128)
    config = ExperimentConfig(output=str(base / "out"), pretrained="none", address=cluster.address,
                              storage=str(base / "runs"))
    with pytest.MonkeyPatch.context() as env:  # set after the nodes started: only the runtime_env can carry it
        env.setenv("TORCH_HOME", str(base / "torch-home"))
        ray.init(**init_options(config))
    try:
        yield config, cache
    finally:
        ray.shutdown()


def test_every_node_gets_the_code_and_sees_the_shared_paths(connected, cluster):
    config, cache = connected
    notes, views = check_cluster(config, str(cache))
    assert set(views) == node_ids(cluster)
    assert "all 2 nodes see a token file the driver wrote under --storage, the preprocessing cache entry" in notes[-1]
    for view in views.values():
        shipped = Path(view.code)
        assert shipped != REPO_ROOT and (shipped / "tune_main.py").is_file()  # a copy unpacked by Ray, not ours
        assert (shipped / "trainables" / "cluster.py").read_text() == (REPO_ROOT / "trainables" / "cluster.py").read_text()
        assert not (shipped / ".git").exists() and not (shipped / "runs").exists()
        assert view.env["TORCH_HOME"] == str(Path(config.output).parent / "torch-home")  # forwarded to the trials
    assert not list(Path(config.storage).glob(f"{TOKEN_PREFIX}*"))  # the token is removed


def test_a_path_a_node_does_not_see_stops_the_run_naming_node_path_and_fix(connected, cluster, tmp_path):
    config, _ = connected
    missing = tmp_path / "node-local" / "entry"
    with pytest.raises(ClusterCheckError) as raised:
        check_cluster(config, str(missing))
    message = str(raised.value)
    assert "2 of 2 nodes are not ready" in message
    for node_id in node_ids(cluster):
        assert f"node id {node_id}): does not see the preprocessing cache entry (--cache-dir): {missing}/volumes.npy" \
            in message
    assert "Fix: mount the shared file system at the same path on every node" in message
    assert "token" not in message  # --storage itself is seen by both


def test_a_storage_uri_is_not_checked_file_by_file_but_the_cache_is(connected, tmp_path):
    config, cache = connected
    config = dataclasses.replace(config, storage="s3://bucket/runs")
    notes, views = check_cluster(config, str(cache))
    assert "--storage s3://bucket/runs is a URI: not checked from the nodes" in notes[0]
    assert all(list(view.seen) == [f"{cache}/volumes.npy"] for view in views.values())
    with pytest.raises(ClusterCheckError, match="does not see the preprocessing cache entry"):
        check_cluster(config, str(tmp_path / "nowhere"))

