"""Every model by name: how to build it and how its standard pre-trained weights are copied in.

The paper's three video ResNets come first; the 2-D slice baseline is opt-in (not in PAPER_MODEL_NAMES,
which experiments run by default) because the paper has no numbers to compare it with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from models.kinetics import load_kinetics_weights
from models.pretrained_weights import PRETRAINED_WEIGHTS, TransferReport, read_state_dict, resolve_weights_path
from models.slice_resnet import build_slice_resnet, load_imagenet_weights
from models.video_resnets import VIDEO_ARCHITECTURES, VIDEO_DISPLAY_NAMES, build_video_resnet


@dataclass(frozen=True)
class Architecture:
    """A model family member: ``build(num_classes, in_channels, dropout)`` and its weight transfer
    ``load_weights(model, state_dict, source, model_name=name)``."""

    build: Callable[[int, int, float], nn.Module]
    load_weights: Callable[..., TransferReport]
    display_name: str


ARCHITECTURES: dict[str, Architecture] = {
    **{name: Architecture(partial(build_video_resnet, name), load_kinetics_weights, VIDEO_DISPLAY_NAMES[name])
       for name in VIDEO_ARCHITECTURES},
    "resnet18_2d": Architecture(build_slice_resnet, load_imagenet_weights, "2-D baseline: ResNet18 on axial slices"),
}

MODEL_NAMES = tuple(ARCHITECTURES)
PAPER_MODEL_NAMES = tuple(VIDEO_ARCHITECTURES)  # what --models means when not given
DISPLAY_NAMES = {name: arch.display_name for name, arch in ARCHITECTURES.items()}
# What "pre-trained" means per model (--pretrained kinetics: each model's standard pre-training).
PRETRAINING_DATASETS = {name: PRETRAINED_WEIGHTS[name].dataset for name in ARCHITECTURES}


def build_model(
    name: str,
    num_classes: int = 3,
    in_channels: int = 1,
    dropout: float = 0.3,
    pretrained: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Build ``name`` for ``in_channels`` MRI contrasts and ``num_classes`` labels; input (B, C, slices, H, W).

    ``pretrained`` is None (from scratch), ``"kinetics"`` (the model's standard pre-training: Kinetics-400,
    or ImageNet for ``resnet18_2d``; looked up in ``weights_dir`` then torch's hub cache) or a path to
    a torchvision state dict. The transfer report is attached to the model as ``model.transfer_report``.
    A missing file raises PretrainedWeightsNotFound, a file that is not this model's torchvision state dict
    (unreadable, another object, another architecture, tensors missing) PretrainedWeightsInvalid: both say the fix.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(ARCHITECTURES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    architecture = ARCHITECTURES[name]
    # Resolve the weights first so a missing file fails before any work.
    weights_path = resolve_weights_path(name, pretrained, weights_dir) if pretrained else None

    model = architecture.build(num_classes, in_channels, dropout)
    model.transfer_report = None
    if weights_path is not None:
        state_dict = read_state_dict(weights_path, name)
        model.transfer_report = architecture.load_weights(model, state_dict, str(weights_path), model_name=name)
    return model


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ARCHITECTURES", "Architecture", "DISPLAY_NAMES", "MODEL_NAMES", "PAPER_MODEL_NAMES", "PRETRAINING_DATASETS",
           "build_model", "count_trainable_parameters"]
