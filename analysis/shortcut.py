"""Shortcut check and per-site results: does a deep arm learn more than where a scan came from?

The baselines (trainables/baselines.py) see no anatomy: one sees acquisition measurements (voxel
size, grid, intensity scale), the other the brain's intensity histogram. A deep arm that does not
clearly beat them on a class has not shown that it uses anatomy for that class.

"Clearly better" is defined once, here: a paired, subject-level percentile bootstrap of the
difference deep − baseline in F1 (per class, and macro F1) on the test predictions the two share
(same fold, same subject); the deep arm is clearly better when the lower end of the 95% interval
is above 0. Pairing matters: both models are scored on the same resampled subjects, so the
subjects' difficulty cancels out of the difference.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.names import Arm, arm_frames, arm_label, arm_mask, display_name
from analysis.stats import defined_percentile_interval

CONFIDENCE = 0.95
SHORTCUT_COLUMNS = ["model", "pretrained", "baseline", "metric", "class", "n_subjects", "n_rows", "deep",
                    "baseline_value", "diff", "low", "high", "clearly_better", "clearly_worse", "n_resamples",
                    "n_undefined_resamples", "seed", "note"]
# What failing to beat each baseline means, in the report's words.
MEANING = {
    "acquisition_baseline": "that class's score may reflect the data source rather than anatomy",
    "histogram_baseline": "nothing shows that the network learned more than intensity statistics (an interval "
                          "that reaches 0 is no evidence either way; see the training check for whether it trained)",
}


# ----------------------------------------------------------------------------------------- paired bootstrap
def _paired_rows(deep: pd.DataFrame, base: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Rows both predicted, matched on (fold, subject_id); rows whose labels disagree are dropped and counted."""
    cols = ["fold", "subject_id", "label", "pred"]
    both = deep[cols].merge(base[cols], on=["fold", "subject_id"], suffixes=("_deep", "_base"), validate="one_to_one")
    agree = both["label_deep"] == both["label_base"]
    both = both[agree].sort_values(["subject_id", "fold"], kind="stable").reset_index(drop=True)
    return both.rename(columns={"label_deep": "label"}).drop(columns="label_base"), int((~agree).sum())


def _per_subject_counts(label: np.ndarray, pred: np.ndarray, row_subject: np.ndarray, n_subjects: int,
                        n_classes: int) -> np.ndarray:
    """(subjects, 3, classes): each subject's true positives, false positives and false negatives per class.

    F1 is a function of these sums, so a resample is a weighted sum of per-subject counts.
    """
    counts = np.zeros((n_subjects, 3, n_classes))
    for k in range(n_classes):
        np.add.at(counts[:, 0, k], row_subject, (label == k) & (pred == k))
        np.add.at(counts[:, 1, k], row_subject, (label != k) & (pred == k))
        np.add.at(counts[:, 2, k], row_subject, (label == k) & (pred != k))
    return counts


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """2TP / (2TP + FP + FN); NaN where the class is neither present nor predicted (undefined, as in
    analysis.metrics: not a 0 that a draw without the class would pull the interval down with)."""
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), np.nan)


