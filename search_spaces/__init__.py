"""Hyperparameter ranges searched around the paper's defaults, as plain data."""
from search_spaces.paper import SEARCH_SPACE, SearchRange, optuna_distributions, space_table

__all__ = ["SEARCH_SPACE", "SearchRange", "optuna_distributions", "space_table"]
