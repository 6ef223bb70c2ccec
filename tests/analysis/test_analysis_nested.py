"""Nested cross-validation of the search: per-fold selection, leak check, nested estimate, deployment
configuration, and what the report and the CLI say about it (and about searches run before it)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from analysis import build_report
from analysis.__main__ import summary
from analysis.load import load_experiment
from analysis.nested import (
    DEPLOY_COLUMNS,
    RULE_BEST_CHOICE,
    RULE_EVERY_FOLD,
    SELECTION_COLUMNS,
    analyse_nested,
    choose,
    deploy_choice,
    estimate_columns,
)
from analysis.search_report import leak_sentence, search_effort_text
from analysis.tables import fmt, fmt_pm
from analysis_fixtures import CLASSES, NESTED_ERROR_CONFIG, PAPER_CONFIG, fold_subjects, nested_trial_name

MC3 = ("mc3_18", False)
R3D = ("r3d_18", True)
# Worked out by hand from NESTED_SCORES: the configuration each fold's own trials rank first.
EXPECTED_CHOICE = {MC3: ["cfgC", "cfgA", PAPER_CONFIG], R3D: ["cfgA", "cfgA", "cfgA"]}


def _name(arm: tuple[str, bool], fold: int, config_id: str) -> str:
    """The grid's trial for the paper configuration (handed to the study), else the study's own search trial."""
    return nested_trial_name("paper" if config_id == PAPER_CONFIG else "search", *arm, fold, config_id)


def _arm_rows(frame: pd.DataFrame, arm: tuple[str, bool]) -> pd.DataFrame:
    return frame[(frame["model"] == arm[0]) & (frame["pretrained"] == arm[1])]


def _hand_estimate(preds: pd.DataFrame, names: list[str]) -> dict[str, float]:
    """sklearn on the named trials' test rows: per fold, mean and sample std over folds, and pooled."""
    rows = preds[preds["trial_name"].isin(names)]
    folds = [g for _, g in rows.groupby("fold")]
    f1 = [f1_score(g["label"], g["pred"], labels=CLASSES, average="macro") for g in folds]
    acc = [accuracy_score(g["label"], g["pred"]) for g in folds]
    per_class = f1_score(rows["label"], rows["pred"], labels=CLASSES, average=None)
    return {"n_folds": len(folds), "test_macro_f1_mean": np.mean(f1), "test_macro_f1_std": np.std(f1, ddof=1),
            "test_macro_f1_pooled": f1_score(rows["label"], rows["pred"], labels=CLASSES, average="macro"),
            "test_accuracy_mean": np.mean(acc), "test_accuracy_std": np.std(acc, ddof=1),
            "test_accuracy_pooled": accuracy_score(rows["label"], rows["pred"]),
            **{f"test_f1_{c}_pooled": v for c, v in zip(CLASSES, per_class)}}


def _selected(nested, arm: tuple[str, bool], fold: int) -> pd.Series:
    sel = _arm_rows(nested.selection, arm)
    return sel[sel["fold"] == fold].iloc[0]


def _with_trial(exp, arm: tuple[str, bool], fold: int, config_id: str, score: float) -> None:
    """Add a finished search trial to the loaded experiment (in memory)."""
    row = {**exp.trials.iloc[0].to_dict(), "experiment": "search", "model": arm[0], "pretrained": arm[1],
           "fold": float(fold), "config_id": config_id, "trial_name": _name(arm, fold, config_id),
           "status": "TERMINATED", "best_val_macro_f1": score}
    exp.trials = pd.concat([exp.trials, pd.DataFrame([row])], ignore_index=True)


# ---------------------------------------------------------------------------------------- estimate
def test_nested_estimate_equals_hand_recomputation(built_nested_report):
    tables = built_nested_report / "report" / "tables"
    estimate = pd.read_csv(tables / "nested_estimate.csv")
    preds = pd.read_csv(built_nested_report / "predictions.csv", dtype={"config_id": str})
    assert list(estimate.columns) == estimate_columns(CLASSES)
    for arm, choice in EXPECTED_CHOICE.items():
        rows = _arm_rows(estimate, arm).set_index("estimate")
        chosen = [_name(arm, fold, cid) for fold, cid in enumerate(choice)]
        grid = [_name(arm, fold, PAPER_CONFIG) for fold in range(3)]
        for estimate_kind, names in (("nested", chosen), ("paper_default", grid)):
            got, want = rows.loc[estimate_kind], _hand_estimate(preds, names)
            assert got["trials"] == ";".join(names)
            for column, value in want.items():
                assert got[column] == pytest.approx(value, abs=1e-12), (arm, estimate_kind, column)
    # the fixture tells the designs apart: the nested estimate of mc3 mixes three configurations
    mc3 = _arm_rows(estimate, MC3).set_index("estimate")
    assert mc3.loc["nested", "test_macro_f1_std"] > 0.1 > mc3.loc["paper_default", "test_macro_f1_std"]


