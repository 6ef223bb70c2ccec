"""Video ResNets reading a 3-D MRI with the slice axis as time."""
from models.kinetics import KineticsWeightsNotFound, TransferReport, load_kinetics_weights, resolve_weights_path, weights_filename
from models.video_resnets import (
    ARCHITECTURES,
    DISPLAY_NAMES,
    PAPER_TRAINABLE_PARAMETERS,
    build_model,
    count_trainable_parameters,
)

MODEL_NAMES = tuple(ARCHITECTURES)

__all__ = [
    "ARCHITECTURES", "DISPLAY_NAMES", "MODEL_NAMES", "PAPER_TRAINABLE_PARAMETERS", "KineticsWeightsNotFound",
    "TransferReport", "build_model", "count_trainable_parameters", "load_kinetics_weights",
    "resolve_weights_path", "weights_filename",
]
