"""Two-class results (AUC, PR, sensitivity/specificity at 0.5 and at validation-chosen thresholds, classification
report) and calibration (Brier, ECE), checked against hand-computed values on tiny hand-built prediction tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve

from analysis import binary as bn
from analysis import calibration as cal
from analysis_fixtures import PAPER_CONFIG, paper_meta, trial_name, trial_row, write_dir

BINARY_CLASSES = ["Healthy", "Tumour"]
ARM = ("mc3_18", True)
# Four subjects (label, prob_Healthy, prob_Tumour); no confidence sits on a bin edge.
FOUR = [("Healthy", 0.95, 0.05), ("Healthy", 0.35, 0.65), ("Tumour", 0.65, 0.35), ("Tumour", 0.15, 0.85)]
# By hand, positive class Tumour, scores (0.05, 0.65 | 0.35, 0.85):
#   AUC: pairs (pos > neg) 0.35>0.05, 0.35<0.65, 0.85>0.05, 0.85>0.65 -> 3/4
#   Brier: (0.05^2 + 0.65^2 + 0.65^2 + 0.15^2) / 4 = 0.87 / 4
#   ECE: top-class confidences 0.95 (right), 0.65 (wrong), 0.65 (wrong), 0.85 (right): bins [0.9,1] gap 0.05,
#        [0.6,0.7) gap 0.65 (two), [0.8,0.9) gap 0.15 -> (0.05 + 2 * 0.65 + 0.15) / 4 = 0.375
#   AP: ranked 0.85(+), 0.65(-), 0.35(+), 0.05(-): 0.5 * 1 + 0.5 * 2/3 = 5/6
#   threshold 0.5: predicted Healthy, Tumour, Healthy, Tumour -> sensitivity 1/2, specificity 1/2
AUC, BRIER, ECE, AP = 0.75, 0.87 / 4, 0.375, 5 / 6


def binary_rows(fold: int = 0, table=FOUR) -> list[dict]:
    rows = []
    for k, (label, ph, pt) in enumerate(table):
        rows.append({"experiment": "paper", "model": ARM[0], "pretrained": ARM[1], "fold": fold,
                     "config_id": PAPER_CONFIG, "trial_name": trial_name(*ARM, fold), "subject_id": f"s{fold}-{k}",
                     "label": label, "pred": BINARY_CLASSES[int(pt > ph)], "prob_Healthy": ph, "prob_Tumour": pt})
    return rows


def build_binary_dir(out: Path, n_folds: int = 2, val_tables: list | None = None) -> Path:
    """Each fold's test part is FOUR; ``val_tables`` (one per fold, (label, prob_Tumour) pairs) adds
    OUT/val_predictions.csv as the orchestrator writes it."""
    preds, trials, planned = [], [], []
    for fold in range(n_folds):
        preds += binary_rows(fold)
        trials.append(trial_row("paper", *ARM, fold, PAPER_CONFIG))
        planned.append(trial_name(*ARM, fold))
    meta = {**paper_meta([ARM], planned), "classes": BINARY_CLASSES, "n_folds": n_folds}
    write_dir(out, meta, preds, [], trials)
    (out / "epochs.csv").unlink()  # no learning curves needed here
    if val_tables is not None:
        pd.concat([scored_rows(fold, table, "val") for fold, table in enumerate(val_tables)]).to_csv(
            out / "val_predictions.csv", index=False)
    return out


def _frame(table=FOUR) -> pd.DataFrame:
    return pd.DataFrame(binary_rows(0, table))


# ------------------------------------------------------------------------------------------------ binary
def test_auc_of_four_subjects_matches_hand_value():
    df = _frame()
    y, score = (df["label"] == "Tumour").to_numpy(int), df["prob_Tumour"].to_numpy()
    assert bn.auc_or_nan(y, score) == pytest.approx(AUC)
    ci = bn.bootstrap_auc_ci(df, BINARY_CLASSES, n_resamples=200, seed=3)
    assert ci["auc"] == pytest.approx(AUC)
    assert 0.0 <= ci["auc_low"] <= ci["auc_high"] <= 1.0
    assert 0 < ci["n_undefined_resamples"] < 200  # some resamples hold a single class: counted, left out
    assert bn.bootstrap_auc_ci(df, BINARY_CLASSES, n_resamples=200, seed=3) == ci  # seeded


def test_binary_summary_sensitivity_specificity_and_ap():
    # No validation predictions (a run made before they were saved): 0.5 in every fold, and said so.
    s = bn.binary_summary(_frame(), BINARY_CLASSES, [ARM], n_resamples=50, seed=0)
    assert len(s) == 1
    r = s.iloc[0]
    assert r["positive_class"] == "Tumour" and bn.positive_class(BINARY_CLASSES) == "Tumour"
    assert r["auc"] == pytest.approx(AUC)
    assert r["average_precision"] == pytest.approx(AP)
    assert r["sensitivity"] == pytest.approx(0.5) and r["specificity"] == pytest.approx(0.5)
    assert r["sensitivity_argmax"] == pytest.approx(0.5) and r["specificity_argmax"] == pytest.approx(0.5)
    assert r["threshold"] == 0.5
    assert r["threshold_source"] == "0.5 in every fold: no validation predictions (a run made before they were saved)"
    assert r["n_subjects"] == 4


def test_sensitivity_specificity_by_hand():
    # 3 positives (2 found), 2 negatives (1 false alarm)
    assert bn.sensitivity_specificity([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx((2 / 3, 1 / 2))


def test_classification_report_support_and_values():
    # one more Tumour subject, found: true H H T T T, predicted H T H T T
    table = FOUR + [("Tumour", 0.2, 0.8)]
    both = bn.classification_report_table(_frame(table), BINARY_CLASSES, [ARM])
    assert list(both["threshold_rule"].unique()) == ["0.5", "validation"]
    rep = both[both["threshold_rule"] == "0.5"].set_index("row")
    assert list(rep.index) == ["Healthy", "Tumour", "accuracy", "macro avg", "weighted avg"]
    assert rep.loc["Healthy", "support"] == 2 and rep.loc["Tumour", "support"] == 3
    assert rep.loc["macro avg", "support"] == 5 and rep.loc["weighted avg", "support"] == 5
    assert rep.loc["Healthy", "precision"] == pytest.approx(1 / 2)   # H predicted twice, right once
    assert rep.loc["Healthy", "recall"] == pytest.approx(1 / 2)
    assert rep.loc["Tumour", "precision"] == pytest.approx(2 / 3)
    assert rep.loc["Tumour", "recall"] == pytest.approx(2 / 3)
    assert rep.loc["accuracy", "f1"] == pytest.approx(3 / 5)
    assert rep.loc["macro avg", "recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)


# ------------------------------------------------------------------------------ validation-chosen thresholds
# Each fold: (label, prob_Tumour) of its validation part and of its test part. By hand, positive iff prob > t:
# fold 0 validation, descending 0.90+ 0.70+ 0.62- 0.45+ 0.30- 0.10- (P = N = 3); J of each operating point:
#   all >= 0.90: 1/3; >= 0.70: 2/3; >= 0.62: 2/3 - 1/3; >= 0.45: 1 - 1/3 = 2/3; >= 0.30: 1/3; everyone: 0.
#   Best J = 2/3 twice: gap [0.62, 0.70) -> midpoint 0.66 (0.16 from 0.5), gap [0.30, 0.45) -> 0.375 (0.125): 0.375.
# fold 1 validation: negatives 0.10 0.55 0.60 below positives 0.70 0.80 0.90: J = 1 in the gap [0.60, 0.70) -> 0.65.
VAL = {0: [("Healthy", 0.10), ("Healthy", 0.30), ("Healthy", 0.62), ("Tumour", 0.45), ("Tumour", 0.70), ("Tumour", 0.90)],
       1: [("Tumour", 0.70), ("Tumour", 0.80), ("Tumour", 0.90), ("Healthy", 0.10), ("Healthy", 0.55), ("Healthy", 0.60)]}
# Test parts. fold 0 at 0.375: Tumour 0.40 0.80 found, 0.35 missed; Healthy 0.20 right, 0.38 0.55 wrong.
#                  at 0.5:   Tumour 0.80 found;              Healthy 0.20 0.38 right, 0.55 wrong.
#             fold 1 at 0.65: Tumour 0.66 0.90 0.70 found;  Healthy 0.55 0.60 0.30 right.
#                  at 0.5:   Tumour all found;              Healthy 0.30 right, 0.55 0.60 wrong.
# Pooled: validation thresholds sensitivity (2 + 3) / 6, specificity (1 + 3) / 6; at 0.5 (1 + 3) / 6, (2 + 1) / 6.
TEST = {0: [("Tumour", 0.40), ("Tumour", 0.80), ("Tumour", 0.35), ("Healthy", 0.20), ("Healthy", 0.38), ("Healthy", 0.55)],
        1: [("Tumour", 0.66), ("Tumour", 0.90), ("Tumour", 0.70), ("Healthy", 0.55), ("Healthy", 0.60), ("Healthy", 0.30)]}


def scored_rows(fold: int, table, part: str) -> pd.DataFrame:
    """Prediction rows of one fold's part from (label, prob_Tumour); subject ids name the fold and the part."""
    return pd.DataFrame([{"experiment": "paper", "model": ARM[0], "pretrained": ARM[1], "fold": fold,
                          "config_id": PAPER_CONFIG, "trial_name": trial_name(*ARM, fold),
                          "subject_id": f"{part}{fold}-{k}", "label": label, "pred": BINARY_CLASSES[int(pt > 0.5)],
                          "prob_Healthy": 1 - pt, "prob_Tumour": pt} for k, (label, pt) in enumerate(table)])


