"""The nested search's router: each (arm, fold) study runs one trial at a time, so a seed fixes its configurations."""
from __future__ import annotations

import math
import pickle
import random
import shutil

import optuna
import pytest
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search_spaces import PAPER_DEFAULTS, SEARCH_SPACE, optuna_distributions
from trainables.nested_search import (STUDY_DATABASE, TUNE_TRIAL_ATTR, FoldStudies, OutputFolderStorage, StudyKey,
                                      studies_under, tell_resumed_results)

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


def states(database, key: StudyKey) -> list[str]:
    study = optuna.load_study(study_name=key.name, storage=f"sqlite:///{database}")
    return [trial.state.name for trial in study.trials]


def test_a_restore_fails_the_trial_a_dead_driver_asked_for_after_its_last_save_and_keeps_the_resumed_ones(
        tmp_path, caplog):
    """The driver is SIGKILLed after Optuna recorded a trial but before Tune saved its state (trials + searcher).

    Tune resumes the trials of its last save, under their old ids, and reports them to the restored searcher;
    the later one is known to nobody and must not stay RUNNING for ever.
    """
    database = tmp_path / "a.db"
    searcher = router(database)
    first = [searcher.suggest(f"trial{i}") for i in range(3)]  # one per fold study
    assert [config["fold"] for config in first] == [0, 1, 2]
    searcher.on_trial_complete("trial0", {METRIC: score(first[0])})
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune's periodic save: trial1 and trial2 are in flight
    lost = searcher.suggest("trial3")  # asked after the save: Optuna has it, Tune's saved state does not
    assert lost["fold"] == 0 and states(database, KEYS[0]) == ["COMPLETE", "RUNNING"]
    # The driver dies here. The rerun restores Tune's state and the searcher state of the same save.
    restored = router(tmp_path / "blank.db")
    with caplog.at_level("WARNING", logger="trainables.nested_search"):
        restored.restore(str(tmp_path / "searcher.pkl"))
    assert states(database, KEYS[0]) == ["COMPLETE", "FAIL"]
    assert ("Optuna study mc3_18-scratch-fold0: trial 1 was left RUNNING by a driver that stopped before Ray Tune "
            "saved it (no Tune trial will report it); marked FAIL") in caplog.text
    assert "fold1" not in caplog.text and "fold2" not in caplog.text
    # trial1 and trial2 were saved in flight: Tune resumes them and reports their scores to the restored searcher.
    assert states(database, KEYS[1]) == states(database, KEYS[2]) == ["RUNNING"]
    restored.on_trial_complete("trial1", {METRIC: score(first[1])})
    restored.on_trial_complete("trial2", {METRIC: score(first[2])})
    assert states(database, KEYS[1]) == states(database, KEYS[2]) == ["COMPLETE"]
    fold1 = optuna.load_study(study_name=KEYS[1].name, storage=f"sqlite:///{database}")
    assert fold1.trials[0].value == pytest.approx(score(first[1]))
    # The lost trial's place is taken by a new one (the restored counters are the save's), as the quota says.
    replacement = restored.suggest("trial4")
    assert replacement["fold"] == 0 and states(database, KEYS[0]) == ["COMPLETE", "FAIL", "RUNNING"]
    assert (replacement["lr"], replacement["dropout"]) == (lost["lr"], lost["dropout"])  # the sampler's saved state


