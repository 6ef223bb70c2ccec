"""Hyperparameter ranges searched around the paper's defaults, as plain data."""
from search_spaces.paper import SEARCH_SPACE, SearchRange, optuna_distributions, space_table
from search_spaces.recipe import PAPER_DEFAULTS

__all__ = ["PAPER_DEFAULTS", "SEARCH_SPACE", "SearchRange", "optuna_distributions", "space_table"]
