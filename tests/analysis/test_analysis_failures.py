"""Failed trials (ERROR: retries used up; FAILED: a permanent error, not retried) in the report: listed with their
error, and never hidden inside a mean over the other folds of their arm or configuration."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis import build_report
from analysis.load import load_experiment
from analysis.nested import RULE_BEST_CHOICE, RULE_EVERY_FOLD, analyse_nested, deploy_choice
from analysis.partial import failed_folds
from analysis.search_report import deploy_display, estimate_display, selection_display
from analysis.tables import best_configs, best_configs_display
from analysis_fixtures import PAPER_CONFIG, PAPER_DEFAULTS, nested_trial_name, trial_name

MC3, R3D = ("mc3_18", False), ("r3d_18", True)
PERMANENT = ("PermanentTrialError: node worker-2 (Ray node 9f3c) cannot use the preprocessing cache entry "
             "/cache/abc: volumes.npy is missing. Fix: put it on a file system that every node mounts at the same "
             "path (at trainables/ray_trainable.py:131 in check_cache)")


def fail(out: Path, names: list[str], status: str = "FAILED", error: str = PERMANENT) -> None:
    """Turn finished trials into failed ones, as collect writes them: the status and error, and no predictions."""
    trials = pd.read_csv(out / "trials.csv", dtype=str, keep_default_na=False)
    assert set(names) <= set(trials["trial_name"])
    hit = trials["trial_name"].isin(names)
    trials.loc[hit, ["status", "error", "best_val_macro_f1"]] = [status, error, ""]
    trials.to_csv(out / "trials.csv", index=False)
    predictions = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    predictions[~predictions["trial_name"].isin(names)].to_csv(out / "predictions.csv", index=False)


def nested_name(arm: tuple[str, bool], fold: int, config_id: str) -> str:
    return nested_trial_name("paper" if config_id == PAPER_CONFIG else "search", *arm, fold, config_id)


# ---------------------------------------------------------------------------------------- paper tables
def test_a_failed_grid_fold_is_listed_with_its_error_and_named_beside_the_arm(partial_dir):
    failed = trial_name("mc3_18", True, 1)
    fail(partial_dir, [failed])
    report = build_report(partial_dir, bootstrap_samples=20, seed=0)
    md = (report / "report.md").read_text()
    assert "2/3 (fold 1 failed)" in md  # beside every paper-table row of the arm, not a silent mean of 2 folds
    assert "2/3 (fold 2 failed)" in md and "2/3 (missing fold 1)" in md  # the fixture's ERROR and never-run folds
    listed = pd.read_csv(report / "tables" / "failed_trials.csv").set_index("trial_name")
    assert listed.loc[failed, "status"] == "FAILED" and listed.loc[failed, "error"] == PERMANENT
    assert listed.loc[trial_name("r3d_18", True, 2), "status"] == "ERROR"
    failed_section = md.split("### Failed trials")[1].split("###")[0]
    assert f"| FAILED (permanent error; not retried) | {PERMANENT} |" in failed_section
    assert "ERROR (crashed; retries used up)" in failed_section and "2 trial(s) failed" in md


# ---------------------------------------------------------------------------------------- nested search
def test_a_fold_whose_candidates_all_failed_is_named_in_the_selection_and_the_estimate(nested_dir):
    names = [nested_name(MC3, 1, cid) for cid in (PAPER_CONFIG, "cfgA", "cfgC")]
    fail(nested_dir, names)
    exp = load_experiment(nested_dir)
    nested = analyse_nested(exp)
    row = nested.selection.set_index(["model", "pretrained", "fold"]).loc[(*MC3, 1)]
    assert row["config_id"] == "" and row["n_candidates"] == 0
    assert row["n_failed"] == 3 and row["failed_trials"] == ";".join(sorted(names))
    estimate = nested.estimate.set_index(["model", "pretrained", "estimate"])
    for kind, why in (("nested", "fold 1: no finished candidate (3 failed)"), ("paper_default", "fold 1: failed")):
        assert estimate.loc[(*MC3, kind), "n_folds"] == 2 and estimate.loc[(*MC3, kind), "folds"] == "0;2"
        assert estimate.loc[(*MC3, kind), "missing_folds"] == why
    assert estimate.loc[(*R3D, "nested"), "missing_folds"] == ""
    shown = estimate_display(nested.estimate, exp.classes, exp.n_folds, exp.default_label)
    scratch = shown[shown["Pre-trained"] == "no"]  # mc3_18 from scratch
    assert scratch["Folds"].tolist() == ["2/3 (fold 1: no finished candidate (3 failed))", "2/3 (fold 1: failed)"]
    assert "0 (3 failed)" in selection_display(nested.selection, exp)["Candidates"].tolist()


def test_the_default_is_named_where_its_fold_failed_though_the_nested_choice_finished(nested_dir):
    fail(nested_dir, [nested_name(MC3, 0, PAPER_CONFIG)], status="ERROR", error="RuntimeError: CUDA out of memory")
    estimate = analyse_nested(load_experiment(nested_dir)).estimate.set_index(["model", "pretrained", "estimate"])
    assert estimate.loc[(*MC3, "nested"), "n_folds"] == 3
    assert estimate.loc[(*MC3, "paper_default"), "n_folds"] == 2
    assert estimate.loc[(*MC3, "paper_default"), "missing_folds"] == "fold 0: failed"


def test_a_configuration_with_a_failed_fold_is_not_ranked_for_deployment(nested_dir):
    """Without any configuration in every fold the fallback ranks the folds' choices: cfgA (0.95, fold 1) and the
    paper's (0.92, fold 2) each lost a fold to a failure, so cfgC (0.85, fold 0; not run in fold 2) is deployed."""
    fail(nested_dir, [nested_name(MC3, 2, "cfgA"), nested_name(MC3, 0, PAPER_CONFIG)])
    exp = load_experiment(nested_dir)
    nested = analyse_nested(exp)
    row = nested.deploy.set_index(["model", "pretrained"]).loc[MC3]
    assert row["config_id"] == "cfgC" and row["rule"] == RULE_BEST_CHOICE
    assert row["excluded_configs"] == f"{PAPER_CONFIG} (fold 0 failed); cfgA (fold 2 failed); cfgD (fold 0 failed)"
    assert nested.deploy.set_index(["model", "pretrained"]).loc[R3D, "config_id"] == "cfgA"  # untouched arm
    shown = deploy_display(nested.deploy, exp)
    assert "cfgA (fold 2 failed)" in shown[shown["Pre-trained"] == "no"]["Not ranked (a fold failed)"].iloc[0]