def test_a_lost_first_trial_is_failed_and_the_grid_configuration_is_queued_again(tmp_path, caplog):
    """Each study starts from the grid's (enqueued) configuration: losing that trial must not lose the point."""
    database = tmp_path / "a.db"
    searcher = router(database)
    searcher.save(str(tmp_path / "searcher.pkl"))  # saved before any suggestion
    assert (searcher.suggest("trial0")["lr"], searcher.suggest("trial1")["fold"]) == (PAPER_DEFAULTS["lr"], 1)
    restored = router(tmp_path / "blank.db")
    with caplog.at_level("WARNING", logger="trainables.nested_search"):
        restored.restore(str(tmp_path / "searcher.pkl"))
    assert states(database, KEYS[0]) == states(database, KEYS[1]) == ["FAIL", "WAITING"]
    assert "Optuna study mc3_18-scratch-fold1: trial 0 was left RUNNING" in caplog.text
    assert "its enqueued configuration" in caplog.text and "queued again" in caplog.text
    again = restored.suggest("trial2")
    assert again["fold"] == 0
    assert {k: again[k] for k in ("lr", "weight_decay", "dropout", "aug_strength")} == \
        {k: PAPER_DEFAULTS[k] for k in ("lr", "weight_decay", "dropout", "aug_strength")}
    assert states(database, KEYS[0]) == ["FAIL", "RUNNING"]


def test_a_driver_dying_while_a_lost_first_trial_is_failed_keeps_the_grid_configuration_queued_once(tmp_path,
                                                                                                       monkeypatch):
    """The point is queued again before the FAIL is written: a crash between the two writes loses nothing, and the
    next restore (which finds the trial still RUNNING) does not queue it a second time."""
    database = tmp_path / "a.db"
    searcher = router(database)
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("trial0")

    def driver_dies(*args, **kwargs):
        raise KeyboardInterrupt("killed while closing the lost trial")

    with monkeypatch.context() as patch:
        patch.setattr(optuna.Study, "tell", driver_dies)
        with pytest.raises(KeyboardInterrupt):
            router(tmp_path / "blank.db").restore(str(tmp_path / "searcher.pkl"))
    assert states(database, KEYS[0]) == ["RUNNING", "WAITING"]  # queued, not yet failed
    restored = router(tmp_path / "blank.db")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert states(database, KEYS[0]) == ["FAIL", "WAITING"]
    again = restored.suggest("trial1")
    assert again["fold"] == 0 and again["lr"] == PAPER_DEFAULTS["lr"]
    assert states(database, KEYS[0]) == ["FAIL", "RUNNING"]


