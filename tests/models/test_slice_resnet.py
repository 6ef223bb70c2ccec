"""The 2-D slice baseline (resnet18_2d): per-slice ResNet18, ImageNet transfer by local file, a fold through the
trainable, and its name in the report."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18
from torchvision.models.video import r3d_18

from models import (
    DISPLAY_NAMES, MODEL_NAMES, PAPER_MODEL_NAMES, KineticsWeightsNotFound, PretrainedWeightsInvalid,
    PretrainedWeightsNotFound, build_model, weights_filename,
)

IMAGENET_FILE = "resnet18-f37072fd.pth"


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    """torchvision resnet18's exact keys and shapes (1000 classes, RGB), with random values: no download."""
    torch.manual_seed(5)
    state = resnet18(weights=None).state_dict()
    # Make BatchNorm buffers recognisable too (fresh ones are all 0 / 1, which would hide a missed copy).
    return {k: torch.rand_like(v) + 0.5 if k.endswith(("running_mean", "running_var")) else v for k, v in state.items()}


@pytest.fixture()
def imagenet_dir(tmp_path, imagenet_state):
    torch.save(imagenet_state, tmp_path / IMAGENET_FILE)
    return tmp_path


# ---------------------------------------------------------------------------------------------- the model
def test_it_is_registered_but_not_a_default_model():
    assert "resnet18_2d" in MODEL_NAMES and "resnet18_2d" not in PAPER_MODEL_NAMES
    assert weights_filename("resnet18_2d") == IMAGENET_FILE