def test_selection_table_rows_scores_and_candidates(built_nested_report):
    tables = built_nested_report / "report" / "tables"
    sel = pd.read_csv(tables / "nested_selection.csv", dtype={"config_id": str}, keep_default_na=False)
    trials = pd.read_csv(built_nested_report / "trials.csv").set_index("trial_name")
    preds = pd.read_csv(built_nested_report / "predictions.csv")
    assert list(sel.columns) == SELECTION_COLUMNS + ["leak_check"]
    assert len(sel) == 6 and sorted(set(zip(sel["model"], sel["pretrained"], sel["fold"]))) == sorted(
        (m, p, k) for m, p in EXPECTED_CHOICE for k in range(3))
    for r in sel.itertuples(index=False):
        arm = (r.model, r.pretrained)
        assert r.config_id == EXPECTED_CHOICE[arm][r.fold]
        assert r.trial_name == _name(arm, r.fold, r.config_id)
        assert float(r.inner_val_macro_f1) == pytest.approx(trials.loc[r.trial_name, "best_val_macro_f1"])
        rows = preds[preds["trial_name"] == r.trial_name]
        assert float(r.test_macro_f1) == pytest.approx(f1_score(rows["label"], rows["pred"], labels=CLASSES,
                                                               average="macro"))
        candidates = r.candidate_trials.split(";")
        assert len(candidates) == r.n_candidates
        assert {int(trials.loc[c, "fold"]) for c in candidates} == {r.fold}
        assert {(trials.loc[c, "model"], bool(trials.loc[c, "pretrained"])) for c in candidates} == {arm}
        assert _name(arm, r.fold, PAPER_CONFIG) in candidates  # the grid trial handed to the study
        assert not any(NESTED_ERROR_CONFIG in c for c in candidates)  # an ERRORed trial never competes
        assert r.leak_check == "ok"


# ---------------------------------------------------------------------------------------- selection
def test_a_fold_never_chooses_from_another_fold(nested_dir):
    exp = load_experiment(nested_dir)
    # cfgA holds the best score anywhere (0.95, fold 1) and the best mean over folds, yet fold 0 keeps its own best
    assert _selected(analyse_nested(exp), MC3, 0)["config_id"] == "cfgC"
    _with_trial(exp, MC3, 1, "cfgZ", 0.999)  # far better than anything, but trained on fold 1
    nested = analyse_nested(exp)
    assert _selected(nested, MC3, 1)["config_id"] == "cfgZ"  # fold 1 sees it ...
    fold0 = _selected(nested, MC3, 0)
    assert fold0["config_id"] == "cfgC" and "cfgZ" not in fold0["candidate_trials"]  # ... fold 0 does not
    _with_trial(exp, MC3, 0, "cfgZ", 0.999)  # the same score in fold 0 itself does win there
    assert _selected(analyse_nested(exp), MC3, 0)["config_id"] == "cfgZ"


def test_choose_refuses_candidates_of_several_folds():
    frame = pd.DataFrame({"fold": [0.0, 1.0], "config_id": ["a", "b"], "trial_name": ["t0", "t1"],
                          "best_val_macro_f1": [0.5, 0.9]})
    with pytest.raises(ValueError, match="folds"):
        choose(frame, PAPER_CONFIG)
    assert choose(frame.iloc[:0], PAPER_CONFIG) is None


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_ties_go_to_the_paper_configuration_then_the_smallest_trial_name(order):
    tied = pd.DataFrame({"fold": [2.0] * 3, "config_id": ["zzz", PAPER_CONFIG, "aaa"],
                         "trial_name": ["a-trial", "z-trial", "m-trial"], "best_val_macro_f1": [0.8, 0.8, 0.8]})
    assert choose(tied.iloc[order], PAPER_CONFIG)["trial_name"] == "z-trial"
    no_paper = tied[tied["config_id"] != PAPER_CONFIG]
    assert choose(no_paper.iloc[[1, 0]], PAPER_CONFIG)["trial_name"] == "a-trial"
    better = tied.assign(best_val_macro_f1=[0.8, 0.8, 0.81])  # a strictly better score beats the paper's point
    assert choose(better.iloc[order], PAPER_CONFIG)["trial_name"] == "m-trial"


