"""The Tune trainable: a failure mid-trial resumes from the last checkpoint, not from scratch."""
import pandas as pd
import pytest
import ray
from ray import tune

from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
from trainables.ray_trainable import FAIL_ONCE_KEY, config_id, fold_trial, trial_name


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_injected_failure_resumes_from_checkpoint(phantom_root, tmp_path, ray_session):
    data = prepare_data(DataSpec(data_root=str(phantom_root)), PreprocessConfig(spacing=16.0), SplitSpec(n_splits=2),
                        tmp_path / "cache", num_workers=1)
    config = {"model": "r2plus1d_18", "pretrained": False, "fold": 1, "epochs": 3, "batch_size": 4, FAIL_ONCE_KEY: 3}
    tuner = tune.Tuner(
        tune.with_parameters(fold_trial, data=data), param_space=config,
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="failure",
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    (result,) = tuner.fit()
    assert result.error is None
    history = result.metrics_dataframe
    # Three epochs reported once each, though the process died in the third (resumed from epoch 2).
    assert list(history["epoch"]) == [1, 2, 3]
    assert list(history["training_iteration"]) == [1, 2, 3]
    with result.checkpoint.as_directory() as folder:
        epochs = pd.read_csv(f"{folder}/epochs.csv")
        assert list(epochs["epoch"]) == [1, 2, 3]
    assert len(list((tmp_path / "ray" / "failure").glob("*/.injected_failure_done"))) == 1


def test_trial_names_are_readable_and_config_ids_ignore_the_fold():
    a = {"model": "mc3_18", "pretrained": True, "fold": 0, "lr": 1e-5, "weight_decay": 1e-3, "dropout": 0.3}
    b = {**a, "fold": 2}
    assert config_id(a) == config_id(b) != config_id({**a, "lr": 2e-5})
    assert trial_name(b) == f"mc3_18-kinetics-f2-{config_id(a)}"
    assert trial_name({**a, "__trial_index__": 1}).startswith("mc3_18-kinetics-f1-")
