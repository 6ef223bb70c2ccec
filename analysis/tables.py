"""Tables: the CSV frames (numbers) and their display versions (strings, paper format).

Display cells are "mean ± std" over folds (sample std, ddof=1) with the pooled out-of-fold value
beside; the winning arm of a column is **bold** with a ★. Numbers use 4 decimals like the paper.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score

from analysis.load import HYPERPARAMETERS, Experiment
from analysis.metrics import ArmMetrics, overall_metrics
from analysis.names import Arm, arm_frames, arm_mask, arm_sort_key, display_name
from analysis.paper import is_paper_task, published, table_for
from analysis.partial import PartialResults, failed_folds

STAR = "★"  # the best arm of a column (by fold mean): no test behind it
SIGNIFICANT = "†"  # Holm p < 0.05 in the pairwise tests: a glyph of its own, so a best-of-column mark never reads as one

COMPARISON_COLUMNS = ["table", "model", "display_name", "pretrained", "class", "metric", "folds", "mean", "std", "pooled",
                      "paper_mean", "paper_std", "difference", "baseline", "winner", "paper_winner"]


# ----------------------------------------------------------------------------- formatting
def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, (float, np.floating)) and not np.isfinite(x)):
        if isinstance(x, (float, np.floating)) and np.isinf(x):
            return "+inf" if x > 0 else "-inf"
        return ""
    return f"{float(x):.{digits}f}"


def fmt_pm(mean, std, digits: int = 4) -> str:
    if mean is None or not np.isfinite(mean):
        return "no results"
    return f"{fmt(mean, digits)} ± {fmt(std, digits) if np.isfinite(std) else 'n/a'}"


def fmt_diff(x, digits: int = 4) -> str:
    return "" if x is None or not np.isfinite(x) else f"{float(x):+.{digits}f}"


def fmt_p(p) -> str:
    if p is None or not np.isfinite(p):
        return ""
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def mark(text: str, winner: bool, symbol: str = STAR) -> str:
    return f"**{text}** {symbol}" if winner and text else text


# ----------------------------------------------------------------------------- paper comparison
def macro_specificity(metrics: ArmMetrics, arm: Arm) -> tuple[float, float, float]:
    """(mean, std over folds, pooled) of the unweighted mean over classes of one-vs-rest specificity.

    The paper prints one specificity (0.9684) without saying how it averaged; this is our best reading.
    """
    fc = metrics.per_fold_class[arm_mask(metrics.per_fold_class, arm)]
    if fc.empty:
        return np.nan, np.nan, np.nan
    per_fold = fc.groupby("fold")["specificity"].mean()
    pc = metrics.per_class[arm_mask(metrics.per_class, arm) & (metrics.per_class["metric"] == "specificity")]
    std = float(per_fold.std(ddof=1)) if len(per_fold) > 1 else np.nan
    return float(per_fold.mean()), std, float(pc["pooled"].mean())


def paper_comparison(metrics: ArmMetrics, arms: list[Arm], classes: list[str], partial: PartialResults,
                     baseline_metrics: ArmMetrics | None = None, baseline_arms: Sequence[Arm] = ()) -> pd.DataFrame:
    """One row per (arm, paper-table metric): ours (mean, std, pooled) beside the published value.

    Arms without results keep their row with blank numbers (never zeros) so the published value still shows.
    Baselines (`baseline_arms`, metrics from the same code in `baseline_metrics`) get rows marked
    baseline = True: no published value, and they never win the ★, which ranks the paper's arms only.
    """
    rows = []
    for arm in arms:
        folds = int(partial.arm_folds[arm_mask(partial.arm_folds, arm)]["folds_present"].sum())
        rows += _comparison_rows(metrics, arm, classes, folds, baseline=False)
    for arm in baseline_arms:
        folds = int(arm_mask(baseline_metrics.per_fold_overall, arm).sum()) if baseline_metrics is not None else 0
        rows += _comparison_rows(baseline_metrics, arm, classes, folds, baseline=True)
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS[:-3] + ["baseline"])
    frame["table"] = frame["table"].astype("Int64")
    frame["baseline"] = frame["baseline"].astype(bool)
    frame["winner"] = _is_max(frame, "mean")
    frame["paper_winner"] = _is_max(frame, "paper_mean")
    return frame[COMPARISON_COLUMNS]


def _comparison_rows(metrics: ArmMetrics | None, arm: Arm, classes: list[str], folds: int,
                     baseline: bool) -> list[dict]:
    """The paper-table metrics of one arm. A baseline gets no published value; in a run on other classes than the
    paper's, no row (deep arm or baseline) is looked up in, or placed under, a published table."""
    comparable = is_paper_task(classes)
    wanted = [("f1", c) for c in classes] + [("macro_f1", ""), ("weighted_f1", ""), ("accuracy", ""),
                                             ("macro_specificity", "")]
    rows = []
    for metric, cls in wanted:
        mean, std, pooled = _summary_of(metrics, arm, metric, cls)
        paper_metric = "specificity" if metric == "macro_specificity" else metric
        looked_up = comparable and not baseline
        p_mean, p_std, table = published(arm[0], arm[1], paper_metric, cls) if looked_up else (np.nan, np.nan, None)
        if table is None and comparable:
            table = table_for(paper_metric, cls)
        rows.append({"table": table, "model": arm[0], "display_name": display_name(arm[0]), "pretrained": arm[1],
                     "class": cls, "metric": metric, "folds": folds, "mean": mean, "std": std, "pooled": pooled,
                     "paper_mean": p_mean, "paper_std": p_std,
                     "difference": mean - p_mean if np.isfinite(mean) and np.isfinite(p_mean) else np.nan,
                     "baseline": baseline})
    return rows


