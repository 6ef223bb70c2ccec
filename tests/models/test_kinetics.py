"""Kinetics-400 transfer: exactly the stem and FC are skipped, and a missing file says how to get it."""
import pytest
import torch
from torchvision.models.video import mc3_18, r2plus1d_18, r3d_18

from models import KineticsWeightsNotFound, build_model, weights_filename

TORCHVISION_BUILDERS = {"r3d_18": r3d_18, "mc3_18": mc3_18, "r2plus1d_18": r2plus1d_18}


def kinetics_like_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's exact keys and shapes for the 400-class RGB model, filled with recognisable values."""
    state = TORCHVISION_BUILDERS[name](weights=None, num_classes=400).state_dict()
    return {k: torch.full_like(v, 0.125) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_transfer_skips_exactly_stem_and_fc(tmp_path, name):
    state = kinetics_like_state_dict(name)
    path = tmp_path / weights_filename(name)
    torch.save(state, path)
    model = build_model(name, pretrained=path)
    report = model.transfer_report
    assert set(report.skipped) == {k for k in state if k.startswith(("stem.", "fc."))}
    assert set(report.loaded) == {k for k in state if not k.startswith(("stem.", "fc."))}
    assert report.missing and all(k.startswith(("stem.", "fc.")) for k in report.missing)
    own = model.state_dict()
    assert all(torch.all(own[k] == 0.125) for k in report.loaded if own[k].is_floating_point())
    assert not torch.all(own["stem.0.weight"] == 0.125)  # single-channel stem stays fresh
    assert own["fc.1.weight"].shape == (3, 512)


def test_kinetics_name_resolves_through_weights_dir(tmp_path):
    torch.save(kinetics_like_state_dict("mc3_18"), tmp_path / weights_filename("mc3_18"))
    model = build_model("mc3_18", pretrained="kinetics", weights_dir=tmp_path)
    assert model.transfer_report.source == str(tmp_path / "mc3_18-a90a0ba3.pth")


def test_kinetics_name_resolves_through_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save(kinetics_like_state_dict("r3d_18"), tmp_path / "checkpoints" / "r3d_18-b3b3357e.pth")
    assert len(build_model("r3d_18", pretrained="kinetics").transfer_report.loaded) > 50


def test_missing_weights_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(KineticsWeightsNotFound) as error:
        build_model("r2plus1d_18", pretrained="kinetics", weights_dir=tmp_path / "weights")
    message = str(error.value)
    assert str(tmp_path / "weights" / "r2plus1d_18-91a641e6.pth") in message
    assert str(tmp_path / "hub" / "checkpoints" / "r2plus1d_18-91a641e6.pth") in message
    assert "R2Plus1D_18_Weights.KINETICS400_V1" in message


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(kinetics_like_state_dict("r2plus1d_18"), path)
    with pytest.raises(ValueError, match="do not fit this model"):
        build_model("r3d_18", pretrained=path)
