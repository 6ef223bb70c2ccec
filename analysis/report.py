"""Build OUT/report/: report.md, self-contained report.html, tables/*.csv, figures/*.png.

Every file is written atomically and its content depends only on the inputs (no timestamps, no
absolute paths of OUT, sorted orders, seeded resampling), so re-running gives the same bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import binary as bn
from analysis import calibration as cal
from analysis import confound_report as cr
from analysis import figures as figs
from analysis.document import Document
from datasets.atomic import write_text_atomic
from analysis.load import Experiment, check_one_trial_per_fold, load_experiment
from analysis.metrics import arm_metrics, confusion_counts, roc_per_class
from analysis.names import Arm, arm_frames, arm_label, arm_mask, display_name, display_names_note
from analysis.paper import PAPER_CITATION, is_paper_task
from analysis.partial import STATUS_MEANING, PartialResults, partial_results
from analysis.stats import POWER_CAVEAT, bootstrap_f1_ci, pairwise_tests
from analysis import search_report as sr
from analysis import tables as tb
from analysis import training_check as tc

SPLIT_TEXT = {
    "kfold": "k-fold cross-validation: each subject is tested exactly once (train:test = {k1}:1)",
    "shuffle": "{k} independent random 70:30 train/test splits (a subject may be tested in several splits)",
}


class _Writer:
    """Writes report files and remembers them, so files of an earlier run that this run did not
    produce (e.g. an arm that no longer exists) can be removed instead of lingering as stale results."""

    def __init__(self, report_dir: Path):
        self.report_dir = report_dir
        self.tables_dir = report_dir / "tables"
        self.figures_dir = report_dir / "figures"
        self.written: set[Path] = set()

    def csv(self, name: str, frame: pd.DataFrame) -> Path:
        path = self.tables_dir / name
        write_text_atomic(path, frame.to_csv(index=False, lineterminator="\n"))
        self.written.add(path)
        return path

    def figure(self, path: Path | None) -> Path | None:
        if path is not None:
            self.written.add(path)
        return path

    def prune(self) -> None:
        for folder, pattern in ((self.tables_dir, "*.csv"), (self.figures_dir, "*.png")):
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(pattern)):
                if path not in self.written:
                    path.unlink()
            for tmp in sorted(folder.glob(".*.tmp")):  # left by a run that was killed mid-write
                tmp.unlink()


def build_report(out_dir: str | Path, bootstrap_samples: int = 2000, seed: int = 0) -> Path:
    """Read the experiment directory and write OUT/report/; returns the report directory.

    `seed` seeds the subject bootstrap and the fANOVA importance evaluator.
    """
    if int(bootstrap_samples) < 1:
        raise ValueError(f"bootstrap_samples must be at least 1, got {bootstrap_samples}")
    out_dir = Path(out_dir)
    exp = load_experiment(out_dir)
    report_dir = out_dir / "report"
    w = _Writer(report_dir)
    w.tables_dir.mkdir(parents=True, exist_ok=True)
    w.figures_dir.mkdir(parents=True, exist_ok=True)
    classes = exp.classes

    main_preds = exp.select_main(exp.predictions)
    check_one_trial_per_fold(main_preds, out_dir / "predictions.csv")
    main_trials = exp.select_main(exp.trials)
    main_epochs = exp.select_main(exp.epochs)
    arms = exp.main_arms()
    partial = partial_results(exp, main_preds, arms)
    metrics = arm_metrics(main_preds, classes, arms)
    confusion = confusion_counts(main_preds, classes, arms)
    auc, curves, roc_notes = roc_per_class(main_preds, classes, arms)
    tests = pairwise_tests(metrics.per_fold_overall, main_trials, arms)
    boot = _bootstrap(main_preds, classes, arms, bootstrap_samples, seed)
    result_arms = [a for a in arms if arm_mask(metrics.per_fold_overall, a).any()]
    confounds = cr.analyse_confounds(exp, main_preds, result_arms, bootstrap_samples, seed)
    partial.extra_folds.update(cr.baseline_folds(confounds, exp.n_folds))
    binary = bn.is_binary(classes)
    if binary:
        thresholds = bn.fold_thresholds(main_preds, exp.select_main(exp.val_predictions), classes)
        bin_summary = bn.binary_summary(main_preds, classes, result_arms, bootstrap_samples, seed, thresholds)
        bin_report = bn.classification_report_table(main_preds, classes, result_arms, thresholds)
    calibration = cal.calibration_table(main_preds, classes, result_arms)
    comp = tb.paper_comparison(metrics, arms, classes, partial, confounds.baseline_metrics, confounds.baseline_arms)
    learn_folds = tc.fold_learning(main_epochs, main_preds, result_arms)
    learn_arms = tc.arm_learning(learn_folds, boot, result_arms, len(classes))

    # ---------------------------------------------------------------- tables
    w.csv("per_class.csv", metrics.per_class)
    w.csv("overall.csv", metrics.overall)
    w.csv("per_fold_class.csv", metrics.per_fold_class)
    w.csv("per_fold_overall.csv", metrics.per_fold_overall)
    w.csv("paper_comparison.csv", comp)
    w.csv("arms.csv", partial.arm_folds.assign(display_name=partial.arm_folds["model"].map(display_name)))
    w.csv("confusion.csv", confusion)
    w.csv("roc_auc.csv", auc)
    w.csv("pairwise_tests.csv", tests)
    w.csv("bootstrap_ci.csv", boot)
    w.csv("failed_trials.csv", partial.failed)
    w.csv("missing_trials.csv", partial.missing)
    cr.write_tables(w.csv, exp, confounds)
    if binary:
        w.csv("binary_auc.csv", bin_summary)
        w.csv("thresholds.csv", thresholds)
        w.csv("classification_report.csv", bin_report)
    w.csv("calibration.csv", calibration)
    w.csv("training_check.csv", learn_folds)
    w.csv("training_check_arms.csv", learn_arms)

    # ---------------------------------------------------------------- figures
    fig_dir = w.figures_dir
    # The comparison table already holds each arm's published macro F1 (NaN when not comparable).
    paper_macro = comp[comp["metric"] == "macro_f1"].set_index(["model", "pretrained"])["paper_mean"]
    fig_macro = w.figure(figs.macro_f1_figure(metrics, arms, fig_dir / "macro_f1_by_arm.png",
                                              lambda arm: float(paper_macro.get(arm, float("nan")))))
    fig_conf = {a: w.figure(figs.confusion_figure(confusion, a, classes, fig_dir / figs.figure_name("confusion", a),
                                                  partial.folds_label(a).split(" ")[0])) for a in result_arms}
    fig_heat = w.figure(figs.heatmap_figure(metrics, arms, classes, fig_dir / "heatmap_classwise.png"))
    fig_roc = {a: w.figure(figs.roc_figure(curves, a, classes, fig_dir / figs.figure_name("roc", a))) for a in result_arms}
    fig_pr = (w.figure(figs.precision_recall_figure(bn.pr_curves(main_preds, classes, result_arms), result_arms,
                                                    bn.positive_class(classes), fig_dir / "precision_recall.png"))
              if binary else None)
    fig_rel = w.figure(figs.reliability_figure(cal.reliability_curves(main_preds, classes, result_arms), result_arms,
                                               fig_dir / "reliability.png"))
    fig_learn = {}
    if main_epochs is not None:
        fig_learn = {a: w.figure(figs.learning_curve_figure(main_epochs, a, fig_dir / figs.figure_name("learning", a)))
                     for a in arms}

    # ---------------------------------------------------------------- search
    is_search = (exp.experiment in ("search", "demo") or sr.is_nested(exp) or bool(exp.optuna_studies)
                 or (exp.trials is not None and (exp.trials["experiment"] == "search").any()))
    search = sr.analyse_search(exp, w, out_dir, seed) if is_search else None

    # ---------------------------------------------------------------- document
    doc = Document(f"Brain tumour classification: {exp.experiment} experiment")
    cr.warnings_section(doc, synthetic_data_warning(exp) + tc.warnings(learn_arms) + cr.warnings(confounds, classes))
    _what_ran(doc, exp, arms, partial, main_preds, cr.what_ran_items(exp, confounds))
    cr.data_section(doc, exp, confounds)
    _main_tables(doc, exp, comp, metrics, arms, partial, fig_macro, report_dir, confounds)
    tc.section(doc, learn_folds, learn_arms, bootstrap_samples)
    cr.shortcut_section(doc, confounds, classes, bootstrap_samples, seed)
    cr.per_site_section(doc, confounds, classes)
    _statistics(doc, tests, boot, result_arms, classes, bootstrap_samples, seed, exp.n_folds, partial)
    if binary:
        _binary_section(doc, bin_summary, bin_report, result_arms, classes, fig_pr, report_dir, bootstrap_samples, seed)
    _calibration_section(doc, calibration, fig_rel, report_dir)
    _figures(doc, exp, result_arms, arms, auc, roc_notes, fig_conf, fig_heat, fig_roc, fig_learn, report_dir, classes,
             partial)
    if search is not None:
        sr.search_section(doc, exp, search, report_dir)
    _partial(doc, exp, partial)
    _file_list(doc, w, report_dir)
    doc.heading("Appendix: per-fold metrics", 2)
    doc.para("Each fold's test predictions, per class; support = test subjects of that class in the fold.")
    doc.table(tb.per_fold_display(metrics), empty="No paper-protocol predictions.")

    write_text_atomic(report_dir / "report.md", doc.to_markdown())
    write_text_atomic(report_dir / "report.html", doc.to_html())
    w.prune()
    return report_dir


def _bootstrap(preds: pd.DataFrame, classes: list[str], arms: list[Arm], n: int, seed: int) -> pd.DataFrame:
    frames = []
    for arm, sel in arm_frames(preds, arms):
        ci = bootstrap_f1_ci(sel, classes, n_resamples=n, seed=seed)
        ci.insert(0, "pretrained", arm[1])
        ci.insert(0, "model", arm[0])
        ci["n_subjects"] = sel["subject_id"].nunique()
        ci["n_resamples"] = n
        ci["seed"] = seed
        frames.append(ci)
    columns = ["model", "pretrained", "metric", "class", "pooled", "low", "high", "n_subjects", "n_resamples",
               "n_undefined_resamples", "seed"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _rel(path: Path, report_dir: Path) -> str:
    return path.relative_to(report_dir).as_posix()


# ==================================================================== sections
def _span(values: pd.Series) -> str:
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}-{high}"


def _training_item(exp: Experiment, main_preds: pd.DataFrame) -> str | None:
    """How the main tables' test predictions were made: epochs, part sizes and the epoch chosen (trials.csv)."""
    columns = {"trial_name", "epochs_run", "best_epoch", "n_train", "n_val", "n_test"}
    if exp.trials is None or not columns <= set(exp.trials.columns) or main_preds.empty:
        return None
    used = exp.trials[exp.trials["trial_name"].isin(set(main_preds["trial_name"]))].dropna(subset=sorted(columns - {"trial_name"}))
    if used.empty:
        return None
    return (f"Training and selection ({len(used)} trial(s) behind the main tables, from trials.csv): each trained "
            f"{_span(used['epochs_run'])} epoch(s) on its fold's training part ({_span(used['n_train'])} subjects), "
            f"kept the weights of the epoch with the best macro F1 on the fold's inner validation part "
            f"({_span(used['n_val'])} subjects; epochs chosen: {_span(used['best_epoch'])}), and scored its test part "
            f"({_span(used['n_test'])} subjects) once, with those weights. {_loss_text(used)}")


