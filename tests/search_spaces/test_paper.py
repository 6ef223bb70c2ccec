"""The search space is centred on the paper's values and says why each range is as wide as it is."""
import math

from search_spaces import SEARCH_SPACE, optuna_distributions, space_table
from trainables import PAPER_DEFAULTS


def test_every_range_contains_the_papers_value_and_has_a_reason():
    for item in SEARCH_SPACE:
        assert item.low < PAPER_DEFAULTS[item.name] < item.high, item.name
        assert len(item.reason) > 20


def test_log_ranges_are_centred_on_the_paper_in_log_space():
    for item in SEARCH_SPACE:
        if item.log:
            centre = math.sqrt(item.low * item.high)
            assert math.isclose(centre, PAPER_DEFAULTS[item.name], rel_tol=1e-9), item.name


def test_optuna_distributions_match_the_table():
    distributions = optuna_distributions()
    assert set(distributions) == {"lr", "weight_decay", "dropout", "aug_strength"}
    assert distributions["lr"].low == 4e-6 and distributions["lr"].high == 4e-4 and distributions["lr"].log
    assert not distributions["dropout"].log
    assert [row["paper"] for row in space_table()] == [1e-5, 1e-3, 0.3, 1.0]
    assert [row["default"] for row in space_table()] == [4e-5, 1e-3, 0.3, 1.0]


def test_ranges_follow_a_set_value():
    distributions = optuna_distributions({"lr": 3e-4, "weight_decay": 1e-3, "dropout": 0.8, "aug_strength": 1.0})
    assert math.isclose(distributions["lr"].low, 3e-5) and math.isclose(distributions["lr"].high, 3e-3)
    assert (distributions["weight_decay"].low, distributions["weight_decay"].high) == (1e-5, 1e-1)
    assert (distributions["dropout"].low, distributions["dropout"].high) == (0.0, 0.8)


def test_without_augmentation_the_strength_is_not_searched_and_the_table_says_why():
    constants = {**PAPER_DEFAULTS, "augmentation": "none"}
    assert set(optuna_distributions(constants)) == {"lr", "weight_decay", "dropout"}
    rows = {row["name"]: row for row in space_table(constants)}
    assert not rows["aug_strength"]["searched"] and rows["lr"]["searched"]
    assert rows["aug_strength"]["reason"] == "not searched: --set augmentation=none, so the strength has no effect"
    assert set(optuna_distributions({**PAPER_DEFAULTS, "augmentation": "heavy"})) >= {"aug_strength"}
