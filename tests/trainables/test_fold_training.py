"""One fold without Ray: class weights, config checks, the data-on-device path, light checkpoints, resume,
and a run that learns the phantoms."""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
from trainables import class_weights, classification_metrics, resolve_config, train_fold
from trainables.metrics import WeightedCrossEntropy
from trainables import PAPER_DEFAULTS, fold_training


def test_class_weights_are_one_minus_class_share():
    # counts 3, 1, 2 of N = 6 -> 1 - 3/6, 1 - 1/6, 1 - 2/6
    np.testing.assert_allclose(class_weights([0, 0, 0, 1, 2, 2], 3), [0.5, 5 / 6, 2 / 3])
    np.testing.assert_allclose(class_weights([1, 1], 3), [1.0, 0.0, 1.0])


def test_class_weights_act_on_each_sample_at_any_batch_size():
    """W_c = 1 - n_c/N must weigh a sample even alone in its batch (torch's per-batch weighted mean cancels it)."""
    targets = [0, 0, 0, 1, 2, 2]  # weights 1/2, 5/6, 2/3; mean over the samples (3/2 + 5/6 + 4/3) / 6 = 11/18
    criterion = WeightedCrossEntropy.for_training_part(targets, 3)
    assert criterion.mean_weight == pytest.approx(11 / 18)
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor(targets)
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    for i, weight in enumerate([1 / 2, 1 / 2, 1 / 2, 5 / 6, 2 / 3, 2 / 3]):  # batch size 1
        assert criterion(logits[i:i + 1], labels[i:i + 1]).item() == pytest.approx(weight * nll[i].item() / (11 / 18))
    # An epoch's batch losses, weighted by batch size, add up to the whole part's weighted mean for every batch size.
    whole = torch.nn.CrossEntropyLoss(weight=criterion.weight)(logits, labels).item()
    for size in (1, 2, 4, 6):
        epoch = sum(criterion(logits[s:s + size], labels[s:s + size]).item() * len(labels[s:s + size])
                    for s in range(0, 6, size)) / 6
        assert epoch == pytest.approx(whole)
    weighted, weights = criterion.sums(logits[3:5], labels[3:5])
    assert weighted.item() == pytest.approx(5 / 6 * nll[3].item() + 2 / 3 * nll[4].item())
    assert weights.item() == pytest.approx(5 / 6 + 2 / 3)


def test_batch_norm_recalibration_is_the_mean_over_samples_with_a_short_last_batch():
    torch.manual_seed(0)
    inputs = torch.randn(9, 2, 3, 4, 4) + torch.arange(9.0).view(9, 1, 1, 1, 1)  # subjects differ in mean
    model = torch.nn.Sequential(torch.nn.BatchNorm3d(2)).eval()
    batches = [inputs[0:4], inputs[4:8], inputs[8:9]]  # 4, 4, 1: the lone subject must weigh 1/9, not 1/3
    fold_training.recalibrate_batch_norm(model, batches)
    torch.testing.assert_close(model[0].running_mean, inputs.mean(dim=(0, 2, 3, 4)))
    assert model[0].momentum == 0.1 and not model.training  # restored
    equal_weights = torch.stack([b.mean(dim=(0, 2, 3, 4)) for b in batches]).mean(0)  # torch's update_bn
    assert not torch.allclose(model[0].running_mean, equal_weights, atol=1e-2)


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
    assert resolve_config({"_experiment": "paper"})["lr"] == PAPER_DEFAULTS["lr"]  # private keys pass through untouched


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
    ({"model": "resnet50"}, "model must be one of r2plus1d_18, mc3_18, r3d_18, resnet18_2d, got 'resnet50'"),
    ({"checkpoint_every": 0}, "checkpoint_every must be positive, got 0"),
    ({"checkpoint_every": 1.5}, "checkpoint_every must be a whole number, got 1.5"),
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


