"""Are the volumes skull-stripped, and alike across classes? Checked before any preprocessing.

BraTS is distributed skull-stripped with an exact-zero background; IXI as downloaded is a whole
head with a noisy background (the paper stripped it with FSL BET2 first). If one class is stripped
and another is not, a classifier can tell them apart by skull and background alone, and the
preprocessing, which takes every non-zero voxel as brain, crops an unstripped head to its whole
field of view. So a run whose volumes mix the two stops here, unless the user says otherwise.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from datasets.acquisition import STRIPPED_MIN_BORDER_ZERO, looks_stripped
from datasets.records import SubjectRecord
from datasets.validation import InvalidDataError

FIX = ("strip it (e.g. FSL `bet <in> <out>_brain -R`: for IXI, `bet IXI002-Guys-0828-T1 IXI002-Guys-0828-T1_brain -R` "
       "leaves the stripped file beside the raw one and discovery prefers it) or give the stripped file")
LISTED = 25  # unstripped volumes named in an error message; `python -m datasets check` names all


class UnstrippedDataError(InvalidDataError):
    """The run's volumes mix skull-stripped and unstripped heads: a confound with the label."""


@dataclass(frozen=True)
class Unstripped:
    subject_id: str
    label: str
    path: str
    border_zero_fraction: float

    def format(self) -> str:
        return (f"{self.path}: background not zero ({self.border_zero_fraction:.0%} of the border voxels are 0; "
                f"a skull-stripped volume has ~100 %), subject {self.subject_id} ({self.label}): looks unstripped")


@dataclass
class StrippingCheck:
    """Per class, how many subjects are stripped; which volumes are not."""

    classes: tuple[str, ...]
    stripped: Counter = field(default_factory=Counter)
    unstripped: list[Unstripped] = field(default_factory=list)

    @property
    def unstripped_by_class(self) -> Counter:
        return Counter(u.label for u in {(u.subject_id, u.label): u for u in self.unstripped}.values())

    @property
    def mixed(self) -> bool:
        """Stripped and unstripped subjects in one run: the case that confounds the label."""
        return bool(self.unstripped) and sum(self.stripped.values()) > 0

    def by_class(self) -> dict[str, dict[str, int]]:
        return {c: {"stripped": int(self.stripped.get(c, 0)), "unstripped": int(self.unstripped_by_class.get(c, 0))}
                for c in self.classes}

    def summary(self) -> str:
        return ", ".join(f"{c} {n['stripped']}/{n['stripped'] + n['unstripped']} stripped"
                         for c, n in self.by_class().items())

    def format(self, limit: int | None = None) -> str:
        lines = [f"Skull stripping (exact-zero background): {self.summary()}"]
        if self.unstripped:
            shown = self.unstripped if limit is None else self.unstripped[:limit]
            lines.append(f"{len(self.unstripped)} volume(s) not skull-stripped; fix: {FIX}:")
            lines += [f"  {u.format()}" for u in shown]
            if len(shown) < len(self.unstripped):
                lines.append(f"  ... and {len(self.unstripped) - len(shown)} more (python -m datasets check lists all)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """For experiment.json: the report states at its top what was allowed through."""
        return {"threshold_border_zero_fraction": STRIPPED_MIN_BORDER_ZERO, "by_class": self.by_class(),
                "unstripped": [{"subject_id": u.subject_id, "label": u.label, "path": u.path,
                                "border_zero_fraction": u.border_zero_fraction} for u in self.unstripped]}


def check_stripping(records: Sequence[SubjectRecord], profiles: dict[str, dict],
                    classes: Sequence[str]) -> StrippingCheck:
    """Every file of every subject is measured; a subject is stripped only when all its files are."""
    check = StrippingCheck(tuple(classes))
    for record in records:
        bad = [Unstripped(record.subject_id, record.label, path, float(profiles[path]["border_zero_fraction"]))
               for path in record.paths if not looks_stripped(profiles[path])]
        if bad:
            check.unstripped.extend(bad)
        else:
            check.stripped[record.label] += 1
    return check


def require_consistent_stripping(check: StrippingCheck, allow_unstripped: bool) -> None:
    """Stop a run that mixes stripped and unstripped volumes, before hours of preprocessing and training."""
    if not check.mixed or allow_unstripped:
        return
    raise UnstrippedDataError(
        "Skull-stripped and unstripped volumes are mixed in this run ("
        + check.summary() + "). A classifier can then separate the classes by skull and background "
        "instead of anatomy: the scores would measure which data set a scan came from (a confound). "
        "The preprocessing also takes every non-zero voxel as brain, so an unstripped head is cropped to its "
        f"whole field of view. Fix: {FIX}; or pass --allow-unstripped to go on anyway (the report will say so at its "
        "top).\n" + check.format(limit=LISTED)
    )
