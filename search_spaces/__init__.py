"""Hyperparameter ranges searched around the paper's defaults, as plain data."""
from search_spaces.paper import (SEARCH_SPACE, TPE_STARTUP_TRIALS, SearchRange, active_ranges, optuna_distributions,
                                 space_table, unsearched)
from search_spaces.recipe import DEVIATIONS, PAPER_DEFAULTS, PAPER_RECIPE, deviations_from_paper

__all__ = ["DEVIATIONS", "PAPER_DEFAULTS", "PAPER_RECIPE", "SEARCH_SPACE", "SearchRange", "TPE_STARTUP_TRIALS",
           "active_ranges", "deviations_from_paper", "optuna_distributions", "space_table", "unsearched"]
