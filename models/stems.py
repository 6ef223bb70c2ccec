"""Single-channel stems for torchvision's video ResNets.

The MRI volume enters as (batch, channels, slices, height, width): the slice axis plays the
role of video time. Only the first convolution's input channels differ from torchvision's RGB
stems; everything after the stem reuses its Kinetics-400 weights unchanged. The stem itself
(convolutions and BatchNorms alike) starts fresh: its 3-channel filters are not carried over,
and the tensors behind them were trained on those filters' outputs (see models/kinetics.py).
"""
from __future__ import annotations

from torch import nn


class BasicStem(nn.Sequential):
    """ResNet3D / Mixed-Convolution stem: one 3x7x7 convolution (torchvision ``BasicStem``)."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )


class R2Plus1dStem(nn.Sequential):
    """ResNet (2+1)D stem: a 1x7x7 spatial then a 3x1x1 "temporal" convolution (torchvision ``R2Plus1dStem``)."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, 45, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(45),
            nn.ReLU(inplace=True),
            nn.Conv3d(45, 64, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )


def init_stem(stem: nn.Module) -> None:
    """Initialise a fresh stem the way torchvision's ``VideoResNet`` initialises its own."""
    for module in stem.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
