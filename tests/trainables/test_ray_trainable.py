"""The Tune trainable: a failure mid-trial resumes from the last checkpoint, not from scratch; light checkpoints;
the driver reads a finished trial's outputs without its weights."""
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import ray
import torch
from ray import tune

from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
from trainables.collect import _read_outputs
from trainables.ray_trainable import BEST_WEIGHTS_FOLDER, FAIL_ONCE_KEY, config_id, cpu_share, fold_trial, trial_name


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own Ray, even beside another one
    yield
    ray.shutdown()


def test_injected_failure_resumes_from_checkpoint(phantom_root, tmp_path, ray_session, monkeypatch):
    data = prepare_data(DataSpec(data_root=str(phantom_root)), PreprocessConfig(spacing=16.0), SplitSpec(n_splits=2),
                        tmp_path / "cache", num_workers=1)
    config = {"model": "r2plus1d_18", "pretrained": False, "fold": 1, "epochs": 3, "batch_size": 4,
              "checkpoint_every": 2, FAIL_ONCE_KEY: 3}
    tuner = tune.Tuner(
        tune.with_parameters(fold_trial, data=data), param_space=config,
        # num_to_keep as in the real runs (trainables/tuning.py): Tune then syncs its experiment state (the
        # trial's result.json, which a restarted trial reloads) after every checkpoint, not only every ~10 s.
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="failure",
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    (result,) = tuner.fit()
    assert result.error is None
    history = result.metrics_dataframe
    # Three epochs reported once each, though the process died in the third (resumed from epoch 2's checkpoint).
    assert list(history["epoch"]) == [1, 2, 3]
    assert list(history["training_iteration"]) == [1, 2, 3]
    with result.checkpoint.as_directory() as folder:
        epochs = pd.read_csv(f"{folder}/epochs.csv")
        assert list(epochs["epoch"]) == [1, 2, 3]
        # The final checkpoint: float32 best weights, counters and the outputs; no optimizer state.
        assert sorted(p.name for p in Path(folder).iterdir()) == [
            "best_weights.pt", "epochs.csv", "fold_state.pt", "predictions.csv", "result.json", "val_predictions.csv"]
        state = torch.load(f"{folder}/fold_state.pt", weights_only=False)
        assert state["finished"] and "optimizer" not in state and "model" not in state
        weights = torch.load(f"{folder}/best_weights.pt", weights_only=True)
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    trial_dir = next((tmp_path / "ray" / "failure").glob("*/.injected_failure_done")).parent
    # Checkpoints in epochs 2 (every second epoch) and 3 (the final one) only: the final one is the second.
    assert [p.name for p in trial_dir.glob("checkpoint_*")] == ["checkpoint_000001"] == [Path(result.checkpoint.path).name]
    assert not list(trial_dir.glob(f"{BEST_WEIGHTS_FOLDER}/*.pt"))  # best weights waiting on the side: cleared
    assert len(list((tmp_path / "ray" / "failure").glob("*/.injected_failure_done"))) == 1

    # The driver reads the small files only: a copy whose weights are corrupt still gives every output,
    # and the checkpoint is never materialised as a local directory.
    copy = tmp_path / "checkpoint_copy"
    shutil.copytree(result.checkpoint.path, copy)
    (copy / "best_weights.pt").write_bytes(b"not a weights file")

    def refuse(*args, **kwargs):
        raise AssertionError("collect must not download or copy the checkpoint")

    monkeypatch.setattr(tune.Checkpoint, "as_directory", refuse)
    monkeypatch.setattr(tune.Checkpoint, "to_directory", refuse)
    outputs = _read_outputs(SimpleNamespace(checkpoint=tune.Checkpoint(str(copy))))
    assert outputs["summary"]["epochs_run"] == 3 and list(outputs["epochs"]["epoch"]) == [1, 2, 3]
    assert list(outputs["predictions"].columns[:3]) == ["subject_id", "label", "pred"]
    assert outputs["predictions"]["subject_id"].map(type).eq(str).all()
    (copy / "result.json").unlink()  # an unfinished trial's checkpoint: nothing to collect
    assert _read_outputs(SimpleNamespace(checkpoint=tune.Checkpoint(str(copy)))) == {}
    assert _read_outputs(SimpleNamespace(checkpoint=None)) == {}


def test_a_trial_uses_whole_cpus_of_its_share():
    assert cpu_share({"CPU": 1.0, "GPU": 0.25}) == 1
    assert cpu_share({"CPU": 3.0}) == 3
    assert cpu_share({"CPU": 0.5}) == 1
    assert cpu_share({}) is None


def test_trial_names_are_readable_and_config_ids_ignore_the_fold():
    a = {"model": "mc3_18", "pretrained": True, "fold": 0, "lr": 1e-5, "weight_decay": 1e-3, "dropout": 0.3}
    b = {**a, "fold": 2}
    assert config_id(a) == config_id(b) != config_id({**a, "lr": 2e-5})
    assert trial_name(b) == f"mc3_18-kinetics-f2-{config_id(a)}"
    assert trial_name({**a, "__trial_index__": 1}).startswith("mc3_18-kinetics-f1-")