def _summary_of(metrics: ArmMetrics | None, arm: Arm, metric: str, cls: str) -> tuple[float, float, float]:
    """(fold mean, fold std, pooled) of one metric of one arm; NaNs when the arm has no results."""
    if metrics is None:
        return np.nan, np.nan, np.nan
    if metric == "macro_specificity":
        return macro_specificity(metrics, arm)
    if metric == "f1":
        sel = metrics.per_class[arm_mask(metrics.per_class, arm) & (metrics.per_class["metric"] == "f1")
                                & (metrics.per_class["class"] == cls)]
    else:
        sel = metrics.overall[arm_mask(metrics.overall, arm) & (metrics.overall["metric"] == metric)]
    if sel.empty:
        return np.nan, np.nan, np.nan
    mean, std, pooled = sel.iloc[0][["mean", "std", "pooled"]].astype(float)
    return float(mean), float(std), float(pooled)


def _is_max(frame: pd.DataFrame, column: str) -> pd.Series:
    """True for the deep arm(s) with the highest value of `column` within each (metric, class); ties all win.

    Baselines are left out before the maximum is taken: a baseline that beats every arm must not take the ★
    away from the best arm (the shortcut check, not the ★, is where baselines compete).
    """
    arms = frame[column].where(~frame["baseline"])
    best = arms.groupby([frame["metric"], frame["class"]]).transform("max")
    return (arms == best) & arms.notna()


# ----------------------------------------------------------------------------- display tables
def arm_cells(model: str, pretrained: bool) -> dict[str, str]:
    """The Model and Pre-trained cells that open every per-arm display table, so all tables name an arm alike."""
    return {"Model": display_name(model), "Pre-trained": "yes" if pretrained else "no"}


def _arm_cols(arm: Arm, partial: PartialResults, baseline: bool = False) -> dict[str, str]:
    """Model, pre-training and folds; a baseline is set in italics and says so instead of a pre-training."""
    if baseline:
        return {"Model": f"*{display_name(arm[0])}*", "Pre-trained": "baseline", "Folds": partial.folds_label(arm)}
    return {**arm_cells(*arm), "Folds": partial.folds_label(arm)}


def class_f1_display(comp: pd.DataFrame, cls: str, arms: list[Arm], partial: PartialResults) -> pd.DataFrame:
    """Tables 2-4: F1 of one class per arm, ours beside the published value."""
    rows = []
    for arm in arms:
        r = comp[arm_mask(comp, arm) & (comp["metric"] == "f1") & (comp["class"] == cls)].iloc[0]
        rows.append({**_arm_cols(arm, partial, bool(r["baseline"])),
                     "F1 (mean ± std over folds)": mark(fmt_pm(r["mean"], r["std"]), r["winner"]),
                     "F1 pooled": fmt(r["pooled"]),
                     "Published": mark(fmt_pm(r["paper_mean"], r["paper_std"]), r["paper_winner"])
                     if np.isfinite(r["paper_mean"]) else "",
                     "Difference": fmt_diff(r["difference"])})
    return pd.DataFrame(rows)


