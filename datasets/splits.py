"""Outer test folds and inner validation splits that never leak subjects or groups.

Splitters follow scikit-learn's protocol (``split(X, y, groups)``), so a stock splitter can be
used instead. The plan is saved as JSON with its seed and audited before any training.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

from datasets.atomic import write_text_atomic

SCHEMES = ("kfold", "shuffle")


class StratifiedGroupShuffleSplit:
    """Random train/test splits that keep class proportions and never split a group.

    scikit-learn offers stratified shuffles (no groups) and group shuffles (no stratification);
    this fills the gap. Without repeated groups it defers to ``StratifiedShuffleSplit``.
    Groups are assigned greedily in random order to the test part while their class still needs
    test subjects, so each class gets about ``test_size`` of its subjects.
    """

    def __init__(self, n_splits: int = 3, test_size: float = 0.3, random_state: int | None = None) -> None:
        if not 0 < test_size < 1:
            raise ValueError(f"test_size must be in (0, 1), got {test_size}")
        if n_splits < 1:
            raise ValueError(f"n_splits must be at least 1, got {n_splits}")
        self.n_splits, self.test_size, self.random_state = n_splits, test_size, random_state

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits

    def split(self, X, y, groups=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        y = np.asarray(y)
        if groups is None or len(set(groups)) == len(y):
            yield from StratifiedShuffleSplit(self.n_splits, test_size=self.test_size, random_state=self.random_state).split(X, y)
            return
        groups = np.asarray(groups)
        rng = np.random.default_rng(self.random_state)
        unique_groups = np.unique(groups)
        # A group's class is its most common label (groups are normally one subject, or one patient).
        group_label = {g: pd.Series(y[groups == g]).mode().iloc[0] for g in unique_groups}
        classes, counts = np.unique(y, return_counts=True)
        for _ in range(self.n_splits):
            wanted = {c: int(round(self.test_size * n)) for c, n in zip(classes, counts)}
            taken = {c: 0 for c in classes}
            test_groups = set()
            for g in rng.permutation(unique_groups):
                label = group_label[g]
                size = int((groups == g).sum())
                if taken[label] + size <= wanted[label] or taken[label] == 0 and wanted[label] > 0:
                    test_groups.add(g)
                    taken[label] += size
            test_mask = np.isin(groups, list(test_groups))
            yield np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def check_split_options(scheme: str, n_splits: int, test_size: float, val_fraction: float) -> None:
    """The one place split options are validated: by ``SplitSpec`` before any file is read, and by ``plan_splits``."""
    if scheme not in SCHEMES:
        raise ValueError(f"--split must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    fewest = 2 if scheme == "kfold" else 1
    if n_splits < fewest:
        raise ValueError(f"--folds must be at least {fewest} for --split {scheme}, got {n_splits}")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def outer_splitter(scheme: str, n_splits: int, test_size: float, seed: int, grouped: bool):
    """The paper's two readings: k-fold CV (2:1 for k=3), or k random 70:30 splits."""
    if scheme == "kfold":
        cls = StratifiedGroupKFold if grouped else StratifiedKFold
        return cls(n_splits=n_splits, shuffle=True, random_state=seed)
    return StratifiedGroupShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=seed)


@dataclass
class Fold:
    fold: int
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass
class SplitPlan:
    """Every fold's subject ids, and how they were drawn (enough to reproduce them)."""

    scheme: str
    n_splits: int
    test_size: float
    val_fraction: float
    seed: int
    folds: list[Fold] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SplitPlan":
        data = json.loads(text)
        data["folds"] = [Fold(**f) for f in data["folds"]]
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SplitPlan":
        return cls.from_json(Path(path).read_text())


def plan_splits(
    table: pd.DataFrame,
    scheme: str = "kfold",
    n_splits: int = 3,
    test_size: float = 0.3,
    val_fraction: float = 0.2,
    seed: int = 0,
    outer=None,
) -> SplitPlan:
    """Outer folds from ``outer`` (default: by ``scheme``), each with a stratified inner validation part.

    ``table`` needs ``subject_id``, ``label`` and ``group`` columns; rows are sorted by subject id
    first, so the plan depends on the data and the seed only, never on file-system order.
    """
    check_split_options(scheme, n_splits, test_size, val_fraction)
    table = table.sort_values("subject_id").reset_index(drop=True)
    ids, y, groups = table["subject_id"].to_numpy(), table["label"].to_numpy(), table["group"].to_numpy()
    small = table["label"].value_counts()
    if (small < n_splits).any():
        raise ValueError(
            f"Every class needs at least {n_splits} subjects for {n_splits} folds; "
            + ", ".join(f"{c}: {n}" for c, n in small.items() if n < n_splits)
        )
    grouped = len(set(groups)) < len(groups)
    outer = outer or outer_splitter(scheme, n_splits, test_size, seed, grouped)
    plan = SplitPlan(scheme, n_splits, test_size, val_fraction, seed)
    for index, (train_idx, test_idx) in enumerate(outer.split(ids, y, groups if grouped else None)):
        inner = StratifiedGroupShuffleSplit(1, test_size=val_fraction, random_state=seed + 1000 + index)
        try:
            fit_idx, val_idx = next(inner.split(train_idx, y[train_idx], groups[train_idx]))
        except ValueError as error:  # scikit-learn's words name neither the fold nor a fix
            raise ValueError(
                f"Fold {index}'s training part ({len(train_idx)} subjects) is too small for a stratified validation "
                f"part of {val_fraction:.0%} over {len(set(y))} classes ({error}); use more subjects or fewer folds"
            ) from None
        plan.folds.append(
            Fold(index, sorted(ids[train_idx][fit_idx]), sorted(ids[train_idx][val_idx]), sorted(ids[test_idx]))
        )
    audit_splits(plan, table)
    return plan


class LeakageError(AssertionError):
    """A subject or group appears in the test part and in the training or validation part."""


def audit_splits(plan: SplitPlan, table: pd.DataFrame) -> None:
    """Raise ``LeakageError`` unless test ∩ (train ∪ val) = ∅ by subject and by group, for every fold."""
    group_of = dict(zip(table["subject_id"], table["group"]))
    for fold in plan.folds:
        parts = {"train": set(fold.train), "val": set(fold.val), "test": set(fold.test)}
        unknown = set().union(*parts.values()) - set(group_of)
        if unknown:
            raise LeakageError(f"Fold {fold.fold} names subjects absent from the data: {sorted(unknown)[:5]}")
        for a, b in (("test", "train"), ("test", "val"), ("train", "val")):
            shared = parts[a] & parts[b]
            if shared:
                raise LeakageError(f"Fold {fold.fold}: subjects in both {a} and {b}: {sorted(shared)[:5]}")
            shared_groups = {group_of[s] for s in parts[a]} & {group_of[s] for s in parts[b]}
            if shared_groups:
                raise LeakageError(f"Fold {fold.fold}: groups in both {a} and {b}: {sorted(shared_groups)[:5]}")