# bn_recalibration: 12 short epochs leave BatchNorm's running averages behind the weights (see DEFAULT_CONFIG);
# without it this run passed or failed with the dropout masks (which moved when batches stopped coming from a
# DataLoader that drew a seed from the global RNG every epoch).
LEARNING = {"model": "r2plus1d_18", "fold": 0, "epochs": 12, "lr": 3e-4, "batch_size": 4, "aug_strength": 0.0, "seed": 0,
            "bn_recalibration": True}


def _saved_bytes(payload) -> int:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.tell()


def _model_and_optimizer_bytes(data, model_name: str) -> int:
    """What one copy of the model's and Adam's state takes in a file, Adam's state filled by one step."""
    from models import build_model

    model = build_model(model_name, num_classes=len(data.classes), in_channels=data.cached.meta["channels"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, data.cached.meta["channels"], 8, 8, 8)).sum().backward()
    optimizer.step()
    return _saved_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def _folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


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
    # a learnable fold ends predicting more than one class on validation; every epoch uses 1-3 classes
    assert epochs["val_predicted_classes"].between(1, 3).all() and epochs["val_predicted_classes"].iloc[-1] > 1
    summary = json.loads((tmp_path / "result.json").read_text())
    assert epochs["val_macro_f1"].iloc[summary["best_epoch"] - 1] == epochs["val_macro_f1"].max()
    assert [r["epoch"] for r in reports] == list(range(1, 13)) and reports[-1]["fold_finished"]


