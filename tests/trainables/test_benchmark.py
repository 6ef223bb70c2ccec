"""The benchmark script runs the trials' own training step and reports rows a user can act on."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from trainables import benchmark


def test_cpu_rows_per_model_read_back_from_the_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    code = benchmark.main(["--models", "mc3_18,r3d_18", "--shape", "16,16,12", "--batch-size", "2", "--amp", "both",
                           "--device", "cpu", "--warmup", "1", "--steps", "2", "--output", str(out)])
    assert code == 0
    table = pd.read_csv(out)
    # Autocast is CUDA-only in training, so "both" collapses to one fp32 row per model on a CPU.
    assert list(table["model"]) == ["mc3_18", "r3d_18"] and set(table["precision"]) == {"float32"}
    assert set(table["shape_xyz"]) == {"16x16x12"} and set(table["batch_size"]) == {2}
    assert np.allclose(table["train_volumes_per_s"], 2 / table["train_step_s"])
    expected_fed = 2 / (table["train_step_s"] + 2 * table["augment_s_per_volume"])
    assert np.allclose(table["fed_volumes_per_s"], expected_fed)
    assert (table["augment_s_per_volume"] > 0).all()
    assert "peak_memory_gib" not in table  # a CUDA-only column
    assert "augmentation at strength 1.0" in capsys.readouterr().out


def test_no_augmentation_costs_nothing_and_the_cache_gives_the_shape(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"shape": [12, 16, 12], "channels": 2}))
    out = tmp_path / "bench.csv"
    assert benchmark.main(["--models", "mc3_18", "--cache", str(cache), "--augmentation", "none", "--device", "cpu",
                           "--warmup", "0", "--steps", "1", "--output", str(out)]) == 0
    row = pd.read_csv(out).iloc[0]
    assert row["shape_xyz"] == "12x16x12" and row["augment_s_per_volume"] == 0
    assert row["fed_volumes_per_s"] == row["train_volumes_per_s"]


def test_bad_options_are_named(capsys):
    assert benchmark.main(["--models", "resnet50"]) == 2
    assert "--models: unknown ['resnet50']" in capsys.readouterr().err
    assert benchmark.main(["--shape", "16,16"]) == 2
    assert "--shape takes three positive sizes" in capsys.readouterr().err
    assert benchmark.main(["--augmentation", "strong"]) == 2
    assert "augmentation must be one of none, light, heavy" in capsys.readouterr().err
