"""The 2-D baseline: torchvision's ResNet18 applied to every axial slice, slice features averaged.

It answers the question the paper's spatiospatial models raise: how much do convolutions across
slices add over a network that sees each slice alone? Everything else is kept equal: the same input
layout (batch, channels, slices = axial Z, Y, X), the same Dropout + Linear head on 512 features,
and a standard pre-training (ImageNet here, Kinetics-400 for the video models).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torchvision.models import resnet18

from models.pretrained_weights import TransferReport, transfer_weights

FEATURES = 512  # ResNet18's pooled features per slice; the video ResNets' head sees the same width


class SliceResNet(nn.Module):
    """ResNet18 on each of the T slices of a (B, C, T, H, W) volume; the mean of the T feature vectors is classified.

    Mean rather than max over slices: it is the 2-D counterpart of the video models' global average pool
    over (T, H, W), so the baseline differs from them only in having no convolution across slices. It
    also sends a gradient to every slice at each step, where max would train one slice per feature and
    volume (slow and noisy at batch 4 and a few dozen epochs). A lesion seen in few slices still moves the
    mean: ReLU features are non-negative, so a feature that fires only there shifts the average by its
    share of slices, and the head can weight it up.

    BatchNorm2d over the B*T slices normalises over the same values as the video models' BatchNorm3d over
    (B, T, H, W), so BN recalibration and batch-size effects carry over unchanged.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 1, dropout: float = 0.3) -> None:
        super().__init__()
        encoder = resnet18(weights=None)
        encoder.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet
        encoder.fc = nn.Identity()  # the encoder returns its 512 pooled features; the head is ours
        self.encoder = encoder
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURES, num_classes))
        # Same head initialisation as the video models (models/video_resnets.py).
        nn.init.normal_(self.fc[1].weight, 0, 0.01)
        nn.init.constant_(self.fc[1].bias, 0)

    def slice_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, T, 512): each slice through ResNet18 on its own, all slices in one batch."""
        if volumes.dim() != 5:
            raise ValueError(f"SliceResNet expects (batch, channels, slices, height, width), got shape {tuple(volumes.shape)}")
        batch, channels, slices, height, width = volumes.shape
        as_images = volumes.transpose(1, 2).reshape(batch * slices, channels, height, width)
        return self.encoder(as_images).reshape(batch, slices, -1)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.fc(self.slice_features(volumes).mean(dim=1))


def rgb_filters_to_channels(rgb: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """ImageNet's (64, 3, k, k) first-layer filters -> (64, C, k, k) for C MRI channels.

    Each channel gets the mean of the RGB filters times 3/C, i.e. the sum over RGB shared equally by the
    C channels. A grey image (x, x, x) gives the RGB filters' response sum_rgb(W) * x, and a C-channel
    volume with equal channels gives the same here: conv1's output keeps the scale that the pre-trained bn1
    statistics and later layers expect, whatever C (timm's ``adapt_input_conv`` does the same). The plain
    mean would shrink every activation three-fold until BatchNorm caught up.
    """
    if rgb.dim() != 4 or rgb.shape[1] != 3 or rgb.shape[0] != own.shape[0] or rgb.shape[2:] != own.shape[2:]:
        raise ValueError(f"expected RGB filters of shape {(own.shape[0], 3, *own.shape[2:])}, got {tuple(rgb.shape)}")
    channels = own.shape[1]
    return (rgb.mean(dim=1, keepdim=True) * (3 / channels)).expand(-1, channels, -1, -1).contiguous()


def load_imagenet_weights(model: SliceResNet, state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                          model_name: str | None = "resnet18_2d") -> TransferReport:
    """Copy a torchvision ResNet18 ImageNet state dict into ``model.encoder``: conv1 adapted, fc skipped (1000 classes)."""
    return transfer_weights(model, state_dict, source, dataset="ImageNet", skipped_prefixes=("fc.",),
                            key_prefix="encoder.", adapters={"conv1.weight": rgb_filters_to_channels},
                            model_name=model_name)


def build_slice_resnet(num_classes: int, in_channels: int, dropout: float) -> SliceResNet:
    return SliceResNet(num_classes=num_classes, in_channels=in_channels, dropout=dropout)


__all__ = ["SliceResNet", "build_slice_resnet", "load_imagenet_weights", "rgb_filters_to_channels"]