def test_resume_with_checkpoint_every_two_replays_the_lost_epoch_exactly(phantom_data, tmp_path):
    # Light augmentation on the device (strength 1): its generator is seeded from (seed, fold, epoch).
    # mc3_18 on the 16 mm phantoms: replay depends on neither the architecture nor the voxel size, and checkpoint
    # sizes only on the model.
    quick = {**LEARNING, "model": "mc3_18", "epochs": 5, "fold": 1, "aug_strength": 1.0, "checkpoint_every": 2}
    checkpoints = {}

    def record(metrics, checkpoint_dir):
        checkpoints[metrics["epoch"]] = None if checkpoint_dir is None else {
            "bytes": _folder_bytes(checkpoint_dir), "files": sorted(os.listdir(checkpoint_dir))}

    full = train_fold(quick, phantom_data, tmp_path / "full", reporter=record, best_weights_store=tmp_path / "best_full")
    # A report every epoch; a checkpoint every second epoch and at the end.
    assert sorted(checkpoints) == [1, 2, 3, 4, 5]
    assert [e for e, c in checkpoints.items() if c is not None] == [2, 4, 5]
    bound = _model_and_optimizer_bytes(phantom_data, quick["model"])
    for epoch in (2, 4):  # model + optimizer once (plus RNG states and history), no second copy of the weights
        assert checkpoints[epoch]["files"] == ["fold_state.pt"]
        assert checkpoints[epoch]["bytes"] <= bound + 64_000, (checkpoints[epoch]["bytes"], bound)
    assert checkpoints[5]["files"] == ["best_weights.pt", "epochs.csv", "fold_state.pt", "predictions.csv", "result.json",
                                       "val_predictions.csv"]
    assert checkpoints[5]["bytes"] < bound / 2.5  # the weights only: a third of model + Adam
    assert not list((tmp_path / "best_full").glob("best_weights_e*.pt"))  # the side store is emptied at the end

    def crash_in_epoch_three(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            shutil.rmtree(tmp_path / "saved", ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp_path / "saved")
        if metrics["epoch"] == 3:
            raise KeyboardInterrupt("simulated crash")

    store = tmp_path / "best_part"
    with pytest.raises(KeyboardInterrupt):
        train_fold(quick, phantom_data, tmp_path / "part", reporter=crash_in_epoch_three, best_weights_store=store)
    assert torch.load(tmp_path / "saved" / "fold_state.pt", weights_only=False)["epoch"] == 2
    # Continued from epoch 2's checkpoint, the run replays epoch 3 and matches the uninterrupted one exactly.
    resumed = train_fold(quick, phantom_data, tmp_path / "resumed", resume_from=tmp_path / "saved",
                         best_weights_store=store)
    assert resumed.epochs_run == 5
    full_epochs = pd.read_csv(tmp_path / "full" / "epochs.csv").drop(columns="seconds")
    resumed_epochs = pd.read_csv(tmp_path / "resumed" / "epochs.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(full_epochs, resumed_epochs)
    pd.testing.assert_frame_equal(full.predictions, resumed.predictions)


def test_best_weights_wait_on_the_side_once_and_come_back_on_resume(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    store, cpu = fold_training.WeightStore(tmp_path / "store"), torch.device("cpu")
    state = fold_training._State()
    state.epoch, state.best_epoch, state.best_score = 4, 4, (0.5, -1.0)
    state.best_weights = {k: v.clone() for k, v in model.state_dict().items()}
    # The best epoch is the checkpoint's own: its model is the best weights, nothing goes to the side.
    assert fold_training._save_checkpoint(tmp_path, model, optimizer, None, state, store, cpu) is None
    assert not (tmp_path / "store").exists()
    with torch.no_grad():
        model[0].weight.add_(1.0)  # epoch 5 and 6 train on; epoch 4 stays the best
    state.epoch = 6
    assert fold_training._save_checkpoint(tmp_path, model, optimizer, None, state, store, cpu) == 4
    written = os.path.getmtime(store.file(4))
    state.epoch = 8  # a later checkpoint with the same best epoch writes nothing again
    assert fold_training._save_checkpoint(tmp_path, model, optimizer, None, state, store, cpu) == 4
    assert os.path.getmtime(store.file(4)) == written and len(list((tmp_path / "store").iterdir())) == 1
    payload = torch.load(tmp_path / "fold_state.pt", weights_only=False)
    assert "best_weights" not in payload and not payload["best_in_model"]
    restored_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    restored = fold_training._State()
    assert not fold_training._load_checkpoint(tmp_path, restored_model, torch.optim.Adam(restored_model.parameters()),
                                              None, restored, store, cpu)
    assert restored.epoch == 8 and restored.best_epoch == 4 and restored.stored_best_epoch == 4
    for key, value in state.best_weights.items():
        torch.testing.assert_close(restored.best_weights[key], value, rtol=0, atol=0)
    torch.testing.assert_close(restored_model[0].weight, model[0].weight, rtol=0, atol=0)
    store.prune(None)
    assert not list((tmp_path / "store").iterdir())


@pytest.mark.parametrize("written_fused, resumed_fused", [(False, True), (True, False)])
def test_a_checkpoint_resumes_with_the_optimizer_kernel_of_the_device_it_resumes_on(tmp_path, written_fused,
                                                                                   resumed_fused):
    """A CPU run resumed on a GPU (fused Adam + GradScaler there) and the reverse; both kernels exist on the CPU."""
    def linear_and_adam(fused):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)

    model, optimizer = linear_and_adam(written_fused)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state, store, cpu = fold_training._State(), fold_training.WeightStore(tmp_path / "store"), torch.device("cpu")
    state.epoch, state.best_epoch, state.best_score = 1, 1, (0.5, -1.0)
    state.best_weights = {k: v.clone() for k, v in model.state_dict().items()}
    fold_training._save_checkpoint(tmp_path, model, optimizer, None, state, store, cpu)

    resumed_model, resumed = linear_and_adam(resumed_fused)
    fold_training._load_checkpoint(tmp_path, resumed_model, resumed, None, fold_training._State(), store, cpu)
    assert bool(resumed.param_groups[0]["fused"]) is resumed_fused
    assert resumed.param_groups[0]["lr"] == 1e-3 and resumed.state_dict()["state"][0]["step"].item() == 1.0
    torch.testing.assert_close(resumed.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    # The step a GPU trial takes: the GradScaler hands its scale to the fused kernel (the unfused one refuses it).
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(resumed_model(torch.randn(5, 4)).sum()).backward()
    scaler.step(resumed)
    scaler.update()
    assert resumed.state_dict()["state"][0]["step"].item() == 2.0


def test_amp_uses_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    calls = []

    def supported(answer):
        def is_bf16_supported(*args, **kwargs):
            calls.append((args, kwargs))
            return answer
        return is_bf16_supported

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(True))
    assert fold_training.amp_setup(cuda, True) == (torch.bfloat16, None)
    assert calls[-1] == ((), {"including_emulation": False})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(False))
    with pytest.warns(UserWarning):  # no CUDA here: the scaler warns and disables itself, the choice stands
        dtype, scaler = fold_training.amp_setup(cuda, True)
    assert dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    # An indexed device is made current while asking, so a mixed machine's cuda:1 is judged by its own GPU.
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda index: entered.append(index) or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(True))
    assert fold_training.amp_setup(torch.device("cuda:1"), True) == (torch.bfloat16, None)
    assert entered == [1]
    calls.clear()
    assert fold_training.amp_setup(torch.device("cpu"), True) == (None, None)
    assert fold_training.amp_setup(cuda, False) == (None, None)
    assert calls == []