def two_folds(tables: dict, part: str) -> pd.DataFrame:
    return pd.concat([scored_rows(fold, table, part) for fold, table in tables.items()], ignore_index=True)


def test_youden_threshold_by_hand():
    def chosen(table):
        return bn.youden_threshold(np.array([label == "Tumour" for label, _ in table]), np.array([p for _, p in table]))

    assert chosen(VAL[0]) == (pytest.approx(0.375), bn.YOUDEN)  # the tie goes to the cut closer to 0.5
    assert chosen(VAL[1]) == (pytest.approx(0.65), bn.YOUDEN)
    # The best gap [0.30, 0.62) holds 0.5: nothing on validation argues against argmax.
    assert chosen([("Healthy", 0.2), ("Healthy", 0.3), ("Tumour", 0.62), ("Tumour", 0.8)]) == (0.5, bn.YOUDEN)
    assert chosen([("Tumour", 0.3), ("Tumour", 0.9)]) == (0.5, bn.ONE_CLASS)
    # Every Tumour below every Healthy: no cut beats chance.
    assert chosen([("Tumour", 0.1), ("Tumour", 0.2), ("Healthy", 0.8), ("Healthy", 0.9)]) == (0.5, bn.NO_SIGNAL)


def test_each_fold_applies_its_own_validation_threshold_to_its_test_part():
    test, val = two_folds(TEST, "test"), two_folds(VAL, "val")
    thresholds = bn.fold_thresholds(test, val, BINARY_CLASSES)
    assert list(thresholds["fold"]) == [0, 1] and list(thresholds["chosen_by"]) == [bn.YOUDEN] * 2
    np.testing.assert_allclose(thresholds["threshold"], [0.375, 0.65])
    # Fold 0's validation part at 0.375: Tumour 0.45 0.70 0.90 found, Healthy 0.62 wrong -> 1, 2/3, J 2/3.
    assert thresholds.loc[0, ["val_sensitivity", "val_specificity", "val_youden_j"]].tolist() == pytest.approx(
        [1, 2 / 3, 2 / 3])
    assert list(thresholds["n_val"]) == [6, 6] and list(thresholds["n_val_positive"]) == [3, 3]
    r = bn.binary_summary(test, BINARY_CLASSES, [ARM], n_resamples=20, seed=0, thresholds=thresholds).iloc[0]
    assert (r["sensitivity"], r["specificity"]) == pytest.approx((5 / 6, 4 / 6))
    assert (r["sensitivity_argmax"], r["specificity_argmax"]) == pytest.approx((4 / 6, 3 / 6))
    assert r["threshold"] == pytest.approx((0.375 + 0.65) / 2)  # the median of the two folds: a summary only
    assert r["threshold_source"] == ("each fold's own threshold, chosen by Youden's J on its validation part "
                                     "(median 0.512, range 0.375-0.65 over 2 fold(s))")
    rep = bn.classification_report_table(test, BINARY_CLASSES, [ARM], thresholds)
    val_rows = rep[rep["threshold_rule"] == "validation"].set_index("row")
    argmax_rows = rep[rep["threshold_rule"] == "0.5"].set_index("row")
    assert val_rows.loc["Tumour", "recall"] == pytest.approx(5 / 6)
    assert val_rows.loc["Healthy", "recall"] == pytest.approx(4 / 6)
    assert val_rows.loc["accuracy", "f1"] == pytest.approx(9 / 12)
    assert argmax_rows.loc["Tumour", "recall"] == pytest.approx(4 / 6) and argmax_rows.loc["accuracy", "f1"] == 7 / 12


