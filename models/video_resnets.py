"""The paper's three classifiers, built from torchvision's video ResNet builders.

Each builder is torchvision's own (so blocks and layers stay upstream's); we swap the stem for a
single- or multi-channel one and the head for Dropout + Linear, as the paper did.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.models.video import VideoResNet, mc3_18, r2plus1d_18, r3d_18

from models.stems import BasicStem, R2Plus1dStem, init_stem

# name -> (torchvision builder, stem class)
VIDEO_ARCHITECTURES: dict[str, tuple[Callable[..., VideoResNet], type[nn.Module]]] = {
    "r2plus1d_18": (r2plus1d_18, R2Plus1dStem),
    "mc3_18": (mc3_18, BasicStem),
    "r3d_18": (r3d_18, BasicStem),
}

VIDEO_DISPLAY_NAMES = {
    "r2plus1d_18": "ResNet (2+1)D",
    "mc3_18": "ResNet Mixed Convolution",
    "r3d_18": "ResNet3D",
}

# Table 1 of the paper; r3d_18 differs from torchvision by 1,527 parameters (see README).
PAPER_TRAINABLE_PARAMETERS = {"r3d_18": 33_150_522, "r2plus1d_18": 31_297_254, "mc3_18": 11_472_963}


def build_video_resnet(name: str, num_classes: int, in_channels: int, dropout: float) -> VideoResNet:
    """A fresh (randomly initialised) video ResNet with an ``in_channels`` stem and a Dropout + Linear head."""
    builder, stem_class = VIDEO_ARCHITECTURES[name]
    model = builder(weights=None)
    model.stem = stem_class(in_channels)
    init_stem(model.stem)
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    nn.init.normal_(model.fc[1].weight, 0, 0.01)
    nn.init.constant_(model.fc[1].bias, 0)
    return model


__all__ = ["PAPER_TRAINABLE_PARAMETERS", "VIDEO_ARCHITECTURES", "VIDEO_DISPLAY_NAMES", "build_video_resnet"]
