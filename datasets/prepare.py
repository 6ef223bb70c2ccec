"""From a data folder (or manifest) to audited folds over a preprocessed cache, in one call.

Everything that reads NIfTI files happens here, once, before any training: trials receive a
``PreparedData`` (a few paths and ids) and memory-map the cached array.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from datasets.acquisition import PROFILE_COLUMNS, looks_stripped
from datasets.cohort import check_max_per_class, draw_cohort, save_cohort
from datasets.dicom import convert_records, dicom_cache_dir
from datasets.preprocessing import CachedDataset, PreprocessConfig, preprocess
from datasets.records import SubjectRecord
from datasets.rsna import discover_rsna, find_rsna_layout
from datasets.sources import class_order, discover_brats_ixi, read_manifest
from datasets.splits import (SplitPlan, audit_splits, check_class_counts, check_every_part_has_every_class,
                             check_groups_per_class, check_split_options, plan_splits)
from datasets.stripping import StrippingCheck, check_stripping, require_consistent_stripping
from datasets.validation import (CONTENT_DIGEST, InvalidDataError, Problem, ValidationReport, require_valid,
                                 validate_records)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """Where the subjects come from. Exactly one of ``data_root`` and ``manifest``."""

    data_root: str | None = None
    manifest: str | None = None
    contrasts: tuple[str, ...] = ("t1ce",)
    classes: tuple[str, ...] | None = None
    skip_invalid: bool = False
    allow_unstripped: bool = False  # go on when stripped and unstripped volumes are mixed (the report says so)
    max_per_class: dict[str, int] = field(default_factory=dict)  # class -> N subjects drawn with the split seed

    def __post_init__(self) -> None:
        if (self.data_root is None) == (self.manifest is None):
            raise ValueError("Give exactly one of --data-root and --manifest")
        object.__setattr__(self, "max_per_class", check_max_per_class(self.max_per_class))


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


SPLIT_SPEC_FIELDS = ("scheme", "n_splits", "test_size", "val_fraction", "seed")  # saved in every SplitPlan too


def check_plan_matches(plan: SplitPlan, spec: SplitSpec, path: str | os.PathLike) -> None:
    """Refuse a saved plan drawn with other options than this run asks for, instead of silently reusing it.

    A run that stopped before its options were saved (experiment.json) leaves splits.json behind; the next run
    in the same folder may ask for other folds or another seed.
    """
    differ = [f"{name} {getattr(plan, name)!r} (asked: {getattr(spec, name)!r})" for name in SPLIT_SPEC_FIELDS
              if getattr(plan, name) != getattr(spec, name)]
    if differ:
        raise ValueError(f"{path} holds splits drawn with other options: {'; '.join(differ)}. Use another --output "
                         f"(tune_main) or --splits-file (datasets prepare), or delete {path} to draw the splits again")


@dataclass(frozen=True)
class PreparedData:
    """What a trial needs: the cache entry, the label order and the audited folds."""

    cache_dir: str
    classes: tuple[str, ...]
    plan: SplitPlan
    spacing: float
    excluded: tuple[str, ...] = field(default=())
    register: str = "none"
    stripping: dict = field(default_factory=dict, compare=False)  # StrippingCheck.to_dict() of the run's subjects
    cohort: dict = field(default_factory=dict, compare=False)  # draw_cohort's record: available and drawn per class
    # One row per subject: ids, label, source, site, stripped and the raw files' acquisition profile
    # (written to OUT/subjects.csv; the acquisition-only baseline's features).
    subjects: pd.DataFrame | None = field(default=None, compare=False, repr=False)

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
    """The subjects of the manifest, the RSNA-MICCAI 2021 tree (DICOM series folders as paths) or BraTS/IXI."""
    if spec.manifest is not None:
        return read_manifest(spec.manifest)
    if find_rsna_layout(spec.data_root) is not None:
        return discover_rsna(spec.data_root, spec.contrasts)
    return discover_brats_ixi(spec.data_root, spec.contrasts, spec.classes)


def select_classes(records: list[SubjectRecord], classes: Sequence[str]) -> list[SubjectRecord]:
    """The subjects whose label is one of ``classes``: ``--classes LGG,HGG`` on BraTS + IXI runs LGG vs HGG.

    The subjects left out are counted per label in the log, so a misspelt label in a manifest (which would be left
    out with them) is visible. Unlabelled records are kept: validation refuses them with its own message. So is
    every entry of a subject id that one kept entry has: an id listed under two labels (HGG in BraTS, Healthy in a
    manifest row) is a conflict for validation to refuse, not something a subset may hide.
    """
    kept_ids = {r.subject_id for r in records if not r.label or r.label in classes}
    kept = [r for r in records if r.subject_id in kept_ids]
    left_out = Counter(r.label for r in records if r.subject_id not in kept_ids)
    if left_out:
        log.warning("--classes %s: leaving out %d subject(s) with another label: %s", ",".join(classes),
                    sum(left_out.values()), ", ".join(f"{label} ({n})" for label, n in sorted(left_out.items())))
    return kept


def check_data(spec: DataSpec, cache_root: str | os.PathLike | None = None) -> ValidationReport:
    records = load_records(spec)
    classes = class_order(records, spec.classes)
    records = select_classes(records, classes)
    # DICOM series become cached NIfTI first; an unusable series is reported with the other problems.
    records, unconverted = convert_records(records, dicom_cache_dir(cache_root))
    cache_file = Path(cache_root) / "validation.json" if cache_root else None
    report = validate_records(records, classes, cache_file)
    report.problems[:0] = unconverted
    return report


def subject_table(records: list[SubjectRecord], report: ValidationReport) -> pd.DataFrame:
    """The run's cohort with each subject's first file's acquisition profile (all files decide ``stripped``)."""
    rows = []
    for record in sorted(records, key=lambda r: r.subject_id):
        profile = report.profiles[record.paths[0]]
        rows.append({"subject_id": record.subject_id, "label": record.label, "group": record.group,
                     "source": record.source, "site": record.site,
                     "stripped": all(looks_stripped(report.profiles[p]) for p in record.paths),
                     **{c: profile[c] for c in PROFILE_COLUMNS},
                     # the first file's voxels, for prediction to recognise this subject's volume under any name
                     CONTENT_DIGEST: profile.get(CONTENT_DIGEST, "")})
    return pd.DataFrame(rows, columns=["subject_id", "label", "group", "source", "site", "stripped", *PROFILE_COLUMNS,
                                       CONTENT_DIGEST])