def _scores(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(resamples, 1 + classes): macro F1 over the defined classes, then F1 per class, for subject weights
    (resamples, subjects)."""
    tp, fp, fn = (weights @ counts[:, i, :] for i in range(3))
    f1 = _f1(tp, fp, fn)
    return np.concatenate([np.nanmean(f1, axis=1, keepdims=True), f1], axis=1)


def paired_bootstrap(deep: pd.DataFrame, base: pd.DataFrame, classes: list[str], n_resamples: int, seed: int,
                     confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Difference deep − baseline of macro F1 and per-class F1, with its paired subject bootstrap interval.

    Subjects are drawn with replacement (all of a subject's rows travel together, as a subject tested
    in several shuffle splits has several); each resample scores both models on the same draw. One
    generator seeded with `seed` per pair, so a result does not depend on which other arms ran.
    """
    both, mismatched = _paired_rows(deep, base)
    names = [("macro_f1", "")] + [("f1", c) for c in classes]
    subjects = np.array(sorted(both["subject_id"].unique()))
    note = f"{mismatched} shared row(s) with different labels left out" if mismatched else ""
    if len(subjects) == 0:
        return pd.DataFrame([{"metric": m, "class": c, "n_subjects": 0, "n_rows": 0, "deep": np.nan,
                              "baseline_value": np.nan, "diff": np.nan, "low": np.nan, "high": np.nan,
                              "clearly_better": False, "clearly_worse": False, "n_undefined_resamples": 0,
                              "note": "no test predictions in common"}
                             for m, c in names])
    code = {c: i for i, c in enumerate(classes)}
    row_subject = np.searchsorted(subjects, both["subject_id"].to_numpy())
    label = both["label"].map(code).to_numpy()
    counts = {side: _per_subject_counts(label, both[f"pred_{side}"].map(code).to_numpy(), row_subject,
                                        len(subjects), len(classes)) for side in ("deep", "base")}
    ones = np.ones((1, len(subjects)))
    point = {side: _scores(ones, counts[side])[0] for side in counts}
    undefined = np.zeros(len(names), dtype=int)
    if len(subjects) < 2:
        low = high = np.full(len(names), np.nan)
        note = "; ".join(filter(None, [note, "fewer than 2 shared subjects: no interval"]))
    else:
        weights = np.random.default_rng(seed).multinomial(len(subjects), np.full(len(subjects), 1 / len(subjects)),
                                                          size=n_resamples).astype(float)
        diffs = _scores(weights, counts["deep"]) - _scores(weights, counts["base"])
        undefined = np.isnan(diffs).sum(axis=0)
        # over the draws where both sides define the metric (a class absent from a draw, and not predicted by one
        # of the two, has no difference there); every draw defines macro F1
        low, high = defined_percentile_interval(diffs, confidence, axis=0)
    rows = []
    for i, (metric, cls) in enumerate(names):
        rows.append({"metric": metric, "class": cls, "n_subjects": len(subjects), "n_rows": len(both),
                     "deep": float(point["deep"][i]), "baseline_value": float(point["base"][i]),
                     "diff": float(point["deep"][i] - point["base"][i]), "low": float(low[i]), "high": float(high[i]),
                     "clearly_better": bool(np.isfinite(low[i]) and low[i] > 0),
                     "clearly_worse": bool(np.isfinite(high[i]) and high[i] < 0),
                     "n_undefined_resamples": int(undefined[i]), "note": note})
    return pd.DataFrame(rows)


def shortcut_check(main_preds: pd.DataFrame, baseline_preds: pd.DataFrame, deep_arms: list[Arm],
                   baseline_arms: list[Arm], classes: list[str], n_resamples: int, seed: int) -> pd.DataFrame:
    """Every deep arm with predictions against every baseline: SHORTCUT_COLUMNS, one row per metric and class."""
    frames = []
    for arm, deep in arm_frames(main_preds, deep_arms):
        for base_arm in baseline_arms:
            base = baseline_preds[arm_mask(baseline_preds, base_arm)]
            res = paired_bootstrap(deep, base, classes, n_resamples, seed)
            res.insert(0, "baseline", base_arm[0])
            res.insert(0, "pretrained", arm[1])
            res.insert(0, "model", arm[0])
            res["n_resamples"], res["seed"] = n_resamples, seed
            frames.append(res)
    return pd.concat(frames, ignore_index=True)[SHORTCUT_COLUMNS] if frames else pd.DataFrame(columns=SHORTCUT_COLUMNS)


def not_clearly_better(check: pd.DataFrame, baseline: str) -> tuple[int, int]:
    """(results not clearly better, results) over deep arm x class F1 rows against one baseline."""
    sel = check[(check["baseline"] == baseline) & (check["metric"] == "f1")]
    return int((~sel["clearly_better"].astype(bool)).sum()), len(sel)


def clearly_worse(check: pd.DataFrame, baseline: str) -> int:
    """Deep arm x class F1 rows whose whole 95% interval lies below the baseline: the arm did worse, not just no better."""
    sel = check[(check["baseline"] == baseline) & (check["metric"] == "f1")]
    return int(sel["clearly_worse"].astype(bool).sum()) if "clearly_worse" in sel else 0


def verdicts(check: pd.DataFrame, classes: list[str], baselines: list[str]) -> list[str]:
    """Per class and baseline, in words: which deep arms are not clearly better, and what that means."""
    sentences = []
    for cls in classes:
        for baseline in baselines:
            sel = check[(check["baseline"] == baseline) & (check["metric"] == "f1") & (check["class"] == cls)]
            if sel.empty:
                continue
            weak = [arm_label(r.model, r.pretrained) for r in sel.itertuples(index=False) if not r.clearly_better]
            name = display_name(baseline)
            if not weak:
                sentences.append(f"{cls}: every deep arm is clearly better than the {name}.")
                continue
            meaning = MEANING.get(baseline, "the deep arm has not shown more than this baseline does")
            worse = [arm_label(r.model, r.pretrained) for r in sel.itertuples(index=False) if r.clearly_worse]
            below = f" Clearly worse than it (the whole interval below 0): {'; '.join(worse)}." if worse else ""
            if len(weak) == len(sel) and len(sel) > 1:
                sentences.append(f"{cls}: no deep arm is clearly better than the {name} ({'; '.join(weak)}): "
                                 f"{meaning}.{below}")
            else:
                verb = "is" if len(weak) == 1 else "are"
                sentences.append(f"{cls}: {'; '.join(weak)} {verb} not clearly better than the {name}: {meaning}.{below}")
    return sentences


def shortcut_display(check: pd.DataFrame) -> pd.DataFrame:
    fmt = lambda v: "" if not np.isfinite(v) else f"{v:.4f}"  # noqa: E731
    return pd.DataFrame({
        "Deep arm": [arm_label(m, p) for m, p in zip(check["model"], check["pretrained"])],
        "Baseline": check["baseline"].map(display_name),
        "Metric": [f"F1 {c}" if m == "f1" else "Macro F1" for m, c in zip(check["metric"], check["class"])],
        # Scored on the shared test predictions of all folds at once (pooled), as the bootstrap resamples them.
        "Deep (pooled)": check["deep"].map(fmt), "Baseline (pooled)": check["baseline_value"].map(fmt),
        "Diff (deep − baseline) [95% CI]": [f"{d:+.4f} [{fmt(lo)}, {fmt(hi)}]" if np.isfinite(d) else ""
                                            for d, lo, hi in zip(check["diff"], check["low"], check["high"])],
        "Clearly better": [("yes" if b else "**no** (clearly worse)" if w else "**no**")
                           for b, w in zip(check["clearly_better"], check["clearly_worse"])],
        "Subjects": check["n_subjects"].astype(str), "Note": check["note"]})


# ----------------------------------------------------------------------------------------- per site
def with_origin(preds: pd.DataFrame, subjects: pd.DataFrame | None) -> pd.DataFrame | None:
    """Predictions with source and site: their own columns, else looked up in subjects.csv; None when neither has them."""
    if "site" in preds.columns:
        return preds if "source" in preds.columns else preds.assign(source="")
    if subjects is None or "site" not in subjects.columns:
        return None
    origin = subjects[["subject_id", "source", "site"]]
    return preds.merge(origin, on="subject_id", how="left").fillna({"source": "", "site": ""})


def per_site(preds: pd.DataFrame, arms: list[Arm], classes: list[str], baseline: bool) -> pd.DataFrame:
    """Per arm and (source, site): test predictions, accuracy and the recall of each class present there.

    Pooled over folds. A site where a class is absent has no recall for it (NaN, not 0).
    """
    rows = []
    for arm, sel in arm_frames(preds, arms):
        for (source, site), grp in sel.groupby(["source", "site"], sort=True):
            correct = grp["label"] == grp["pred"]
            row = {"model": arm[0], "pretrained": arm[1], "baseline": baseline, "source": source, "site": site,
                   "n": len(grp), "accuracy": float(correct.mean())}
            for cls in classes:
                of_class = grp["label"] == cls
                row[f"n_{cls}"] = int(of_class.sum())
                row[f"recall_{cls}"] = float(correct[of_class].mean()) if of_class.any() else np.nan
            rows.append(row)
    columns = ["model", "pretrained", "baseline", "source", "site", "n", "accuracy",
               *[f"n_{c}" for c in classes], *[f"recall_{c}" for c in classes]]
    return pd.DataFrame(rows, columns=columns)


def per_site_display(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    fmt = lambda v: "" if pd.isna(v) else f"{v:.4f}"  # noqa: E731
    out = pd.DataFrame({
        "Arm": [f"*{arm_label(m, p)}*" if b else arm_label(m, p)
                for m, p, b in zip(table["model"], table["pretrained"], table["baseline"])],
        "Source": table["source"].replace("", "(unknown)"), "Site": table["site"].replace("", "(unknown)"),
        "n": table["n"].astype(str), "Accuracy": table["accuracy"].map(fmt)})
    for cls in classes:
        out[f"Recall {cls} (n)"] = [f"{fmt(r)} ({int(n)})" if n else "" for r, n in
                                    zip(table[f"recall_{cls}"], table[f"n_{cls}"])]
    return out.reset_index(drop=True)
