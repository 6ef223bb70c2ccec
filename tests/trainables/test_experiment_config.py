"""ExperimentConfig: what is compared on resume, and seeds checked before any work."""
from __future__ import annotations

import pytest

from trainables.experiment import ExperimentConfig


def test_paths_inside_the_experiment_folder_are_compared_relative_to_it(tmp_path):
    moved = ExperimentConfig(output=str(tmp_path / "moved"), pretrained="none")
    saved = {**moved.to_dict(), "output": str(tmp_path / "first"),
             "data_root": str(tmp_path / "first" / "cache" / "demo-data"),
             "cache_dir": str(tmp_path / "first" / "cache"), "storage": str(tmp_path / "first" / "ray")}
    mine = {"data_root": str(tmp_path / "moved" / "cache" / "demo-data"), "cache_dir": str(tmp_path / "moved" / "cache")}
    moved.data_root, moved.cache_dir = mine["data_root"], mine["cache_dir"]
    assert moved.differences(saved) == []
    assert moved.differences({**saved, "data_root": "/data/brain"}) == ["data_root"]
    assert moved.differences({**saved, "storage": "/shared/runs"}) == ["storage"]
    assert moved.differences({**saved, "storage": "s3://b/runs"}) == ["storage"]


@pytest.mark.parametrize("options, message", [
    ({"seed": -1}, "--seed must be a whole number from 0 to 4294967, got -1"),
    ({"seed": 2**32}, "--seed must be a whole number from 0 to 4294967, got 4294967296"),
    ({"overrides": {"seed": 2**32}}, "--set seed must be a whole number from 0 to 4294967, got 4294967296"),
    ({"seed": 2**32 - 1000, "overrides": {"seed": 1}}, "--seed must be a whole number from 0 to 4294966293"),
])
def test_seeds_outside_numpys_range_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ExperimentConfig(output=str(tmp_path), **options)


def test_the_largest_accepted_seeds_train(tmp_path):
    """The bound is exact: numpy accepts seed * 1000 + fold for the last fold, and seed + 1000 + fold for splits."""
    import numpy as np

    config = ExperimentConfig(output=str(tmp_path), seed=4294967, folds=3)
    np.random.seed(config.seed * 1000 + config.folds - 1)
    with pytest.raises(ValueError):
        ExperimentConfig(output=str(tmp_path), seed=4294967 + 1, folds=3)
    split_only = ExperimentConfig(output=str(tmp_path), seed=2**32 - 1003, folds=3, overrides={"seed": 0})
    np.random.RandomState(split_only.seed + 1000 + split_only.folds - 1)
