"""One fold without Ray: class weights, config checks, resume, and a run that learns the phantoms."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
from trainables import class_weights, classification_metrics, resolve_config, train_fold


def test_class_weights_are_one_minus_class_share():
    # counts 3, 1, 2 of N = 6 -> 1 - 3/6, 1 - 1/6, 1 - 2/6
    np.testing.assert_allclose(class_weights([0, 0, 0, 1, 2, 2], 3), [0.5, 5 / 6, 2 / 3])
    np.testing.assert_allclose(class_weights([1, 1], 3), [1.0, 0.0, 1.0])


def test_epoch_metrics_by_hand():
    # targets 0,0,1,2 / predictions 0,1,1,2: class 0 P=1 R=1/2 F1=2/3; class 1 P=1/2 R=1 F1=2/3; class 2 F1=1
    metrics = classification_metrics("val", [0, 0, 1, 2], [0, 1, 1, 2], ["LGG", "HGG", "Healthy"])
    assert metrics["val_accuracy"] == pytest.approx(0.75)
    assert metrics["val_f1_LGG"] == pytest.approx(2 / 3) and metrics["val_f1_Healthy"] == pytest.approx(1.0)
    assert metrics["val_macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_unknown_or_bad_options_are_refused():
    with pytest.raises(ValueError, match="Unknown training option\\(s\\) \\['learning_rate'\\]"):
        resolve_config({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="lr must be positive"):
        resolve_config({"lr": 0})
    assert resolve_config({"_experiment": "paper"})["lr"] == 1e-5  # private keys pass through untouched


@pytest.mark.parametrize("option, message", [
    ({"lr": "abc"}, "lr must be a number, got 'abc'"),
    ({"batch_size": 2.5}, "batch_size must be a whole number, got 2.5"),
    ({"epochs": True}, "epochs must be a whole number, got True"),
    ({"amp": "yes"}, "amp must be true or false, got 'yes'"),
    ({"bn_recalibration": 1}, "bn_recalibration must be true or false, got 1"),
    ({"dropout": 1.0}, "dropout must be in \\[0, 1\\), got 1.0"),
    ({"patience": 0}, "patience must be at least 1"),
    ({"augmentation": "medium"}, "augmentation must be one of none, light, heavy, got 'medium'"),
    ({"aug_strength": 9}, "aug_strength must be in \\[0, 4.0\\], got 9"),
    ({"model": "resnet50"}, "model must be one of r2plus1d_18, mc3_18, r3d_18, got 'resnet50'"),
])
def test_every_bad_value_is_named_before_training(option, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(option)


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory):
    from datasets.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path_factory.mktemp("learn"), n_hgg=20, n_lgg=20, n_healthy=20, seed=11, downsample=4)
    return prepare_data(DataSpec(data_root=str(root)), PreprocessConfig(spacing=8.0), SplitSpec(n_splits=3, seed=0),
                        tmp_path_factory.mktemp("cache"), num_workers=1)


LEARNING = {"model": "r2plus1d_18", "fold": 0, "epochs": 12, "lr": 3e-4, "batch_size": 4, "aug_strength": 0.0, "seed": 0}


def test_a_short_run_learns_the_phantoms_and_writes_documented_outputs(learnable_data, tmp_path):
    reports = []
    result = train_fold(LEARNING, learnable_data, tmp_path, reporter=lambda m, c: reports.append(m))
    # Chance is 1/3 for three balanced classes; 12 of 20 correct has p ~ 0.01 under chance.
    assert result.test_metrics["accuracy"] >= 0.6, result.test_metrics
    assert result.test_metrics["macro_f1"] >= 0.5, result.test_metrics
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["subject_id", "label", "pred", "prob_LGG", "prob_HGG", "prob_Healthy"]
    assert sorted(predictions["subject_id"]) == sorted(learnable_data.plan.folds[0].test)
    assert set(predictions["pred"]) <= {"LGG", "HGG", "Healthy"}
    np.testing.assert_allclose(predictions.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert list(epochs["epoch"]) == list(range(1, 13))
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_f1_LGG", "lr"} <= set(epochs.columns)
    summary = json.loads((tmp_path / "result.json").read_text())
    assert epochs["val_macro_f1"].iloc[summary["best_epoch"] - 1] == epochs["val_macro_f1"].max()
    assert [r["epoch"] for r in reports] == list(range(1, 13)) and reports[-1]["fold_finished"]


def test_resume_from_a_checkpoint_continues_where_it_stopped(learnable_data, tmp_path):
    quick = {**LEARNING, "epochs": 3, "fold": 1, "aug_strength": 1.0}
    full = train_fold(quick, learnable_data, tmp_path / "full")

    def crash_after_epoch_two(metrics, checkpoint_dir):
        if metrics["epoch"] == 2:
            shutil.copytree(checkpoint_dir, tmp_path / "saved")
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train_fold(quick, learnable_data, tmp_path / "part", reporter=crash_after_epoch_two)
    # Continued from epoch 2's checkpoint, the run matches the uninterrupted one exactly.
    resumed = train_fold(quick, learnable_data, tmp_path / "resumed", resume_from=tmp_path / "saved")
    assert resumed.epochs_run == 3
    full_epochs = pd.read_csv(tmp_path / "full" / "epochs.csv").drop(columns="seconds")
    resumed_epochs = pd.read_csv(tmp_path / "resumed" / "epochs.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(full_epochs, resumed_epochs)
    pd.testing.assert_frame_equal(full.predictions, resumed.predictions)


def test_patience_stops_when_validation_stops_improving(learnable_data, tmp_path):
    result = train_fold({**LEARNING, "epochs": 6, "patience": 1, "fold": 2}, learnable_data, tmp_path)
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    # The rule by hand: the best (val F1, then lower val loss) so far; stop once `patience` epochs pass without one.
    best, best_epoch, expected_stop = None, 0, 6
    for row in epochs.itertuples():
        score = (row.val_macro_f1, -row.val_loss)
        if best is None or score > best:
            best, best_epoch = score, row.epoch
        if row.epoch - best_epoch >= 1:
            expected_stop = row.epoch
            break
    assert result.epochs_run == expected_stop == len(epochs)
    assert result.best_epoch == best_epoch


def test_bn_recalibration_sets_running_statistics_from_the_unaugmented_training_part(phantom_root, tmp_path):
    import torch

    from datasets import VolumeDataset
    from models import build_model

    data = prepare_data(DataSpec(data_root=str(phantom_root)), PreprocessConfig(spacing=16.0), SplitSpec(n_splits=2),
                        tmp_path / "cache", num_workers=1)
    config = {"model": "mc3_18", "fold": 0, "epochs": 1, "batch_size": 1, "lr": 1e-3}
    train_idx, train_y, _ = data.fold_indices(0)["train"]
    stem_means = {}
    for recalibrate in (False, True):
        out = tmp_path / f"recalibrate_{recalibrate}"
        train_fold({**config, "bn_recalibration": recalibrate}, data, out)
        weights = torch.load(out / "checkpoint" / "fold_state.pt", weights_only=False)["best_weights"]
        model = build_model("mc3_18")
        model.load_state_dict(weights)
        volumes = VolumeDataset(data.cached.volumes(), train_idx, train_y, data.spacing)
        with torch.no_grad():  # the stem convolution's output, averaged per channel over every training volume
            stem_means[recalibrate] = torch.stack([model.stem[0](volumes[i][0][None]).mean(dim=(0, 2, 3, 4))
                                                   for i in range(len(volumes))]).mean(0)
        running = weights["stem.1.running_mean"]
        matches = torch.allclose(running, stem_means[recalibrate], rtol=1e-4, atol=1e-6)
        # Recalibrated: the exact mean over the training part with the final weights; otherwise a lagging average.
        assert matches == recalibrate, (recalibrate, running[:4], stem_means[recalibrate][:4])
