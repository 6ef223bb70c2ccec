"""Each model's standard pre-training, read from a local torchvision state dict.

One table says which torchvision weights a model starts from (Kinetics-400 for the paper's video
ResNets, ImageNet for the 2-D slice baseline); one function finds that file. Nothing is downloaded:
the weights come from a file the user names, a ``--weights-dir``, or torch's hub cache (where
torchvision itself would have saved them). ``--pretrained kinetics`` predates the 2-D baseline and
keeps meaning "the model's standard pre-training" for every model.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, WeightsEnum
from torchvision.models.video import MC3_18_Weights, R2Plus1D_18_Weights, R3D_18_Weights

log = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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


class PretrainedWeightsInvalid(ValueError):
    """The weights file is there but is not the model's torchvision state dict: unreadable (truncated, not a
    PyTorch file), another kind of object (a training checkpoint, a whole pickled model), another architecture's
    weights, or a state dict lacking tensors. A ValueError, so a trial meeting it fails at once without retries."""


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


def sha256_prefix(model_name: str) -> str:
    """The hash prefix in torchvision's file name (``a90a0ba3`` of ``mc3_18-a90a0ba3.pth``): its sha256 starts so."""
    return Path(weights_filename(model_name)).stem.rsplit("-", 1)[-1]


def _file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def replacement_text(model_name: str | None, path: str | os.PathLike | None = None) -> str:
    """The fix for a wrong weights file: torchvision's own file for ``model_name``, checkable by its sha256."""
    if model_name is None or model_name not in PRETRAINED_WEIGHTS:
        return "Fix: give the torchvision state dict of this model's architecture."
    expected = sha256_prefix(model_name)
    checked = ""
    if path is not None and Path(path).is_file():
        actual = _file_sha256(Path(path))
        if actual is not None and not actual.startswith(expected):
            checked = f" (this file's sha256 starts with {actual[:len(expected)]}, torchvision's with {expected})"
    return (f"Fix: replace it with torchvision's {weights_filename(model_name)}{checked}.\n{how_to_obtain(model_name)}")