def _register(records: list[SubjectRecord], spec: DataSpec, config: PreprocessConfig, cache_root,
              num_workers: int | None) -> tuple[list[SubjectRecord], list[Problem]]:
    """N4 + affine registration to MNI152 (cached per file); failures stop the run or, with --skip-invalid, drop out."""
    from datasets.registration import register_records  # ANTsPy is imported only when asked for

    registered, problems = register_records(records, cache_root, method=config.register, spacing=config.spacing,
                                            num_workers=num_workers)
    if problems and not spec.skip_invalid:
        raise InvalidDataError("Registration to MNI152 failed; fix or remove these files, or pass --skip-invalid "
                               "to leave them out:\n" + "\n".join(f"  {p.path}: {p.reason} (subject {p.subject_id})"
                                                                  for p in problems))
    for problem in problems:
        log.warning("Left out (--skip-invalid): %s: %s", problem.path, problem.reason)
    return registered, problems


def prepare_data(
    spec: DataSpec,
    preprocess_config: PreprocessConfig,
    split_spec: SplitSpec,
    cache_root: str | os.PathLike,
    splits_file: str | os.PathLike | None = None,
    num_workers: int | None = None,
    cohort_file: str | os.PathLike | None = None,
) -> PreparedData:
    """Validate, check stripping and class counts, draw the cohort, register (optional), preprocess (cached),
    split and audit.

    Every refusal (invalid files, mixed skull stripping, an unknown class in ``max_per_class``, class
    counts the folds cannot split) comes before the first volume is preprocessed; class counts are
    checked again when registration or preprocessing leaves subjects out (--skip-invalid). Reuses
    ``splits_file`` and ``cohort_file`` if they exist (resume), after checking they were drawn with this run's
    options (before any file is opened).
    """
    saved_plan = SplitPlan.load(splits_file) if splits_file is not None and Path(splits_file).is_file() else None
    if saved_plan is not None:
        check_plan_matches(saved_plan, split_spec, splits_file)
    report = check_data(spec, cache_root)
    if report.problems:
        log.warning("%s", report.format())
    records = require_valid(report, spec.skip_invalid)
    records, cohort = draw_cohort(records, spec.max_per_class, split_spec.seed, report.classes, cohort_file)
    stripping = check_stripping(records, report.profiles, report.classes)
    require_consistent_stripping(stripping, spec.allow_unstripped)
    _log_stripping(stripping, spec.allow_unstripped)
    require_class_counts(records, report.classes, split_spec)
    if cohort_file is not None:
        save_cohort(cohort_file, cohort)
    subjects = subject_table(records, report)
    excluded = [p.subject_id for p in report.problems]
    if preprocess_config.register != "none":
        records, failed = _register(records, spec, preprocess_config, cache_root, num_workers)
        excluded += [p.subject_id for p in failed]
        if failed:
            subjects = _drop(subjects, {p.subject_id for p in failed})
            require_class_counts(records, report.classes, split_spec, after="registration")
    cached = preprocess(records, preprocess_config, cache_root, num_workers=num_workers, skip_invalid=spec.skip_invalid)
    table = cached.table
    failed_ids = _left_out_by_preprocessing(cached)
    if failed_ids:
        excluded += sorted(failed_ids)
        subjects = _drop(subjects, failed_ids)
        require_class_counts([r for r in records if r.subject_id not in failed_ids], report.classes, split_spec,
                             after="preprocessing")
    if saved_plan is not None:
        plan = saved_plan
        audit_splits(plan, table)
        ids_in_plan = {s for f in plan.folds for s in f.train + f.val + f.test}
        in_data = set(table["subject_id"])
        if not ids_in_plan <= in_data:
            raise ValueError(f"{splits_file} names subjects that are not in the data; delete it to draw new splits")
        if in_data - ids_in_plan:
            # E.g. a plan drawn with --classes LGG,HGG met by a run with all three classes: the others would be
            # cached and counted as classes, yet in no fold's training, validation or test part.
            unplanned = sorted(in_data - ids_in_plan)
            raise ValueError(f"{splits_file} leaves out {len(unplanned)} subject(s) of this run's data (e.g. "
                             f"{', '.join(unplanned[:3])}): it was drawn for other data or --classes; delete it to "
                             "draw new splits, or run with the options it was drawn with")
        check_every_part_has_every_class(plan, table, saved=splits_file)
    else:
        plan = plan_splits(table, split_spec.scheme, split_spec.n_splits, split_spec.test_size,
                           split_spec.val_fraction, split_spec.seed)
        if splits_file is not None:
            plan.save(splits_file)
    return PreparedData(str(cached.directory), report.classes, plan, preprocess_config.spacing,
                        excluded=tuple(excluded), register=preprocess_config.register,
                        stripping=stripping.to_dict(), cohort=cohort, subjects=subjects)