def test_deploy_choice_skips_excluded_configurations_in_both_rules():
    candidates = pd.DataFrame([("a", 0, 0.9), ("a", 1, 0.9), ("b", 0, 0.5), ("b", 1, 0.5), ("c", 0, 0.6)],
                              columns=["config_id", "fold", "best_val_macro_f1"])
    chosen = pd.DataFrame({"fold": [0, 1], "config_id": ["a", "a"], "inner_val_macro_f1": [0.9, 0.9]})
    assert deploy_choice(candidates, chosen, [0, 1], None) == ("a", RULE_EVERY_FOLD)
    assert deploy_choice(candidates, chosen, [0, 1], None, excluded={"a"}) == ("b", RULE_EVERY_FOLD)
    assert deploy_choice(candidates, chosen, [0, 1], None, excluded={"a", "b"}) is None


def test_every_configuration_failing_somewhere_leaves_no_deployment_and_says_why(nested_dir):
    fail(nested_dir, [nested_name(R3D, 2, cid) for cid in (PAPER_CONFIG, "cfgA")] + [nested_name(R3D, 0, "cfgC")])
    exp = load_experiment(nested_dir)
    row = analyse_nested(exp).deploy.set_index(["model", "pretrained"]).loc[R3D]
    assert row["config_id"] == "" and row["rule"].startswith("none: every configuration has a failed fold")
    assert "cfgC (fold 0 failed)" in row["excluded_configs"]