@lru_cache(maxsize=None)
def _reference_layout(model_name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's own state dict for ``model_name`` (RGB stem, original head), built without memory."""
    source = pretrained_source(model_name)
    builder = getattr(importlib.import_module(source.builder_module), source.builder)
    with torch.device("meta"):
        state = builder(weights=None).state_dict()
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _optional(key: str) -> bool:
    """BatchNorm's step counter: absent from state dicts saved before PyTorch 0.4.1, never used by a forward pass."""
    return key.endswith("num_batches_tracked")


def identify_weights(state_dict: Mapping[str, Any]) -> str | None:
    """The model of ``PRETRAINED_WEIGHTS`` whose torchvision state dict has exactly this layout, else None."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for name in PRETRAINED_WEIGHTS:
        reference = _reference_layout(name)
        if (all(reference.get(k) == shape for k, shape in shapes.items())
                and all(k in shapes for k in reference if not _optional(k))):
            return name
    return None


def _looks_like(state_dict: Mapping[str, Any], model_name: str | None) -> str:
    """`` (they are r3d_18's: ...)`` when the tensors are exactly another known model's, else ""."""
    other = identify_weights(state_dict)
    if other is None or other == model_name:
        return ""
    return f" (they are {other}'s {pretrained_source(other).dataset} weights, torchvision's {weights_filename(other)})"


def check_state_dict(loaded: Any, source: str, dataset: str, model_name: str | None = None) -> dict[str, torch.Tensor]:
    """``loaded`` as a state dict (names to tensors), or PretrainedWeightsInvalid saying what it is and the fix."""
    if isinstance(loaded, Mapping) and loaded and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in loaded.items()):
        return dict(loaded)
    if isinstance(loaded, Mapping) and not loaded:
        what = "an empty state dict"
    elif isinstance(loaded, Mapping):
        nested = [k for k, v in loaded.items() if isinstance(v, Mapping)
                  and any(isinstance(t, torch.Tensor) for t in v.values())]
        what = (f"a checkpoint holding a state dict under {nested[0]!r}, not a state dict itself (if that entry is the "
                f"torchvision weights, save it alone: torch.save(torch.load(FILE)[{nested[0]!r}], NEW_FILE))"
                if nested else
                f"a dictionary of {', '.join(sorted({type(v).__name__ for v in loaded.values()}))} values, not a state "
                "dict (a dictionary of tensors)")
    else:
        what = f"a {type(loaded).__name__}, not a state dict (a dictionary of tensors)"
    target = f"{dataset} weights file {source}" + (f" for {model_name}" if model_name else "")
    raise PretrainedWeightsInvalid(f"{target} is {what}. {replacement_text(model_name, source)}")


def read_state_dict(path: str | os.PathLike, model_name: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (CPU tensors), or PretrainedWeightsInvalid naming the file, what is wrong and the fix.

    ``weights_only``: a state dict needs no code to unpickle, and a file that does is not torchvision's.
    """
    dataset = pretraining_dataset(model_name)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable for the operating system (permissions, ...): its own message names the file
    except pickle.UnpicklingError:  # needs code to unpickle: a pickled nn.Module or other object, or no pickle at all
        raise PretrainedWeightsInvalid(
            f"{dataset} weights file {path} for {model_name} is not a state dict of tensors (a whole pickled model, "
            f"another object, or not a PyTorch file at all). {replacement_text(model_name, path)}") from None
    except Exception as error:  # torch.load's other ways to say "not a (complete) PyTorch file"
        first = _ANSI.sub("", str(error).strip()).split(". ")[0].splitlines()[0][:120] if str(error).strip() else ""
        raise PretrainedWeightsInvalid(
            f"{dataset} weights file {path} for {model_name} cannot be read (a truncated or corrupt download? "
            f"{type(error).__name__}{': ' + first if first else ''}). {replacement_text(model_name, path)}") from None
    return check_state_dict(loaded, str(path), dataset, model_name)


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
    model_name: str | None = None,
) -> TransferReport:
    """Copy every tensor of a torchvision state dict into ``model``, except ``skipped_prefixes``; report what happened.

    ``key_prefix`` is where torchvision's modules sit inside ``model``; ``adapters`` reshape named tensors
    (file key) instead of skipping them, and raise ValueError for a tensor they cannot adapt. Any key or shape
    that does not fit is a wrong file, refused: skipping it quietly would train from a half-loaded network; so is
    a file lacking any tensor that should come from it (only BatchNorm's ``num_batches_tracked`` may be absent).
    ``model_name`` (the registry's name) lets the refusal name torchvision's right file and how to get it.
    """
    adapters = adapters or {}
    state_dict = check_state_dict(state_dict, source, dataset, model_name)
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
            this = f"this model ({model_name})" if model_name else "this model"
            raise PretrainedWeightsInvalid(
                f"{dataset} weights from {source} do not fit {this}{_looks_like(state_dict, model_name)}: at {key!r} "
                f"the file has shape {tuple(tensor.shape)}, the model "
                f"{tuple(own[target].shape) if target in own else 'has no such tensor'}. "
                f"{replacement_text(model_name, source)}"
            )
    expected = [k for k in own if k.startswith(key_prefix) and not k[len(key_prefix):].startswith(skipped_prefixes)]
    absent = [k for k in expected if k not in to_load and not _optional(k)]
    if absent:
        shown = ", ".join(k[len(key_prefix):] for k in absent[:3]) + (", ..." if len(absent) > 3 else "")
        raise PretrainedWeightsInvalid(
            f"{dataset} weights from {source} lack {len(absent)} of the {len(expected)} tensors this model takes from "
            f"them ({shown}){_looks_like(state_dict, model_name)}: a partial state dict would leave those layers "
            f"untrained. {replacement_text(model_name, source)}"
        )
    model.load_state_dict(to_load, strict=False)
    report.missing = [k for k in own if k not in to_load]
    log.info(report.summary())
    return report
