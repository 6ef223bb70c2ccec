"""MRI data: discovery, validation, preprocessing cache, leak-free splits and augmentation."""
from datasets.augmentation import build_augmentation
from datasets.prepare import DataSpec, PreparedData, SplitSpec, check_data, load_records, prepare_data
from datasets.preprocessing import CachedDataset, PreprocessConfig, preprocess
from datasets.records import PAPER_CLASSES, SubjectRecord
from datasets.splits import LeakageError, SplitPlan, StratifiedGroupShuffleSplit, audit_splits, plan_splits
from datasets.validation import InvalidDataError, ValidationReport, check_volume, validate_records
from datasets.volume_dataset import VolumeDataset, to_video_layout

__all__ = [
    "CachedDataset", "DataSpec", "InvalidDataError", "LeakageError", "PAPER_CLASSES", "PreparedData",
    "PreprocessConfig", "SplitPlan", "SplitSpec", "StratifiedGroupShuffleSplit", "SubjectRecord",
    "ValidationReport", "VolumeDataset", "audit_splits", "build_augmentation", "check_data", "check_volume",
    "load_records", "plan_splits", "prepare_data", "preprocess", "to_video_layout", "validate_records",
]