def test_no_test_subject_influences_its_own_threshold():
    test, val = two_folds(TEST, "test"), two_folds(VAL, "val")
    before = bn.fold_thresholds(test, val, BINARY_CLASSES)
    moved_test = test.copy()
    # Fold 0's missed Tumour (0.35) now scores 0.99, and a Healthy 0.01: the test outcome changes, the thresholds not.
    moved_test.loc[moved_test["subject_id"] == "test0-2", ["prob_Tumour", "prob_Healthy"]] = [0.99, 0.01]
    moved_test.loc[moved_test["subject_id"] == "test0-4", ["prob_Tumour", "prob_Healthy"]] = [0.01, 0.99]
    pd.testing.assert_frame_equal(bn.fold_thresholds(moved_test, val, BINARY_CLASSES), before)
    summary = bn.binary_summary(moved_test, BINARY_CLASSES, [ARM], n_resamples=20, seed=0, thresholds=before).iloc[0]
    assert (summary["sensitivity"], summary["specificity"]) == pytest.approx((6 / 6, 5 / 6))
    # Fold 0's validation Healthy 0.62 drops to 0.40: J = 1 in the gap [0.40, 0.45) -> 0.425; fold 1 stays.
    moved_val = val.copy()
    moved_val.loc[moved_val["subject_id"] == "val0-2", ["prob_Tumour", "prob_Healthy"]] = [0.40, 0.60]
    np.testing.assert_allclose(bn.fold_thresholds(test, moved_val, BINARY_CLASSES)["threshold"], [0.425, 0.65])


