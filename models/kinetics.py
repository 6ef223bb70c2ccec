"""Kinetics-400 transfer for the paper's video ResNets (names kept for the modules that import them).

The lookup itself is model-agnostic and lives in ``models.pretrained_weights``: this module keeps the
Kinetics-era public names working. Every tensor is copied except the stem (3 RGB input channels
there) and the final FC (400 Kinetics classes there).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from models.pretrained_weights import (
    PRETRAINED_WEIGHTS,
    PretrainedWeightsInvalid,
    PretrainedWeightsNotFound,
    TransferReport,
    candidate_paths,
    how_to_obtain,
    resolve_weights_path,
    transfer_weights,
    weights_filename,
)

KINETICS_WEIGHTS = {name: source.weights for name, source in PRETRAINED_WEIGHTS.items() if source.dataset == "Kinetics-400"}

# Keys that never transfer: the stem sees the MRI channels, not 3 RGB ones; the head has our classes.
SKIPPED_PREFIXES = ("stem.", "fc.")

# One exception for every model's missing weights (ImageNet ones too), so existing handlers catch them all.
KineticsWeightsNotFound = PretrainedWeightsNotFound


def load_kinetics_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                          model_name: str | None = None) -> TransferReport:
    """Copy every tensor except the stem and the FC into ``model``; report what happened.

    A file that lacks one of those tensors or does not fit raises PretrainedWeightsInvalid (naming torchvision's
    file for ``model_name`` when given)."""
    return transfer_weights(model, state_dict, source, dataset="Kinetics-400", skipped_prefixes=SKIPPED_PREFIXES,
                            model_name=model_name)


__all__ = ["KINETICS_WEIGHTS", "KineticsWeightsNotFound", "PretrainedWeightsInvalid", "SKIPPED_PREFIXES",
           "TransferReport", "candidate_paths", "how_to_obtain", "load_kinetics_weights", "resolve_weights_path",
           "weights_filename"]
