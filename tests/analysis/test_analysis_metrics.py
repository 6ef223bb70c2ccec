"""Metrics against arithmetic done by hand on fixed predictions (never by calling sklearn again)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.metrics import arm_metrics, class_metrics, confusion_counts, overall_metrics, roc_per_class
from analysis.names import arm_frames, arm_mask
from analysis.paper import published

CLASSES = ["HGG", "LGG", "Healthy"]

# Confusion matrix (rows true, columns predicted; HGG, LGG, Healthy):
#   HGG     [3, 1, 0]
#   LGG     [1, 1, 0]
#   Healthy [0, 1, 3]
Y_TRUE = ["HGG"] * 4 + ["LGG"] * 2 + ["Healthy"] * 4
Y_PRED = ["HGG", "HGG", "HGG", "LGG", "HGG", "LGG", "LGG", "Healthy", "Healthy", "Healthy"]


def test_class_metrics_by_hand():
    got = class_metrics(Y_TRUE, Y_PRED, CLASSES).set_index("class")
    # HGG: TP 3, FP 1 (an LGG), FN 1, TN = 6 non-HGG - 1 FP = 5
    # LGG: TP 1, FP 2 (an HGG and a Healthy), FN 1, TN = 8 - 2 = 6
    # Healthy: TP 3, FP 0, FN 1, TN = 6
    expected = {
        "HGG": dict(precision=3 / 4, recall=3 / 4, f1=2 * 3 / (2 * 3 + 1 + 1), specificity=5 / 6, support=4),
        "LGG": dict(precision=1 / 3, recall=1 / 2, f1=2 * 1 / (2 * 1 + 2 + 1), specificity=6 / 8, support=2),
        "Healthy": dict(precision=3 / 3, recall=3 / 4, f1=2 * 3 / (2 * 3 + 0 + 1), specificity=6 / 6, support=4),
    }
    for cls, values in expected.items():
        for metric, value in values.items():
            assert got.loc[cls, metric] == pytest.approx(value), (cls, metric)


def test_overall_metrics_by_hand():
    got = overall_metrics(Y_TRUE, Y_PRED, CLASSES)
    f1 = {"HGG": 3 / 4, "LGG": 2 / 5, "Healthy": 6 / 7}
    assert got["accuracy"] == pytest.approx(7 / 10)
    assert got["macro_f1"] == pytest.approx((3 / 4 + 2 / 5 + 6 / 7) / 3)
    assert got["weighted_f1"] == pytest.approx((4 * f1["HGG"] + 2 * f1["LGG"] + 4 * f1["Healthy"]) / 10)


def test_specificity_undefined_is_nan_not_zero():
    got = class_metrics(["HGG", "HGG"], ["HGG", "HGG"], ["HGG", "LGG"]).set_index("class")
    assert math.isnan(got.loc["HGG", "specificity"])  # no negatives at all
    assert got.loc["LGG", "specificity"] == 1.0
    assert math.isnan(got.loc["LGG", "f1"])  # no LGG sample and none predicted: nothing to measure, not a 0


def _frame(matrices: list[list[list[int]]], model="m", pretrained=True) -> pd.DataFrame:
    rows = []
    for fold, mat in enumerate(matrices):
        n = 0
        for i, t in enumerate(CLASSES):
            for j, p in enumerate(CLASSES):
                for _ in range(mat[i][j]):
                    probs = {c: 0.1 for c in CLASSES}
                    probs[p] = 0.8
                    rows.append({"model": model, "pretrained": pretrained, "fold": fold, "trial_name": f"t{fold}",
                                 "subject_id": f"s{fold}-{n}", "label": t, "pred": p,
                                 **{f"prob_{c}": probs[c] for c in CLASSES}})
                    n += 1
    return pd.DataFrame(rows)


def test_arm_metrics_fold_mean_std_and_pooled_by_hand():
    mats = [[[3, 1, 0], [1, 1, 0], [0, 0, 4]],
            [[4, 0, 0], [0, 2, 0], [0, 0, 4]],
            [[4, 0, 0], [1, 1, 0], [0, 0, 4]]]
    m = arm_metrics(_frame(mats), CLASSES, [("m", True)])
    pc = m.per_class.set_index(["class", "metric"])
    # LGG F1 per fold: 1/2, 1, 2/3 -> mean 13/18; deviations -4/18, 5/18, -1/18 -> sample var 42/324/2
    assert pc.loc[("LGG", "f1"), "mean"] == pytest.approx(13 / 18)
    assert pc.loc[("LGG", "f1"), "std"] == pytest.approx(math.sqrt(21) / 18)
    # pooled = summed matrix [[11,1,0],[2,4,0],[0,0,12]]
    assert pc.loc[("HGG", "f1"), "pooled"] == pytest.approx(22 / 25)
    assert pc.loc[("HGG", "precision"), "pooled"] == pytest.approx(11 / 13)
    assert pc.loc[("HGG", "recall"), "pooled"] == pytest.approx(11 / 12)
    assert pc.loc[("HGG", "specificity"), "pooled"] == pytest.approx(16 / 18)
    assert pc.loc[("LGG", "f1"), "pooled"] == pytest.approx(8 / 11)
    assert pc.loc[("LGG", "specificity"), "pooled"] == pytest.approx(23 / 24)
    ov = m.overall.set_index("metric")
    assert ov.loc["accuracy", "pooled"] == pytest.approx(27 / 30)
    assert ov.loc["macro_f1", "pooled"] == pytest.approx((22 / 25 + 8 / 11 + 1) / 3)
    assert ov.loc["weighted_f1", "pooled"] == pytest.approx((12 * 22 / 25 + 6 * 8 / 11 + 12 * 1) / 30)
    # fold macro F1: 3/4, 1, (8/9 + 2/3 + 1)/3 = 23/27
    assert ov.loc["macro_f1", "mean"] == pytest.approx((3 / 4 + 1 + 23 / 27) / 3)
    assert list(m.per_fold_overall["macro_f1"]) == pytest.approx([3 / 4, 1.0, 23 / 27])
    assert list(m.support["support"]) == [12, 6, 12]


def test_single_fold_std_is_nan_not_zero():
    m = arm_metrics(_frame([[[3, 1, 0], [1, 1, 0], [0, 0, 4]]]), CLASSES, [("m", True)])
    assert m.overall["std"].isna().all()


def test_arm_without_predictions_gets_no_rows():
    m = arm_metrics(_frame([[[3, 1, 0], [1, 1, 0], [0, 0, 4]]]), CLASSES, [("m", True), ("other", False)])
    assert set(m.per_class["model"]) == {"m"}
    assert set(m.overall["model"]) == {"m"}


def test_arm_frames_select_by_model_and_pretrained_in_the_order_asked():
    # The same model in both pre-training arms must not mix; an arm without rows is skipped, not yielded empty.
    frame = pd.DataFrame({"model": ["a", "a", "b", "a"], "pretrained": [True, False, True, True], "row": [0, 1, 2, 3]})
    assert arm_mask(frame, ("a", True)).tolist() == [True, False, False, True]
    got = [(arm, rows["row"].tolist()) for arm, rows in arm_frames(frame, [("b", True), ("c", True), ("a", True)])]
    assert got == [(("b", True), [2]), (("a", True), [0, 3])]


def test_confusion_counts_summed_and_row_normalised():
    mats = [[[3, 1, 0], [1, 1, 0], [0, 0, 4]], [[4, 0, 0], [1, 1, 0], [0, 0, 4]]]
    cm = confusion_counts(_frame(mats), CLASSES, [("m", True)]).set_index(["true", "pred"])
    assert cm.loc[("HGG", "HGG"), "count"] == 7
    assert cm.loc[("LGG", "HGG"), "count"] == 2
    assert cm.loc[("LGG", "HGG"), "row_fraction"] == pytest.approx(2 / 4)
    assert cm.loc[("HGG", "LGG"), "row_fraction"] == pytest.approx(1 / 8)


def test_roc_skips_class_with_single_label_value():
    df = _frame([[[3, 1, 0], [0, 0, 0], [0, 0, 4]]])  # no LGG subject at all
    auc, curves, notes = roc_per_class(df, CLASSES, [("m", True)])
    auc = auc.set_index("class")
    assert np.isnan(auc.loc["LGG", "pooled"])
    assert ("m", True, "LGG") not in curves
    assert any("LGG" in n and "single label value" in n for n in notes)
    assert auc.loc["Healthy", "pooled"] == pytest.approx(1.0)


def test_published_values_match_display_names_despite_spacing():
    # paper_results.csv writes "ResNet(2+1)D", models.DISPLAY_NAMES "ResNet (2+1)D"
    assert published("r2plus1d_18", True, "macro_f1")[0] == pytest.approx(0.9237)
    assert published("mc3_18", True, "f1", "LGG")[:2] == pytest.approx((0.8949, 0.033))
    assert math.isnan(published("resnet2d_18", True, "macro_f1")[0])  # not in the paper: blank, no failure
    assert math.isnan(published("mc3_18", True, "f1", "Meningioma")[0])


def test_a_class_absent_from_a_fold_is_undefined_there_not_a_zero():
    """A perfect classifier over three folds, the third without LGG: LGG's F1 is 1 over the two folds that hold it
    and every fold's macro F1 is 1 (sklearn's zero_division=0 gave LGG 0.667 ± 0.577 and fold 2 macro F1 0.667)."""
    from analysis.metrics import arm_metrics

    classes = ["HGG", "LGG", "Healthy"]
    rows = [{"model": "m", "pretrained": True, "fold": fold, "trial_name": f"t{fold}", "subject_id": f"{fold}-{c}-{i}",
             "label": c, "pred": c} for fold in range(3) for c in classes for i in range(3) if (fold, c) != (2, "LGG")]
    metrics = arm_metrics(pd.DataFrame(rows), classes, [("m", True)])
    fold2 = metrics.per_fold_class[(metrics.per_fold_class["fold"] == 2)].set_index("class")
    assert np.isnan(fold2.loc["LGG", ["precision", "recall", "f1"]].astype(float)).all()
    assert fold2.loc["LGG", "specificity"] == 1.0 and fold2.loc["LGG", "support"] == 0
    lgg_f1 = metrics.per_class.set_index(["class", "metric"]).loc[("LGG", "f1")]
    assert (lgg_f1["mean"], lgg_f1["std"], lgg_f1["pooled"]) == (1.0, 0.0, 1.0)
    assert metrics.per_fold_overall["macro_f1"].tolist() == [1.0, 1.0, 1.0]
    # A class predicted but absent keeps sklearn's well-defined 0: its false positives are errors.
    wrong = pd.DataFrame(rows).assign(pred=lambda f: np.where((f["fold"] == 2) & (f["label"] == "HGG"), "LGG", f["pred"]))
    fold2 = arm_metrics(wrong, classes, [("m", True)]).per_fold_class.query("fold == 2").set_index("class")
    assert fold2.loc["LGG", "f1"] == 0.0 and fold2.loc["LGG", "precision"] == 0.0 and np.isnan(fold2.loc["LGG", "recall"])
