"""The nested search's router: each (arm, fold) study runs one trial at a time, so a seed fixes its configurations."""
from __future__ import annotations

import math
import random

import optuna
import pytest
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search_spaces import PAPER_DEFAULTS, SEARCH_SPACE, optuna_distributions
from trainables.nested_search import FoldStudies, StudyKey

METRIC = "val_macro_f1_best"
KEYS = [StudyKey("mc3_18", False, fold) for fold in range(3)]
TRIALS_PER_STUDY = 13  # past TPE's 10 random start-up trials, where timing used to matter


def router(database) -> FoldStudies:
    default = {item.name: PAPER_DEFAULTS[item.name] for item in SEARCH_SPACE}
    studies = {key: OptunaSearch(optuna_distributions(PAPER_DEFAULTS), metric=METRIC, mode="max",
                                 points_to_evaluate=[default], sampler=optuna.samplers.TPESampler(seed=0),
                                 study_name=key.name, storage=optuna.storages.RDBStorage(f"sqlite:///{database}"))
               for key in KEYS}
    return FoldStudies(studies, {key: TRIALS_PER_STUDY for key in KEYS}, {}, METRIC, "max")


def score(config: dict) -> float:
    """A deterministic stand-in for training: best near lr 4e-5 and low dropout."""
    return 1 - abs(math.log10(config["lr"]) + 4.4) - config["dropout"] / 3


def drive(searcher: FoldStudies, slots: int, completion_seed: int) -> dict[int, list[tuple[float, float]]]:
    """What Tune does: fill the free slots with suggestions, then finish a running trial (in a seeded random order)."""
    order, running, configs, asked = random.Random(completion_seed), [], {key.fold: [] for key in KEYS}, 0
    while True:
        while len(running) < slots:
            config = searcher.suggest(f"trial{asked}")
            if config is None or config == Searcher.FINISHED:
                break
            assert config["fold"] not in {c["fold"] for _, c in running}, "two trials of one study in flight"
            running.append((f"trial{asked}", config))
            configs[config["fold"]].append((config["lr"], config["dropout"]))
            asked += 1
        if not running:
            return configs
        trial_id, config = running.pop(order.randrange(len(running)))
        searcher.on_trial_complete(trial_id, {METRIC: score(config)})


@pytest.fixture(autouse=True)
def quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    yield
    optuna.logging.set_verbosity(verbosity)


def test_the_same_seed_gives_the_same_configurations_whatever_order_trials_finish_in(tmp_path):
    first = drive(router(tmp_path / "a.db"), slots=4, completion_seed=0)
    second = drive(router(tmp_path / "b.db"), slots=4, completion_seed=1)
    one_at_a_time = drive(router(tmp_path / "c.db"), slots=1, completion_seed=0)
    assert all(len(configs) == TRIALS_PER_STUDY for configs in first.values())
    assert first == second == one_at_a_time
    # Every study starts at the paper's point, and the studies' first random suggestions coincide across folds.
    assert {configs[0] for configs in first.values()} == {(PAPER_DEFAULTS["lr"], PAPER_DEFAULTS["dropout"])}
    assert len({configs[1] for configs in first.values()}) == 1


def test_a_restored_router_does_not_wait_for_a_trial_it_saved_as_running(tmp_path):
    searcher = router(tmp_path / "a.db")
    config = searcher.suggest("trial0")
    busy = [searcher.suggest(f"trial{i}") for i in (1, 2)]
    assert config["fold"] == 0 and [c["fold"] for c in busy] == [1, 2]
    assert searcher.suggest("trial3") is None  # every study has its trial running: "not now", not "finished"
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = router(tmp_path / "b.db")
    restored.restore(str(tmp_path / "searcher.pkl"))
    # Tune may already count the saved trials as finished and never report them again: the studies go on.
    assert restored.suggest("trial3")["fold"] == 0
