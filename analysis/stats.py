"""How much of a difference between arms is real: corrected resampled t-test, Holm, subject bootstrap.

Why the correction: the folds share training subjects, so per-fold differences are positively
correlated and the plain paired t-test is far too eager. Nadeau & Bengio (2003, Machine Learning 52)
inflate the variance by n_test/n_train. With J = 3 folds the test has df = 2 and very little power.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.metrics import precision_recall_fscore_support

from analysis.names import Arm, arm_mask

POWER_CAVEAT = (
    "With only {J} folds the corrected t-test has {df} degree(s) of freedom and very little power: "
    "a large p-value is not evidence that two arms perform the same, and only very large, very consistent "
    "differences can reach significance. Folds share training subjects, so the differences are not independent; "
    "the Nadeau-Bengio correction (variance x (1/J + n_test/n_train)) accounts for that only approximately."
)


@dataclass(frozen=True)
class CorrectedTTest:
    mean_diff: float
    std_diff: float   # sample std (ddof=1) of the per-fold differences
    n_folds: int
    test_train_ratio: float
    t: float
    df: int
    p: float
    note: str


def corrected_resampled_ttest(differences, test_train_ratio: float) -> CorrectedTTest:
    """Nadeau-Bengio corrected resampled t-test on paired per-fold differences d_j.

    t = mean(d) / sqrt(var(d, ddof=1) * (1/J + n_test/n_train)), df = J - 1, two-sided p (scipy.stats.t).
    Zero variance (every fold's difference the same): t = +-inf when mean(d) != 0, but p is NaN, not 0. The variance
    is an estimate from J - 1 degrees of freedom, and three equal differences do not make it zero; a p of 0 would be
    marked significant and take Holm's smallest multiplier from every other pair.
    """
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    J = len(d)
    if J < 2:
        return CorrectedTTest(float(d.mean()) if J else np.nan, np.nan, J, test_train_ratio, np.nan, max(J - 1, 0), np.nan,
                              f"{J} paired fold(s): at least 2 are needed")
    if not np.isfinite(test_train_ratio) or test_train_ratio < 0:
        return CorrectedTTest(float(d.mean()), float(d.std(ddof=1)), J, test_train_ratio, np.nan, J - 1, np.nan,
                              "n_test/n_train unknown (trials.csv lacks n_test or n_train)")
    mean, var = float(d.mean()), float(d.var(ddof=1))
    # Equal differences (up to float noise from subtracting scores) would otherwise give t ~ 1e16.
    if np.ptp(d) <= 1e-12:
        var = 0.0
    corrected_var = var * (1.0 / J + test_train_ratio)
    if corrected_var == 0.0:
        if abs(mean) <= 1e-12:
            return CorrectedTTest(mean, 0.0, J, test_train_ratio, np.nan, J - 1, np.nan,
                                  "identical scores on every fold: no difference and no variance, t undefined")
        return CorrectedTTest(mean, 0.0, J, test_train_ratio, float(np.copysign(np.inf, mean)), J - 1, np.nan,
                              "the difference is the same on every fold (zero variance): t = +-inf, p undefined "
                              "and not tested")
    t = mean / np.sqrt(corrected_var)
    p = float(2.0 * sps.t.sf(abs(t), df=J - 1))
    return CorrectedTTest(mean, float(np.sqrt(var)), J, test_train_ratio, float(t), J - 1, p, "")


def holm(pvalues) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaN entries are not tested and stay NaN.

    scipy.stats has only Benjamini-Hochberg (false_discovery_control), which controls the FDR, not the
    family-wise error we want for "is this arm better". Step-down: sort ascending, multiply the k-th
    smallest (k = 0..m-1) by m - k, take the running maximum, cap at 1.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    running = 0.0
    for k, idx in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[idx]))
        adjusted[idx] = running
    return adjusted


def split_ratio(trials: pd.DataFrame | None, arms: list[Arm], folds: list[int]) -> float:
    """Mean over the trials involved of n_test / n_train (from trials.csv); NaN when unknown."""
    if trials is None or trials.empty:
        return np.nan
    mask = trials["fold"].isin(folds) & pd.Series(
        [(m, p) in set(arms) for m, p in zip(trials["model"], trials["pretrained"])], index=trials.index)
    sel = trials[mask & (trials["status"] == "TERMINATED")]
    ratio = (sel["n_test"] / sel["n_train"]).replace([np.inf, -np.inf], np.nan).dropna()
    return float(ratio.mean()) if len(ratio) else np.nan


def pairwise_tests(per_fold_overall: pd.DataFrame, trials: pd.DataFrame | None, arms: list[Arm],
                   metric: str = "macro_f1") -> pd.DataFrame:
    """Every pair of arms with results, paired on their shared folds; Holm over all pairs tested.

    diff = arm_a - arm_b, so t > 0 means arm_a scored higher.
    """
    have = [arm for arm in arms if arm_mask(per_fold_overall, arm).any()]
    rows = []
    for a, b in itertools.combinations(have, 2):
        sa = _fold_series(per_fold_overall, a, metric)
        sb = _fold_series(per_fold_overall, b, metric)
        shared = sorted(set(sa.index) & set(sb.index))
        res = corrected_resampled_ttest((sa[shared] - sb[shared]).to_numpy(), split_ratio(trials, [a, b], shared))
        rows.append({"model_a": a[0], "pretrained_a": a[1], "model_b": b[0], "pretrained_b": b[1], "metric": metric,
                     "folds": res.n_folds, "mean_a": float(sa[shared].mean()) if shared else np.nan,
                     "mean_b": float(sb[shared].mean()) if shared else np.nan, "mean_diff": res.mean_diff,
                     "std_diff": res.std_diff, "n_test_over_n_train": res.test_train_ratio, "t": res.t, "df": res.df,
                     "p": res.p, "note": res.note})
    columns = ["model_a", "pretrained_a", "model_b", "pretrained_b", "metric", "folds", "mean_a", "mean_b", "mean_diff",
               "std_diff", "n_test_over_n_train", "t", "df", "p", "p_holm", "note"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    frame["p_holm"] = holm(frame["p"].to_numpy())
    return frame[columns]


def _fold_series(per_fold_overall: pd.DataFrame, arm: Arm, metric: str) -> pd.Series:
    sel = per_fold_overall[arm_mask(per_fold_overall, arm)]
    return sel.set_index("fold")[metric].astype(float)


def defined_percentile_interval(draws: np.ndarray, confidence: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap ``draws`` along ``axis`` over the draws that define the statistic (NaN ones
    are left out, and counted by the caller); NaN where no draw defines it."""
    tail = 100 * (1 - confidence) / 2
    with warnings.catch_warnings():  # an all-NaN slice: NaN, which the tables show as no interval
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=axis)
    return low, high


