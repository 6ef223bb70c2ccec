"""The classifiers: the paper's video ResNets (slice axis as time) and an opt-in 2-D slice baseline."""
from models.kinetics import KineticsWeightsNotFound, load_kinetics_weights
from models.pretrained_weights import (
    PretrainedWeightsInvalid,
    PretrainedWeightsNotFound,
    TransferReport,
    pretraining_dataset,
    resolve_weights_path,
    weights_filename,
)
from models.registry import (
    ARCHITECTURES,
    DISPLAY_NAMES,
    MODEL_NAMES,
    PAPER_MODEL_NAMES,
    PRETRAINING_DATASETS,
    build_model,
    count_trainable_parameters,
)
from models.video_resnets import PAPER_TRAINABLE_PARAMETERS

__all__ = [
    "ARCHITECTURES", "DISPLAY_NAMES", "MODEL_NAMES", "PAPER_MODEL_NAMES", "PAPER_TRAINABLE_PARAMETERS",
    "PRETRAINING_DATASETS", "KineticsWeightsNotFound", "PretrainedWeightsInvalid", "PretrainedWeightsNotFound",
    "TransferReport", "build_model", "count_trainable_parameters", "load_kinetics_weights", "pretraining_dataset",
    "resolve_weights_path", "weights_filename",
]