def test_the_grid_trial_handed_to_a_study_is_a_candidate(nested_dir):
    grid = _name(MC3, 2, PAPER_CONFIG)
    fold2 = _selected(analyse_nested(load_experiment(nested_dir)), MC3, 2)
    assert fold2["trial_name"] == grid and fold2["n_candidates"] == 2  # 0.92 beats the study's own cfgA (0.90)
    # Without the hand-over the grid trial is no candidate: it was not part of that study.
    meta = json.loads((nested_dir / "experiment.json").read_text())
    for spec in meta["optuna_studies"]:
        spec["grid_trial"] = None
    (nested_dir / "experiment.json").write_text(json.dumps(meta))
    fold2 = _selected(analyse_nested(load_experiment(nested_dir)), MC3, 2)
    assert fold2["config_id"] == "cfgA" and fold2["n_candidates"] == 1 and grid not in fold2["candidate_trials"]


def test_an_unfinished_grid_trial_is_no_candidate(nested_dir):
    exp = load_experiment(nested_dir)
    exp.trials.loc[exp.trials["trial_name"] == _name(MC3, 2, PAPER_CONFIG), "status"] = "ERROR"
    fold2 = _selected(analyse_nested(exp), MC3, 2)
    assert fold2["config_id"] == "cfgA" and fold2["n_candidates"] == 1


def test_nested_tables_do_not_depend_on_row_order(nested_dir):
    exp = load_experiment(nested_dir)
    first = analyse_nested(exp)
    exp.trials = exp.trials.sample(frac=1.0, random_state=3).reset_index(drop=True)
    exp.predictions = exp.predictions.sample(frac=1.0, random_state=4).reset_index(drop=True)
    second = analyse_nested(exp)
    for name in ("selection", "estimate", "deploy"):
        pd.testing.assert_frame_equal(getattr(first, name), getattr(second, name))


# ---------------------------------------------------------------------------------------- leak check
def test_leak_check_names_a_candidate_that_saw_a_test_subject_of_its_fold(nested_dir):
    leaked = fold_subjects(0)[5]  # a fold-0 test subject
    assert leaked not in json.loads((nested_dir / "splits.json").read_text())["folds"][0]["train"]
    offender = _name(MC3, 0, "cfgA")  # a candidate of fold 0 that was not chosen: it still counts
    val_offender = _name(R3D, 1, PAPER_CONFIG)
    extra = pd.DataFrame([{"trial_name": offender, "part": "train", "subject_id": leaked},
                          {"trial_name": val_offender, "part": "val", "subject_id": fold_subjects(1)[0]}])
    path = nested_dir / "trial_subjects.csv"
    pd.concat([pd.read_csv(path), extra]).to_csv(path, index=False)
    sel = analyse_nested(load_experiment(nested_dir)).selection.set_index(["model", "pretrained", "fold"])
    assert sel.loc[(*MC3, 0), "leak_check"] == f"leak: {offender} [{leaked}]"
    assert sel.loc[(*R3D, 1), "leak_check"] == f"leak: {val_offender} [{fold_subjects(1)[0]}]"
    others = sel.drop(index=[(*MC3, 0), (*R3D, 1)])
    assert (others["leak_check"] == "ok").all() and len(others) == 4
    assert "2 fold(s) not ok" in leak_sentence(sel.reset_index())


def test_leak_check_does_not_vouch_for_unlisted_trials_and_needs_trial_subjects(nested_dir):
    path = nested_dir / "trial_subjects.csv"
    subjects = pd.read_csv(path)
    unlisted = _name(MC3, 0, "cfgC")
    subjects[subjects["trial_name"] != unlisted].to_csv(path, index=False)
    sel = analyse_nested(load_experiment(nested_dir)).selection.set_index(["model", "pretrained", "fold"])
    assert sel.loc[(*MC3, 0), "leak_check"] == f"not in trial_subjects.csv: {unlisted}"
    path.unlink()
    sel = analyse_nested(load_experiment(nested_dir)).selection
    assert "leak_check" not in sel.columns and "missing" in leak_sentence(sel)