def test_folds_without_a_usable_validation_part_use_half_and_say_why():
    test = two_folds({**TEST, 2: TEST[1]}, "test")
    val = two_folds({0: VAL[0], 1: [("Tumour", 0.7), ("Tumour", 0.9)]}, "val")  # fold 1: one class; fold 2: no rows
    thresholds = bn.fold_thresholds(test, val, BINARY_CLASSES)
    assert list(thresholds["chosen_by"]) == [bn.YOUDEN, bn.ONE_CLASS, bn.NO_VALIDATION]
    np.testing.assert_allclose(thresholds["threshold"], [0.375, 0.5, 0.5])
    source = bn.threshold_source(thresholds)
    assert source == ("each fold's own threshold, chosen by Youden's J on its validation part (median 0.5, range "
                      "0.375-0.5 over 3 fold(s)); 0.5 in fold(s) 1: its validation part holds one class only; 0.5 in "
                      "fold(s) 2: no validation predictions (a run made before they were saved)")


def test_validation_rows_of_a_test_subject_are_refused():
    test, val = two_folds(TEST, "test"), two_folds(VAL, "val")
    val.loc[val["subject_id"] == "val1-0", "subject_id"] = "test1-0"  # fold 1 "validated" on its own test subject
    with pytest.raises(ValueError, match=r"trial '.*-f1' has validation rows for its own test subject\(s\) "
                                         r"\['test1-0'\]"):
        bn.fold_thresholds(test, val, BINARY_CLASSES)


