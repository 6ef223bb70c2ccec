"""The paper's three classifiers, built from torchvision's video ResNet builders.

Each builder is torchvision's own (so blocks and layers stay upstream's); we swap the stem for a
single- or multi-channel one and the head for Dropout + Linear, as the paper did.
"""
from __future__ import annotations

import os
from typing import Callable

from torch import nn
from torchvision.models.video import VideoResNet, mc3_18, r2plus1d_18, r3d_18

from models.kinetics import TransferReport, load_kinetics_weights, resolve_weights_path
from models.stems import BasicStem, R2Plus1dStem, init_stem

import torch

# name -> (torchvision builder, stem class)
ARCHITECTURES: dict[str, tuple[Callable[..., VideoResNet], type[nn.Module]]] = {
    "r2plus1d_18": (r2plus1d_18, R2Plus1dStem),
    "mc3_18": (mc3_18, BasicStem),
    "r3d_18": (r3d_18, BasicStem),
}

DISPLAY_NAMES = {
    "r2plus1d_18": "ResNet (2+1)D",
    "mc3_18": "ResNet Mixed Convolution",
    "r3d_18": "ResNet3D",
}

# Table 1 of the paper; r3d_18 differs from torchvision by 1,527 parameters (see README).
PAPER_TRAINABLE_PARAMETERS = {"r3d_18": 33_150_522, "r2plus1d_18": 31_297_254, "mc3_18": 11_472_963}


def build_model(
    name: str,
    num_classes: int = 3,
    in_channels: int = 1,
    dropout: float = 0.3,
    pretrained: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
) -> VideoResNet:
    """Build ``name`` for ``in_channels`` MRI contrasts and ``num_classes`` labels.

    ``pretrained`` is None (from scratch), ``"kinetics"`` (look in ``weights_dir`` then torch's hub
    cache) or a path to a torchvision Kinetics-400 state dict. The transfer report is attached to
    the model as ``model.transfer_report``.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(ARCHITECTURES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    builder, stem_class = ARCHITECTURES[name]
    # Resolve the weights first so a missing file fails before any work.
    weights_path = resolve_weights_path(name, pretrained, weights_dir) if pretrained else None

    model = builder(weights=None)
    model.stem = stem_class(in_channels)
    init_stem(model.stem)
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    nn.init.normal_(model.fc[1].weight, 0, 0.01)
    nn.init.constant_(model.fc[1].bias, 0)

    model.transfer_report = None
    if weights_path is not None:
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.transfer_report = load_kinetics_weights(model, state_dict, source=str(weights_path))
    return model


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ARCHITECTURES", "DISPLAY_NAMES", "PAPER_TRAINABLE_PARAMETERS", "TransferReport", "build_model", "count_trainable_parameters"]