# ---------------------------------------------------------------------------------------- deployment
def test_deploy_configuration_is_the_best_mean_over_folds_without_a_test_score(nested_dir):
    deploy = analyse_nested(load_experiment(nested_dir)).deploy.set_index(["model", "pretrained"])
    assert list(deploy.reset_index().columns) == DEPLOY_COLUMNS
    assert not [c for c in deploy.columns if "test" in c]
    # mc3: cfgA (0.80, 0.95, 0.90) beats the paper's point (0.70, 0.72, 0.92) on the mean, though folds 0 and 2 chose
    # otherwise; cfgC was not evaluated in fold 2 and cannot be deployed by the first rule
    for arm, chosen_in in ((MC3, "1"), (R3D, "0;1;2")):
        row = deploy.loc[arm]
        assert row["config_id"] == "cfgA" and row["rule"] == RULE_EVERY_FOLD
        assert row["inner_val_macro_f1_mean"] == pytest.approx((0.80 + 0.95 + 0.90) / 3)
        assert row["evaluated_folds"] == "0;1;2" and row["chosen_in_folds"] == chosen_in
        assert row["lr"] == pytest.approx(1e-4)


def test_deploy_rule_falls_back_to_the_best_fold_choice_and_ties_to_the_paper():
    def cands(rows):
        return pd.DataFrame(rows, columns=["config_id", "fold", "best_val_macro_f1"])

    chosen = pd.DataFrame({"fold": [0, 1, 2], "config_id": ["x", "z", ""], "inner_val_macro_f1": [0.90, 0.95, np.nan]})
    # no configuration evaluated in all of folds 0, 1, 2: the best fold choice (z, 0.95) wins
    partial = cands([("x", 0, 0.90), ("y", 0, 0.85), ("z", 1, 0.95), ("y", 1, 0.99), ("w", 2, 0.10)])
    assert deploy_choice(partial, chosen, [0, 1, 2], PAPER_CONFIG) == ("z", RULE_BEST_CHOICE)
    # y evaluated in every fold wins over the higher single-fold choices
    every = pd.concat([partial, cands([("y", 2, 0.50)])])
    assert deploy_choice(every, chosen, [0, 1, 2], PAPER_CONFIG) == ("y", RULE_EVERY_FOLD)
    # mean 0.15 each; in floats (0.1 + 0.2) / 2 exceeds (0.15 + 0.15) / 2 by one ulp, which must not decide
    tied = cands([("b", 0, 0.1), ("b", 1, 0.2), ("a", 0, 0.15), ("a", 1, 0.15), (PAPER_CONFIG, 0, 0.15),
                  (PAPER_CONFIG, 1, 0.15)])
    assert deploy_choice(tied, chosen, [0, 1], PAPER_CONFIG) == (PAPER_CONFIG, RULE_EVERY_FOLD)
    without_paper = tied[tied["config_id"] != PAPER_CONFIG]
    assert deploy_choice(without_paper, chosen, [0, 1], PAPER_CONFIG) == ("a", RULE_EVERY_FOLD)  # smallest id
    assert deploy_choice(cands([]), chosen.assign(config_id=""), [0, 1], PAPER_CONFIG) is None


# ---------------------------------------------------------------------------------------- report and CLI
def test_nested_report_leads_with_the_estimate_and_labels_studies_by_fold(built_nested_report):
    report = built_nested_report / "report"
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    assert "played no part" not in md and "played no part" not in html
    headings = ["## Hyperparameter search", "### Nested cross-validation estimate", "### Configuration chosen in each fold",
                "### Configuration to deploy (for a final model, not an estimate)", "### Optuna studies"]
    positions = [md.index(h) for h in headings]
    assert positions == sorted(positions)
    assert "chosen from fold k's trials alone" in md and "scored **once** on fold k's test part" in md
    assert "Search design: nested cross-validation" in md
    assert "the folds chose 3 different configurations" in md and "all 3 folds chose the same configuration" in md
    deploy = md[positions[3]:positions[4]]
    header = next(line for line in deploy.splitlines() if line.startswith("| Model"))
    assert "Test" not in header and "test" not in header
    assert not (report / "tables" / "best_configs.csv").exists()  # the biased mean-over-folds table is not written
    for arm in ("mc3_18-scratch", "r3d_18-kinetics"):
        for fold in range(3):
            assert (report / "figures" / f"optuna_history_{arm}-fold{fold}.png").is_file()
            # Fold 2's studies hold two trials: too few for fANOVA, said instead of apportioned.
            assert (report / "tables" / f"optuna_importance_{arm}-fold{fold}.csv").is_file() == (fold < 2)
        assert (f"study '{arm}-fold2': hyperparameter importances need at least 3 completed trials with different "
                "scores and varying parameters (2 completed, 2 distinct score(s)") in md
    assert "Optimisation history, ResNet Mixed Convolution (scratch), fold 2." in md
    # What was searched and how hard: lr re-centred on --set lr=4e-4 (10x the default 4e-5, so the decade moves too).
    assert "| `lr` | 4e-05 - 0.004 | log |" in md and "(moved with the --set value from 4e-06 - 0.0004)" in md
    assert ("4 trial(s) per (arm, outer fold) study, the grid's configuration first" in md
            and "this was a random search around the grid's configuration, not a model-guided one" in md)
    assert "objective = inner-validation macro F1 of fold 2" in md
    # A demo report says, before any number, that its subjects are generated phantoms.
    assert md.index("**Synthetic data**: this is the demo.") < md.index("## What ran")
    assert "Experiment: `demo` (synthetic phantoms, see *Warnings*)." in md
    # Optuna's own best trial is named as such, and points to the fold's selection (which breaks ties its own way).
    assert md.count("Optuna's best trial: value ") == 6
    assert md.count("The configuration this fold uses is the one under \"Configuration chosen in each fold\"") == 6
    assert (report / "figures" / "search_nested_vs_default.png").is_file()