# ---------------------------------------------------------------------------------------- search before nested CV
def test_before_nested_cv_a_configuration_with_a_failed_fold_is_not_chosen_by_its_mean(search_dir):
    """cfgA (3 finished folds) would win; with fold 2 failed its mean over folds 0-1 must not compete."""
    fail(search_dir, [trial_name(model, pre, 2, "cfgA") for model, pre in (MC3, R3D)]
         + [trial_name("mc3_18", False, 1, PAPER_CONFIG)])
    exp = load_experiment(search_dir)
    best = best_configs(exp)
    mc3 = best[(best["model"] == "mc3_18")].set_index("role")
    r3d = best[(best["model"] == "r3d_18")].set_index("role")
    # cfgB (2 of 3 folds, none failed: the third was never run) stays the fallback; the paper's default has all 3
    # folds in r3d_18 and wins there, but lost fold 1 in mc3_18
    assert r3d.loc["best", "config_id"] == PAPER_CONFIG and r3d.loc["best", "failed_folds"] == ""
    assert mc3.loc["best", "config_id"] == "cfgB"
    assert mc3.loc["paper_default", "failed_folds"] == "1" and mc3.loc["paper_default", "inner_folds"] == 2
    shown = best_configs_display(best, PAPER_DEFAULTS)
    default = shown[(shown["Pre-trained"] == "no") & shown["Config"].str.startswith("paper defaults")].iloc[0]
    assert "(2 folds; fold 1 failed)" in default["Inner-val macro F1"]
    assert "(2 folds; fold 1 failed)" in default["Test macro F1"]


def test_failed_folds_ignore_a_fold_that_finished_after_all():
    trials = pd.DataFrame([
        {"trial_name": "t0", "model": "m", "pretrained": True, "fold": 0.0, "config_id": "c", "experiment": "search",
         "status": "FAILED"},
        {"trial_name": "t0b", "model": "m", "pretrained": True, "fold": 0.0, "config_id": "c", "experiment": "search",
         "status": "TERMINATED"},
        {"trial_name": "t1", "model": "m", "pretrained": True, "fold": 1.0, "config_id": "c", "experiment": "search",
         "status": "ERROR"},
        {"trial_name": "x1", "model": "m", "pretrained": True, "fold": 1.0, "config_id": "d", "experiment": "search",
         "status": "INCOMPLETE"}])
    assert failed_folds(trials, ("m", True), "c") == {1: ["t1"]}
    assert failed_folds(trials, ("m", True)) == {1: ["t1"]}
    assert failed_folds(trials, ("m", False)) == {} and failed_folds(None, ("m", True)) == {}


@pytest.mark.parametrize("status", ["ERROR", "FAILED"])
def test_a_failed_search_trial_never_competes_in_its_fold(nested_dir, status):
    fail(nested_dir, [nested_name(MC3, 0, "cfgC")], status=status)
    selection = analyse_nested(load_experiment(nested_dir)).selection
    row = selection.set_index(["model", "pretrained", "fold"]).loc[(*MC3, 0)]
    assert row["config_id"] == "cfgA" and row["n_failed"] == 2  # cfgC (0.85) failed; the fixture's cfgD too


def test_a_demo_report_does_not_call_its_own_search_trials_unplanned(nested_dir):
    """experiment.json plans the grid's trials only: the search's were listed as "not planned" in every demo report.
    A paper-protocol trial outside the plan is still named."""
    from analysis.partial import partial_results

    exp = load_experiment(nested_dir)
    main = exp.select_main(exp.predictions)
    notes = partial_results(exp, main, exp.main_arms()).notes
    assert not [note for note in notes if "did not plan" in note]
    stray = main[main["trial_name"] == main["trial_name"].iloc[0]].assign(trial_name="paper-mc3_18-stray")
    exp.predictions = pd.concat([exp.predictions, stray], ignore_index=True)
    notes = partial_results(exp, exp.select_main(exp.predictions), exp.main_arms()).notes
    assert "Trials with paper-protocol predictions that experiment.json did not plan (used): paper-mc3_18-stray" in notes
