"""Kinetics-400 transfer: exactly the stem and FC are skipped, every other tensor arrives, a missing file says how
to get it, and a wrong file (unreadable, partial, another model's) is refused naming the file and the fix."""
import pickle

import pytest
import torch
from torchvision.models.video import mc3_18, r2plus1d_18, r3d_18

from models import KineticsWeightsNotFound, PretrainedWeightsInvalid, build_model, weights_filename
from models.pretrained_weights import PRETRAINED_WEIGHTS, how_to_obtain

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


# ---------------------------------------------------------------------------------------------- every tensor, wrong files
def perturbed_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's layout for ``name`` with a distinct random value in every tensor (fresh BatchNorm buffers are
    all 0 / 1 and would hide a missed copy); integer buffers (num_batches_tracked) moved off their initial 0."""
    generator = torch.Generator().manual_seed(seed)
    state = TORCHVISION_BUILDERS[name](weights=None).state_dict()
    return {k: torch.rand(v.shape, generator=generator) + 0.5 if v.is_floating_point() else v + 7
            for k, v in state.items()}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_every_tensor_but_the_stem_and_fc_arrives_unchanged(tmp_path, name, channels):
    state = perturbed_state_dict(name)
    path = tmp_path / weights_filename(name)
    torch.save(state, path)
    own = build_model(name, in_channels=channels, pretrained=path).state_dict()
    copied = [k for k in state if not k.startswith(("stem.", "fc."))]
    assert len(copied) == len(state) - (12 if name == "r2plus1d_18" else 6) - 2
    assert [k for k in copied if not torch.equal(own[k], state[k])] == []
    # The stem is fresh (README: "every tensor except the stem ... is copied"), for any number of channels.
    assert own["stem.0.weight"].shape[1] == channels and not torch.equal(own["stem.1.running_var"], state["stem.1.running_var"])


def test_a_state_dict_saved_before_num_batches_tracked_existed_still_loads(tmp_path):
    state = {k: v for k, v in perturbed_state_dict("mc3_18").items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    own = build_model("mc3_18", pretrained=tmp_path / "old.pth").state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith(("stem.", "fc.")))


def assert_names_file_and_fix(message: str, path, name: str) -> None:
    assert str(path) in message
    assert f"Fix: replace it with torchvision's {weights_filename(name)}" in message
    assert f"{type(PRETRAINED_WEIGHTS[name].weights).__name__}.{PRETRAINED_WEIGHTS[name].weights.name}" in message


def test_a_partial_state_dict_is_refused_not_half_loaded(tmp_path):
    state = perturbed_state_dict("r3d_18")
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    for label, content in (("partial", partial), ("empty", {})):
        path = tmp_path / f"{label}.pth"
        torch.save(content, path)
        with pytest.raises(PretrainedWeightsInvalid) as error:
            build_model("r3d_18", pretrained=path)
        assert_names_file_and_fix(str(error.value), path, "r3d_18")
    path = tmp_path / "partial.pth"
    lost = [k for k in state if k.startswith("layer4.") and not k.endswith("num_batches_tracked")]
    taken = [k for k in state if not k.startswith(("stem.", "fc."))]
    with pytest.raises(PretrainedWeightsInvalid,
                       match=rf"lack {len(lost)} of the {len(taken)} tensors this model takes from them \(layer4\."):
        build_model("r3d_18", pretrained=path)


def test_files_that_are_no_state_dict_are_refused_naming_the_file_and_the_fix(tmp_path):
    full = tmp_path / "full.pth"
    torch.save(perturbed_state_dict("mc3_18"), full)
    files = {
        "truncated.pth": full.read_bytes()[: full.stat().st_size // 2],  # an interrupted download or copy
        "empty.pth": b"",
        "page.pth": b"<html><body>404 Not Found</body></html>",  # a proxy's error page saved as the file
        "pickle.pth": pickle.dumps({"weights": [1, 2, 3]}, protocol=2),  # a pickle that is not torch's
    }
    for filename, content in files.items():
        (tmp_path / filename).write_bytes(content)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"state_dict": perturbed_state_dict("mc3_18"), "epoch": 3}, tmp_path / "checkpoint.pth")
    for filename in [*files, "list.pth", "checkpoint.pth"]:
        with pytest.raises(PretrainedWeightsInvalid) as error:
            build_model("mc3_18", pretrained=tmp_path / filename)
        message = str(error.value)
        assert message.startswith(f"Kinetics-400 weights file {tmp_path / filename} for mc3_18 "), message
        assert_names_file_and_fix(message, tmp_path / filename, "mc3_18")
        assert "sha256 starts with" in message and "torchvision's with a90a0ba3" in message
    with pytest.raises(PretrainedWeightsInvalid, match="a checkpoint holding a state dict under 'state_dict'"):
        build_model("mc3_18", pretrained=tmp_path / "checkpoint.pth")


@pytest.mark.parametrize(("given", "wanted"), [("r3d_18", "mc3_18"), ("mc3_18", "r3d_18"), ("r2plus1d_18", "r3d_18")])
def test_another_models_file_is_named_for_what_it_is(tmp_path, given, wanted):
    path = tmp_path / weights_filename(wanted)  # e.g. r3d_18's weights saved under mc3_18's file name
    torch.save(perturbed_state_dict(given), path)
    with pytest.raises(PretrainedWeightsInvalid) as error:
        build_model(wanted, pretrained="kinetics", weights_dir=tmp_path)
    message = str(error.value)
    assert f"do not fit this model ({wanted}) (they are {given}'s Kinetics-400 weights, torchvision's " \
           f"{weights_filename(given)})" in message
    assert_names_file_and_fix(message, path, wanted)


def test_a_wrong_weights_file_fails_a_trial_at_once_instead_of_being_retried(tmp_path):
    from trainables.errors import is_permanent

    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(PretrainedWeightsInvalid) as error:
        build_model("mc3_18", pretrained=tmp_path / "truncated.pth")
    assert isinstance(error.value, ValueError) and is_permanent(error.value)


@pytest.mark.parametrize("name", ["r2plus1d_18", "mc3_18", "r3d_18", "resnet18_2d"])
def test_the_how_to_names_torchvisions_own_file_and_weights(name):
    import torchvision.models as tvm
    import torchvision.models.video as tvv

    expected = {"r2plus1d_18": tvv.R2Plus1D_18_Weights.KINETICS400_V1, "mc3_18": tvv.MC3_18_Weights.KINETICS400_V1,
                "r3d_18": tvv.R3D_18_Weights.KINETICS400_V1, "resnet18_2d": tvm.ResNet18_Weights.IMAGENET1K_V1}[name]
    filename = expected.url.rsplit("/", 1)[-1]
    assert weights_filename(name) == filename
    text = how_to_obtain(name)
    builder = "resnet18" if name == "resnet18_2d" else name
    module = "torchvision.models" if name == "resnet18_2d" else "torchvision.models.video"
    assert (f'python -c "from {module} import {builder}, {type(expected).__name__}; '
            f'{builder}(weights={type(expected).__name__}.{expected.name})"') in text
    assert f"~/.cache/torch/hub/checkpoints/{filename}" in text
