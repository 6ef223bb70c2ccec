"""Nested cross-validation for the search: one Optuna study per (arm, outer fold), all in one Tuner.

Why nested: choosing a configuration by the mean over folds of inner-validation scores lets fold
k's test subjects take part in the choice (fold j's validation part is drawn from fold j's
training part, which holds fold k's test subjects), so the chosen configuration's test score is
optimistically biased (Cawley & Talbot, JMLR 2010). Here fold k's configuration is chosen from
trials that trained on fold k's training part and were scored on fold k's inner validation part
only; their test predictions are the nested estimate.

Why one Tuner with a routing searcher (and not one Tuner per study): Tune runs one Tuner at a
time, so k x arms Tuners would leave the cluster idle at the end of every study. ``FoldStudies``
implements Ray's ``Searcher`` API: each time Tune asks for a trial it picks the study with the
fewest trials started so far (round robin over arms and folds), asks that study's own
``OptunaSearch`` (TPE, seeded, SQLite-backed) for a configuration and tags it with the arm and
fold; each result goes back to the study it came from. So trials of all folds and arms run
concurrently, each study sees only its own fold's scores, and Tune checkpoints the router (and
with it every study's searcher) like any searcher, so ``Tuner.restore`` continues every study.

Why one trial in flight per study: after its random start-up trials, TPE's next suggestion depends on
which of the study's trials have finished when it is asked. With several trials of one study running,
that is a matter of timing, and the same seed would give other configurations on a rerun. A study
therefore gets its next trial only when its previous one has finished (Tune is told "not now" when
every open study is busy), so each study's sequence of configurations depends on the seed and the
scores alone. Parallelism comes from running many studies at once (arms x folds); with fewer studies
than trial slots, slots wait.

A driver that dies (SIGKILL, a reboot) can leave an Optuna trial RUNNING for ever: ``OptunaSearch.suggest``
writes it to the SQLite study at once, while Tune saves its own state (trials and this searcher) only every
few seconds. ``FoldStudies.restore`` closes such trials as FAIL (see ``close_abandoned_trials``).

A trial that ends in ERROR (crashes past ``--max-failures``, or a permanent error) is told FAIL to its study by
``OptunaSearch`` at once. ``Tuner.restore(..., resume_errored=True)`` runs it again under the same Tune trial id,
but Ray 2.60 never gives its study the score when it then finishes: ``OptunaSearch.on_trial_complete`` only warns
("additional completion") for a trial it has already told, and with ``max_concurrent_trials`` Tune's
``ConcurrencyLimiter`` does not even pass that completion on (it forgot the trial at its error); an Optuna trial
that has finished cannot be told again either. So every Optuna trial is tagged with its Tune trial id when it is
asked for (user attribute ``tune_trial_id``), and after each run ``tell_resumed_results`` adds, for each FAIL
trial whose Tune trial has now finished, a COMPLETE trial with the same parameters and that score (the FAIL one
stays: Optuna cannot change a finished trial). TPE learns from it from then on, not during the run that
resumed the trial (whose other suggestions are made while it trains anyway).
"""
from __future__ import annotations

import contextlib
import logging
import math
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)

# Optuna user attribute: the Tune trial id each Optuna trial was asked for, so that a finished Tune result can be
# matched to its study's trial after a restore (``tell_resumed_results``).
TUNE_TRIAL_ATTR = "tune_trial_id"


@dataclass(frozen=True)
class StudyKey:
    """One Optuna study: an arm (model, pre-training) and an outer fold."""

    model: str
    pretrained: bool
    fold: int

    @property
    def name(self) -> str:
        """``<model>-<scratch|kinetics>-fold<k>``: what optuna-dashboard lists."""
        return f"{self.model}-{'kinetics' if self.pretrained else 'scratch'}-fold{self.fold}"


# Where the search's studies live, relative to the output folder.
STUDY_DATABASE = Path("optuna") / "search.db"


def study_database_url(output: str | Path) -> str:
    """SQLite URL of the search's studies under ``output`` (every (arm, fold) study: optuna-dashboard lists them)."""
    return f"sqlite:///{Path(output) / STUDY_DATABASE}"


