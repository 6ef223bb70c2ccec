"""Did training learn? Fold verdicts from hand-built epoch histories, arm verdicts against 1/K, and the report."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import build_report
from analysis import training_check as tc
from analysis.names import arm_label

ARM = ("mc3_18", False)


def _epochs(losses, predicted_classes=None, fold=0, model="mc3_18", pretrained=False) -> pd.DataFrame:
    frame = pd.DataFrame({"model": model, "pretrained": pretrained, "fold": fold, "epoch": range(1, len(losses) + 1),
                          "train_loss": losses})
    if predicted_classes is not None:
        frame["val_predicted_classes"] = predicted_classes
    return frame


def _preds(preds, fold=0, model="mc3_18", pretrained=False) -> pd.DataFrame:
    return pd.DataFrame({"model": model, "pretrained": pretrained, "fold": fold, "pred": preds})


def test_falling_loss_and_varied_predictions_learned():
    folds = tc.fold_learning(_epochs([1.2, 1.0, 0.8, 0.6, 0.5], [3, 2, 3, 3, 3]), _preds(["LGG", "HGG", "LGG"]), [ARM])
    row = folds.iloc[0]
    assert row["learned"] and row["reasons"] == ""
    assert row["train_loss_first"] == pytest.approx(1.2)
    assert row["train_loss_end"] == pytest.approx((0.8 + 0.6 + 0.5) / 3)  # last three epochs
    assert row["val_one_class_epochs"] == 0 and row["test_predicted_classes"] == 2


def test_flat_loss_is_flagged_with_its_numbers():
    # end = mean(1.09, 1.08, 1.07) = 1.08 >= 0.9 x 1.10
    row = tc.fold_learning(_epochs([1.10, 1.09, 1.08, 1.07]), _preds(["LGG", "HGG"]), [ARM]).iloc[0]
    assert not row["learned"]
    assert row["reasons"] == "training loss did not fall (1.100 in epoch 1, 1.080 at the end)"


@pytest.mark.parametrize("losses, bad", [([1.1, 1.09, np.inf], 1), ([1.1, np.nan, np.nan], 2), ([np.nan, 0.5], 1)])
def test_a_diverged_loss_is_flagged_not_waved_through(losses, bad):
    row = tc.fold_learning(_epochs(losses), _preds(["LGG", "HGG"]), [ARM]).iloc[0]
    assert not row["learned"]
    assert row["reasons"] == f"training loss not finite (inf or NaN) in {bad} of {len(losses)} epochs"


def test_loss_falling_by_just_over_ten_percent_passes():
    row = tc.fold_learning(_epochs([1.0, 0.89]), _preds(["LGG", "HGG"]), [ARM]).iloc[0]
    assert row["learned"]
    row = tc.fold_learning(_epochs([1.0, 0.9]), _preds(["LGG", "HGG"]), [ARM]).iloc[0]
    assert not row["learned"]


def test_one_class_validation_in_half_the_epochs_is_flagged():
    row = tc.fold_learning(_epochs([1.2, 0.9, 0.7, 0.5], [1, 3, 1, 2]), _preds(["LGG", "HGG"]), [ARM]).iloc[0]
    assert row["reasons"] == "validation predicted one class in 2 of 4 epochs"
    row = tc.fold_learning(_epochs([1.2, 0.9, 0.7, 0.5], [1, 3, 2, 2]), _preds(["LGG", "HGG"]), [ARM]).iloc[0]
    assert row["learned"] and row["val_one_class_epochs"] == 1


def test_one_class_test_fold_is_flagged_and_reasons_accumulate():
    row = tc.fold_learning(_epochs([1.1, 1.1, 1.1], [1, 1, 1]), _preds(["HGG"] * 5), [ARM]).iloc[0]
    assert row["reasons"].split("; ") == ["training loss did not fall (1.100 in epoch 1, 1.100 at the end)",
                                          "validation predicted one class in 3 of 3 epochs",
                                          "the test fold got one class for every subject"]


def test_runs_without_the_column_or_without_epochs_are_judged_on_what_exists():
    # read from CSV as text, older runs have the column empty: not judged on it
    row = tc.fold_learning(_epochs([1.2, 0.6], ["", ""]), _preds(["LGG", "HGG"]), [ARM]).iloc[0]
    assert row["learned"] and np.isnan(row["val_one_class_epochs"])
    row = tc.fold_learning(None, _preds(["LGG", "LGG"]), [ARM]).iloc[0]
    assert row["epochs_run"] == 0 and row["reasons"] == "the test fold got one class for every subject"
    # a single epoch: nothing to compare the loss with
    assert tc.fold_learning(_epochs([1.1]), _preds(["LGG", "HGG"]), [ARM]).iloc[0]["learned"]


def test_folds_of_each_arm_are_kept_apart():
    epochs = pd.concat([_epochs([1.2, 0.5], fold=0), _epochs([1.1, 1.1], fold=1),
                        _epochs([1.1, 1.1], fold=0, model="r3d_18")])
    preds = pd.concat([_preds(["LGG", "HGG"], fold=0), _preds(["LGG", "HGG"], fold=1),
                       _preds(["LGG", "HGG"], fold=0, model="r3d_18")])
    folds = tc.fold_learning(epochs, preds, [ARM, ("r3d_18", False)])
    assert folds[["model", "fold", "learned"]].values.tolist() == [["mc3_18", 0, True], ["mc3_18", 1, False],
                                                                   ["r3d_18", 0, False]]


def test_arm_above_chance_uses_the_lower_bootstrap_end_against_one_over_k():
    folds = pd.concat([tc.fold_learning(_epochs([1.2, 0.5]), _preds(["LGG", "HGG"]), [ARM]),
                       tc.fold_learning(_epochs([1.1, 1.1], model="r3d_18"), _preds(["LGG", "HGG"], model="r3d_18"),
                                        [("r3d_18", False)])])
    boot = pd.DataFrame({"model": ["mc3_18", "r3d_18", "r3d_18"], "pretrained": False,
                         "metric": ["macro_f1", "macro_f1", "f1"], "class": ["", "", "LGG"],
                         "pooled": [0.62, 0.41, 0.9], "low": [0.40, 0.30, 0.8], "high": [0.8, 0.55, 1.0]})
    arms = tc.arm_learning(folds, boot, [ARM, ("r3d_18", False)], n_classes=3)
    assert arms["chance"].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert arms["above_chance"].tolist() == [True, False]
    assert arms["folds_not_learned"].tolist() == [0, 1]
    warnings = tc.warnings(arms)
    label = arm_label("r3d_18", False)
    assert warnings == [f"**Training did not learn** for {label} in 1 of 1 fold(s) (see *Did training learn?*).",
                        f"**Not above chance**: {label}'s pooled macro F1 is 0.410 with 95% interval [0.300, 0.550], "
                        "which reaches chance (0.333)."]


def test_report_flags_a_fold_that_did_not_learn(paper_dir):
    epochs = pd.read_csv(paper_dir / "epochs.csv")
    epochs["val_predicted_classes"] = 3
    flat = (epochs["model"] == "mc3_18") & epochs["pretrained"] & (epochs["fold"] == 0)
    epochs.loc[flat, "train_loss"] = [1.10, 1.09, 1.08]
    epochs.loc[flat, "val_predicted_classes"] = 1
    epochs.to_csv(paper_dir / "epochs.csv", index=False)
    build_report(paper_dir, bootstrap_samples=50, seed=0)

    folds = pd.read_csv(paper_dir / "report" / "tables" / "training_check.csv")
    assert len(folds) == 9 and (~folds["learned"]).sum() == 1
    bad = folds[~folds["learned"]].iloc[0]
    assert (bad["model"], bool(bad["pretrained"]), bad["fold"]) == ("mc3_18", True, 0)
    assert bad["reasons"] == ("training loss did not fall (1.100 in epoch 1, 1.085 at the end); "
                              "validation predicted one class in 3 of 3 epochs")
    report = (paper_dir / "report" / "report.md").read_text()
    warnings = report.split("## Warnings", 1)[1].split("## What ran", 1)[0]
    assert f"**Training did not learn** for {arm_label('mc3_18', True)} in 1 of 3 fold(s)" in warnings
    section = report.split("## Did training learn?", 1)[1].split("\n## ", 1)[0]
    assert f"- {arm_label('mc3_18', True)}, fold 0: training loss did not fall" in section
    assert "was not made" not in section


def test_report_says_when_the_validation_column_is_missing(built_paper_report):
    report = (built_paper_report / "report" / "report.md").read_text()
    section = report.split("## Did training learn?", 1)[1].split("\n## ", 1)[0]
    assert "the one-class-validation check was not made" in section
    assert "No fold was flagged." in section
    arms = pd.read_csv(built_paper_report / "report" / "tables" / "training_check_arms.csv")
    assert len(arms) == 3 and arms["chance"].tolist() == pytest.approx([1 / 3] * 3)
