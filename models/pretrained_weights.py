"""Each model's standard pre-training, read from a local torchvision state dict.

One table says which torchvision weights a model starts from (Kinetics-400 for the paper's video
ResNets, ImageNet for the 2-D slice baseline); one function finds that file. Nothing is downloaded:
the weights come from a file the user names, a ``--weights-dir``, or torch's hub cache (where
torchvision itself would have saved them). ``--pretrained kinetics`` predates the 2-D baseline and
keeps meaning "the model's standard pre-training" for every model.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, WeightsEnum
from torchvision.models.video import MC3_18_Weights, R2Plus1D_18_Weights, R3D_18_Weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a model's weights come from: the torchvision enum member and the builder that downloads it."""

    weights: WeightsEnum
    dataset: str  # as messages and reports name it: "Kinetics-400", "ImageNet"
    builder_module: str  # the how-to imports ``builder`` from here
    builder: str


PRETRAINED_WEIGHTS: dict[str, PretrainedWeights] = {
    "r2plus1d_18": PretrainedWeights(R2Plus1D_18_Weights.KINETICS400_V1, "Kinetics-400", "torchvision.models.video", "r2plus1d_18"),
    "mc3_18": PretrainedWeights(MC3_18_Weights.KINETICS400_V1, "Kinetics-400", "torchvision.models.video", "mc3_18"),
    "r3d_18": PretrainedWeights(R3D_18_Weights.KINETICS400_V1, "Kinetics-400", "torchvision.models.video", "r3d_18"),
    "resnet18_2d": PretrainedWeights(ResNet18_Weights.IMAGENET1K_V1, "ImageNet", "torchvision.models", "resnet18"),
}

# "kinetics" (the CLI's word), "true" (config pretrained=True) and "standard" ask for the model's own pre-training,
# whatever data set it was; "imagenet" is accepted where that is the model's data set.
STANDARD_KEYWORDS = {"kinetics", "kinetics400", "true", "standard"}
DATASET_KEYWORDS = {"imagenet": "ImageNet"}


class PretrainedWeightsNotFound(FileNotFoundError):
    """Raised before any training when a model's pre-trained state dict is not on this machine."""


@dataclass
class TransferReport:
    """Which keys of the model came from the pre-trained file and which stayed randomly initialised."""

    source: str
    dataset: str = "Kinetics-400"
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # loaded after reshaping (e.g. RGB filters to MRI channels)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped_what: str = "stem/fc"

    def summary(self) -> str:
        adapted = f", {len(self.adapted)} adapted ({', '.join(self.adapted)})" if self.adapted else ""
        return (
            f"{self.dataset} weights from {self.source}: {len(self.loaded)} tensors loaded{adapted}, "
            f"{len(self.skipped)} skipped ({self.skipped_what}), {len(self.missing)} left at initialisation"
        )


def pretrained_source(model_name: str) -> PretrainedWeights:
    """The table entry of ``model_name``, or an error naming the models that have one."""
    if model_name not in PRETRAINED_WEIGHTS:
        raise ValueError(f"No pre-trained weights are known for model {model_name!r}; choose one of {sorted(PRETRAINED_WEIGHTS)}")
    return PRETRAINED_WEIGHTS[model_name]


def pretraining_dataset(model_name: str) -> str:
    """``"Kinetics-400"`` or ``"ImageNet"``: what ``--pretrained kinetics`` means for this model."""
    return pretrained_source(model_name).dataset


def weights_filename(model_name: str) -> str:
    """File name torchvision uses for this model's weights (e.g. ``r3d_18-b3b3357e.pth``, ``resnet18-f37072fd.pth``)."""
    return os.path.basename(urlparse(pretrained_source(model_name).weights.url).path)


