"""The paper's models: parameter counts (Table 1), heads, stems and input layout."""
import pytest
import torch

from models import DISPLAY_NAMES, MODEL_NAMES, PAPER_MODEL_NAMES, PAPER_TRAINABLE_PARAMETERS, build_model, count_trainable_parameters


@pytest.mark.parametrize("name", ["r2plus1d_18", "mc3_18"])
def test_trainable_parameters_match_table_1(name):
    assert count_trainable_parameters(build_model(name)) == PAPER_TRAINABLE_PARAMETERS[name]


def test_r3d_18_is_1527_parameters_short_of_the_printed_table():
    # torchvision's r3d_18 with the paper's stem and head; the paper printed 33,150,522.
    assert count_trainable_parameters(build_model("r3d_18")) == 33_148_995
    assert PAPER_TRAINABLE_PARAMETERS["r3d_18"] - 33_148_995 == 1527


def test_display_names_cover_every_model():
    assert set(DISPLAY_NAMES) == set(MODEL_NAMES)
    assert DISPLAY_NAMES["r2plus1d_18"] == "ResNet (2+1)D"


def test_the_paper_models_are_the_default_and_the_2d_baseline_is_extra():
    assert PAPER_MODEL_NAMES == ("r2plus1d_18", "mc3_18", "r3d_18")
    assert MODEL_NAMES == (*PAPER_MODEL_NAMES, "resnet18_2d")


@pytest.mark.parametrize("name", PAPER_MODEL_NAMES)  # the 2-D baseline has no stem: tests/models/test_slice_resnet.py
def test_forward_on_a_small_multichannel_volume(name):
    model = build_model(name, num_classes=2, in_channels=2, dropout=0.5).eval()
    assert model.stem[0].in_channels == 2
    assert isinstance(model.fc[0], torch.nn.Dropout) and model.fc[0].p == 0.5
    assert model.fc[1].out_features == 2
    with torch.no_grad():
        logits = model(torch.randn(1, 2, 8, 32, 32))  # (batch, channels, slices, H, W)
    assert logits.shape == (1, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"name": "resnet50"}, "Unknown model 'resnet50'"), ({"name": "mc3_18", "num_classes": 1}, "num_classes"),
     ({"name": "mc3_18", "dropout": 1.0}, "dropout"), ({"name": "mc3_18", "in_channels": 0}, "in_channels")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)