class OutputFolderStorage(optuna.storages.RDBStorage):
    """The search's SQLite storage, reopened under the output folder a run is resumed from.

    Ray pickles every ``OptunaSearch`` with its study and storage (``tuner.pkl``, the searcher state). A plain
    ``RDBStorage`` unpickles to its absolute URL, so a search resumed from a copied ``--output`` would read and
    write the original folder's database, and one resumed from a renamed folder would fail to open it. This
    storage remembers its output folder; unpickled inside ``studies_under(output)`` it connects to that folder's
    database instead (elsewhere, to the one it was made for).
    """

    resume_output: ClassVar[Path | None] = None  # set by ``studies_under`` while a search is restored and run

    def __init__(self, output: str | Path, **kwargs: Any) -> None:
        self.output = Path(output)
        (self.output / STUDY_DATABASE).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(study_database_url(self.output), **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        output = type(self).resume_output
        if output is not None and Path(state["output"]) != output:
            state = {**state, "output": output, "url": study_database_url(output)}
        super().__setstate__(state)


@contextlib.contextmanager
def studies_under(output: str | Path) -> Iterator[None]:
    """Within this block, every ``OutputFolderStorage`` that is unpickled opens ``output``'s study database."""
    previous = OutputFolderStorage.resume_output
    OutputFolderStorage.resume_output = Path(output)
    try:
        yield
    finally:
        OutputFolderStorage.resume_output = previous


class PickledSearcher(Searcher):
    """A searcher whose whole state is its attributes: Tune's ``save``/``restore`` pickle them (as OptunaSearch does)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__.copy(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


class FoldStudies(PickledSearcher):
    """Routes each Tune trial to one (arm, fold) study and each result back to it.

    ``studies`` maps a key to its ``OptunaSearch`` (already given its space, metric, mode and
    storage); ``quota`` is how many trials each study may still start in this run; ``fixed`` holds
    the training options every trial shares.
    """

    def __init__(self, studies: dict[StudyKey, OptunaSearch], quota: dict[StudyKey, int], fixed: dict[str, Any],
                 metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self._studies = dict(studies)
        self._order = list(studies)
        self._quota = dict(quota)
        self._fixed = dict(fixed)
        self._started: Counter = Counter()
        self._study_of: dict[str, StudyKey] = {}
        self._running: dict[StudyKey, str] = {}  # the one trial in flight per study

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        # The studies were built complete; Tune's param_space holds constants only.
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        open_studies = [key for key in self._order if self._started[key] < self._quota[key]]
        if not open_studies:
            return Searcher.FINISHED
        idle = [key for key in open_studies if key not in self._running]
        if not idle:
            return None  # every open study has a trial running: Tune asks again when one finishes
        key = min(idle, key=lambda k: (self._started[k], self._order.index(k)))
        params = self._studies[key].suggest(trial_id)
        if params is None or params == Searcher.FINISHED:
            return params
        # Trial.set_user_attr is Optuna's public API; the Trial object is read from OptunaSearch's private map of
        # Tune trial ids to Optuna trials (``_ot_trials``, Ray 2.60), the only place that holds it.
        asked = getattr(self._studies[key], "_ot_trials", {}).get(trial_id)
        if asked is not None:
            asked.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        self._started[key] += 1
        self._study_of[trial_id] = key
        self._running[key] = trial_id
        return {**self._fixed, **params, "model": key.model, "pretrained": key.pretrained, "fold": key.fold,
                "_experiment": "search"}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # No pruner is used (OptunaSearch's is a NopPruner); intermediate values are not needed.
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self._study_of.get(trial_id)
        if key is not None:
            searcher = self._studies[key]
            # A trial Tune ran again after an ERROR was told FAIL then (OptunaSearch's private ``_completed_trials``,
            # Ray 2.60): OptunaSearch would only warn. Its score reaches the study by tell_resumed_results.
            if trial_id not in getattr(searcher, "_completed_trials", set()):
                if _has_score(result, self.metric):
                    searcher.on_trial_complete(trial_id, result=result, error=error)
                else:  # without the result: OptunaSearch tells FAIL only when it has no value to tell
                    searcher.on_trial_complete(trial_id, result=None, error=True)
            if self._running.get(key) == trial_id:
                del self._running[key]

    def study_of(self, trial_id: str) -> StudyKey | None:
        return self._study_of.get(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # Forget what was in flight: Tune's restored trial states may already count such a trial as finished
        # (saved apart from this searcher), and a study waiting for it would wait for ever. A trial Tune does
        # resume runs beside its study's next one: a restored search keeps its studies, not its timing.
        self._running = {}
        close_abandoned_trials(self._studies)


def _has_score(result: dict | None, metric: str | None) -> bool:
    """Whether ``result`` ends a trial with a score a study can be told: a permanent failure ends as a finished Tune
    trial whose last report holds NaN (``failure_metrics``). Optuna refuses to tell NaN as COMPLETE, and Ray's
    OptunaSearch then only warns, leaving the Optuna trial RUNNING: TPE would count it as in flight, and a restore
    would close it and queue its point again (a permanently failing grid configuration trained twice). Such a
    trial is told FAIL instead."""
    value = (result or {}).get(metric) if metric else None
    return isinstance(value, (int, float)) and math.isfinite(value) and not (result or {}).get("fold_failed")


def awaited_trials(searcher: OptunaSearch) -> set[int]:
    """Numbers of the study's trials that ``searcher`` handed to Tune and has not been told the end of.

    Read from ``OptunaSearch``'s own map of Tune trial ids to Optuna trials (``_ot_trials``, minus
    ``_completed_trials``; Ray 2.60), which it pickles with its state and uses on ``on_trial_complete``.
    """
    done = getattr(searcher, "_completed_trials", set())
    return {trial.number for trial_id, trial in getattr(searcher, "_ot_trials", {}).items() if trial_id not in done}


def close_abandoned_trials(studies: dict[StudyKey, OptunaSearch]) -> list[tuple[str, int]]:
    """Mark FAIL every RUNNING Optuna trial that no restored searcher is waiting for; returns (study, number) pairs.

    Called on restore. Tune restores its trials and this searcher from one save (the experiment state, then the
    searcher state, written together), and resumes every trial that was unfinished there (PENDING, RUNNING,
    PAUSED) under its old trial id. For each of those the restored ``OptunaSearch`` still maps the trial id to
    its Optuna trial, and ``on_trial_complete`` will tell the study the result once the trial ends. Such trials
    are left RUNNING: closing them now would make that later ``tell`` fail and lose a real score. (A trial that
    ended in ERROR was told FAIL then, so it is not RUNNING here; if ``resume_errored`` runs it again to its end,
    ``tell_resumed_results`` gives its study the score.)

    A RUNNING trial that the restored searcher does not know was asked for after that save by a driver that
    then died: Tune has no trial for it, nobody will ever report it, and the restored searcher suggests a
    replacement (its counters are those of the save). It is closed as FAIL, so the study's counts and the
    report are right (TPE only learns from COMPLETE and PRUNED trials; RUNNING and FAIL ones it ignores). If it
    was an enqueued point (the grid's configuration, each study's first trial), that point is enqueued again so
    the study still starts from it.

    The trial ids Tune will resume are not visible to a searcher, so "the searcher awaits it" stands in for
    "Tune resumes it": the two come from the same save. If the driver died between writing the two files, the
    searcher state is one save older; a trial suggested in between is then closed here, and its result when
    Tune resumes it reaches the study through ``tell_resumed_results`` (if it was the enqueued point, that point is
    then evaluated twice).
    """
    closed = []
    for key, searcher in studies.items():
        study = getattr(searcher, "_ot_study", None)
        if study is None:
            continue
        awaited = awaited_trials(searcher)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number in awaited:
                continue
            # Queued again before the FAIL is written: a driver dying in between then leaves the point queued
            # twice at worst (the check below keeps a second restore from adding a third), never lost.
            requeued = trial.system_attrs.get("fixed_params")
            if requeued and requeued not in waiting_points(study):
                study.enqueue_trial(requeued)
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("Optuna study %s: trial %d was left RUNNING by a driver that stopped before Ray Tune saved "
                        "it (no Tune trial will report it); marked FAIL%s", key.name, trial.number,
                        f", and its enqueued configuration {requeued} queued again" if requeued else "")
            closed.append((key.name, trial.number))
    return closed


def waiting_points(study: optuna.Study) -> list[dict[str, Any]]:
    """The configurations queued in ``study`` (``enqueue_trial``) that no trial has taken yet."""
    return [trial.system_attrs.get("fixed_params") for trial in
            study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]


def tell_resumed_results(storage: optuna.storages.BaseStorage | str, study_names: Iterable[str],
                         scores: dict[str, float]) -> list[tuple[str, int]]:
    """Give each study the score of every trial it holds as FAIL whose Tune trial has since finished.

    ``scores`` maps a Tune trial id to the final score of its finished trial (trials Tune ran again with
    ``resume_errored`` among them). For each FAIL Optuna trial tagged with such an id (``TUNE_TRIAL_ATTR``) and a
    finite score, a COMPLETE trial with the same parameters, distributions and tag and that score is added
    (``Study.add_trial``, public): a finished Optuna trial cannot be told again. A study that already holds a
    COMPLETE trial with the tag is left alone, so calling this after every run adds each score once. A NaN score
    (a permanent failure's report) is not told: the trial stays FAIL. Returns (study name, FAIL trial number) per
    score added.
    """
    added = []
    for name in study_names:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # never created (no trial of it was ever asked for)
            continue
        trials = study.get_trials(deepcopy=False)
        told = {t.user_attrs.get(TUNE_TRIAL_ATTR) for t in trials if t.state == TrialState.COMPLETE}
        for trial in trials:
            tune_id = trial.user_attrs.get(TUNE_TRIAL_ATTR)
            score = scores.get(tune_id, math.nan) if tune_id is not None else math.nan
            if trial.state != TrialState.FAIL or tune_id in told or not math.isfinite(score):
                continue
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.COMPLETE, value=score, params=trial.params, distributions=trial.distributions,
                user_attrs={**trial.user_attrs, "resumed_from_trial": trial.number}))
            told.add(tune_id)
            log.info("Optuna study %s: trial %d was told FAIL when Tune trial %s ended in ERROR; Tune ran it again and "
                     "it finished: its score %.4f is added as a new trial with the same parameters", name, trial.number,
                     tune_id, score)
            added.append((name, trial.number))
    return added