def test_cli_summary_has_one_nested_line_per_searched_arm(built_nested_report):
    text = summary(built_nested_report / "report")
    preds = pd.read_csv(built_nested_report / "predictions.csv", dtype={"config_id": str})
    for arm, label in ((MC3, "ResNet Mixed Convolution (scratch)"), (R3D, "ResNet3D (pre-trained)")):
        want = _hand_estimate(preds, [_name(arm, f, c) for f, c in enumerate(EXPECTED_CHOICE[arm])])
        line = next(li for li in text.splitlines() if li.startswith(label) and "folds" in li and "pooled" in li)
        assert fmt_pm(want["test_macro_f1_mean"], want["test_macro_f1_std"]) in line
        assert f"pooled {fmt(want['test_macro_f1_pooled'])}" in line


def test_search_before_nested_cv_builds_and_says_no_nested_estimate_exists(search_dir):
    report = build_report(search_dir, bootstrap_samples=20, seed=0)
    md = (report / "report.md").read_text()
    assert "No nested estimate exists for this run" in md and "rerun the search" in md
    assert "optimistically biased" in md and "(biased)" in md
    assert "played no part" not in md
    assert "objective = inner-validation macro F1 (mean over folds)" in md
    assert not (report / "tables" / "nested_estimate.csv").exists()
    assert (report / "tables" / "best_configs.csv").is_file()
    assert "no nested estimate" in summary(report)


def test_malformed_nested_inputs(nested_dir):
    (nested_dir / "trial_subjects.csv").write_text("trial_name,part,subject_id\nx,holdout,s1\n")
    exp = load_experiment(nested_dir)  # a bad optional file costs the leak check only
    assert exp.trial_subjects is None and any("trial_subjects.csv could not be read" in n for n in exp.notes)
    meta = json.loads((nested_dir / "experiment.json").read_text())
    meta["optuna_studies"][0]["fold"] = "first"
    (nested_dir / "experiment.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fold 'first'"):
        load_experiment(nested_dir)


def test_tpe_guides_only_from_the_trial_after_the_grid_point_and_nine_random_draws_and_the_report_says_so():
    """The grid's configuration is one of TPE's start-up trials: trials 2-10 repeat a RandomSampler with the same
    seed, trial 11 is TPE's own, so a search of 10 trials per study is called random and one of 11 is not."""
    import optuna

    from search_spaces import PAPER_DEFAULTS, SEARCH_SPACE, TPE_STARTUP_TRIALS, optuna_distributions

    distributions = optuna_distributions(PAPER_DEFAULTS)
    grid_point = {item.name: PAPER_DEFAULTS[item.name] for item in SEARCH_SPACE}

    def drawn(sampler) -> list[dict]:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.enqueue_trial(grid_point)
        for _ in range(TPE_STARTUP_TRIALS + 1):
            trial = study.ask(distributions)
            study.tell(trial, trial.params["lr"] * 1e3 - trial.params["dropout"])
        return [t.params for t in study.trials]

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        tpe = drawn(optuna.samplers.TPESampler(seed=3, n_startup_trials=TPE_STARTUP_TRIALS))
        random_draws = drawn(optuna.samplers.RandomSampler(seed=3))
    finally:
        optuna.logging.set_verbosity(verbosity)
    assert tpe[:TPE_STARTUP_TRIALS] == random_draws[:TPE_STARTUP_TRIALS]
    assert tpe[TPE_STARTUP_TRIALS] != random_draws[TPE_STARTUP_TRIALS]
    assert "not a model-guided one" in search_effort_text(TPE_STARTUP_TRIALS, nested=True)
    assert "not a model-guided one" not in search_effort_text(TPE_STARTUP_TRIALS + 1, nested=True)
    assert "the grid's configuration and 9 random draws" in search_effort_text(4, nested=False)
