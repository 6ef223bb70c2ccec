"""From a data folder (or manifest) to audited folds over a preprocessed cache, in one call.

Everything that reads NIfTI files happens here, once, before any training: trials receive a
``PreparedData`` (a few paths and ids) and memory-map the cached array.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from datasets.preprocessing import CachedDataset, PreprocessConfig, preprocess
from datasets.records import SubjectRecord
from datasets.sources import class_order, discover_brats_ixi, read_manifest
from datasets.splits import SplitPlan, audit_splits, check_split_options, plan_splits
from datasets.validation import ValidationReport, require_valid, validate_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """Where the subjects come from. Exactly one of ``data_root`` and ``manifest``."""

    data_root: str | None = None
    manifest: str | None = None
    contrasts: tuple[str, ...] = ("t1ce",)
    classes: tuple[str, ...] | None = None
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if (self.data_root is None) == (self.manifest is None):
            raise ValueError("Give exactly one of --data-root and --manifest")


@dataclass(frozen=True)
class SplitSpec:
    """How the outer folds and inner validation parts are drawn; checked before any file is read."""

    scheme: str = "kfold"
    n_splits: int = 3
    test_size: float = 0.3
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        check_split_options(self.scheme, self.n_splits, self.test_size, self.val_fraction)


@dataclass(frozen=True)
class PreparedData:
    """What a trial needs: the cache entry, the label order and the audited folds."""

    cache_dir: str
    classes: tuple[str, ...]
    plan: SplitPlan
    spacing: float
    excluded: tuple[str, ...] = field(default=())

    @property
    def cached(self) -> CachedDataset:
        return CachedDataset(Path(self.cache_dir))

    def fold_indices(self, fold: int) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
        """Per part (train/val/test): row indices into the cached array, class indices, subject ids."""
        table = self.cached.table.set_index("subject_id")
        class_index = {c: i for i, c in enumerate(self.classes)}
        chosen = self.plan.folds[fold]
        parts = {}
        for part in ("train", "val", "test"):
            ids = list(getattr(chosen, part))
            rows = table.loc[ids]
            parts[part] = (rows["index"].to_numpy(), np.array([class_index[c] for c in rows["label"]]), ids)
        return parts


def load_records(spec: DataSpec) -> list[SubjectRecord]:
    if spec.manifest is not None:
        return read_manifest(spec.manifest)
    return discover_brats_ixi(spec.data_root, spec.contrasts)


def check_data(spec: DataSpec, cache_root: str | os.PathLike | None = None) -> ValidationReport:
    records = load_records(spec)
    classes = class_order(records, spec.classes)
    cache_file = Path(cache_root) / "validation.json" if cache_root else None
    return validate_records(records, classes, cache_file)


def prepare_data(
    spec: DataSpec,
    preprocess_config: PreprocessConfig,
    split_spec: SplitSpec,
    cache_root: str | os.PathLike,
    splits_file: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> PreparedData:
    """Validate, preprocess (cached), split and audit. Reuses ``splits_file`` if it exists (resume)."""
    report = check_data(spec, cache_root)
    if report.problems:
        log.warning("%s", report.format())
    records = require_valid(report, spec.skip_invalid)
    cached = preprocess(records, preprocess_config, cache_root, num_workers=num_workers)
    table = cached.table
    if splits_file is not None and Path(splits_file).is_file():
        plan = SplitPlan.load(splits_file)
        audit_splits(plan, table)
        ids_in_plan = {s for f in plan.folds for s in f.train + f.val + f.test}
        if not ids_in_plan <= set(table["subject_id"]):
            raise ValueError(f"{splits_file} names subjects that are not in the data; delete it to draw new splits")
    else:
        plan = plan_splits(table, split_spec.scheme, split_spec.n_splits, split_spec.test_size,
                           split_spec.val_fraction, split_spec.seed)
        if splits_file is not None:
            plan.save(splits_file)
    return PreparedData(str(cached.directory), report.classes, plan, preprocess_config.spacing,
                        excluded=tuple(p.subject_id for p in report.problems))