def require_class_counts(records: Sequence[SubjectRecord], classes: Sequence[str], split_spec: SplitSpec,
                         after: str | None = None) -> None:
    """Refuse the run's class counts before spending time on them (:func:`datasets.splits.check_class_counts`);
    ``after`` names the step that left subjects out, so the message says why counts shrank."""
    counts = {c: sum(1 for r in records if r.label == c) for c in classes}
    grouped = len({r.group for r in records}) < len(records)
    try:
        check_class_counts(counts, split_spec.scheme, split_spec.n_splits, split_spec.test_size,
                           split_spec.val_fraction, grouped)
        if grouped:  # a patient's scans never straddle parts: enough patients per class for every part
            check_groups_per_class({c: len({r.group for r in records if r.label == c}) for c in classes},
                                   split_spec.scheme, split_spec.n_splits)
    except ValueError as error:
        if after is None:
            raise
        raise ValueError(f"After the subjects that {after} left out (--skip-invalid): {error}") from None


def _left_out_by_preprocessing(cached: CachedDataset) -> set[str]:
    """Subjects ``preprocess`` left out with --skip-invalid (its meta's "failed"), each logged with its reason."""
    failed = cached.meta.get("failed", [])
    for failure in failed:
        log.warning("Left out (--skip-invalid): %s: %s (subject %s)", failure["path"], failure["reason"],
                    failure["subject_id"])
    return {failure["subject_id"] for failure in failed}


def _drop(subjects: pd.DataFrame, ids: set[str]) -> pd.DataFrame:
    return subjects[~subjects["subject_id"].isin(ids)].reset_index(drop=True)


def _log_stripping(check: StrippingCheck, allowed: bool) -> None:
    if not check.unstripped:
        log.info("Skull stripping: every volume has an exact-zero background (%s)", check.summary())
    elif check.mixed:
        log.warning("--allow-unstripped: going on with mixed skull stripping; the report says so at its top.\n%s",
                    check.format(limit=10))
    else:
        log.warning("No volume is skull-stripped: the preprocessing crops each head to its whole field of view.\n%s",
                    check.format(limit=10))