@pytest.mark.parametrize("channels", [1, 2])
def test_output_is_the_head_on_the_mean_of_per_slice_features(channels):
    torch.manual_seed(0)
    model = build_model("resnet18_2d", num_classes=3, in_channels=channels, dropout=0.5).eval()
    assert model.encoder.conv1.in_channels == channels
    assert isinstance(model.fc[0], torch.nn.Dropout) and model.fc[0].p == 0.5 and model.fc[1].in_features == 512
    volumes = torch.randn(2, channels, 5, 32, 24)  # (batch, channels, slices, H, W)
    with torch.no_grad():
        logits = model(volumes)
        # By hand: each slice alone through torchvision's ResNet18, the slice features averaged, then the head.
        per_slice = torch.stack([model.encoder(volumes[:, :, t]) for t in range(5)], dim=1)
        expected = model.fc(per_slice.mean(dim=1))
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_slice_order_and_other_volumes_do_not_matter_in_eval_mode():
    torch.manual_seed(1)
    model = build_model("resnet18_2d", num_classes=2, in_channels=1).eval()
    volumes = torch.randn(3, 1, 6, 28, 20)
    with torch.no_grad():
        logits = model(volumes)
        shuffled = model(volumes[:, :, torch.tensor([4, 0, 5, 2, 1, 3])])
        alone = model(volumes[1:2])
        with_others_changed = model(torch.cat([torch.randn(1, 1, 6, 28, 20), volumes[1:2]]))
        # A 3-D network is not invariant to slice order: the check above could fail.
        video = build_model("r3d_18", num_classes=2).eval()
        video_logits, video_shuffled = video(volumes), video(volumes[:, :, torch.tensor([4, 0, 5, 2, 1, 3])])
    torch.testing.assert_close(shuffled, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone[0], logits[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_others_changed[1], logits[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(video_shuffled, video_logits, rtol=1e-4, atol=1e-5)


def test_a_volume_of_the_wrong_rank_is_named():
    with pytest.raises(ValueError, match=r"expects \(batch, channels, slices, height, width\), got shape \(1, 32, 32\)"):
        build_model("resnet18_2d")(torch.randn(1, 32, 32))


# ---------------------------------------------------------------------------------------------- ImageNet transfer
@pytest.mark.parametrize("channels", [1, 2])
def test_imagenet_weights_load_with_conv1_averaged_over_rgb(imagenet_dir, imagenet_state, channels):
    model = build_model("resnet18_2d", in_channels=channels, pretrained="kinetics", weights_dir=imagenet_dir)
    own = model.state_dict()
    copied = [k for k in imagenet_state if not k.startswith(("conv1.", "fc."))]
    assert len(copied) == 19 + 20 * 5  # ResNet18's 20 convolutions but conv1, and its 20 BatchNorms' 5 tensors each
    for key in copied:
        assert torch.equal(own[f"encoder.{key}"], imagenet_state[key]), key
    # conv1 by hand: the RGB filters' mean, times 3/C on each of the C channels (= their sum, shared by the channels).
    rgb = imagenet_state["conv1.weight"]
    per_channel = (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3 * 3 / channels
    assert own["encoder.conv1.weight"].shape == (64, channels, 7, 7)
    for c in range(channels):
        torch.testing.assert_close(own["encoder.conv1.weight"][:, c], per_channel)
    report = model.transfer_report
    assert report.dataset == "ImageNet" and report.source == str(imagenet_dir / IMAGENET_FILE)
    assert sorted(report.loaded) == sorted(f"encoder.{k}" for k in copied)
    assert report.adapted == ["encoder.conv1.weight"]
    assert report.skipped == ["fc.weight", "fc.bias"] and report.missing == ["fc.1.weight", "fc.1.bias"]
    assert report.summary().startswith(f"ImageNet weights from {imagenet_dir / IMAGENET_FILE}: 119 tensors loaded, 1 adapted")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_conv1_responds_to_an_mri_slice_as_imagenet_conv1_to_the_same_grey_image(imagenet_dir, imagenet_state, channels):
    model = build_model("resnet18_2d", in_channels=channels, pretrained="imagenet", weights_dir=imagenet_dir)
    grey = torch.rand(1, 1, 40, 32)
    with torch.no_grad():
        ours = model.encoder.conv1(grey.expand(-1, channels, -1, -1))
        imagenet = F.conv2d(grey.expand(-1, 3, -1, -1), imagenet_state["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(ours, imagenet, rtol=1e-4, atol=1e-5)


def test_the_torch_hub_cache_is_searched_too(tmp_path, monkeypatch, imagenet_state):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save(imagenet_state, tmp_path / "checkpoints" / IMAGENET_FILE)
    assert build_model("resnet18_2d", pretrained=True).transfer_report.source == str(tmp_path / "checkpoints" / IMAGENET_FILE)


def test_missing_imagenet_weights_say_imagenet_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PretrainedWeightsNotFound) as error:
        build_model("resnet18_2d", pretrained="kinetics", weights_dir=tmp_path / "weights")
    assert isinstance(error.value, KineticsWeightsNotFound)  # the handlers written for Kinetics catch it
    message = str(error.value)
    assert message.startswith("ImageNet weights for resnet18_2d not found; looked in:")
    assert str(tmp_path / "weights" / IMAGENET_FILE) in message
    assert str(tmp_path / "hub" / "checkpoints" / IMAGENET_FILE) in message
    assert ('python -c "from torchvision.models import resnet18, ResNet18_Weights; '
            'resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)"') in message
    assert "Kinetics" not in message
    with pytest.raises(PretrainedWeightsNotFound, match=f"ImageNet weights for resnet18_2d not found at {tmp_path / 'x.pth'}"):
        build_model("resnet18_2d", pretrained=tmp_path / "x.pth")


def test_imagenet_keyword_is_refused_for_a_kinetics_model():
    with pytest.raises(ValueError, match="r3d_18 is pre-trained on Kinetics-400, not ImageNet"):
        build_model("r3d_18", pretrained="imagenet")


def test_weights_of_the_other_family_are_refused(tmp_path, imagenet_state):
    kinetics = tmp_path / "r3d.pth"
    torch.save(r3d_18(weights=None, num_classes=400).state_dict(), kinetics)
    with pytest.raises(PretrainedWeightsInvalid, match=r"ImageNet weights from .*r3d.pth do not fit this model \(resnet18_2d\) "
                       r"\(they are r3d_18's Kinetics-400 weights, torchvision's r3d_18-b3b3357e.pth\): at 'stem.0.weight'"):
        build_model("resnet18_2d", pretrained=kinetics)
    imagenet = tmp_path / "resnet18.pth"
    torch.save(imagenet_state, imagenet)
    with pytest.raises(PretrainedWeightsInvalid, match=r"Kinetics-400 weights from .*resnet18.pth do not fit this model \(r3d_18\) "
                       r"\(they are resnet18_2d's ImageNet weights, torchvision's resnet18-f37072fd.pth\): at 'conv1.weight'"):
        build_model("r3d_18", pretrained=imagenet)


def test_a_partial_or_unreadable_imagenet_file_is_refused_naming_the_file_and_the_fix(tmp_path, imagenet_state):
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in imagenet_state.items() if not k.startswith("layer4.")}, partial)
    full = tmp_path / "full.pth"
    torch.save(imagenet_state, full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[:100_000])
    for path, what in ((partial, r"lack \d+ of the 120 tensors this model takes from them \(layer4\."),
                       (truncated, "cannot be read")):
        with pytest.raises(PretrainedWeightsInvalid, match=what) as error:
            build_model("resnet18_2d", pretrained=path)
        message = str(error.value)
        assert str(path) in message and "Fix: replace it with torchvision's resnet18-f37072fd.pth" in message
        assert "ResNet18_Weights.IMAGENET1K_V1" in message


def test_a_trial_without_the_file_names_imagenet(tmp_path, monkeypatch):
    from trainables.errors import PermanentTrialError
    from trainables.ray_trainable import check_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PermanentTrialError, match=r"has no ImageNet weights for resnet18_2d \(looked for "
                                                  + str(tmp_path / "w" / IMAGENET_FILE)):
        check_weights("resnet18_2d", True, str(tmp_path / "w"), {"hostname": "h", "node_id": "n"})


# ---------------------------------------------------------------------------------------------- through the trainable
def test_opt_in_through_the_experiment_options():
    from trainables.experiment import ExperimentConfig

    assert ExperimentConfig().models == PAPER_MODEL_NAMES
    assert ExperimentConfig(models=("r3d_18", "resnet18_2d")).arms()[-1] == ("resnet18_2d", True)


@pytest.fixture(scope="module")
def phantom_data(phantom_root, tmp_path_factory):
    from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data

    return prepare_data(DataSpec(data_root=str(phantom_root)), PreprocessConfig(spacing=16.0), SplitSpec(n_splits=2),
                        tmp_path_factory.mktemp("slice_cache"), num_workers=1)


def test_one_fold_trains_with_imagenet_weights_and_recalibrated_slice_batchnorm(phantom_data, imagenet_dir, tmp_path):
    from datasets import VolumeDataset
    from trainables import train_fold

    # Batch size 1 is enough for the 2-D model: BatchNorm sees the volume's slices.
    config = {"model": "resnet18_2d", "fold": 0, "epochs": 1, "batch_size": 1, "lr": 1e-3, "bn_recalibration": True,
              "pretrained": True, "weights_dir": str(imagenet_dir), "augmentation": "light"}
    result = train_fold(config, phantom_data, tmp_path / "fold")

    test_idx = phantom_data.fold_indices(0)["test"][0]
    predictions = pd.read_csv(tmp_path / "fold" / "predictions.csv")
    assert len(predictions) == len(test_idx) == result.n_test
    np.testing.assert_allclose(predictions[["prob_LGG", "prob_HGG", "prob_Healthy"]].sum(axis=1), 1.0, rtol=1e-5)
    assert json.loads((tmp_path / "fold" / "result.json").read_text())["config"]["model"] == "resnet18_2d"

    # BN recalibration reached the BatchNorm2d layers: bn1's running mean is conv1's mean over every training slice.
    weights = {k: v.float() if v.is_floating_point() else v
               for k, v in torch.load(tmp_path / "fold" / "checkpoint" / "best_weights.pt", weights_only=True).items()}
    model = build_model("resnet18_2d")
    model.load_state_dict(weights)
    train_idx, train_y, _ = phantom_data.fold_indices(0)["train"]
    volumes = VolumeDataset(phantom_data.cached.volumes(), train_idx, train_y, phantom_data.spacing)
    with torch.no_grad():
        conv1_means = torch.stack([model.encoder.conv1(volumes[i][0].transpose(0, 1)).mean(dim=(0, 2, 3))
                                   for i in range(len(volumes))]).mean(0)
    torch.testing.assert_close(weights["encoder.bn1.running_mean"], conv1_means, rtol=5e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------- the report's words
def test_the_report_names_it_the_2d_baseline_with_its_imagenet_pretraining():
    from analysis.names import arm_label, display_name, sort_arms
    from analysis.paper import published

    assert display_name("resnet18_2d") == DISPLAY_NAMES["resnet18_2d"] == "2-D baseline: ResNet18 on axial slices"
    assert arm_label("resnet18_2d", True) == "2-D baseline: ResNet18 on axial slices (ImageNet pre-trained)"
    assert arm_label("resnet18_2d", False) == "2-D baseline: ResNet18 on axial slices (scratch)"
    assert arm_label("r3d_18", True) == "ResNet3D (pre-trained)"
    assert sort_arms([("resnet18_2d", False), ("mc3_18", True), ("r3d_18", False)])[-1] == ("resnet18_2d", False)
    assert np.isnan(published("resnet18_2d", True, "macro_f1")[0])  # not a paper arm: no published value
