"""Nested cross-validation of the search: what each outer fold chose, the estimate those choices give,
and the configuration to deploy.

Why nested: choosing one configuration by its mean over folds of inner-validation scores lets fold k's
test subjects take part in the choice (fold j's inner validation part is drawn from fold j's training
part, which holds fold k's test subjects), so that configuration's test score is optimistically biased
(Cawley & Talbot, JMLR 2010). A nested search runs one Optuna study per (arm, outer fold); its trials train
on that fold's training part and are scored on its inner validation part only. Here:

* **Selection** (`fold_candidates`, then `choose`): fold k's trial is chosen from fold k's candidates
  alone. The filter comes first and `choose` refuses rows of more than one fold, so no other fold's trial
  can influence fold k's choice.
* **Nested estimate** (`nested_estimate`): each fold's chosen trial scored once on that fold's test part,
  summarised with the same metric code as the paper tables, beside the paper's configuration on the
  same folds.
* **Deployment** (`deploy_config`): the configuration to train a final model with. Its choice may use
  every fold's inner validation, which is why it is never reported with a test score.

Failed trials (ERROR or FAILED in trials.csv) never compete. Each fold's row names its failed trials, an
estimate over fewer folds than studied says which fold is missing and why, and a configuration with a failed
fold is left out of the deployment ranking (its mean over the other folds would hide the failure) and named.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.load import HYPERPARAMETERS, Experiment
from analysis.metrics import arm_metrics, overall_metrics
from analysis.names import Arm, arm_mask, arm_sort_key
from analysis.partial import failed_folds, failed_folds_text, failed_trials

SEARCH = "search"
LEAK_SUBJECTS_SHOWN = 5  # a leak lists this many subject ids per trial, then a count
TIE_DECIMALS = 12  # means over folds equal to this many decimals are a tie

SELECTION_COLUMNS = ["model", "pretrained", "fold", "config_id", "trial_name", *HYPERPARAMETERS, "inner_val_macro_f1",
                     "test_macro_f1", "n_candidates", "candidate_trials", "n_failed", "failed_trials"]
DEPLOY_COLUMNS = ["model", "pretrained", "config_id", "rule", *HYPERPARAMETERS, "inner_val_macro_f1_mean",
                  "evaluated_folds", "chosen_in_folds", "excluded_configs"]
# Why a deployment configuration was picked (the `rule` column).
RULE_EVERY_FOLD = "evaluated in every fold: best mean inner-validation macro F1"
RULE_BEST_CHOICE = "no configuration evaluated in every fold: the fold choice with the best inner-validation macro F1"
RULE_ALL_FAILED = "none: every configuration has a failed fold"


def estimate_columns(classes: list[str]) -> list[str]:
    """nested_estimate.csv's columns: one row per (arm, estimate), estimate = "nested" or "paper_default"."""
    return ["model", "pretrained", "estimate", "n_folds", "folds", "trials", "missing_folds", "test_macro_f1_mean",
            "test_macro_f1_std",
            "test_macro_f1_pooled", "test_accuracy_mean", "test_accuracy_std", "test_accuracy_pooled",
            *[f"test_f1_{c}_pooled" for c in classes]]


@dataclass(frozen=True)
class FoldStudy:
    """One Optuna study of a nested search: an arm and the outer fold its trials trained on."""

    model: str
    pretrained: bool
    fold: int
    grid_trial: str | None = None  # the paper-grid trial handed to the study as an evaluated trial

    @property
    def arm(self) -> Arm:
        return (self.model, self.pretrained)


@dataclass
class NestedSearch:
    """Everything the report shows about a nested search."""

    studies: list[FoldStudy]
    candidates: pd.DataFrame  # trials.csv rows that competed, with the study's fold in `fold`
    selection: pd.DataFrame   # nested_selection.csv
    estimate: pd.DataFrame    # nested_estimate.csv
    deploy: pd.DataFrame      # deploy_config.csv


# ---------------------------------------------------------------------------------------- studies
def fold_studies(exp: Experiment) -> list[FoldStudy]:
    """Every (arm, outer fold) study: those experiment.json lists, plus any fold that has search trials but no
    entry (so a trial is never silently left out), in the paper's arm order, then by fold."""
    studies = {(str(s["model"]), bool(s["pretrained"]), int(s["fold"])): s.get("grid_trial")
               for s in exp.optuna_studies if s.get("fold") is not None and "model" in s}
    trials = _search_trials(exp.trials)
    for model, pretrained, fold in zip(trials["model"], trials["pretrained"], trials["fold"]):
        if np.isfinite(fold):
            studies.setdefault((str(model), bool(pretrained), int(fold)), None)
    found = [FoldStudy(m, p, k, g) for (m, p, k), g in studies.items()]
    return sorted(found, key=lambda s: (arm_sort_key(s.arm), s.fold))


