"""What did not run, named: failed trials, missing trials, arms with fewer folds than planned.

Nothing is zero-filled: a missing fold simply contributes no row, and the reader is told which. A failed
trial is ERROR (a crash that Tune's retries, --max-failures, did not get past) or FAILED (a permanent error:
a missing input, a bad value, a full disk; not retried); its fold is named as failed wherever a mean over
folds leaves it out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from analysis.load import Experiment
from analysis.names import Arm, arm_mask

UNFINISHED = ("MISSING", "PENDING", "RUNNING", "INCOMPLETE")
FAILED_STATUSES = ("ERROR", "FAILED")
STATUS_MEANING = {"ERROR": "crashed; retries used up", "FAILED": "permanent error; not retried"}


@dataclass
class PartialResults:
    failed: pd.DataFrame     # trial_name, model, pretrained, fold, config_id, status, error
    missing: pd.DataFrame    # trial_name, model, pretrained, fold, config_id, reason
    # model, pretrained, folds_planned, folds_present, missing_folds, failed_folds, trials, n_predictions
    arm_folds: pd.DataFrame
    notes: list[str]
    # Arms outside the paper protocol shown in its tables (the baselines): arm -> label like "3/3".
    extra_folds: dict[Arm, str] = field(default_factory=dict)

    def folds_label(self, arm: Arm) -> str:
        """'3/3', '2/3 (fold 1 failed)' or '2/3 (missing fold 1)', as shown beside every table row."""
        if arm in self.extra_folds:
            return self.extra_folds[arm]
        row = self.arm_folds[arm_mask(self.arm_folds, arm)]
        if row.empty:
            return ""
        r = row.iloc[0]
        label = f"{r['folds_present']}/{r['folds_planned']}"
        if r["folds_present"] >= r["folds_planned"]:
            return label
        failed = _fold_list(r["failed_folds"])
        missing = [f for f in _fold_list(r["missing_folds"]) if f not in failed]
        parts = ([f"missing fold{'s' if len(missing) > 1 else ''} {', '.join(missing)}"] if missing else []) + (
            [f"fold{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed"] if failed else [])
        return f"{label} ({'; '.join(parts)})"

    def is_incomplete(self, arm: Arm) -> bool:
        row = self.arm_folds[arm_mask(self.arm_folds, arm)]
        return bool(len(row)) and int(row.iloc[0]["folds_present"]) < int(row.iloc[0]["folds_planned"])


def _fold_list(text) -> list[str]:
    return [part.strip() for part in str(text or "").split(",") if part.strip()]


def failed_trials(trials: pd.DataFrame | None) -> pd.DataFrame:
    """trials.csv rows with status ERROR or FAILED (an empty frame without trials.csv)."""
    if trials is None:
        return pd.DataFrame(columns=["trial_name", "model", "pretrained", "fold", "config_id", "status", "error"])
    return trials[trials["status"].isin(FAILED_STATUSES)]


def failed_folds(trials: pd.DataFrame | None, arm: Arm, config_id: str | None = None,
                 experiments: tuple[str, ...] | None = None) -> dict[int, list[str]]:
    """Folds of ``arm`` (of one configuration, and of some experiments, when given) whose trial failed and that
    have no finished trial beside it: fold -> the failed trials' names.

    A mean over folds of that arm or configuration leaves these folds out; callers name them instead of
    averaging the rest silently.
    """
    if trials is None:
        return {}
    mine = trials[arm_mask(trials, arm)]
    if config_id is not None:
        mine = mine[mine["config_id"] == config_id]
    if experiments is not None:
        mine = mine[mine["experiment"].isin(experiments)]
    finished = set(mine.loc[mine["status"] == "TERMINATED", "fold"])
    out: dict[int, list[str]] = {}
    for row in mine[mine["status"].isin(FAILED_STATUSES)].itertuples(index=False):
        if pd.notna(row.fold) and row.fold not in finished:
            out.setdefault(int(row.fold), []).append(str(row.trial_name))
    return {fold: sorted(names) for fold, names in sorted(out.items())}


def failed_folds_text(folds: dict[int, list[str]]) -> str:
    """'fold 1 failed', 'folds 0, 2 failed', or '' (none)."""
    if not folds:
        return ""
    return f"fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))} failed"


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return "(no error message recorded)"


def partial_results(exp: Experiment, main_preds: pd.DataFrame, arms: list[Arm]) -> PartialResults:
    trials = exp.trials
    predicted = set(exp.predictions["trial_name"])
    notes: list[str] = []
    ident = ["trial_name", "model", "pretrained", "fold", "config_id"]

    if trials is not None:
        failed = failed_trials(trials)[[*ident, "status", "error"]].copy()
        failed["error"] = failed["error"].map(_first_line)
        with_preds = sorted(set(failed["trial_name"]) & predicted)
        if with_preds:
            notes.append("Trials with status ERROR or FAILED that nevertheless have predictions (these predictions "
                         "are used): " + ", ".join(with_preds))
    else:
        failed = pd.DataFrame(columns=[*ident, "status", "error"])

    missing_rows = []
    known = set(trials["trial_name"]) if trials is not None else set()
    failed_names = set(failed["trial_name"])
    for name in exp.planned_trials:
        if name not in known and name not in predicted:
            missing_rows.append({"trial_name": name, "reason": "planned, but not in trials.csv and no predictions"})
    if trials is not None:
        for row in trials.itertuples(index=False):
            if row.trial_name in predicted or row.trial_name in failed_names:
                continue
            reason = (f"status {row.status}, no predictions" if row.status in UNFINISHED
                      else f"status {row.status} but no rows in predictions.csv")
            missing_rows.append({"trial_name": row.trial_name, "model": row.model, "pretrained": row.pretrained,
                                 "fold": row.fold, "config_id": row.config_id, "reason": reason})
    missing = pd.DataFrame(missing_rows, columns=[*ident, "reason"])
    if exp.planned_trials:
        # planned_trials lists the grid's (paper-protocol) trials; a search's trials are drawn as it runs.
        unplanned = sorted(set(exp.select_main(exp.predictions)["trial_name"]) - set(exp.planned_trials))
        if unplanned:
            notes.append("Trials with paper-protocol predictions that experiment.json did not plan (used): "
                         + ", ".join(unplanned))

    arm_rows = []
    for model, pretrained in arms:
        sel = main_preds[arm_mask(main_preds, (model, pretrained))]
        present = sorted(int(f) for f in sel["fold"].unique())
        absent = [f for f in range(exp.n_folds) if f not in present]
        main_failed = failed_folds(exp.select_main(trials), (model, pretrained)) if trials is not None else {}
        arm_rows.append({"model": model, "pretrained": pretrained, "folds_planned": exp.n_folds,
                         "folds_present": len(present), "missing_folds": ", ".join(map(str, absent)),
                         "failed_folds": ", ".join(str(f) for f in main_failed if f in absent),
                         "trials": ", ".join(sorted(sel["trial_name"].unique())), "n_predictions": len(sel)})
    arm_folds = pd.DataFrame(arm_rows, columns=["model", "pretrained", "folds_planned", "folds_present",
                                                "missing_folds", "failed_folds", "trials", "n_predictions"])
    sort = lambda f: f.sort_values("trial_name", kind="stable").reset_index(drop=True)  # noqa: E731
    return PartialResults(failed=sort(failed), missing=sort(missing), arm_folds=arm_folds, notes=notes)
