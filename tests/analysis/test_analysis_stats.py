"""Corrected resampled t-test and Holm against worked examples; bootstrap determinism."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from analysis.stats import bootstrap_f1_ci, corrected_resampled_ttest, holm, pairwise_tests

CLASSES = ["HGG", "LGG", "Healthy"]


def test_corrected_ttest_worked_example_df2():
    # d = [0.02, 0.05, 0.03], J = 3, n_test/n_train = 0.5
    # mean = 0.10/3 = 1/30
    # deviations: -1/75, 1/60, -1/300 -> squares sum 0.00046667 = 7/15000 -> var(ddof=1) = 7/30000
    # corrected var = 7/30000 * (1/3 + 1/2) = 7/30000 * 5/6 = 7/36000
    # t = (1/30) / sqrt(7/36000) = sqrt(36000 / (7 * 900)) = sqrt(40/7) = 2.390457...
    # Student t with 2 df: P(|T| > t) = 1 - t / sqrt(2 + t^2) = 1 - sqrt((40/7) / (54/7)) = 1 - sqrt(20/27)
    res = corrected_resampled_ttest([0.02, 0.05, 0.03], 0.5)
    assert res.df == 2
    assert res.n_folds == 3
    assert res.mean_diff == pytest.approx(1 / 30)
    assert res.std_diff == pytest.approx(math.sqrt(7 / 30000))
    assert res.t == pytest.approx(math.sqrt(40 / 7))
    assert res.t == pytest.approx(2.390457, abs=1e-6)
    assert res.p == pytest.approx(1 - math.sqrt(20 / 27))
    assert res.p == pytest.approx(0.139337, abs=1e-6)


def test_corrected_ttest_worked_example_df1_and_sign():
    # d = [-0.1, -0.3], n_test/n_train = 1: mean -0.2, var = (0.1^2 + 0.1^2)/1 = 0.02,
    # corrected var = 0.02 * (1/2 + 1) = 0.03, t = -0.2 / sqrt(0.03) = -2/sqrt(3)
    # 1 df is the Cauchy distribution: P(|T| > t) = 1 - (2/pi) * arctan(|t|)
    res = corrected_resampled_ttest([-0.1, -0.3], 1.0)
    assert res.df == 1
    assert res.t == pytest.approx(-2 / math.sqrt(3))
    assert res.p == pytest.approx(1 - 2 / math.pi * math.atan(2 / math.sqrt(3)))


def test_corrected_ttest_is_more_conservative_than_plain_paired_t():
    from scipy import stats

    d = [0.02, 0.05, 0.03]
    plain = stats.ttest_1samp(d, 0.0)
    assert corrected_resampled_ttest(d, 0.5).p > plain.pvalue


def test_corrected_ttest_zero_variance_and_too_few_folds():
    up = corrected_resampled_ttest([0.1, 0.1, 0.1], 0.5)
    assert up.t == math.inf and math.isnan(up.p) and "zero variance" in up.note and "not tested" in up.note
    down = corrected_resampled_ttest([-0.1, -0.1, -0.1], 0.5)
    assert down.t == -math.inf and math.isnan(down.p)
    same = corrected_resampled_ttest([0.0, 0.0, 0.0], 0.5)
    assert math.isnan(same.t) and math.isnan(same.p) and same.note
    one = corrected_resampled_ttest([0.1], 0.5)
    assert math.isnan(one.p) and "at least 2" in one.note
    unknown = corrected_resampled_ttest([0.02, 0.05, 0.03], float("nan"))
    assert math.isnan(unknown.p) and "n_test/n_train" in unknown.note


def test_holm_worked_example():
    # sorted: 0.01*4 = 0.04; 0.03*3 = 0.09; 0.04*2 = 0.08 -> running max 0.09; 0.20*1 = 0.20
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    # capped at 1: 0.5*2 = 1.0; 0.6*1 = 0.6 -> running max 1.0
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    # NaN = not tested: m = 2; 0.02*2 = 0.04; 0.03*1 = 0.03 -> 0.04
    got = holm([0.02, np.nan, 0.03])
    assert got[0] == pytest.approx(0.04) and np.isnan(got[1]) and got[2] == pytest.approx(0.04)
    assert holm([]).size == 0


def test_pairwise_tests_pairs_on_shared_folds_and_uses_trials_ratio():
    fo = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "pretrained": [True] * 6, "fold": [0, 1, 2] * 2,
                       "macro_f1": [0.82, 0.85, 0.83, 0.80, 0.80, 0.80]})
    trials = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "pretrained": [True] * 6, "fold": [0, 1, 2] * 2,
                           "status": ["TERMINATED"] * 6, "n_test": [10.0] * 6, "n_train": [20.0] * 6})
    got = pairwise_tests(fo, trials, [("a", True), ("b", True)])
    assert len(got) == 1
    row = got.iloc[0]
    assert row["n_test_over_n_train"] == pytest.approx(0.5)
    assert row["t"] == pytest.approx(math.sqrt(40 / 7))  # same differences as the worked example
    assert row["p_holm"] == pytest.approx(row["p"])  # a family of one


def _pooled(n_per_class=(12, 6, 12), wrong=((0, 1), (1, 0), (1, 0))) -> pd.DataFrame:
    rows, k = [], 0
    for ci, n in enumerate(n_per_class):
        for i in range(n):
            rows.append({"subject_id": f"s{k:03d}", "label": CLASSES[ci], "pred": CLASSES[ci]})
            k += 1
    df = pd.DataFrame(rows)
    used: dict[int, int] = {}
    for true_i, pred_i in wrong:  # turn some correct predictions into errors
        idx = df.index[df["label"] == CLASSES[true_i]][used.get(true_i, 0)]
        used[true_i] = used.get(true_i, 0) + 1
        df.loc[idx, "pred"] = CLASSES[pred_i]
    return df


def test_bootstrap_is_deterministic_and_brackets_pooled_value():
    df = _pooled()
    a = bootstrap_f1_ci(df, CLASSES, n_resamples=200, seed=0)
    b = bootstrap_f1_ci(df, CLASSES, n_resamples=200, seed=0)
    pd.testing.assert_frame_equal(a, b)
    c = bootstrap_f1_ci(df, CLASSES, n_resamples=200, seed=1)
    assert not a.equals(c)
    macro = a[a["metric"] == "macro_f1"].iloc[0]
    assert macro["pooled"] == pytest.approx(f1_score(df["label"], df["pred"], labels=CLASSES, average="macro"))
    assert (a["low"] <= a["pooled"]).all() and (a["pooled"] <= a["high"]).all()
    assert macro["low"] < macro["high"]


def test_bootstrap_keeps_rows_of_a_subject_together():
    # repeated random splits test a subject more than once: duplicating every row must not change the
    # point estimate, and resampling is over the 30 subjects, not the 60 rows
    df = _pooled()
    twice = pd.concat([df, df], ignore_index=True)
    one = bootstrap_f1_ci(df, CLASSES, n_resamples=100, seed=0)
    two = bootstrap_f1_ci(twice, CLASSES, n_resamples=100, seed=0)
    assert list(two["pooled"]) == pytest.approx(list(one["pooled"]))
    assert list(two["low"]) == pytest.approx(list(one["low"]))
    assert list(two["high"]) == pytest.approx(list(one["high"]))


def test_a_zero_variance_pair_is_not_significant_and_takes_no_holm_slot_from_the_others():
    """Arms a = [.90, .80, .85], b = a - 0.05, c = [.70, .82, .60]: a-b differs by 0.05 on every fold. Its p is
    undefined, so it is neither marked nor counted, and the other two pairs are corrected for m = 2, not 3."""
    rows = [{"model": m, "pretrained": False, "fold": f, "macro_f1": v}
            for m, values in {"a": [.90, .80, .85], "b": [.85, .75, .80], "c": [.70, .82, .60]}.items()
            for f, v in enumerate(values)]
    trials = pd.DataFrame([{"model": r["model"], "pretrained": False, "fold": r["fold"], "status": "TERMINATED",
                            "n_test": 10, "n_train": 20} for r in rows])
    tests = pairwise_tests(pd.DataFrame(rows), trials, [("a", False), ("b", False), ("c", False)])
    by_pair = tests.set_index(["model_a", "model_b"])
    assert math.isinf(by_pair.loc[("a", "b"), "t"]) and math.isnan(by_pair.loc[("a", "b"), "p_holm"])
    for pair in (("a", "c"), ("b", "c")):
        d = np.array([.90, .80, .85]) - np.array([.70, .82, .60]) - (0.05 if pair[0] == "b" else 0.0)
        p = corrected_resampled_ttest(d, 0.5).p
        assert by_pair.loc[pair, "p"] == pytest.approx(p)
    raw = sorted(by_pair.loc[[("a", "c"), ("b", "c")], "p"])
    assert sorted(by_pair.loc[[("a", "c"), ("b", "c")], "p_holm"]) == pytest.approx([2 * raw[0], max(2 * raw[0], raw[1])])


def test_a_class_absent_from_a_draw_and_never_predicted_is_left_out_of_that_draw_not_scored_0():
    """A perfect classifier on 2 LGG, 9 HGG and 9 Healthy subjects: 20 draws of 20 miss both LGG subjects in
    (18/20)^20 = 12% of resamples. Those draws cannot measure LGG; scored as 0 they made the interval [0, 1] for a
    classifier that never errs."""
    labels = ["LGG"] * 2 + ["HGG"] * 9 + ["Healthy"] * 9
    df = pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(20)], "fold": 0, "label": labels, "pred": labels})
    ci = bootstrap_f1_ci(df, CLASSES, n_resamples=400, seed=0).set_index("class")
    assert (ci["pooled"] == 1.0).all() and (ci["low"] == 1.0).all() and (ci["high"] == 1.0).all()
    undefined = ci.loc["LGG", "n_undefined_resamples"]
    assert 0.07 * 400 < undefined < 0.18 * 400  # about 12%
    assert ci.loc["", "n_undefined_resamples"] == ci.loc["HGG", "n_undefined_resamples"] == 0