def overall_display(comp: pd.DataFrame, metrics_: list[tuple[str, str]], arms: list[Arm],
                    partial: PartialResults) -> pd.DataFrame:
    """Table 5 (macro / weighted F1) or Table 6 (accuracy / specificity) style."""
    rows = []
    for arm in arms:
        row = _arm_cols(arm, partial, bool(comp[arm_mask(comp, arm)]["baseline"].any()))
        for metric, title in metrics_:
            r = comp[arm_mask(comp, arm) & (comp["metric"] == metric)].iloc[0]
            row[f"{title} (mean ± std)"] = mark(fmt_pm(r["mean"], r["std"]), r["winner"])
            row[f"{title} pooled"] = fmt(r["pooled"])
            row[f"{title} published"] = mark(fmt(r["paper_mean"]), r["paper_winner"]) if np.isfinite(r["paper_mean"]) else ""
            row[f"{title} difference"] = fmt_diff(r["difference"])
        rows.append(row)
    return pd.DataFrame(rows)


def per_class_display(metrics: ArmMetrics, arms: list[Arm], classes: list[str], partial: PartialResults) -> pd.DataFrame:
    """Every class metric of every arm: 'mean ± std (pooled x)', with the pooled support."""
    pc = metrics.per_class
    rows = []
    for arm in arms:
        if not arm_mask(pc, arm).any():
            continue
        for cls in classes:
            row = {**_arm_cols(arm, partial), "Class": cls}
            for metric in ("precision", "recall", "specificity", "f1"):
                r = pc[arm_mask(pc, arm) & (pc["class"] == cls) & (pc["metric"] == metric)].iloc[0]
                row[metric.capitalize() if metric != "f1" else "F1"] = f"{fmt_pm(r['mean'], r['std'])} (pooled {fmt(r['pooled'])})"
            sup = metrics.support[arm_mask(metrics.support, arm) & (metrics.support["class"] == cls)]
            row["Support (all folds)"] = str(int(sup["support"].iloc[0]))
            rows.append(row)
    return pd.DataFrame(rows)


def per_fold_display(metrics: ArmMetrics) -> pd.DataFrame:
    """Per fold: each class's precision / recall / specificity / F1 / support, and the fold's accuracy."""
    fc, fo = metrics.per_fold_class, metrics.per_fold_overall
    if fc.empty:
        return pd.DataFrame()
    merged = fc.merge(fo[["model", "pretrained", "fold", "accuracy", "macro_f1"]], on=["model", "pretrained", "fold"])
    merged = merged.assign(_k=[arm_sort_key((m, p)) for m, p in zip(merged["model"], merged["pretrained"])])
    merged = merged.sort_values(["_k", "fold"], kind="stable")
    return pd.DataFrame({
        "Model": merged["model"].map(display_name), "Pre-trained": merged["pretrained"].map({True: "yes", False: "no"}),
        "Fold": merged["fold"].astype(str), "Trial": merged["trial_name"], "Class": merged["class"],
        "Precision": merged["precision"].map(fmt), "Recall": merged["recall"].map(fmt),
        "Specificity": merged["specificity"].map(fmt), "F1": merged["f1"].map(fmt),
        "Support": merged["support"].astype(str), "Fold accuracy": merged["accuracy"].map(fmt),
        "Fold macro F1": merged["macro_f1"].map(fmt)}).reset_index(drop=True)


