"""Kinetics-400 transfer from a local torchvision state dict.

Nothing is downloaded: the weights come from a file the user names, a ``--weights-dir``, or
torch's hub cache (where torchvision itself would have saved them). Every tensor is copied
except the stem (3 RGB input channels there) and the final FC (400 Kinetics classes there).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models.video import MC3_18_Weights, R2Plus1D_18_Weights, R3D_18_Weights

log = logging.getLogger(__name__)

KINETICS_WEIGHTS = {
    "r3d_18": R3D_18_Weights.KINETICS400_V1,
    "mc3_18": MC3_18_Weights.KINETICS400_V1,
    "r2plus1d_18": R2Plus1D_18_Weights.KINETICS400_V1,
}

# Keys that never transfer: the stem sees 1 MRI channel, not 3 RGB ones; the head has our classes.
SKIPPED_PREFIXES = ("stem.", "fc.")


class KineticsWeightsNotFound(FileNotFoundError):
    """Raised before any training when a Kinetics-400 state dict is not on this machine."""


@dataclass
class TransferReport:
    """Which keys of the model came from Kinetics-400 and which stayed randomly initialised."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"Kinetics-400 weights from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.skipped)} skipped (stem/fc), {len(self.missing)} left at initialisation"
        )


def weights_filename(model_name: str) -> str:
    """File name torchvision uses for this model's Kinetics-400 weights (e.g. ``r3d_18-b3b3357e.pth``)."""
    if model_name not in KINETICS_WEIGHTS:
        raise ValueError(f"No Kinetics-400 weights are known for model {model_name!r}; choose one of {sorted(KINETICS_WEIGHTS)}")
    return os.path.basename(urlparse(KINETICS_WEIGHTS[model_name].url).path)


def candidate_paths(model_name: str, weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Places searched, in order, for ``model_name``'s Kinetics-400 file."""
    filename = weights_filename(model_name)
    places = []
    if weights_dir is not None:
        places.append(Path(weights_dir) / filename)
    places.append(Path(torch.hub.get_dir()) / "checkpoints" / filename)
    return places


def how_to_obtain(model_name: str) -> str:
    weights = KINETICS_WEIGHTS[model_name]
    enum_name = type(weights).__name__
    return (
        "On a machine with internet, run\n"
        f"    python -c \"from torchvision.models.video import {model_name}, {enum_name}; "
        f"{model_name}(weights={enum_name}.KINETICS400_V1)\"\n"
        f"then copy ~/.cache/torch/hub/checkpoints/{weights_filename(model_name)} into --weights-dir "
        "(or into this machine's torch hub cache)."
    )


def resolve_weights_path(model_name: str, pretrained: str | os.PathLike, weights_dir: str | os.PathLike | None = None) -> Path:
    """Turn ``pretrained`` (a file path, or ``"kinetics"``) into an existing file or fail with a how-to."""
    if str(pretrained).lower() not in {"kinetics", "kinetics400", "true"}:
        path = Path(pretrained).expanduser()
        if path.is_file():
            return path
        raise KineticsWeightsNotFound(
            f"Kinetics-400 weights for {model_name} not found at {path}.\n{how_to_obtain(model_name)}"
        )
    places = candidate_paths(model_name, weights_dir)
    for path in places:
        if path.is_file():
            return path
    searched = "\n".join(f"    {p}" for p in places)
    raise KineticsWeightsNotFound(
        f"Kinetics-400 weights for {model_name} not found; looked in:\n{searched}\n{how_to_obtain(model_name)}"
    )


def load_kinetics_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> TransferReport:
    """Copy every matching tensor except the stem and the FC into ``model``; report what happened."""
    report = TransferReport(source=source)
    own = model.state_dict()
    to_load = {}
    for key, tensor in state_dict.items():
        if key.startswith(SKIPPED_PREFIXES):
            report.skipped.append(key)
        elif key in own and own[key].shape == tensor.shape:
            to_load[key] = tensor
            report.loaded.append(key)
        else:
            # A key of a different architecture is a wrong file, not something to skip quietly.
            raise ValueError(
                f"Kinetics weights from {source} do not fit this model at {key!r} "
                f"(file shape {tuple(tensor.shape)}, model {tuple(own[key].shape) if key in own else 'absent'}); "
                "is this the state dict of the same torchvision architecture?"
            )
    model.load_state_dict(to_load, strict=False)
    report.missing = [k for k in own if k not in to_load]
    log.info(report.summary())
    return report