# trials.csv's ``loss`` (trainables.metrics.LOSS_PER_SAMPLE / LOSS_PER_BATCH; analysis does not import trainables).
LOSS_TEXT = {
    "class_weighted_per_sample": "the class weights W_c = 1 − n_c/N of the fold's training part weigh each sample's "
                                 "cross-entropy (a batch's loss is the mean of w·nll over its samples, divided by the "
                                 "training part's mean weight)",
    "class_weighted_per_batch": "torch's per-batch weighted mean of the cross-entropy with the class weights "
                                "W_c = 1 − n_c/N, under which a batch of one sample ignores its weight (folds finished "
                                "before the weights acted per sample)",
}


SYNTHETIC_TEXT = ("**Synthetic data**: this is the demo. Its subjects are phantoms generated by {generator}, not "
                  "scans of anyone. Where a *Published* column appears, it is the paper's result on real data at "
                  "2 mm, shown only to show the layout: the *Difference* compares unlike things.")
SYNTHETIC_GENERATORS = {
    "tumour": "`datasets.synthetic` (BraTS/IXI-shaped volumes with drawn lesions; their sources, sites and scanners "
              "are simulated too)",
    "mgmt": "`datasets.synthetic_rsna` (RSNA-MICCAI-shaped DICOM series; the MGMT label is simulated too)",
}