def _search_trials(trials: pd.DataFrame | None) -> pd.DataFrame:
    """The search's trials that know their arm (a MISSING row carries only a name and a status)."""
    if trials is None:
        return pd.DataFrame(columns=["experiment", "trial_name", "model", "pretrained", "fold", "config_id", "status",
                                     *HYPERPARAMETERS, "best_val_macro_f1"])
    return trials[(trials["experiment"] == SEARCH) & (trials["model"] != "")]


# ---------------------------------------------------------------------------------------- selection
def fold_candidates(trials: pd.DataFrame | None, study: FoldStudy) -> pd.DataFrame:
    """Fold k's candidates: its study's finished search trials and, when finished, the grid trial it was handed.

    Finished = TERMINATED with a finite inner-validation score; only the arm's rows with fold == k qualify,
    the grid trial included, so nothing trained on another fold's training part can compete.
    """
    if trials is None:
        return _search_trials(None)
    done = trials[(trials["status"] == "TERMINATED") & np.isfinite(trials["best_val_macro_f1"].astype(float))
                  & arm_mask(trials, study.arm) & (trials["fold"] == study.fold)]
    own = done["experiment"] == SEARCH
    handed = (done["trial_name"] == study.grid_trial) if study.grid_trial else pd.Series(False, index=done.index)
    return done[own | handed].sort_values("trial_name", kind="stable").reset_index(drop=True)


def choose(candidates: pd.DataFrame, paper_config_id: str | None) -> pd.Series | None:
    """The chosen trial among one fold's candidates: the highest inner-validation macro F1.

    Ties go to the paper's configuration (the a-priori choice needs no search to justify it), then to the
    smallest trial_name, so the choice never depends on row order. Rows of several folds are refused: a
    fold's choice must not see another fold's scores. None when there is no candidate.
    """
    if candidates.empty:
        return None
    folds = sorted(set(candidates["fold"]))
    if len(folds) != 1:
        raise ValueError(f"choose() got candidates of folds {folds}; filter one fold's rows first (fold_candidates)")
    ranked = candidates.assign(_not_paper=candidates["config_id"] != paper_config_id).sort_values(
        ["best_val_macro_f1", "_not_paper", "trial_name"], ascending=[False, True, True], kind="stable")
    return ranked.drop(columns="_not_paper").iloc[0]


def leak_check(candidates: pd.DataFrame, test_subjects: list[str] | None, trial_subjects: pd.DataFrame) -> str:
    """Whether fold k's candidates stayed off fold k's test subjects: "ok", else the offending trials.

    Offending = a candidate whose train or val part (trial_subjects.csv) holds a subject of fold k's test
    part (splits.json); each is named with those subjects.

    A candidate the orchestrator did not list in trial_subjects.csv cannot be vouched for and is named too.
    """
    if test_subjects is None:
        return "not checked: this fold is not in splits.json"
    if candidates.empty:
        return "no candidates"
    test = set(test_subjects)
    used = trial_subjects[trial_subjects["part"].isin(["train", "val"])]
    listed = set(trial_subjects["trial_name"])
    leaks, unlisted = [], []
    for name in candidates["trial_name"]:
        if name not in listed:
            unlisted.append(name)
            continue
        seen = sorted(test & set(used.loc[used["trial_name"] == name, "subject_id"]))
        if seen:
            more = f" and {len(seen) - LEAK_SUBJECTS_SHOWN} more" if len(seen) > LEAK_SUBJECTS_SHOWN else ""
            leaks.append(f"{name} [{' '.join(seen[:LEAK_SUBJECTS_SHOWN])}{more}]")
    parts = (["leak: " + "; ".join(leaks)] if leaks else []) + (
        ["not in trial_subjects.csv: " + "; ".join(unlisted)] if unlisted else [])
    return " | ".join(parts) or "ok"