def test_a_copied_router_restores_against_the_copys_database(tmp_path):
    """Ray pickles the studies with their storage; restored inside ``studies_under(copy)`` (as run_search restores
    a copied --output) they read and write the copy's database, and the original is left as it was."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    searcher = FoldStudies({key: OptunaSearch(optuna_distributions(PAPER_DEFAULTS), metric=METRIC, mode="max",
                                              sampler=optuna.samplers.TPESampler(seed=0), study_name=key.name,
                                              storage=OutputFolderStorage(original)) for key in KEYS},
                           {key: 2 for key in KEYS}, {}, METRIC, "max")
    searcher.suggest("trial0")
    searcher.save(str(original / "searcher.pkl"))
    shutil.copytree(original, copy)
    with studies_under(copy):
        restored = pickle.loads(pickle.dumps(searcher))  # as Tuner.restore unpickles tuner.pkl
        restored.restore(str(copy / "searcher.pkl"))
    restored.on_trial_complete("trial0", {METRIC: 0.9})
    assert states(copy / STUDY_DATABASE, KEYS[0]) == ["COMPLETE"]
    assert states(original / STUDY_DATABASE, KEYS[0]) == ["RUNNING"]


def test_a_trial_that_errored_and_finished_after_a_restore_gives_its_study_its_score_once(tmp_path, caplog):
    """Tune tells an ERROR trial's study FAIL; resume_errored runs it again under the same id. Ray's OptunaSearch
    then only warns ("additional completion"): the score is added as a COMPLETE copy of the FAIL trial instead."""
    database = tmp_path / "a.db"
    searcher = router(database)
    configs = {f"trial{i}": searcher.suggest(f"trial{i}") for i in range(3)}  # one per fold study
    searcher.on_trial_complete("trial0", error=True)  # crashed past --max-failures: told FAIL, as Tune does
    searcher.on_trial_complete("trial1", error=True)  # errored too, and Tune will not run it again
    searcher.on_trial_complete("trial2", {METRIC: score(configs["trial2"])})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = router(tmp_path / "blank.db")
    restored.restore(str(tmp_path / "searcher.pkl"))
    with caplog.at_level("WARNING"):
        restored.on_trial_complete("trial0", {METRIC: 0.75})  # the resumed trial finishes
    assert "additional completion" not in caplog.text
    assert states(database, KEYS[0]) == ["FAIL"]  # what Ray 2.60 leaves: the score is not told

    storage = optuna.storages.RDBStorage(f"sqlite:///{database}")
    names = [key.name for key in KEYS]
    scores = {"trial0": 0.75, "trial2": score(configs["trial2"]), "elsewhere": 0.5}
    assert tell_resumed_results(storage, names, scores) == [(KEYS[0].name, 0)]
    fold0 = optuna.load_study(study_name=KEYS[0].name, storage=storage)
    failed, told = fold0.trials
    assert (failed.state.name, told.state.name, told.value) == ("FAIL", "COMPLETE", 0.75)
    assert told.params == failed.params == {k: configs["trial0"][k] for k in failed.params}
    assert told.user_attrs[TUNE_TRIAL_ATTR] == "trial0"
    assert fold0.best_value == 0.75
    assert states(database, KEYS[1]) == ["FAIL"] and states(database, KEYS[2]) == ["COMPLETE"]
    # Every later run calls it again: nothing is added twice, and a NaN score (a permanent failure) is not told.
    assert tell_resumed_results(storage, names, {**scores, "trial1": math.nan}) == []
    assert states(database, KEYS[0]) == ["FAIL", "COMPLETE"] and states(database, KEYS[1]) == ["FAIL"]


def test_a_permanent_failure_s_nan_score_is_told_as_a_failed_trial_and_frees_its_study(tmp_path):
    """A trial that fails permanently finishes (no ERROR) with NaN as its score: Optuna refuses NaN as COMPLETE and
    Ray's OptunaSearch only warns, which left the Optuna trial RUNNING (and a restore would train its point again)."""
    database = tmp_path / "a.db"
    searcher = router(database)
    first = searcher.suggest("trial0")
    assert first["fold"] == 0
    searcher.on_trial_complete("trial0", {METRIC: math.nan, "fold_failed": True, "fold_finished": False})
    assert states(database, KEYS[0]) == ["FAIL"]
    # The study is free again, and a restore has nothing to close or queue again.
    following = [searcher.suggest(f"trial{i}") for i in (1, 2, 3)]
    assert [c["fold"] for c in following] == [1, 2, 0]
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = router(tmp_path / "blank.db")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert states(database, KEYS[0]) == ["FAIL", "RUNNING"]


def test_fresh_studies_start_over_a_study_that_no_tune_run_holds(tmp_path):
    """Studies are built, then Tune saves its first state; a stop in between leaves studies that no Tune run can
    restore, and the rerun builds them again. Added to, fold 0 would queue the grid's point twice and fold 1 count
    its handed-over grid score twice; started over, each holds its one first point, as after an uninterrupted start."""
    from search_spaces import active_ranges
    from trainables.experiment import ExperimentConfig
    from trainables.tuning import fresh_fold_studies

    config = ExperimentConfig(experiment="search", output=str(tmp_path / "out"), models=("mc3_18",), pretrained="none")
    constants = config.training_constants()
    default_point = {item.name: constants[item.name] for item in active_ranges(constants)}
    keys = [StudyKey("mc3_18", False, 0), StudyKey("mc3_18", False, 1)]
    for _ in range(2):
        fresh_fold_studies(config, keys, constants, default_point, {keys[1]: 0.5})
    url = f"sqlite:///{tmp_path / 'out' / STUDY_DATABASE}"
    queued = optuna.load_study(study_name=keys[0].name, storage=url).trials
    assert [t.state for t in queued] == [optuna.trial.TrialState.WAITING]
    assert queued[0].system_attrs["fixed_params"] == default_point
    handed = optuna.load_study(study_name=keys[1].name, storage=url).trials
    assert [(t.state, t.value) for t in handed] == [(optuna.trial.TrialState.COMPLETE, 0.5)]