def pairwise_display(tests: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in tests.itertuples(index=False):
        significant = np.isfinite(r.p_holm) and r.p_holm < 0.05
        rows.append({"Arm A": _arm_text(r.model_a, r.pretrained_a), "Arm B": _arm_text(r.model_b, r.pretrained_b),
                     "Folds": str(r.folds), "Macro F1 A (fold mean)": fmt(r.mean_a),
                     "Macro F1 B (fold mean)": fmt(r.mean_b),
                     "Mean diff (A − B)": fmt_diff(r.mean_diff), "t": fmt(r.t, 3), "df": str(r.df), "p": fmt_p(r.p),
                     "p (Holm)": mark(fmt_p(r.p_holm), significant, SIGNIFICANT), "Note": r.note})
    return pd.DataFrame(rows)


def bootstrap_display(boot: pd.DataFrame, arms: list[Arm], classes: list[str], partial: PartialResults) -> pd.DataFrame:
    """Pooled value [low, high] per arm, with the folds and subjects it covers (an arm missing a fold has fewer)."""
    rows = []
    for arm, sel in arm_frames(boot, arms):
        row = {**_arm_cols(arm, partial), "Subjects": str(int(sel["n_subjects"].iloc[0]))}
        for metric, cls, title in [("macro_f1", "", "Macro F1")] + [("f1", c, f"F1 {c}") for c in classes]:
            r = sel[(sel["metric"] == metric) & (sel["class"] == cls)].iloc[0]
            row[title] = f"{fmt(r['pooled'])} [{fmt(r['low'])}, {fmt(r['high'])}]"
        rows.append(row)
    return pd.DataFrame(rows)


def auc_display(auc: pd.DataFrame, arms: list[Arm], classes: list[str], partial: PartialResults,
                subjects: dict[Arm, int]) -> pd.DataFrame:
    """Pooled AUC (fold mean ± std) per arm and class, with the folds and subjects it covers."""
    rows = []
    for arm, sel in arm_frames(auc, arms):
        row = {**_arm_cols(arm, partial), "Subjects": str(subjects.get(arm, ""))}
        for cls in classes:
            r = sel[sel["class"] == cls]
            row[f"AUC {cls}: pooled (fold mean ± std)"] = (
                f"{fmt(r['pooled'].iloc[0]) or 'n/a'} ({fmt_pm(r['mean'].iloc[0], r['std'].iloc[0])})" if len(r) else "")
        rows.append(row)
    return pd.DataFrame(rows)


def _arm_text(model: str, pretrained: bool) -> str:
    return f"{display_name(model)} ({'pre-trained' if pretrained else 'scratch'})"


# ----------------------------------------------------------------------------- search before nested CV
BEST_COLUMNS = ["model", "pretrained", "role", "config_id", *HYPERPARAMETERS, "inner_val_macro_f1_mean",
                "inner_val_macro_f1_std", "inner_folds", "test_folds", "test_macro_f1_mean", "test_macro_f1_std",
                "test_macro_f1_pooled", "test_accuracy_mean", "test_accuracy_pooled", "failed_folds"]


def best_configs(exp: Experiment) -> pd.DataFrame:
    """Searches run before nested CV: per arm the config with the best mean inner-validation macro F1, and the
    paper defaults.

    This is what those runs' design allows, and its test scores are optimistically biased: fold j's inner
    validation part is drawn from fold j's training part, which holds fold k's test subjects, so the mean
    over folds lets every fold's test subjects take part in the choice (the report says so; nested runs use
    `analysis.nested` instead). Configs with all planned folds finished rank before partial ones, so one
    lucky fold cannot win; a config with a failed fold (ERROR or FAILED, no finished trial in that fold) is not
    ranked at all, and its row names the failed folds; ties are broken by config_id for determinism. Test scores
    come from predictions.csv.
    """
    trials = exp.trials
    if trials is None:
        return pd.DataFrame(columns=BEST_COLUMNS)
    # MISSING rows carry only a name and a status; they have no arm to rank
    search = trials[~trials["experiment"].isin(["paper", ""]) & (trials["model"] != "")]
    arms = sorted({(m, p) for m, p in zip(search["model"], search["pretrained"])}, key=arm_sort_key)
    search = _with_grid_default(trials, search, arms, exp.paper_config_id)
    done = search[(search["status"] == "TERMINATED") & search["best_val_macro_f1"].notna()]
    rows = []
    for arm, arm_done in arm_frames(done, arms):
        broken = {cid for cid in set(arm_done["config_id"]) if failed_folds(search, arm, cid)}
        agg = arm_done.groupby("config_id").agg(mean=("best_val_macro_f1", "mean"), n=("fold", "nunique")).reset_index()
        agg = agg[~agg["config_id"].isin(broken)]
        agg["complete"] = agg["n"] >= exp.n_folds
        agg = agg.sort_values(["complete", "mean", "config_id"], ascending=[False, False, True], kind="stable")
        roles = [("best", str(agg["config_id"].iloc[0]))] if len(agg) else []
        if exp.paper_config_id is not None:
            roles.append(("paper_default", exp.paper_config_id))
        for role, cid in roles:
            rows.append(_config_row(exp, search, arm, role, cid))
    return pd.DataFrame(rows, columns=BEST_COLUMNS)


def _with_grid_default(trials: pd.DataFrame, search: pd.DataFrame, arms: list[Arm], paper_id: str | None) -> pd.DataFrame:
    """Add the grid's trials of the default configuration where the search did not run it itself.

    When the grid and the search run in one experiment, the search is handed the grid's score for the
    default configuration instead of training it again; it is a candidate like any other.
    """
    if paper_id is None:
        return search
    extra = []
    for arm in arms:
        if not (arm_mask(search, arm) & (search["config_id"] == paper_id)).any():
            extra.append(trials[(trials["experiment"] == "paper") & arm_mask(trials, arm) & (trials["config_id"] == paper_id)])
    return pd.concat([search, *extra], ignore_index=True) if extra else search


def _config_row(exp: Experiment, search: pd.DataFrame, arm: Arm, role: str, cid: str) -> dict:
    tr = search[arm_mask(search, arm) & (search["config_id"] == cid)]
    done = tr[(tr["status"] == "TERMINATED") & tr["best_val_macro_f1"].notna()]
    if len(tr):
        hp = {h: tr[h].iloc[0] for h in HYPERPARAMETERS}
    else:
        hp = {h: exp.paper_defaults.get(h, np.nan) for h in HYPERPARAMETERS}
    preds = exp.predictions
    sel = preds[arm_mask(preds, arm) & (preds["config_id"] == cid)]
    # One trial per fold: the experiment whose trials were ranked (the search's own where it has them).
    experiments = set(tr["experiment"]) or set(sel["experiment"])
    sel = sel[sel["experiment"].isin(sorted(experiments)[:1])]
    # The main tables' rule (overall_metrics): a class absent from a fold and never predicted there is left out of
    # that fold's macro F1, not counted as 0, so the defaults' row here equals theirs for the same trials.
    fold_scores = [overall_metrics(g["label"], g["pred"], exp.classes) for _, g in sel.groupby("fold", sort=True)]
    fold_f1 = [score["macro_f1"] for score in fold_scores]
    fold_acc = [score["accuracy"] for score in fold_scores]
    pooled = overall_metrics(sel["label"], sel["pred"], exp.classes)["macro_f1"] if len(sel) else np.nan
    std = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else np.nan  # noqa: E731
    failed = failed_folds(search, arm, cid)
    return {"model": arm[0], "pretrained": arm[1], "role": role, "config_id": cid, **hp,
            "failed_folds": ";".join(map(str, failed)),
            "inner_val_macro_f1_mean": float(done["best_val_macro_f1"].mean()) if len(done) else np.nan,
            "inner_val_macro_f1_std": std(done["best_val_macro_f1"].to_numpy()),
            "inner_folds": int(done["fold"].nunique()), "test_folds": len(fold_f1),
            "test_macro_f1_mean": float(np.mean(fold_f1)) if fold_f1 else np.nan, "test_macro_f1_std": std(fold_f1),
            "test_macro_f1_pooled": float(pooled),
            "test_accuracy_mean": float(np.mean(fold_acc)) if fold_acc else np.nan,
            "test_accuracy_pooled": float(accuracy_score(sel["label"], sel["pred"])) if len(sel) else np.nan}


BIASED = " (biased)"


def best_configs_display(best: pd.DataFrame, paper_defaults: dict, default_label: str = "paper defaults") -> pd.DataFrame:
    """The pre-nested choice beside the defaults; the chosen configuration's test cells say they are biased.

    The defaults were fixed before the search, so their test scores carry no selection bias and are left plain.
    """
    rows = []
    for r in best.to_dict("records"):
        chosen = r["role"] == "best"
        mark_ = BIASED if chosen else ""
        row = {**arm_cells(r["model"], r["pretrained"]),
               "Config": ("chosen by mean over folds" if chosen else default_label) + f" `{r['config_id']}`",
               **hp_cells(r, paper_defaults, show_default=chosen)}
        failed = _failed_note(r.get("failed_folds"))
        inner, test = (fmt_pm(r["inner_val_macro_f1_mean"], r["inner_val_macro_f1_std"]),
                       fmt_pm(r["test_macro_f1_mean"], r["test_macro_f1_std"]))
        row["Inner-val macro F1"] = f"{inner} ({r['inner_folds']} folds{failed})"
        row["Test macro F1"] = f"{test} ({r['test_folds']} folds{failed}){mark_}"
        row["Test macro F1 pooled"] = fmt(r["test_macro_f1_pooled"]) + mark_
        row["Test accuracy (fold mean)"] = fmt(r["test_accuracy_mean"]) + mark_
        rows.append(row)
    return pd.DataFrame(rows)


def _failed_note(failed_folds) -> str:
    """'; fold 1 failed' for a best_configs row whose mean leaves out failed folds ('' when none)."""
    text = "" if failed_folds is None or (isinstance(failed_folds, float) and np.isnan(failed_folds)) else str(failed_folds)
    folds = [f for f in text.replace(".0", "").split(";") if f]
    return f"; fold{'s' if len(folds) > 1 else ''} {', '.join(folds)} failed" if folds else ""


def hp_cells(record: dict, paper_defaults: dict, show_default: bool) -> dict[str, str]:
    """One cell per hyperparameter; with `show_default`, a value that differs from the default names it in brackets."""
    cells = {}
    for h in HYPERPARAMETERS:
        text = fmt_hp(record[h])
        default = paper_defaults.get(h)
        if show_default and default is not None and text != fmt_hp(default):
            text = f"{text} (default {fmt_hp(default)})"
        cells[h] = text
    return cells


def fmt_hp(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return "?"
    if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool):
        return f"{float(value):.4g}"
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)