# ------------------------------------------------------------------------------------------- calibration
def test_brier_and_ece_binary_by_hand():
    df = _frame()
    table = cal.calibration_table(df, BINARY_CLASSES, [ARM])
    assert table["brier"].iloc[0] == pytest.approx(BRIER)
    assert table["ece"].iloc[0] == pytest.approx(ECE)
    y = np.array([0, 0, 1, 1])
    # the one-vs-rest mean equals the ordinary binary Brier of the positive class
    assert cal.brier_ovr(y, df[["prob_Healthy", "prob_Tumour"]].to_numpy()) == pytest.approx(BRIER)


def test_brier_and_ece_three_classes_by_hand():
    probs = np.array([[0.72, 0.18, 0.10], [0.55, 0.25, 0.20]])
    y = np.array([0, 1])
    # per class: A ((0.28^2 + 0.55^2) / 2), B ((0.18^2 + 0.75^2) / 2), C ((0.1^2 + 0.2^2) / 2); mean of the three
    hand = ((0.28 ** 2 + 0.55 ** 2) / 2 + (0.18 ** 2 + 0.75 ** 2) / 2 + (0.1 ** 2 + 0.2 ** 2) / 2) / 3
    assert cal.brier_ovr(y, probs) == pytest.approx(hand)
    assert cal.brier_ovr(y, probs) == pytest.approx(0.5129 / 3)
    # confidences 0.72 (right, bin (0.7, 0.8]) and 0.55 (wrong, bin (0.5, 0.6]): (0.28 + 0.55) / 2
    assert cal.expected_calibration_error(y, probs) == pytest.approx(0.415)


def test_a_confidence_on_a_bin_edge_is_counted_where_the_reliability_figure_counts_it():
    # 0.8 and 0.8 right, 0.75 and 0.75 wrong: sklearn puts all four in (0.7, 0.8], one bin of accuracy 0.5 and
    # mean confidence 0.775, so ECE = |0.5 - 0.775| = 0.275 (with [0.8, 0.9) it would be 0.475).
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.75, 0.25], [0.75, 0.25]])
    y = np.array([0, 0, 1, 1])
    assert list(cal.bin_ids(np.array([0.8, 0.75, 0.3, 0.6, 0.7, 0.0, 0.1, 1.0]))) == [7, 7, 2, 5, 6, 0, 0, 9]
    assert cal.expected_calibration_error(y, probs) == pytest.approx(0.275)
    accuracy, confidence = calibration_curve([1, 1, 0, 0], [0.8, 0.8, 0.75, 0.75], n_bins=10, strategy="uniform")
    assert list(accuracy) == [0.5] and list(confidence) == pytest.approx([0.775])


def test_ece_bins_match_sklearn_calibration_curve():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=200)
    y = rng.integers(0, 3, size=200)
    conf, pred = cal.top_class(probs)
    correct = (pred == y).astype(int)
    acc, mean_conf = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
    counts = np.bincount(cal.bin_ids(conf), minlength=10)
    counts = counts[counts > 0]
    assert cal.expected_calibration_error(y, probs) == pytest.approx(np.sum(counts / 200 * np.abs(acc - mean_conf)))