def synthetic_data_warning(exp: Experiment) -> list[str]:
    """The demo always trains on generated phantoms (tune_main.ensure_demo_data): say so before any number."""
    if exp.experiment != "demo":
        return []
    task = str(exp.meta.get("demo_task") or "tumour")
    return [SYNTHETIC_TEXT.format(generator=SYNTHETIC_GENERATORS.get(task, f"the `{task}` demo's generator"))]


def _loss_text(used: pd.DataFrame) -> str:
    """How the class weights entered the trials' loss (trials.csv ``loss``; runs collected before it lack it)."""
    older = "class_weighted_per_batch"
    kinds = (used["loss"].replace("", np.nan).fillna(older) if "loss" in used
             else pd.Series(older, index=used.index)).value_counts().sort_index()
    if len(kinds) == 1:
        return f"Loss: {LOSS_TEXT.get(kinds.index[0], kinds.index[0])}."
    return "Loss: " + "; ".join(f"{LOSS_TEXT.get(kind, kind)} ({n} trial(s))" for kind, n in kinds.items()) + "."


def _what_ran(doc: Document, exp: Experiment, arms: list[Arm], partial: PartialResults, main_preds: pd.DataFrame,
              data_items: list[str]) -> None:
    doc.heading("What ran", 2)
    split = str(exp.meta.get("split", "unknown"))
    split_text = SPLIT_TEXT.get(split, "split scheme {split!r} (not described by this report)").format(
        k=exp.n_folds, k1=max(exp.n_folds - 1, 1), split=split)
    column, value, description = exp.main_selection()
    items = [
        f"Experiment: `{exp.experiment}`" + (" (synthetic phantoms, see *Warnings*)." if exp.experiment == "demo" else "."),
        f"Split: `{split}`: {split_text}; {exp.n_folds} fold(s); seed {exp.meta.get('seed', 'not recorded')}.",
        "Classes (order of the prob_ columns): " + ", ".join(f"`{c}`" for c in exp.classes) + ".",
        "Arms (model, pre-training) with folds present/planned: " + "; ".join(
            f"{arm_label(*a)}: {partial.folds_label(a)}" for a in arms) + ".",
        f"Main (paper-protocol) tables use {description}: {len(main_preds)} test predictions.",
        f"predictions.csv: {len(exp.predictions)} rows from {exp.predictions['trial_name'].nunique()} trial(s).",
    ]
    training = _training_item(exp, main_preds)
    if training:
        items.append(training)
    items += data_items
    search_item = sr.what_ran_item(exp)
    if search_item:
        items.append(search_item)
    if exp.trials is not None:
        counts = exp.trials["status"].value_counts().sort_index()
        items.append("trials.csv statuses: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    if len(partial.failed):
        items.append(f"**{len(partial.failed)} trial(s) failed** (ERROR or FAILED; see *Failed trials* for each "
                     "error): no mean over folds includes them, and each table that lacks one of their folds names it.")
    if exp.paper_defaults:
        items.append(f"Grid hyperparameters ({exp.default_label}): " + ", ".join(
            f"{k}={tb.fmt_hp(v)}" for k, v in sorted(exp.paper_defaults.items())) + ".")
    deviations = exp.meta.get("deviations")
    if deviations:
        items.append("Deviations from the paper's recipe: " + "; ".join(
            f"`{d['option']}` {tb.fmt_hp(d['used'])} (paper {tb.fmt_hp(d['paper'])}): {d['reason']}" for d in deviations)
            + ".")
    elif deviations is not None:
        items.append("Training recipe: exactly the paper's (no deviations).")
    items.append(f"Published values: {PAPER_CITATION}.")
    doc.bullets(items)
    notes = list(exp.notes)
    if display_names_note():
        notes.append(display_names_note())
    if notes:
        doc.para("Input notes:")
        doc.bullets(notes)


def _main_tables(doc, exp, comp, metrics, arms, partial, fig_macro, report_dir, confounds) -> None:
    doc.heading("Main results (paper protocol)", 2)
    doc.para("Cells are **mean ± sample standard deviation (ddof = 1) over test folds**, as in the paper (a class "
             "with no test subject in a fold, and none predicted there, is undefined in that fold and left out of "
             "its means, not counted as 0); "
             "*pooled* is the same metric on all out-of-fold predictions of the arm concatenated (less biased for "
             "the minority class than the fold mean). *Published* is the paper's value, *Difference* = our fold "
             f"mean − published. **Bold** with {tb.STAR} marks the best arm of a column (ours by fold mean; in the "
             "published column the best published value among the arms shown, not necessarily the paper's best). *Folds* shows folds present / planned; an arm with fewer folds "
             "than planned is marked with the missing fold numbers. Arms without any result show *no results*.")
    if not is_paper_task(exp.classes):
        doc.para(f"This run's classes ({', '.join(exp.classes)}) are not the paper's three (LGG, HGG, Healthy), so no "
                 "published value is shown: the paper's numbers answer another question.")
    if confounds.baseline_arms:
        doc.para("Rows in *italics* marked *baseline* are the scikit-learn baselines (see *Data, cohort and "
                 "confounds*), computed from baseline_predictions.csv on the same outer folds with the same metric "
                 f"code: they are not paper arms, have no published value and never take the {tb.STAR}.")
    else:
        doc.para(f"No baseline rows: {confounds.baseline_note}.")
    arms = [*arms, *confounds.baseline_arms]
    for cls in exp.classes:
        table = comp[(comp["metric"] == "f1") & (comp["class"] == cls)]["table"].dropna()
        ref = f" (paper Table {int(table.iloc[0])})" if len(table) else " (not in the paper)"
        doc.heading(f"F1 of class {cls}{ref}", 3)
        doc.table(tb.class_f1_display(comp, cls, arms, partial), empty="No arms.")
    doc.heading("Macro and weighted F1 (paper Table 5)", 3)
    doc.table(tb.overall_display(comp, [("macro_f1", "Macro F1"), ("weighted_f1", "Weighted F1")], arms, partial),
              empty="No arms.")
    doc.heading("Accuracy and specificity", 3)
    doc.para("The paper gives accuracy (96.98 %) and specificity (0.9684) only for its best arm (pre-trained ResNet "
             "Mixed Convolution) and does not say how it averaged specificity over classes; ours is the unweighted "
             "mean over classes of one-vs-rest specificity.")
    doc.table(tb.overall_display(comp, [("accuracy", "Accuracy"), ("macro_specificity", "Mean specificity")], arms,
                                 partial), empty="No arms.")
    doc.heading("Precision, recall, specificity, F1 and support per class", 3)
    doc.table(tb.per_class_display(metrics, arms, exp.classes, partial), empty="No paper-protocol predictions.")
    if fig_macro is not None:
        doc.image(fig_macro, _rel(fig_macro, report_dir), "Macro F1 per arm: fold values (dots), fold mean (bar), "
                                                          "published value (red cross).")


def _statistics(doc, tests, boot, result_arms, classes, n_boot, seed, n_folds, partial) -> None:
    doc.heading("How much of a difference is real", 2)
    doc.heading("Pairwise comparison of arms on macro F1", 3)
    J = int(tests["folds"].max()) if len(tests) else n_folds
    doc.para("Nadeau-Bengio corrected resampled t-test on the paired per-fold differences d of macro F1: "
             "t = mean(d) / sqrt(var(d, ddof = 1) × (1/J + n_test/n_train)), df = J − 1, two-sided p; n_test/n_train "
             "is the mean over the pair's trials in trials.csv, with n_train the subjects each model was fitted on "
             "(the fold's training part less its inner validation part, which only chose the epoch). p-values are Holm-corrected over all pairs "
             f"(family-wise error); **bold** {tb.SIGNIFICANT} marks Holm p < 0.05 (the {tb.STAR} of the result tables "
             "marks a column's best fold mean and involves no test). A positive difference favours arm A.")
    doc.para("**Caveat:** " + POWER_CAVEAT.format(J=J, df=max(J - 1, 0)))
    zero_var = tests[tests["note"].str.contains("zero variance|identical scores", regex=True)] if len(tests) else tests
    if len(zero_var):
        doc.para("Where the difference is identical on every fold the sample variance is zero: t is reported as "
                 f"±inf, but p is left undefined and the pair is not tested (nor counted in Holm's correction), since "
                 f"an identical difference on {J} folds says more about having {J} folds than about certainty.")
    doc.table(tb.pairwise_display(tests), empty="Fewer than two arms have results: no comparison.")
    doc.heading("Bootstrap 95% confidence intervals", 3)
    doc.para(f"Subject-level percentile bootstrap ({n_boot} resamples, seed {seed}) on each arm's pooled out-of-fold "
             "predictions: subjects are drawn with replacement and the metric recomputed; cells are "
             "pooled value [2.5 %, 97.5 %] over the arm's *Subjects* (its test subjects in the *Folds* it has). A draw "
             "with no subject of a class, and no prediction of it, cannot measure that class: it is left out of that "
             "class's interval and of the draw's macro mean, as the main tables leave such a class out of a fold "
             "(counted per arm and class in tables/bootstrap_ci.csv, n_undefined_resamples). The intervals reflect "
             "test-set sampling only, not training variability.")
    doc.table(tb.bootstrap_display(boot, result_arms, classes, partial), empty="No paper-protocol predictions.")


DATA_LINE = "Data: each arm's pooled outer-test (out-of-fold) predictions."
POOLED_AUC_CAVEAT = ("A pooled AUC ranks together the probabilities of the folds' separately trained models: a "
                     "fold whose scores sit on another scale than the others' can pull it below every fold's own "
                     "AUC, which the per-fold numbers do not mix.")


def _binary_section(doc, summary, report, result_arms, classes, fig_pr, report_dir, n_boot, seed) -> None:
    positive = bn.positive_class(classes)
    doc.heading("Two-class results", 2)
    doc.para(f"Positive class: `{positive}` (the second class in the run's class order "
             + ", ".join(f"`{c}`" for c in classes) + f"); its score is prob_{positive}, predicted {positive} when "
             f"prob_{positive} > the threshold. Two thresholds are reported side by side: 0.5, the argmax prediction "
             "that papers report, and the validation-chosen threshold: each fold's own threshold, chosen by Youden's "
             "J (sensitivity + specificity - 1, from scikit-learn roc_curve) on that fold's inner validation part "
             "and applied to that fold's test subjects only, then pooled, so no test subject influences the "
             "threshold applied to it. Among equally good cuts the one closest to 0.5 is taken. The validation "
             "scores come from the weights selected on that same part, so they are optimistic there: a threshold "
             "placed on them need not hold on test. A fold whose validation part holds one class, where no cut "
             "beats chance, or that saved no validation predictions (runs made before they were saved) uses 0.5; "
             "the arm's line below says which. Each fold's threshold: `tables/thresholds.csv`.")
    doc.bullets([f"{arm_label(r.model, r.pretrained)}: {r.threshold_source}." for r in summary.itertuples(index=False)])
    doc.heading("ROC AUC, average precision, sensitivity and specificity", 3)
    doc.para(f"{DATA_LINE} Bootstrap: {n_boot} resamples of subjects (with replacement, a subject's rows together), "
             f"seed {seed}; percentile 95% CI of the ROC AUC (scikit-learn roc_auc_score). Resamples with a single "
             "label value have no AUC and are left out (counted in tables/binary_auc.csv). Average precision is "
             "scikit-learn's average_precision_score. " + POOLED_AUC_CAVEAT)
    rows = []
    for r in summary.itertuples(index=False):
        rows.append({**tb.arm_cells(r.model, r.pretrained),
                     "Subjects": r.n_subjects, "ROC AUC [95% CI]": f"{tb.fmt(r.auc) or 'n/a'} "
                     f"[{tb.fmt(r.auc_low) or 'n/a'}, {tb.fmt(r.auc_high) or 'n/a'}]",
                     "Average precision": tb.fmt(r.average_precision) or "n/a",
                     "Sensitivity (0.5)": tb.fmt(r.sensitivity_argmax) or "n/a",
                     "Specificity (0.5)": tb.fmt(r.specificity_argmax) or "n/a",
                     "Sensitivity (validation threshold)": tb.fmt(r.sensitivity) or "n/a",
                     "Specificity (validation threshold)": tb.fmt(r.specificity) or "n/a"})
    doc.table(pd.DataFrame(rows), empty="No paper-protocol predictions.")
    if fig_pr is not None:
        doc.image(fig_pr, _rel(fig_pr, report_dir),
                  f"Precision-recall curves of {positive} (scikit-learn precision_recall_curve), AP in the legend; "
                  f"dotted: prevalence of {positive}. {DATA_LINE}")
    doc.heading("Classification report", 3)
    doc.para("scikit-learn classification_report per arm, at 0.5 and at the validation-chosen thresholds (each "
             "fold its own): precision, recall, F1 and support (test predictions: one per subject and fold that tested it) per class, accuracy (in the F1 column, as "
             f"scikit-learn prints it), macro and weighted averages (zero_division = 0). {DATA_LINE}")
    display = pd.DataFrame({
        "Model": report["model"].map(display_name), "Pre-trained": report["pretrained"].map({True: "yes", False: "no"}),
        "Threshold": report["threshold_rule"].map({bn.ARGMAX_RULE: "0.5", bn.VALIDATION_RULE: "validation (per fold)"}),
        "Row": report["row"], "Precision": report["precision"].map(tb.fmt), "Recall": report["recall"].map(tb.fmt),
        "F1": report["f1"].map(tb.fmt), "Support": report["support"]})
    doc.table(display, empty="No paper-protocol predictions.")


def _calibration_section(doc, calibration, fig_rel, report_dir) -> None:
    doc.heading("Calibration", 2)
    doc.para(f"{DATA_LINE} {cal.BRIER_DEFINITION}. {cal.ECE_DEFINITION}. Lower is better for both.")
    doc.table(pd.DataFrame({"Model": calibration["model"].map(display_name),
                            "Pre-trained": calibration["pretrained"].map({True: "yes", False: "no"}),
                            "Predictions": calibration["n_predictions"], "Brier": calibration["brier"].map(tb.fmt),
                            "ECE (10 bins)": calibration["ece"].map(tb.fmt)}),
              empty="No paper-protocol predictions.")
    if fig_rel is not None:
        doc.image(fig_rel, _rel(fig_rel, report_dir),
                  "Reliability diagram: accuracy against mean top-class confidence in each non-empty bin of 10 "
                  f"equal-width bins (scikit-learn calibration_curve); the dashed diagonal is perfect calibration. "
                  f"{DATA_LINE}")


def _figures(doc, exp, result_arms, arms, auc, roc_notes, fig_conf, fig_heat, fig_roc, fig_learn, report_dir,
             classes, partial) -> None:
    doc.heading("Figures", 2)
    doc.heading("Confusion matrices (paper Figs 4-6)", 3)
    if not fig_conf:
        doc.para("No paper-protocol predictions.")
    counted = ("each subject once, in the fold that held it out" if exp.meta.get("split") == "kfold" else
               "a subject once per split that tested it: random splits may test it several times or never")
    for arm in result_arms:
        doc.image(fig_conf[arm], _rel(fig_conf[arm], report_dir),
                  f"Confusion matrix, {arm_label(*arm)}: the paper-protocol test predictions of every outer fold "
                  f"({counted}), counts summed over folds and row-normalised.")
    doc.heading("Class-wise heat-maps (paper Fig 7)", 3)
    if fig_heat is None:
        doc.para("No paper-protocol predictions.")
    else:
        doc.image(fig_heat, _rel(fig_heat, report_dir),
                  "Precision, recall, specificity and F1 per class and arm: means over the outer test folds "
                  "(paper-protocol predictions); the colour scale spans the values shown.")
    doc.heading("ROC curves (one-vs-rest)", 3)
    doc.para("AUC from the prob_ columns: pooled over folds, and mean ± std of the per-fold AUCs. " + POOLED_AUC_CAVEAT)
    subjects = {arm: int(sel["subject_id"].nunique()) for arm, sel in arm_frames(exp.select_main(exp.predictions),
                                                                                    result_arms)}
    doc.table(tb.auc_display(auc, result_arms, classes, partial, subjects), empty="No paper-protocol predictions.")
    if roc_notes:
        doc.bullets(sorted(set(roc_notes)))
    for arm in result_arms:
        if fig_roc.get(arm) is not None:
            doc.image(fig_roc[arm], _rel(fig_roc[arm], report_dir),
                      f"ROC curves, {arm_label(*arm)}: one-vs-rest per class, on the outer test predictions "
                      "pooled over folds.")
    doc.heading("Learning curves", 3)
    if exp.epochs is None:
        doc.para("epochs.csv is missing: no learning curves.")
    drawn = False
    for arm in arms:
        path = fig_learn.get(arm)
        if path is not None:
            drawn = True
            doc.image(path, _rel(path, report_dir), f"Learning curves, {arm_label(*arm)}: training loss on the fold's (augmented) training part, "
                      "validation loss and macro F1 on its inner validation part (never the test part), per "
                      "epoch; mean ± 1 sample std (ddof = 1) over the folds that reached that epoch (a fold "
                      "stopped early drops out; dotted lines and the title say where). Each fold's test part was "
                      "scored once, "
                      "with the weights of its epoch of best validation macro F1.")
    missing = [arm_label(*a) for a in arms if fig_learn.get(a) is None]
    if exp.epochs is not None and missing:
        doc.para("No epoch rows for: " + "; ".join(missing) + ".")
    if exp.epochs is not None and not drawn and not missing:
        doc.para("No arms.")


def _partial(doc, exp, partial: PartialResults) -> None:
    doc.heading("Partial results", 2)
    doc.para("Nothing is zero-filled: a failed or missing trial contributes no row, and is listed here by name.")
    doc.heading("Failed trials", 3)
    failed = partial.failed
    if len(failed):
        doc.para("*ERROR*: the trial crashed and Tune's retries (`--max-failures`, each from the trial's last "
                 "checkpoint) did not get past it. *FAILED*: a permanent error (a missing or unreadable input, a bad "
                 "value, a full disk) that a retry would meet again, so it was not retried. Neither contributes "
                 "results: every mean over folds that lacks one of them says which fold failed. After fixing the "
                 "cause, rerun the same command: both kinds run again, from their last checkpoint.")
    doc.table(pd.DataFrame({"Trial": failed["trial_name"], "Model": failed["model"].map(display_name),
                            "Pre-trained": failed["pretrained"].map({True: "yes", False: "no"}),
                            "Fold": failed["fold"].map(_fold_text), "Config": failed["config_id"],
                            "Status": failed["status"].map(lambda s: f"{s} ({STATUS_MEANING.get(s, '')})"),
                            "Error": failed["error"]}),
              empty="None." if exp.trials is not None else "Unknown: trials.csv is missing.")
    doc.heading("Missing trials", 3)
    missing = partial.missing
    doc.table(pd.DataFrame({"Trial": missing["trial_name"], "Model": missing["model"].map(
        lambda m: display_name(m) if isinstance(m, str) else ""),
        "Fold": missing["fold"].map(_fold_text), "Reason": missing["reason"]}), empty="None.")
    doc.heading("Arms with fewer folds than planned", 3)
    short = [f"{arm_label(r.model, r.pretrained)}: {r.folds_present}/{r.folds_planned} folds"
             + (f" (missing folds: {r.missing_folds}" + (f"; failed: {r.failed_folds}" if r.failed_folds else "") + ")"
                if r.missing_folds else "")
             for r in partial.arm_folds.itertuples(index=False) if r.folds_present < r.folds_planned]
    if short:
        doc.bullets(short)
    else:
        doc.para(f"None: every arm has all {exp.n_folds} folds.")
    if partial.notes:
        doc.bullets(partial.notes)


def _fold_text(fold) -> str:
    try:
        return "" if fold is None or np.isnan(float(fold)) else str(int(fold))
    except (TypeError, ValueError):
        return str(fold)


def _file_list(doc, w: _Writer, report_dir: Path) -> None:
    doc.heading("Files", 2)
    doc.para("Tables (CSV) and figures (PNG) of this report, relative to the report folder:")
    doc.bullets([f"`{_rel(p, report_dir)}`" for p in sorted(w.written)])