def bootstrap_f1_ci(arm_df: pd.DataFrame, classes: list[str], n_resamples: int = 2000, seed: int = 0,
                    confidence: float = 0.95) -> pd.DataFrame:
    """Subject-level percentile bootstrap CI of macro F1 and per-class F1 on pooled out-of-fold predictions.

    Subjects (not rows) are resampled with replacement: with repeated random splits a subject is tested
    more than once, and its rows must travel together. Returns rows (metric, class, pooled, low, high).
    """
    subjects = np.array(sorted(arm_df["subject_id"].unique()))
    codes = {c: i for i, c in enumerate(classes)}
    y_true = arm_df["label"].map(codes).to_numpy(dtype=int)
    y_pred = arm_df["pred"].map(codes).to_numpy(dtype=int)
    labels = list(range(len(classes)))
    subject_pos = {s: i for i, s in enumerate(subjects)}
    row_subject = arm_df["subject_id"].map(subject_pos).to_numpy(dtype=int)
    one_row_each = len(row_subject) == len(subjects)
    if one_row_each:
        row_of_subject = np.empty(len(subjects), dtype=int)
        row_of_subject[row_subject] = np.arange(len(row_subject))
    else:
        rows_by_subject = [np.flatnonzero(row_subject == i) for i in range(len(subjects))]

    def statistic(idx: np.ndarray) -> np.ndarray:
        idx = idx.astype(int)
        rows = row_of_subject[idx] if one_row_each else np.concatenate([rows_by_subject[i] for i in idx])
        _, _, f1, support = precision_recall_fscore_support(y_true[rows], y_pred[rows], labels=labels, average=None,
                                                            zero_division=0)
        # The point estimates' rule (analysis.metrics): a class with no subject in the draw and never predicted there
        # is undefined, not 0, and the macro mean is over the classes that are defined. A draw of 20 subjects with 2
        # LGG holds none in 12% of draws; counting those as F1 = 0 would pull the interval's low end to 0.
        f1 = np.where((support == 0) & (np.bincount(y_pred[rows], minlength=len(labels)) == 0), np.nan, f1)
        return np.concatenate([[np.nanmean(f1)], f1])

    point = statistic(np.arange(len(subjects)))
    undefined = np.zeros(len(point), dtype=int)
    if len(subjects) < 2:
        low = high = np.full_like(point, np.nan)
    else:
        with np.errstate(invalid="ignore"):  # percentiles are taken below, over the defined resamples only
            result = sps.bootstrap((np.arange(len(subjects)),), statistic, n_resamples=n_resamples, vectorized=False,
                                   method="percentile", confidence_level=confidence, rng=np.random.default_rng(seed))
        dist = np.asarray(result.bootstrap_distribution, dtype=float)  # (1 + classes, resamples)
        undefined = np.isnan(dist).sum(axis=1)
        low, high = defined_percentile_interval(dist, confidence, axis=1)
    names = [("macro_f1", "")] + [("f1", c) for c in classes]
    return pd.DataFrame([{"metric": m, "class": c, "pooled": float(point[i]), "low": float(low[i]), "high": float(high[i]),
                          "n_undefined_resamples": int(undefined[i])} for i, (m, c) in enumerate(names)])
