"""Two-class results (AUC, PR, sensitivity/specificity, classification report) and calibration (Brier, ECE),
checked against hand-computed values on tiny hand-built prediction tables."""
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


def build_binary_dir(out: Path, n_folds: int = 2) -> Path:
    preds, trials, planned = [], [], []
    for fold in range(n_folds):
        preds += binary_rows(fold)
        trials.append(trial_row("paper", *ARM, fold, PAPER_CONFIG))
        planned.append(trial_name(*ARM, fold))
    meta = {**paper_meta([ARM], planned), "classes": BINARY_CLASSES, "n_folds": n_folds}
    write_dir(out, meta, preds, [], trials)
    (out / "epochs.csv").unlink()  # no learning curves needed here
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
    s = bn.binary_summary(_frame(), BINARY_CLASSES, [ARM], n_resamples=50, seed=0)
    assert len(s) == 1
    r = s.iloc[0]
    assert r["positive_class"] == "Tumour" and bn.positive_class(BINARY_CLASSES) == "Tumour"
    assert r["auc"] == pytest.approx(AUC)
    assert r["average_precision"] == pytest.approx(AP)
    assert r["sensitivity"] == pytest.approx(0.5) and r["specificity"] == pytest.approx(0.5)
    assert r["threshold"] == 0.5 and r["threshold_source"] == "threshold 0.5 (no validation probabilities are saved)"
    assert r["n_subjects"] == 4


def test_sensitivity_specificity_by_hand():
    # 3 positives (2 found), 2 negatives (1 false alarm)
    assert bn.sensitivity_specificity([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx((2 / 3, 1 / 2))


def test_classification_report_support_and_values():
    # one more Tumour subject, found: true H H T T T, predicted H T H T T
    table = FOUR + [("Tumour", 0.2, 0.8)]
    rep = bn.classification_report_table(_frame(table), BINARY_CLASSES, [ARM]).set_index("row")
    assert list(rep.index) == ["Healthy", "Tumour", "accuracy", "macro avg", "weighted avg"]
    assert rep.loc["Healthy", "support"] == 2 and rep.loc["Tumour", "support"] == 3
    assert rep.loc["macro avg", "support"] == 5 and rep.loc["weighted avg", "support"] == 5
    assert rep.loc["Healthy", "precision"] == pytest.approx(1 / 2)   # H predicted twice, right once
    assert rep.loc["Healthy", "recall"] == pytest.approx(1 / 2)
    assert rep.loc["Tumour", "precision"] == pytest.approx(2 / 3)
    assert rep.loc["Tumour", "recall"] == pytest.approx(2 / 3)
    assert rep.loc["accuracy", "f1"] == pytest.approx(3 / 5)
    assert rep.loc["macro avg", "recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)


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
    # confidences 0.72 (right, bin [0.7, 0.8)) and 0.55 (wrong, bin [0.5, 0.6)): (0.28 + 0.55) / 2
    assert cal.expected_calibration_error(y, probs) == pytest.approx(0.415)


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

    out = build_binary_dir(tmp_path / "OUT")
    report = build_report(out, bootstrap_samples=50, seed=0)
    md = (report / "report.md").read_text()
    assert "## Two-class results" in md
    assert "Positive class: `Tumour`" in md
    assert "threshold 0.5 (no validation probabilities are saved)" in md
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
    rep = pd.read_csv(report / "tables" / "classification_report.csv").set_index("row")
    assert rep.loc["Healthy", "support"] == 4 and rep.loc["Tumour", "support"] == 4
    assert rep.loc["weighted avg", "support"] == 8
    calib = pd.read_csv(report / "tables" / "calibration.csv")
    assert calib["brier"].iloc[0] == pytest.approx(BRIER) and calib["ece"].iloc[0] == pytest.approx(ECE)


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