@pytest.mark.parametrize("archs, capability, supported", [
    (["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], (7, 0), False),  # this torch build on a V100
    (["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], (7, 5), True),   # a T4
    (["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], (8, 9), True),   # sm_86's cubin runs on an L4
    (["sm_80", "sm_90a"], (9, 0), True),                                        # H100 with arch-specific cubins
    (["sm_80", "compute_80"], (9, 0), True),                                    # PTX, compiled at load time
    (["sm_80", "sm_86"], (9, 0), False),                                        # no Hopper cubin, no PTX
    (["sm_80", "sm_100a"], (10, 3), False),                                     # arch-specific: exactly 10.0
    (["sm_80", "sm_100f"], (10, 3), True),                                      # family-specific: 10.x
    (["gfx90a", "gfx942"], (9, 4), True),                                       # names it cannot read: let it run
])
def test_a_gpu_the_torch_build_has_no_kernels_for_is_named_before_training(monkeypatch, tmp_path, archs, capability,
                                                                           supported):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    problem = fold_training.unsupported_gpu(torch.device("cuda"))
    assert (problem is None) == supported, problem
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)  # ROCm: its devices are "cuda" too
    assert fold_training.unsupported_gpu(torch.device("cuda")) is None
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert fold_training.unsupported_gpu(torch.device("cpu")) is None
    if not supported:
        assert problem.startswith(f"Tesla V100-SXM2-16GB (sm_{capability[0]}{capability[1]}) is not among the GPU "
                                  f"architectures this torch {torch.__version__} was built for ({', '.join(archs)})")
        # A trial stops at once with that message (not retried by Tune), before any data reaches the device.
        from trainables.errors import PermanentTrialError
        with pytest.raises(PermanentTrialError, match=r"Install a torch build that includes sm_"):
            train_fold({"model": "mc3_18", "fold": 0, "epochs": 1}, None, tmp_path, device="cuda")
        assert list(tmp_path.iterdir()) == []


PATIENCE = {**LEARNING, "epochs": 6, "patience": 1, "fold": 2}


@pytest.fixture(scope="module")
def patience_run(learnable_data, tmp_path_factory):
    """One early-stopped fold (result, output folder), trained once for the tests that read it."""
    out = tmp_path_factory.mktemp("patience")
    return train_fold(PATIENCE, learnable_data, out), out


def test_patience_stops_when_validation_stops_improving(patience_run, learnable_data, tmp_path):
    result, out = patience_run
    epochs = pd.read_csv(out / "epochs.csv")
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
    # The final checkpoint: float32 best weights, counters and the outputs; no model or optimizer state.
    checkpoint = out / "checkpoint"
    assert sorted(os.listdir(checkpoint)) == ["best_weights.pt", "epochs.csv", "fold_state.pt", "predictions.csv",
                                              "result.json", "val_predictions.csv"]
    state = torch.load(checkpoint / "fold_state.pt", weights_only=False)
    assert state["finished"] and not {"model", "optimizer", "scaler", "best_weights"} & set(state)
    weights = torch.load(checkpoint / "best_weights.pt", weights_only=True)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    # Resumed from it, the fold is not trained again: the result comes back from its outputs.
    again = train_fold(PATIENCE, learnable_data, tmp_path / "again", resume_from=checkpoint)
    assert again.epochs_run == result.epochs_run and again.best_epoch == result.best_epoch
    pd.testing.assert_frame_equal(again.predictions, result.predictions, check_dtype=False)
    pd.testing.assert_frame_equal(again.val_predictions, result.val_predictions, check_dtype=False)

    # A finished checkpoint written before folds saved validation predictions still resumes from its outputs:
    # its test predictions are kept (not rescored from its weights) and it has no validation predictions.
    old = tmp_path / "old_checkpoint"
    shutil.copytree(checkpoint, old)
    (old / "val_predictions.csv").unlink()
    from_old = train_fold(PATIENCE, learnable_data, tmp_path / "from_old", resume_from=old)
    assert from_old.val_predictions is None and not (tmp_path / "from_old" / "val_predictions.csv").exists()
    pd.testing.assert_frame_equal(from_old.predictions, again.predictions, check_exact=True)


def test_validation_predictions_are_the_best_weights_scores_of_the_fold_validation_part(patience_run, learnable_data):
    """val_predictions.csv holds the fold's validation subjects, scored by the weights of the best epoch: the loss
    and macro F1 recomputed from its probabilities equal what that epoch recorded while training."""
    result, out = patience_run
    fold, batch_size = PATIENCE["fold"], PATIENCE["batch_size"]
    val = pd.read_csv(out / "val_predictions.csv", dtype={"subject_id": str})
    classes = list(learnable_data.classes)
    assert list(val.columns) == ["subject_id", "label", "pred", *[f"prob_{c}" for c in classes]]
    # Exactly the fold's validation part, in its order; none of its test subjects.
    _, val_y, val_ids = learnable_data.fold_indices(fold)["val"]
    assert list(val["subject_id"]) == list(val_ids) and sorted(val_ids) == sorted(learnable_data.plan.folds[fold].val)
    assert not set(val["subject_id"]) & set(learnable_data.plan.folds[fold].test)
    assert list(val["label"]) == [classes[i] for i in val_y]
    pd.testing.assert_frame_equal(result.val_predictions, val, check_dtype=False)
    probs = val[[f"prob_{c}" for c in classes]].to_numpy()
    assert list(val["pred"]) == [classes[i] for i in probs.argmax(1)]
    # The weighted cross-entropy over the whole validation part, with the training part's class weights.
    weights = class_weights(learnable_data.fold_indices(fold)["train"][1], len(classes))
    nll = -np.log(probs[np.arange(len(val_y)), val_y])
    loss = (weights[val_y] * nll).sum() / weights[val_y].sum()
    best = pd.read_csv(out / "epochs.csv").set_index("epoch").loc[result.best_epoch]
    assert loss == pytest.approx(best["val_loss"], rel=1e-5)
    recorded = classification_metrics("val", val_y, probs.argmax(1), classes)
    assert recorded["val_macro_f1"] == pytest.approx(best["val_macro_f1"]) == pytest.approx(result.best_val_macro_f1)


@pytest.fixture(scope="module")
def phantom_data(phantom_root, tmp_path_factory):
    return prepare_data(DataSpec(data_root=str(phantom_root)), PreprocessConfig(spacing=16.0), SplitSpec(n_splits=2),
                        tmp_path_factory.mktemp("phantom_cache"), num_workers=1)


def test_bn_recalibration_sets_running_statistics_from_the_unaugmented_training_part(phantom_data, tmp_path):
    from datasets import VolumeDataset
    from models import build_model

    data = phantom_data
    config = {"model": "mc3_18", "fold": 0, "epochs": 1, "batch_size": 1, "lr": 1e-3}
    train_idx, train_y, _ = data.fold_indices(0)["train"]
    stem_means = {}
    for recalibrate in (False, True):
        out = tmp_path / f"recalibrate_{recalibrate}"
        train_fold({**config, "bn_recalibration": recalibrate}, data, out)
        # The final checkpoint's weights (float32; earlier runs kept float16, still loadable).
        weights = {k: v.float() if v.is_floating_point() else v
                   for k, v in torch.load(out / "checkpoint" / "best_weights.pt", weights_only=True).items()}
        model = build_model("mc3_18")
        model.load_state_dict(weights)
        volumes = VolumeDataset(data.cached.volumes(), train_idx, train_y, data.spacing)
        with torch.no_grad():  # the stem convolution's output, averaged per channel over every training volume
            stem_means[recalibrate] = torch.stack([model.stem[0](volumes[i][0][None]).mean(dim=(0, 2, 3, 4))
                                                   for i in range(len(volumes))]).mean(0)
        running = weights["stem.1.running_mean"]
        matches = torch.allclose(running, stem_means[recalibrate], rtol=5e-3, atol=1e-4)
        # Recalibrated: the exact mean over the training part with the final weights; otherwise a lagging average.
        assert matches == recalibrate, (recalibrate, running[:4], stem_means[recalibrate][:4])


@pytest.mark.parametrize("augmentation", ["light", "heavy"])
def test_bn_recalibration_sees_the_epoch_s_shuffled_batches_not_the_id_sorted_part(phantom_data, tmp_path, monkeypatch,
                                                                                  augmentation):
    """The training part is stored sorted by subject id, so its consecutive batches hold one source and mostly
    one class (every IXI id after every BraTS id). Averaging such batches' variances misses the variance between
    sources and classes that every shuffled training batch contains (found by review: 1.2 against 27 on two
    blocks N(0, 1) and N(10, 1)). Recalibration gets the epoch's own batches, un-augmented, on either data path."""
    from datasets import VolumeDataset

    seen = []
    real = fold_training.recalibrate_batch_norm

    def record(model, batches):
        batches = list(batches)
        seen.append(batches)
        real(model, batches)

    monkeypatch.setattr(fold_training, "recalibrate_batch_norm", record)
    config = {"model": "mc3_18", "fold": 0, "epochs": 2, "batch_size": 4, "lr": 1e-3, "bn_recalibration": True,
              "seed": 3, "augmentation": augmentation, "aug_strength": 1.0, "num_workers": 0}
    train_fold(config, phantom_data, tmp_path)
    train_idx, train_y, _ = phantom_data.fold_indices(0)["train"]
    volumes = VolumeDataset(phantom_data.cached.volumes(), train_idx, train_y, phantom_data.spacing)
    plain = torch.stack([volumes[i][0] for i in range(len(volumes))])  # un-augmented, video layout
    assert len(seen) == 2
    for epoch, batches in enumerate(seen, start=1):
        order = fold_training.training_order(len(volumes), seed=3, epoch=epoch)
        assert [len(b) for b in batches] == [len(order[s:s + 4]) for s in range(0, len(order), 4)]
        torch.testing.assert_close(torch.cat(batches), plain[order], rtol=0, atol=0)
        assert not torch.equal(order, torch.arange(len(order)))
    classes_per_sorted_batch = [len(set(train_y[s:s + 4])) for s in range(0, len(train_y), 4)]
    assert min(classes_per_sorted_batch) == 1  # what the id-sorted batches would have been


def test_data_on_the_device_trains_exactly_like_the_dataloader_path(phantom_data, tmp_path):
    """``none`` (volumes on the device, batches by index) against ``heavy`` at strength 0: the DataLoader over
    VolumeDataset of before, with no transform. Same order, same batches, same BatchNorm recalibration."""
    import SimpleITK as sitk

    threads_before, sitk_before = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    seen_threads = []

    def record_threads(metrics, checkpoint_dir):
        seen_threads.append((torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))

    config = {"model": "mc3_18", "fold": 1, "epochs": 2, "batch_size": 2, "lr": 1e-3, "bn_recalibration": True}
    outputs = {}
    for kind in ("none", "heavy"):
        outputs[kind] = train_fold({**config, "augmentation": kind, "aug_strength": 0.0}, phantom_data, tmp_path / kind,
                                   reporter=record_threads, cpus=1)
    # The trial's CPU share caps torch's and SimpleITK's threads while it runs, and only then.
    assert set(seen_threads) == {(1, 1)}
    assert torch.get_num_threads() == threads_before
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == sitk_before
    epochs = {kind: pd.read_csv(tmp_path / kind / "epochs.csv").drop(columns="seconds") for kind in outputs}
    pd.testing.assert_frame_equal(epochs["none"], epochs["heavy"], check_exact=True)
    pd.testing.assert_frame_equal(outputs["none"].predictions, outputs["heavy"].predictions, check_exact=True)
    pd.testing.assert_frame_equal(outputs["none"].val_predictions, outputs["heavy"].val_predictions, check_exact=True)
    assert sorted(outputs["none"].val_predictions["subject_id"]) == sorted(phantom_data.plan.folds[1].val)
    assert list(outputs["none"].predictions.columns) == ["subject_id", "label", "pred", "prob_LGG", "prob_HGG",
                                                         "prob_Healthy"]


def test_evaluation_never_augments_and_matches_a_dataloader_reference(phantom_data, tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    from datasets import VolumeDataset, device_augmentation
    from datasets.volume_dataset import DeviceVolumes
    from models import build_model

    # Light augmentation runs on training batches only: never on validation, test or BatchNorm recalibration.
    augmented, original = [], device_augmentation.augment_light

    def counting(batch, strength, generator):
        augmented.append(batch.shape[0])
        return original(batch, strength, generator)

    monkeypatch.setattr(device_augmentation, "augment_light", counting)
    config = {"model": "mc3_18", "fold": 0, "epochs": 2, "batch_size": 3, "lr": 1e-3, "bn_recalibration": True,
              "augmentation": "light", "aug_strength": 2.0}
    train_fold(config, phantom_data, tmp_path / "light")
    n_train = len(phantom_data.fold_indices(0)["train"][0])
    assert sum(augmented) == 2 * n_train

    # The device evaluation against the DataLoader loop it replaced, on one model's validation part.
    torch.manual_seed(0)
    model = build_model("mc3_18", num_classes=3).eval()
    weights = torch.tensor([0.2, 0.5, 0.3])
    criterion = WeightedCrossEntropy(weights, mean_weight=0.4)
    idx, y, _ = phantom_data.fold_indices(0)["val"]
    volumes = phantom_data.cached.volumes()
    loss, probs, targets = fold_training._evaluate(model, DeviceVolumes(volumes, idx, y, "cpu"), criterion, None, 2)
    reference_probs, reference_logits = [], []
    with torch.no_grad():
        for batch, labels in DataLoader(VolumeDataset(volumes, idx, y, phantom_data.spacing), batch_size=2):
            logits = model(batch)
            reference_logits.append(logits)
            reference_probs.append(torch.softmax(logits, dim=1).numpy())
    np.testing.assert_array_equal(probs, np.concatenate(reference_probs))
    np.testing.assert_array_equal(targets, y)
    # torch's weighted mean over the whole part at once (one batch): the same, whatever the batch size was.
    whole = torch.nn.CrossEntropyLoss(weight=weights)(torch.cat(reference_logits), torch.as_tensor(y)).item()
    assert loss == pytest.approx(whole, rel=1e-6)


def test_a_finished_checkpoint_without_weights_or_outputs_is_refused_not_scored_untrained(phantom_data, tmp_path):
    from trainables.errors import PermanentTrialError

    config = {"model": "mc3_18", "fold": 0, "epochs": 1, "batch_size": 4, "lr": 1e-3}
    train_fold(config, phantom_data, tmp_path / "full")
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / "full" / "checkpoint", kept)
    (kept / "result.json").unlink()
    # Outputs lost, weights kept: rebuilt from the weights, the same predictions as the run that wrote them.
    rebuilt = train_fold(config, phantom_data, tmp_path / "rebuilt", resume_from=kept)
    pd.testing.assert_frame_equal(rebuilt.predictions, pd.read_csv(tmp_path / "full" / "predictions.csv",
                                                                   dtype={"subject_id": str}), check_dtype=False)
    (kept / "best_weights.pt").unlink()
    with pytest.raises(PermanentTrialError, match=r"has lost its best weights \(best_weights.pt\) and outputs "
                                                  r"\(result.json\).*delete that checkpoint"):
        train_fold(config, phantom_data, tmp_path / "again", resume_from=kept)
