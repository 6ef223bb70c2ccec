"""Outer test folds and inner validation splits that never leak subjects or groups.

Splitters follow scikit-learn's protocol (``split(X, y, groups)``), so a stock splitter can be
used instead. The plan is saved as JSON with its seed and audited before any training.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

from datasets.atomic import write_text_atomic

SCHEMES = ("kfold", "shuffle")


class StratifiedGroupShuffleSplit:
    """Random train/test splits that keep class proportions and never split a group.

    scikit-learn offers stratified shuffles (no groups) and group shuffles (no stratification);
    this fills the gap. Without repeated groups it defers to ``StratifiedShuffleSplit``.

    With groups, each group has the class of most of its subjects, and a class wants
    ``round(test_size * subjects)`` test subjects, at least one when it has two or more groups.
    Groups are taken greedily, in an order drawn from ``random_state``, into the test part while their
    class still wants test subjects (a class's first group whatever its size), so each class gets about
    ``test_size`` of its subjects; but a class's last group not yet in the test part is never taken, so
    every class keeps a group in the training part, and every class with two or more groups has one in
    the test part. A class with one group is never in the test part. The same ``random_state`` gives the
    same splits.
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
        groups_of_class = Counter(group_label.values())
        for _ in range(self.n_splits):
            # round(0.2 * 2) = 0 would leave a class with groups out of the test part: one group at least
            wanted = {c: max(int(round(self.test_size * n)), 1 if groups_of_class[c] >= 2 else 0)
                      for c, n in zip(classes, counts)}
            taken = {c: 0 for c in classes}
            kept = dict(groups_of_class)  # per class, its groups not in the test part yet
            test_groups = set()
            for g in rng.permutation(unique_groups):
                label = group_label[g]
                if kept[label] < 2:  # the class's last group stays in the training part
                    continue
                size = int((groups == g).sum())
                if taken[label] + size <= wanted[label] or taken[label] == 0 and wanted[label] > 0:
                    test_groups.add(g)
                    taken[label] += size
                    kept[label] -= 1
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


def check_class_counts(counts: Mapping[str, int], scheme: str = "kfold", n_splits: int = 3, test_size: float = 0.3,
                       val_fraction: float = 0.2, grouped: bool = False) -> None:
    """Refuse, before any preprocessing, class counts with which some fold would lack a class.

    ``counts`` maps every class of the run (one asked for with --classes included) to its number of
    subjects. Checked in order: no class is empty, at least two classes, a subject per test part, and
    a subject in both inner parts (training, validation) of every fold (:func:`fewest_inner_subjects`).
    """
    check_split_options(scheme, n_splits, test_size, val_fraction)
    check_classes_present(counts)
    _require_a_subject_per_fold(counts, n_splits)
    fewest = fewest_inner_subjects(counts, scheme, n_splits, test_size, val_fraction, grouped)
    short = [c for c, n in fewest.items() if n < 1]
    if short:
        needed = _needed_for_inner_parts(counts, short, scheme, n_splits, test_size, val_fraction, grouped)
        fix = ("add subjects, use fewer --folds, or leave the class out (--classes without it)"
               if scheme == "kfold" else
               "add subjects, or leave the class out (--classes without it; each shuffle split "
               "holds out test_size of every class, whatever --folds)")
        raise ValueError(
            f"Too few subjects for every fold's inner training and validation parts to hold each class "
            f"({_options(scheme, n_splits, test_size, val_fraction)}): "
            + ", ".join(f"{c} has {counts[c]}" for c in short) + f"; each needs at least {needed}. A fold whose "
            f"validation part lacks a class picks its best epoch without that class. Fix: {fix}"
        )


def check_classes_present(counts: Mapping[str, int]) -> None:
    """An empty class scores a silent zero F1, and a single class fails every trial in Ray: refuse both."""
    empty = [c for c, n in counts.items() if n == 0]
    found = ", ".join(f"{c} {n}" for c, n in counts.items() if n > 0) or "none"
    if empty:
        raise ValueError(
            f"No valid subject has the label {', '.join(empty)} (asked for with --classes, or every file of the class "
            f"was left out as invalid); subjects found per class: {found}. Add subjects of {', '.join(empty)}, or "
            "leave it out of --classes"
        )
    if len(counts) < 2:
        raise ValueError(
            f"{'Only one class has' if counts else 'No class has'} subjects ({found}); a classifier needs at least "
            "two. Add subjects of another class, or check the labels (--classes, the manifest's label column)"
        )


def _require_a_subject_per_fold(counts: Mapping[str, int], n_splits: int) -> None:
    few = {c: n for c, n in counts.items() if n < n_splits}
    if few:
        raise ValueError(
            f"Every class needs at least {n_splits} subjects for {n_splits} folds (one per test part); "
            + ", ".join(f"{c}: {n}" for c, n in few.items())
            + ". Add subjects, use fewer --folds, or leave the class out (--classes without it)"
        )


def fewest_groups(scheme: str, n_splits: int) -> int:
    """The fewest groups (patients) a class needs so that every fold's test, inner training and inner validation
    parts can each hold one: a group never straddles parts.

    ``shuffle``: a group held out for testing and two kept (inner training, inner validation), whatever
    --folds. ``kfold``: the ``g`` groups are dealt over the ``k`` test folds, each test fold taking ``t >= 1`` and
    leaving ``g - t >= 2`` to its training part; some dealing meets both iff ``g >= k`` and ``g (k - 1) >= 2 k``:
    ``k`` groups for 3 folds or more, 4 for 2 folds (3 would leave one fold's training part a single group). This
    is the least that can work: how StratifiedGroupKFold deals groups of unequal sizes can still leave a part
    without the class, which :func:`check_every_part_has_every_class` refuses after the draw.
    """
    if scheme == "shuffle":
        return 3
    if n_splits < 2:
        raise ValueError(f"--folds must be at least 2 for --split kfold, got {n_splits}")
    return max(n_splits, -(-2 * n_splits // (n_splits - 1)))


def check_groups_per_class(groups_per_class: Mapping[str, int], scheme: str, n_splits: int) -> None:
    """Refuse, before any split is drawn, a class in fewer groups than :func:`fewest_groups` asks for.

    ``groups_per_class`` maps each class to the number of distinct groups among its subjects; classes without
    subjects are left to :func:`check_classes_present`. Meant for grouped data (a manifest's group column):
    without repeated groups every subject is its own group and the class counts decide.
    """
    needed = fewest_groups(scheme, n_splits)
    short = {c: n for c, n in groups_per_class.items() if 0 < n < needed}
    if not short:
        return
    why = ("one held out for testing, and two kept for inner training and inner validation, whatever --folds"
           if scheme == "shuffle" else
           "one in every test fold, and two in every fold's training part, for inner training and inner validation")
    fewest = min(n for n in groups_per_class.values() if n > 0)
    folds = [k for k in range(2, fewest + 1) if fewest_groups("kfold", k) <= fewest]
    other = min(folds, key=lambda k: (abs(k - n_splits), k)) if scheme == "kfold" and folds else None
    raise ValueError(
        f"Too few groups (the manifest's group column: one patient's scans stay in one part) for --split {scheme}, "
        f"--folds {n_splits}: " + ", ".join(f"{c} has {n}" for c, n in short.items())
        + f"; each class needs subjects in at least {needed} groups ({why}). Fix: "
        + (f"use --folds {other}, " if other is not None else "")
        + f"add subjects of other patients (groups) of {', '.join(short)}, leave the class out (--classes without "
        "it), or check the group column (an empty group means the subject's own id)"
    )


def groups_per_class(table: pd.DataFrame) -> dict[str, int]:
    """Per class of ``table`` (``label`` and ``group`` columns), how many distinct groups its subjects are in."""
    return {str(c): int(n) for c, n in table.groupby("label", sort=False)["group"].nunique().items()}


def _options(scheme: str, n_splits: int, test_size: float, val_fraction: float) -> str:
    held_out = "" if scheme == "kfold" else f", test_size {test_size:g}"
    return f"--split {scheme}, --folds {n_splits}{held_out}, val_fraction {val_fraction:g}"


# Up to this many classes every order in which they can first appear is tried (5! = 120); beyond, a bound.
MAX_ENUMERATED_CLASSES = 5


def fewest_inner_subjects(counts: Mapping[str, int], scheme: str, n_splits: int, test_size: float,
                          val_fraction: float, grouped: bool = False) -> dict[str, int]:
    """Per class, the fewest subjects ``plan_splits`` can put in the smaller inner part (training or validation)
    of any fold, whatever the seed and the subject ids; 0 means some fold's inner part can lack the class.

    Without repeated groups the parts' class counts depend on the counts alone, and every outcome is
    enumerated: the outer split's training parts (``kfold``: StratifiedKFold deals each class's
    subjects round-robin over the folds, in the order the classes first appear; ``shuffle``:
    StratifiedShuffleSplit), then the inner StratifiedShuffleSplit of each. Both give a class its
    share rounded down, and the leftover subjects to the largest fractions, ties broken at random.
    With groups (or more than MAX_ENUMERATED_CLASSES classes) :func:`_bounded_fewest` gives a lower
    bound instead (with groups, assuming groups of about one subject: StratifiedGroupKFold's parts
    depend on the group sizes, which counts do not tell).
    """
    names = list(counts)
    if grouped or len(names) > MAX_ENUMERATED_CLASSES:
        return {c: _bounded_fewest(counts, c, scheme, n_splits, test_size, val_fraction, grouped) for c in names}
    vector = np.array([counts[c] for c in names])
    outer = _kfold_training_parts(vector, n_splits) if scheme == "kfold" else _shuffle_training_parts(vector, test_size)
    fewest = np.min([_inner_fewest(np.array(train), val_fraction) for train in outer], axis=0)
    return {c: int(n) for c, n in zip(names, fewest)}


def _mode_outcomes(counts: np.ndarray, draws: int) -> list[np.ndarray]:
    """Every split of ``draws`` over classes that scikit-learn's ``_approximate_mode`` can return."""
    continuous = counts / counts.sum() * draws  # the same float operations, so the same ties
    floored = np.floor(continuous)
    remainder = continuous - floored
    need = int(draws - floored.sum())
    outcomes = [floored]
    for value in np.sort(np.unique(remainder))[::-1]:
        if need <= 0:
            break
        tied = np.flatnonzero(remainder == value)
        take = min(len(tied), need)
        outcomes = [o + np.isin(np.arange(len(o)), chosen) for o in outcomes
                    for chosen in itertools.combinations(tied, take)]
        need -= take
    return [o.astype(int) for o in outcomes]


def _kfold_training_parts(counts: np.ndarray, n_splits: int) -> set[tuple[int, ...]]:
    parts = set()
    for order in itertools.permutations(range(len(counts))):
        dealt = np.repeat(np.array(order), counts[list(order)])  # sorted by order of appearance
        for fold in range(n_splits):
            parts.add(tuple(counts - np.bincount(dealt[fold::n_splits], minlength=len(counts))))
    return parts


def _shuffle_training_parts(counts: np.ndarray, test_size: float) -> set[tuple[int, ...]]:
    total = int(counts.sum())
    return {tuple(train) for train in _mode_outcomes(counts, total - math.ceil(test_size * total))}


def _inner_fewest(train: np.ndarray, val_fraction: float) -> np.ndarray:
    """Per class, the fewest subjects in the smaller of the inner fit and validation parts of ``train``."""
    total = int(train.sum())
    n_val = math.ceil(val_fraction * total)
    fewest = np.zeros(len(train), dtype=int)
    present = train > 0
    if n_val >= total:
        return fewest
    fits = _mode_outcomes(train[present], total - n_val)
    fewest[present] = np.min([np.minimum(fit, train[present] - fit) for fit in fits], axis=0)
    return fewest


def _bounded_fewest(counts: Mapping[str, int], cls: str, scheme: str, n_splits: int, test_size: float,
                    val_fraction: float, grouped: bool) -> int:
    """A lower bound for :func:`fewest_inner_subjects`: the smallest training share of ``cls`` (t of T), split
    by its rounded-down share; with groups the splits hold out round(fraction n) of each class (groups of
    about one subject assumed)."""
    total, n = sum(counts.values()), counts[cls]
    if scheme == "kfold":
        parts = [(n - -(-n // n_splits), total - size) for size in {-(-total // n_splits), total // n_splits}]
    elif grouped:
        held = {c: int(round(test_size * k)) for c, k in counts.items()}
        parts = [(n - held[cls], total - sum(held.values()))]
    else:
        train = total - math.ceil(test_size * total)
        parts = [(math.floor(n / total * train), train)]
    return min(_bounded_inner(t, size, val_fraction, grouped) for t, size in parts)


def _bounded_inner(t: int, total: int, val_fraction: float, grouped: bool) -> int:
    if t < 1 or total < 1:
        return 0
    n_val = math.ceil(val_fraction * total)
    sure = min(t * n_val // total, t * (total - n_val) // total)
    if grouped:  # the inner split may be the grouped one: round(val_fraction t) held out, all of them at worst
        held = int(round(val_fraction * t))
        sure = min(sure, held, t - held)
    return sure


def _needed_for_inner_parts(counts: Mapping[str, int], short: Sequence[str], scheme: str, n_splits: int,
                            test_size: float, val_fraction: float, grouped: bool) -> int:
    """The fewest subjects per short class with which every class is in every fold's inner parts."""
    raise_to, n = set(short), min(counts[c] for c in short)
    for _ in range(100_000):  # a bound, never reached: a large enough class always gets its share
        n += 1
        trial = {c: max(k, n) if c in raise_to else k for c, k in counts.items()}
        fewest = fewest_inner_subjects(trial, scheme, n_splits, test_size, val_fraction, grouped)
        still = {c for c, k in fewest.items() if k < 1}
        if not still:
            break
        raise_to |= still  # a growing total can shrink a small class's share: it has to grow as well
    return n


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
        try:
            return cls.from_json(Path(path).read_text())
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is damaged ({type(error).__name__}: {error}); delete it to draw the splits again "
                             "(the same seed and data give the same splits), or restore it from a backup") from None


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
    first, so the plan depends on the data and the seed only, never on file-system order. Refused before
    drawing: class counts (and, with repeated groups, groups per class) no plan could split; after: a leak
    (:func:`audit_splits`), or a fold part without some class (:func:`check_every_part_has_every_class`).
    """
    check_split_options(scheme, n_splits, test_size, val_fraction)
    table = table.sort_values("subject_id").reset_index(drop=True)
    ids, y, groups = table["subject_id"].to_numpy(), table["label"].to_numpy(), table["group"].to_numpy()
    grouped = len(set(groups)) < len(groups)
    counts = {str(c): int(n) for c, n in table["label"].value_counts(sort=False).items()}
    if outer is None:
        check_class_counts(counts, scheme, n_splits, test_size, val_fraction, grouped)
        if grouped:
            check_groups_per_class(groups_per_class(table), scheme, n_splits)
    else:  # a stock splitter's parts cannot be predicted from the counts
        _require_a_subject_per_fold(counts, n_splits)
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
    check_every_part_has_every_class(plan, table)
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


PARTS = ("train", "val", "test")
_PART_ROLE = {"train": "inner training", "val": "inner validation", "test": "test"}


def check_every_part_has_every_class(plan: SplitPlan, table: pd.DataFrame,
                                     saved: str | os.PathLike | None = None) -> None:
    """Raise ``ValueError`` unless every fold's train, val and test parts each hold a subject of every class of
    ``table``: a fold without a class in its training part never learns it, in its validation part picks its best
    epoch without it, in its test part scores it nowhere (zero F1, silently).

    ``saved``: the splits.json ``plan`` was read from (a plan drawn earlier, re-checked on resume); the message
    then says to delete it.
    """
    label_of = dict(zip(table["subject_id"], table["label"]))
    classes = sorted({str(c) for c in table["label"]})
    missing = []
    for fold in plan.folds:
        for part in PARTS:
            present = {str(label_of[s]) for s in getattr(fold, part) if s in label_of}
            lacking = [c for c in classes if c not in present]
            if lacking:
                missing.append((fold.fold, part, lacking))
    if not missing:
        return
    short = sorted({c for _, _, lacking in missing for c in lacking})
    subjects = table["label"].astype(str).value_counts()
    groups = groups_per_class(table.assign(label=table["label"].astype(str)))
    where = "; ".join(f"fold {fold}'s {part} part ({_PART_ROLE[part]}) has no subject of {', '.join(lacking)}"
                      for fold, part, lacking in missing)
    counts = ", ".join(f"{c} has {int(subjects.get(c, 0))} subject(s) in {groups.get(c, 0)} group(s)" for c in short)
    options = f"--split {plan.scheme}, --folds {plan.n_splits}, --seed {plan.seed}"
    if saved is not None:
        raise ValueError(
            f"{saved} holds splits ({options}) in which {where} ({counts}). A fold without a class trains, picks its "
            f"best epoch or tests without it. Delete {saved} to draw the splits again (the new draw is checked too)"
        )
    raise ValueError(
        f"The splits drawn ({options}) leave a class out of a fold part: {where} ({counts}). A fold without a class "
        f"trains, picks its best epoch or tests without it. Fix: add subjects or groups of {', '.join(short)}, use "
        f"fewer --folds, try another --seed, or leave the class out with --classes without it"
    )