def candidate_paths(model_name: str, weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Places searched, in order, for ``model_name``'s weights file."""
    filename = weights_filename(model_name)
    places = []
    if weights_dir is not None:
        places.append(Path(weights_dir) / filename)
    places.append(Path(torch.hub.get_dir()) / "checkpoints" / filename)
    return places


def how_to_obtain(model_name: str) -> str:
    source = pretrained_source(model_name)
    enum_name, member = type(source.weights).__name__, source.weights.name
    return (
        "On a machine with internet, run\n"
        f"    python -c \"from {source.builder_module} import {source.builder}, {enum_name}; "
        f"{source.builder}(weights={enum_name}.{member})\"\n"
        f"then copy ~/.cache/torch/hub/checkpoints/{weights_filename(model_name)} into --weights-dir "
        "(or into this machine's torch hub cache)."
    )


def _is_keyword(model_name: str, pretrained: str | os.PathLike) -> bool:
    """True when ``pretrained`` names the model's standard pre-training rather than a file."""
    word = str(pretrained).lower()
    if word in STANDARD_KEYWORDS:
        return True
    if word in DATASET_KEYWORDS:
        dataset = pretraining_dataset(model_name)
        if DATASET_KEYWORDS[word] != dataset:
            raise ValueError(f"pretrained={pretrained!r}: {model_name} is pre-trained on {dataset}, not "
                             f"{DATASET_KEYWORDS[word]}; use 'kinetics' (each model's standard pre-training) or a file path")
        return True
    return False


def resolve_weights_path(model_name: str, pretrained: str | os.PathLike, weights_dir: str | os.PathLike | None = None) -> Path:
    """Turn ``pretrained`` (a file path, or ``"kinetics"``: the standard pre-training) into a file or fail with a how-to."""
    dataset = pretraining_dataset(model_name)
    if not _is_keyword(model_name, pretrained):
        path = Path(pretrained).expanduser()
        if path.is_file():
            return path
        raise PretrainedWeightsNotFound(
            f"{dataset} weights for {model_name} not found at {path}.\n{how_to_obtain(model_name)}"
        )
    places = candidate_paths(model_name, weights_dir)
    for path in places:
        if path.is_file():
            return path
    searched = "\n".join(f"    {p}" for p in places)
    raise PretrainedWeightsNotFound(
        f"{dataset} weights for {model_name} not found; looked in:\n{searched}\n{how_to_obtain(model_name)}"
    )


# Reshapes a file tensor to the model's tensor of the same key, e.g. RGB filters to MRI channels.
Adapter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def transfer_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    *,
    dataset: str = "Kinetics-400",
    skipped_prefixes: tuple[str, ...] = ("stem.", "fc."),
    key_prefix: str = "",
    adapters: Mapping[str, Adapter] | None = None,
) -> TransferReport:
    """Copy every tensor of a torchvision state dict into ``model``, except ``skipped_prefixes``; report what happened.

    ``key_prefix`` is where torchvision's modules sit inside ``model``; ``adapters`` reshape named tensors
    (file key) instead of skipping them, and raise ValueError for a tensor they cannot adapt. Any key or shape
    that does not fit is a wrong file, refused: skipping it quietly would train from a half-loaded network.
    """
    adapters = adapters or {}
    report = TransferReport(source=source, dataset=dataset,
                            skipped_what="/".join(p.rstrip(".") for p in skipped_prefixes))
    own = model.state_dict()
    to_load = {}
    for key, tensor in state_dict.items():
        target = key_prefix + key
        if key.startswith(skipped_prefixes):
            report.skipped.append(key)
            continue
        fits = target in own
        if fits and key in adapters:
            try:
                to_load[target] = adapters[key](tensor, own[target])
                report.adapted.append(target)
                continue
            except ValueError:
                fits = False
        if fits and own[target].shape == tensor.shape:
            to_load[target] = tensor
            report.loaded.append(target)
        else:
            # A key of a different architecture is a wrong file, not something to skip quietly.
            raise ValueError(
                f"{dataset} weights from {source} do not fit this model at {key!r} "
                f"(file shape {tuple(tensor.shape)}, model {tuple(own[target].shape) if target in own else 'absent'}); "
                "is this the state dict of the same torchvision architecture?"
            )
    model.load_state_dict(to_load, strict=False)
    report.missing = [k for k in own if k not in to_load]
    log.info(report.summary())
    return report
