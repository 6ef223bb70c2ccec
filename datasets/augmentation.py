"""TorchIO augmentation whose strength is one number, so a search can tune it.

Strength s = 1 is the paper's light augmentation, s = 0 is none; ranges and probabilities grow
linearly with s and are capped where the transform would stop being plausible anatomy.
Augmentation is built only for training data: evaluation loaders never receive a transform.
"""
from __future__ import annotations

import torchio as tio

KINDS = ("none", "light", "heavy")
MAX_STRENGTH = 4.0


def _light(s: float) -> list[tio.Transform]:
    scales = (max(0.5, 1 - 0.1 * s), min(2.0, 1 + 0.2 * s))  # paper: (0.9, 1.2)
    return [
        tio.RandomAffine(scales=scales, degrees=min(45.0, 10.0 * s)),  # paper: 10 degrees
        tio.RandomFlip(axes=("LR",), flip_probability=min(0.5, 0.25 * s)),  # paper: p = 0.25
    ]


def _heavy_extras(s: float) -> list[tio.Transform]:
    p = min(1.0, 0.25 * s)
    return [
        tio.RandomElasticDeformation(max_displacement=min(15.0, 7.5 * s), p=p),
        tio.RandomMotion(degrees=min(20.0, 10.0 * s), translation=min(20.0, 10.0 * s), p=p),
        tio.RandomSpike(intensity=(1.0, 1.0 + 2.0 * s), p=p),
        tio.RandomGhosting(intensity=(0.5, min(1.0, 0.5 + 0.5 * s)), p=p),
    ]


def build_augmentation(kind: str = "light", strength: float = 1.0) -> tio.Transform | None:
    """The training transform for ``kind`` at ``strength``; None means no augmentation."""
    if kind not in KINDS:
        raise ValueError(f"augmentation must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"aug_strength must be in [0, {MAX_STRENGTH}], got {strength}")
    if kind == "none" or strength == 0:
        return None
    transforms = _light(strength)
    if kind == "heavy":
        transforms += _heavy_extras(strength)
    return tio.Compose(transforms)