# ------------------------------------------------------------------------------------------------ report
def test_report_two_class_has_binary_section(tmp_path):
    from analysis import build_report

    # Validation: fold 0's best gap [0.2, 0.4) -> 0.3; fold 1's [0.66, 0.8) -> 0.73 (neither holds 0.5).
    val_tables = [[("Healthy", 0.1), ("Healthy", 0.2), ("Tumour", 0.4), ("Tumour", 0.9)],
                  [("Healthy", 0.1), ("Healthy", 0.66), ("Tumour", 0.8), ("Tumour", 0.9)]]
    out = build_binary_dir(tmp_path / "OUT", val_tables=val_tables)
    report = build_report(out, bootstrap_samples=50, seed=0)
    md = (report / "report.md").read_text()
    assert "## Two-class results" in md
    assert "Positive class: `Tumour`" in md
    assert "chosen by Youden's J (sensitivity + specificity - 1, from scikit-learn roc_curve)" in md
    assert ("ResNet Mixed Convolution (pre-trained): each fold's own threshold, chosen by Youden's J on its validation part (median 0.515, "
            "range 0.3-0.73 over 2 fold(s)).") in md
    assert "Sensitivity (0.5)" in md and "Sensitivity (validation threshold)" in md
    thresholds = pd.read_csv(report / "tables" / "thresholds.csv")
    np.testing.assert_allclose(thresholds["threshold"], [0.3, 0.73])
    assert "50 resamples of subjects" in md and "seed 0" in md
    assert "## Calibration" in md
    for name in ("tables/classification_report.csv", "tables/binary_auc.csv", "tables/calibration.csv",
                 "figures/precision_recall.png", "figures/reliability.png"):
        assert (report / name).is_file(), name
        assert f"`{name}`" in md
    # pooled over the two folds: each fold repeats the four-subject table, so every value is unchanged
    summary = pd.read_csv(report / "tables" / "binary_auc.csv")
    assert summary["auc"].iloc[0] == pytest.approx(AUC) and summary["n_subjects"].iloc[0] == 8
    assert summary["average_precision"].iloc[0] == pytest.approx(AP)
    # FOUR at 0.3 (fold 0): Tumour 0.35 and 0.85 found, Healthy 0.65 a false alarm; at 0.73 (fold 1): Tumour 0.85
    # found, 0.35 missed, both Healthy right -> sensitivity (2 + 1) / 4, specificity (1 + 2) / 4; at 0.5: 2/4, 2/4.
    assert (summary["sensitivity"].iloc[0], summary["specificity"].iloc[0]) == pytest.approx((3 / 4, 3 / 4))
    assert (summary["sensitivity_argmax"].iloc[0], summary["specificity_argmax"].iloc[0]) == pytest.approx((0.5, 0.5))
    both = pd.read_csv(report / "tables" / "classification_report.csv")
    for rule in ("0.5", "validation"):
        rep = both[both["threshold_rule"] == rule].set_index("row")
        assert rep.loc["Healthy", "support"] == 4 and rep.loc["Tumour", "support"] == 4
        assert rep.loc["weighted avg", "support"] == 8
    calib = pd.read_csv(report / "tables" / "calibration.csv")
    assert calib["brier"].iloc[0] == pytest.approx(BRIER) and calib["ece"].iloc[0] == pytest.approx(ECE)


@pytest.mark.parametrize("val_file", ["absent", "header only"])
def test_report_of_a_run_without_validation_predictions_uses_half_and_says_so(tmp_path, val_file):
    from analysis import build_report

    out = build_binary_dir(tmp_path / "OUT")
    if val_file == "header only":  # what collect writes when no trial saved them (older checkpoints)
        (out / "val_predictions.csv").write_text("experiment,model,pretrained,fold,config_id,trial_name\n")
    report = build_report(out, bootstrap_samples=20, seed=0)
    md = (report / "report.md").read_text()
    assert ("ResNet Mixed Convolution (pre-trained): 0.5 in every fold: no validation predictions (a run made before "
            "they were saved).") in md
    summary = pd.read_csv(report / "tables" / "binary_auc.csv")
    assert summary["sensitivity"].iloc[0] == summary["sensitivity_argmax"].iloc[0] == pytest.approx(0.5)


def test_report_three_class_has_calibration_but_no_binary_section(single_arm_dir):
    from analysis import build_report

    report = build_report(single_arm_dir, bootstrap_samples=20, seed=0)
    md = (report / "report.md").read_text()
    assert "Two-class results" not in md
    assert not (report / "tables" / "classification_report.csv").exists()
    assert not (report / "figures" / "precision_recall.png").exists()
    assert "## Calibration" in md and "one-vs-rest Brier" in md
    assert (report / "tables" / "calibration.csv").is_file() and (report / "figures" / "reliability.png").is_file()
    calib = pd.read_csv(report / "tables" / "calibration.csv")
    assert len(calib) == 1 and 0 <= calib["ece"].iloc[0] <= 1