def study_failures(trials: pd.DataFrame | None, study: FoldStudy) -> list[str]:
    """The study's failed trials (ERROR or FAILED): its own search trials of its fold, and the grid trial it was
    to be handed. They never compete; they are named beside the fold's choice."""
    failed = failed_trials(trials)
    if failed.empty:
        return []
    mine = failed[arm_mask(failed, study.arm) & (failed["fold"] == study.fold)]
    own = (mine["experiment"] == SEARCH) | (mine["trial_name"] == (study.grid_trial or ""))
    return sorted(mine.loc[own, "trial_name"])


def selection_row(exp: Experiment, study: FoldStudy, candidates: pd.DataFrame) -> dict:
    """nested_selection.csv's row for one study: the chosen trial, its scores, who it competed with and which of
    the study's trials failed."""
    chosen = choose(candidates, exp.paper_config_id)
    failed = study_failures(exp.trials, study)
    row = {"model": study.model, "pretrained": study.pretrained, "fold": study.fold,
           "n_candidates": len(candidates), "candidate_trials": ";".join(candidates["trial_name"]),
           "n_failed": len(failed), "failed_trials": ";".join(failed)}
    if chosen is None:
        return {**row, "config_id": "", "trial_name": "", **{h: np.nan for h in HYPERPARAMETERS},
                "inner_val_macro_f1": np.nan, "test_macro_f1": np.nan}
    preds = exp.predictions[exp.predictions["trial_name"] == chosen["trial_name"]]
    test = overall_metrics(preds["label"], preds["pred"], exp.classes)["macro_f1"] if len(preds) else np.nan
    return {**row, "config_id": str(chosen["config_id"]), "trial_name": str(chosen["trial_name"]),
            **{h: chosen[h] for h in HYPERPARAMETERS}, "inner_val_macro_f1": float(chosen["best_val_macro_f1"]),
            "test_macro_f1": test}


