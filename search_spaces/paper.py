"""The search space: each range centred on the paper's value, with the reason for its width.

Kept as data so that a report, the CLI and Optuna all read the same numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from search_spaces.recipe import PAPER_DEFAULTS, PAPER_RECIPE


@dataclass(frozen=True)
class SearchRange:
    name: str
    low: float
    high: float
    log: bool
    reason: str

    def bounds(self, centre: float | None = None) -> tuple[float, float]:
        """The range around ``centre`` (a --set value) instead of the paper's value.

        Log ranges keep their width in decades and move with the centre; linear ranges stay, and
        widen only if the centre lies outside them.
        """
        paper = PAPER_DEFAULTS[self.name]
        if centre is None or centre == paper:
            return self.low, self.high
        if self.log:
            return self.low * centre / paper, self.high * centre / paper
        return min(self.low, centre), max(self.high, centre)


# TPE's random start-up suggestions per study (Optuna's default, passed explicitly): a study with no more trials than
# this never leaves random sampling, which the report must say.
TPE_STARTUP_TRIALS = 10

SEARCH_SPACE: tuple[SearchRange, ...] = (
    SearchRange("lr", 4e-6, 4e-4, True,
                "one decade either side of the grid's value (default 4e-5, the paper's 1e-5 scaled to batch 4): "
                "Adam's step size matters most on small 3-D data sets"),
    SearchRange("weight_decay", 1e-5, 1e-1, True,
                "two decades either side of the grid's value (the paper's 1e-3): with the paper's ~600 volumes, or "
                "fewer, regularisation strength is uncertain"),
    SearchRange("dropout", 0.0, 0.6, False,
                "around the paper's 0.3 before the final layer; above 0.6 the 512-feature head starves"),
    SearchRange("aug_strength", 0.0, 2.0, False,
                "0 = none, 1 = the paper's light augmentation, 2 = twice its ranges (scales 0.8-1.4, 20 degrees, flip p 0.5)"),
)


def unsearched(constants: dict[str, Any] | None = None) -> dict[str, str]:
    """Ranges of SEARCH_SPACE left out for these training constants, with why: without augmentation
    (``--set augmentation=none``) the strength changes nothing, and TPE would spend a dimension on noise."""
    constants = constants or {}
    if constants.get("augmentation") == "none":
        return {"aug_strength": "not searched: --set augmentation=none, so the strength has no effect"}
    return {}


def active_ranges(constants: dict[str, Any] | None = None) -> tuple[SearchRange, ...]:
    """The ranges searched for these training constants (SEARCH_SPACE less :func:`unsearched`)."""
    skipped = unsearched(constants)
    return tuple(item for item in SEARCH_SPACE if item.name not in skipped)


def optuna_distributions(centres: dict[str, Any] | None = None) -> dict[str, Any]:
    """The space as Optuna distributions (a dict, so known results can be added as evaluated trials); ``centres``
    are the training constants (a --set value re-centres its range; augmentation none drops aug_strength)."""
    from optuna.distributions import FloatDistribution

    centres = centres or {}
    return {item.name: FloatDistribution(*item.bounds(centres.get(item.name)), log=item.log)
            for item in active_ranges(centres)}


def space_table(centres: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    centres = centres or {}
    skipped = unsearched(centres)
    return [{**asdict(item), "paper": PAPER_RECIPE[item.name], "default": PAPER_DEFAULTS[item.name],
             "searched_low": item.bounds(centres.get(item.name))[0],
             "searched_high": item.bounds(centres.get(item.name))[1],
             "searched": item.name not in skipped, **({"reason": skipped[item.name]} if item.name in skipped else {})}
            for item in SEARCH_SPACE]