def select(exp: Experiment, studies: list[FoldStudy]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(nested_selection, all candidates): one row per study; leak_check only when trial_subjects.csv exists."""
    rows, pools = [], []
    for study in studies:
        candidates = fold_candidates(exp.trials, study)
        row = selection_row(exp, study, candidates)
        if exp.trial_subjects is not None:
            test = exp.splits.get(study.fold, {}).get("test") if exp.splits is not None else None
            row["leak_check"] = leak_check(candidates, test, exp.trial_subjects)
        rows.append(row)
        pools.append(candidates)
    columns = SELECTION_COLUMNS + (["leak_check"] if exp.trial_subjects is not None else [])
    selection = pd.DataFrame(rows, columns=columns)
    selection["fold"] = selection["fold"].astype(int)
    candidates = pd.concat(pools, ignore_index=True) if pools else _search_trials(exp.trials).iloc[:0]
    return selection, candidates


# ---------------------------------------------------------------------------------------- estimate
def paper_default_predictions(exp: Experiment, arm: Arm, folds: list[int]) -> pd.DataFrame:
    """Test predictions of the paper's configuration for `arm` on `folds`: the grid's trials (experiment
    "paper"), else the search's trials of paper_config_id; one trial per fold (the smallest name if several)."""
    preds = exp.predictions
    preds = preds[arm_mask(preds, arm) & preds["fold"].isin(folds)]
    chosen = preds[preds["experiment"] == "paper"]
    if chosen.empty and exp.paper_config_id is not None:
        chosen = preds[(preds["experiment"] == SEARCH) & (preds["config_id"] == exp.paper_config_id)]
    first = chosen.groupby("fold")["trial_name"].min()
    return chosen[chosen["trial_name"].isin(set(first))]


def estimate_row(preds: pd.DataFrame, arm: Arm, estimate: str, classes: list[str], missing: str = "") -> dict:
    """Fold mean, sample std (ddof=1) and pooled value of macro F1, accuracy and per-class F1 of one set of
    test predictions (one trial per fold), computed by the same code as the paper tables. ``missing`` names the
    studied folds that have no trial here, and why."""
    metrics = arm_metrics(preds, classes, [arm])
    folds = sorted(int(f) for f in metrics.per_fold_overall["fold"])
    row = {"model": arm[0], "pretrained": arm[1], "estimate": estimate, "n_folds": len(folds),
           "folds": ";".join(map(str, folds)), "trials": ";".join(metrics.per_fold_overall["trial_name"]),
           "missing_folds": missing}
    overall = metrics.overall.set_index("metric")
    for metric, name in (("macro_f1", "test_macro_f1"), ("accuracy", "test_accuracy")):
        for stat in ("mean", "std", "pooled"):
            row[f"{name}_{stat}"] = float(overall.loc[metric, stat]) if metric in overall.index else np.nan
    f1 = metrics.per_class[metrics.per_class["metric"] == "f1"].set_index("class")["pooled"]
    for cls in classes:
        row[f"test_f1_{cls}_pooled"] = float(f1.get(cls, np.nan))
    return row


def nested_estimate(exp: Experiment, selection: pd.DataFrame) -> pd.DataFrame:
    """Per searched arm: the nested estimate (each fold's chosen trial on that fold's test part) and the paper's
    configuration on the same folds. A studied fold without a chosen trial (every candidate failed, or none ran)
    is named in ``missing_folds``, and so is a fold where the paper's configuration has no trial."""
    rows = []
    for arm in _arms(selection):
        studied = selection[arm_mask(selection, arm)]
        chosen = studied[studied["trial_name"] != ""]
        preds = exp.predictions[exp.predictions["trial_name"].isin(set(chosen["trial_name"]))]
        rows.append(estimate_row(preds, arm, "nested", exp.classes, _unchosen_folds(studied, preds)))
        folds = sorted(int(f) for f in preds["fold"].unique())
        default = paper_default_predictions(exp, arm, folds)
        note = _default_gaps(exp, arm, sorted(int(f) for f in studied["fold"]), folds, set(default["fold"]))
        rows.append(estimate_row(default, arm, "paper_default", exp.classes, note))
    return pd.DataFrame(rows, columns=estimate_columns(exp.classes))


def _default_gaps(exp: Experiment, arm: Arm, studied: list[int], nested_folds: list[int], present: set) -> str:
    """Why a studied fold is absent from the paper configuration's row: it failed there, it has no trial there, or
    (finished) it is left out to stay on the nested estimate's folds."""
    failed = failed_folds(exp.trials, arm, exp.paper_config_id) if exp.paper_config_id else {}
    notes = []
    for fold in studied:
        if fold in present:
            continue
        if fold in failed:
            why = "failed"
        else:
            why = "no trial" if fold in nested_folds else "left out, as in the nested estimate"
        notes.append(f"fold {fold}: {why}")
    return "; ".join(notes)


def _unchosen_folds(studied: pd.DataFrame, preds: pd.DataFrame) -> str:
    """'fold 1: no finished candidate (2 failed)' for each studied fold that adds nothing to the estimate."""
    notes = []
    for r in studied.sort_values("fold").itertuples(index=False):
        if r.fold in set(preds["fold"]):
            continue
        why = "no finished candidate" if not r.trial_name else "no test predictions"
        notes.append(f"fold {r.fold}: {why}" + (f" ({r.n_failed} failed)" if r.n_failed else ""))
    return "; ".join(notes)


def _arms(frame: pd.DataFrame) -> list[Arm]:
    return sorted({(str(m), bool(p)) for m, p in zip(frame["model"], frame["pretrained"])}, key=arm_sort_key)


# ---------------------------------------------------------------------------------------- deployment
def deploy_choice(candidates: pd.DataFrame, chosen: pd.DataFrame, folds: list[int],
                  paper_config_id: str | None,
                  excluded: frozenset[str] | set[str] = frozenset()) -> tuple[str, str] | None:
    """(config_id, rule) of the configuration to deploy for one arm, or None without any candidate.

    Preferred: a configuration evaluated in every fold (identical seeds make the studies' first suggestions
    coincide, and the paper's configuration is in every study), ranked by its mean over folds of
    inner-validation macro F1. Else the fold-chosen configuration with the best inner-validation score. Ties
    go to the paper's configuration, then to the smallest config_id. ``excluded`` configurations (a fold of
    theirs failed) are not ranked at all: a mean over their other folds would hide the failure.
    """
    candidates = candidates[~candidates["config_id"].isin(excluded)]
    chosen = chosen[~chosen["config_id"].isin(excluded)]
    per_fold = candidates.groupby(["config_id", "fold"])["best_val_macro_f1"].mean().reset_index()
    coverage = {cid: {int(f) for f in grp["fold"]} for cid, grp in per_fold.groupby("config_id")}
    everywhere = [cid for cid, seen in coverage.items() if set(folds) <= seen]
    if everywhere:
        means = per_fold[per_fold["config_id"].isin(everywhere)].groupby("config_id")["best_val_macro_f1"].mean()
        return _best(means, paper_config_id), RULE_EVERY_FOLD
    made = chosen[chosen["config_id"] != ""]
    if made.empty:
        return None
    return _best(made.groupby("config_id")["inner_val_macro_f1"].max(), paper_config_id), RULE_BEST_CHOICE


def _best(scores: pd.Series, paper_config_id: str | None) -> str:
    """Highest score; ties to the paper's configuration, then the smallest config_id.

    Scores are means over folds, so they are rounded first: (0.8 + 0.6) / 2 and (0.7 + 0.7) / 2 are one tie,
    not a win decided by the last bit of a float.
    """
    ranked = sorted(scores.items(), key=lambda kv: (-round(float(kv[1]), TIE_DECIMALS), kv[0] != paper_config_id,
                                                    str(kv[0])))
    return str(ranked[0][0])


def configs_with_failed_folds(exp: Experiment, studies: list[FoldStudy], arm: Arm) -> dict[str, dict[int, list[str]]]:
    """config_id -> {fold: failed trials} for the arm's configurations that failed in a fold of its studies and
    have no finished trial there (search trials, and the grid trials handed to the studies)."""
    if exp.trials is None:
        return {}
    handed = {s.grid_trial for s in studies if s.arm == arm and s.grid_trial}
    pool = exp.trials[(exp.trials["experiment"] == SEARCH) | exp.trials["trial_name"].isin(handed)]
    studied = {s.fold for s in studies if s.arm == arm}
    out = {}
    for cid in sorted(set(failed_trials(pool)["config_id"])):
        folds = {f: names for f, names in failed_folds(pool, arm, cid).items() if f in studied}
        if folds:
            out[str(cid)] = folds
    return out


def _excluded_text(failed: dict[str, dict[int, list[str]]]) -> str:
    return "; ".join(f"{cid} ({failed_folds_text(folds)})" for cid, folds in failed.items())


def deploy_config(exp: Experiment, studies: list[FoldStudy], candidates: pd.DataFrame,
                  selection: pd.DataFrame) -> pd.DataFrame:
    """deploy_config.csv: per arm the configuration for a final model. No test score: it is not an estimate.

    Configurations with a failed fold are left out of the ranking and named in ``excluded_configs``; an arm
    whose every configuration failed somewhere gets a row without a configuration (rule RULE_ALL_FAILED).
    """
    rows = []
    for arm in _arms(selection):
        folds = sorted(s.fold for s in studies if s.arm == arm)
        mine = candidates[arm_mask(candidates, arm)]
        chosen = selection[arm_mask(selection, arm)]
        failed = configs_with_failed_folds(exp, studies, arm)
        picked = deploy_choice(mine, chosen, folds, exp.paper_config_id, excluded=set(failed))
        if picked is None:
            if failed and not mine.empty:
                rows.append({"model": arm[0], "pretrained": arm[1], "config_id": "", "rule": RULE_ALL_FAILED,
                             **{h: np.nan for h in HYPERPARAMETERS}, "inner_val_macro_f1_mean": np.nan,
                             "evaluated_folds": "", "chosen_in_folds": "", "excluded_configs": _excluded_text(failed)})
            continue
        cid, rule = picked
        runs = mine[mine["config_id"] == cid].sort_values("trial_name", kind="stable")
        scores = runs.groupby("fold")["best_val_macro_f1"].mean()
        rows.append({"model": arm[0], "pretrained": arm[1], "config_id": cid, "rule": rule,
                     **{h: runs[h].iloc[0] for h in HYPERPARAMETERS}, "inner_val_macro_f1_mean": float(scores.mean()),
                     "evaluated_folds": ";".join(str(int(f)) for f in scores.index),
                     "chosen_in_folds": ";".join(str(int(f)) for f in chosen[chosen["config_id"] == cid]["fold"]),
                     "excluded_configs": _excluded_text(failed)})
    return pd.DataFrame(rows, columns=DEPLOY_COLUMNS)


# ---------------------------------------------------------------------------------------- all of it
def analyse_nested(exp: Experiment) -> NestedSearch:
    """Selection, estimate and deployment configuration of a nested search."""
    studies = fold_studies(exp)
    selection, candidates = select(exp, studies)
    return NestedSearch(studies=studies, candidates=candidates, selection=selection,
                        estimate=nested_estimate(exp, selection),
                        deploy=deploy_config(exp, studies, candidates, selection))
