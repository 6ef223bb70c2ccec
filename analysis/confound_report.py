"""The report's confound sections: Warnings, Data/cohort/confounds, Shortcut check, Per-site results.

Computed once by `analyse_confounds`, then written as tables and rendered as sections. Every input
is optional; what cannot be shown is said in a sentence, in the section and in one list, so a
reader of an old run's report knows what was not checked rather than assuming it was fine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from analysis import confounds as cf
from analysis import shortcut as sc
from analysis.document import Document
from analysis.load import Experiment, check_one_trial_per_fold
from analysis.metrics import ArmMetrics, arm_metrics
from analysis.names import Arm, baseline_sort_key, display_name

ACQUISITION = "acquisition_baseline"
HISTOGRAM = "histogram_baseline"
SITE_COLUMNS = ["level", "source", "site"]


@dataclass
class ConfoundResults:
    options: cf.DataOptions
    cohort: cf.Cohort
    stripping: pd.DataFrame | None
    stripping_source: str
    sites: pd.DataFrame | None          # None: no site recorded anywhere
    sites_source: str
    baseline_preds: pd.DataFrame | None
    baseline_arms: list[Arm]
    baseline_metrics: ArmMetrics | None
    baseline_note: str                  # why there are no baselines ("" when there are)
    shortcut: pd.DataFrame
    per_site: pd.DataFrame
    per_site_note: str                  # how the sites were found, or why there are none
    unavailable: list[str] = field(default_factory=list)  # sections that cannot be shown, in words


def analyse_confounds(exp: Experiment, main_preds: pd.DataFrame, result_arms: list[Arm], n_resamples: int,
                      seed: int) -> ConfoundResults:
    """Everything the confound sections show, from the optional inputs that exist."""
    classes = exp.classes
    strip, strip_source = cf.stripping_table(exp)
    origins, origin_source = cf.subject_origins(exp)
    base_preds, base_arms, base_note = _baselines(exp)
    base_metrics = arm_metrics(base_preds, classes, base_arms) if base_arms else None
    check = (sc.shortcut_check(main_preds, base_preds, result_arms, base_arms, classes, n_resamples, seed)
             if base_arms else pd.DataFrame(columns=sc.SHORTCUT_COLUMNS))
    site_table, site_note = _per_site(exp, main_preds, result_arms, base_preds, base_arms)
    res = ConfoundResults(
        options=cf.data_options(exp.meta), cohort=cf.cohort_table(exp), stripping=strip, stripping_source=strip_source,
        sites=cf.sites_table(origins, classes) if origins is not None else None, sites_source=origin_source,
        baseline_preds=base_preds, baseline_arms=base_arms, baseline_metrics=base_metrics, baseline_note=base_note,
        shortcut=check, per_site=site_table, per_site_note=site_note)
    res.unavailable = _unavailable(exp, res)
    return res


def _baselines(exp: Experiment) -> tuple[pd.DataFrame | None, list[Arm], str]:
    """The baseline predictions and arms, or why there are none (an unusable file costs only the baselines)."""
    preds = exp.baseline_predictions
    if preds is None:
        unreadable = any(n.startswith("baseline_predictions.csv could not be read") for n in exp.notes)
        return None, [], ("baseline_predictions.csv could not be read; see the input notes" if unreadable else
                          "baseline_predictions.csv is missing; the run predates the baselines")
    if preds.empty:
        return None, [], "baseline_predictions.csv has no rows"
    try:
        check_one_trial_per_fold(preds, exp.out_dir / "baseline_predictions.csv")
    except ValueError as exc:
        return None, [], f"baseline_predictions.csv is not usable: {exc}"
    arms = sorted({(m, bool(p)) for m, p in zip(preds["model"], preds["pretrained"])}, key=baseline_sort_key)
    return preds, arms, ""


def _per_site(exp: Experiment, main_preds: pd.DataFrame, result_arms: list[Arm], base_preds: pd.DataFrame | None,
              base_arms: list[Arm]) -> tuple[pd.DataFrame, str]:
    deep = sc.with_origin(main_preds, exp.subjects)
    frames = []
    if deep is not None:
        frames.append(sc.per_site(deep, result_arms, exp.classes, baseline=False))
    base = sc.with_origin(base_preds, exp.subjects) if base_preds is not None else None
    if base is not None:
        frames.append(sc.per_site(base, base_arms, exp.classes, baseline=True))
    empty = sc.per_site(main_preds.iloc[:0].assign(source="", site=""), [], exp.classes, baseline=False)
    table = pd.concat(frames, ignore_index=True) if frames else empty
    if deep is None:
        return table, ("predictions.csv has no site column and subjects.csv is missing: per-site results of the deep "
                       "arms cannot be shown")
    how = ("the predictions' own source and site columns" if "site" in main_preds.columns
           else "subjects.csv (predictions.csv has no site column)")
    return table, f"sites from {how}"


def _unavailable(exp: Experiment, res: ConfoundResults) -> list[str]:
    """One line per confound section that the inputs of this run cannot support."""
    out = []
    if res.cohort.source.startswith("the distinct subjects"):
        out.append("Cohort: subjects.csv and the cohort record in experiment.json are missing; counted from the "
                   "test predictions instead, which misses any subject that was never tested.")
    if res.sites is None:
        out.append(f"Class by source and site: cannot be shown ({res.sites_source}).")
    if res.stripping is None:
        out.append(f"Skull-stripping status per class: cannot be shown ({res.stripping_source}).")
    if res.options.register is None:
        out.append("Registration: not recorded in experiment.json.")
    if not res.baseline_arms:
        out.append(f"Baseline rows, baseline features and the shortcut check: cannot be shown ({res.baseline_note}).")
    elif exp.baseline_selection is None:
        out.append("The baselines' features and choice of C: cannot be shown (baseline_selection.csv is missing).")
    if res.per_site_note.startswith("predictions.csv has no site"):
        out.append(f"Per-site results of the deep arms: cannot be shown ({res.per_site_note.split(':')[0]}).")
    return out


# ----------------------------------------------------------------------------------------- tables
def write_tables(csv: Callable[[str, pd.DataFrame], Path], exp: Experiment, res: ConfoundResults) -> None:
    """cohort, sites, stripping, shortcut_check, per_site and the baselines' metrics, always with a header."""
    csv("cohort.csv", res.cohort.table)
    csv("sites.csv", res.sites if res.sites is not None else
        pd.DataFrame(columns=[*SITE_COLUMNS, *[f"n_{c}" for c in exp.classes], "total", "flag"]))
    csv("stripping.csv", res.stripping if res.stripping is not None else
        pd.DataFrame(columns=["class", "stripped", "unstripped"]))
    csv("shortcut_check.csv", res.shortcut)
    csv("per_site.csv", res.per_site)
    m = res.baseline_metrics or arm_metrics(exp.predictions.iloc[:0], exp.classes, [])
    csv("baseline_per_class.csv", m.per_class)
    csv("baseline_overall.csv", m.overall)
    csv("baseline_per_fold_class.csv", m.per_fold_class)
    csv("baseline_per_fold_overall.csv", m.per_fold_overall)
    if exp.baseline_selection is not None:
        csv("baseline_selection.csv", exp.baseline_selection)


def baseline_folds(res: ConfoundResults, n_folds: int) -> dict[Arm, str]:
    """'3/3' per baseline, beside its rows in the paper tables."""
    if res.baseline_metrics is None:
        return {}
    fo = res.baseline_metrics.per_fold_overall
    return {a: f"{int(((fo['model'] == a[0]) & (fo['pretrained'] == a[1])).sum())}/{n_folds}" for a in res.baseline_arms}


# ----------------------------------------------------------------------------------------- warnings
def warnings(res: ConfoundResults, classes: list[str]) -> list[str]:
    """What a reader must know before any score: unstripped volumes, a cohort unlike the paper's, shortcuts."""
    items = []
    strip = cf.stripping_warning(res.stripping, res.options)
    if strip:
        items.append(strip)
    if res.cohort.differs:
        paper = " / ".join(f"{cf.PAPER_COHORT[c]} {c}" for c in classes)
        items.append(f"**The cohort differs from the paper's** {paper}: this run has {res.cohort.text(classes)} "
                     f"(counted from {res.cohort.source}). A different class balance changes the weighted loss and "
                     "the meaning of macro F1; compare with the published values with care.")
    source = _source_warning(res)
    if source:
        items.append(source)
    weak, total = sc.not_clearly_better(res.shortcut, ACQUISITION)
    if weak:
        items.append(f"**Possible shortcut**: {weak} of {total} deep-arm x class results are not clearly better than "
                     "the acquisition-only baseline, which sees no anatomy beyond overall brain size"
                     f"{_worse(res.shortcut, ACQUISITION)} (see *Shortcut check*).")
    weak, total = sc.not_clearly_better(res.shortcut, HISTOGRAM)
    if weak:
        items.append(f"**Nothing shown beyond intensity statistics**: {weak} of {total} deep-arm x class results are "
                     "not clearly better than the intensity-histogram baseline, which sees only the brain's intensity "
                     f"distribution{_worse(res.shortcut, HISTOGRAM)} (see *Shortcut check*).")
    return items


def _source_warning(res: ConfoundResults) -> str | None:
    """A class whose every subject comes from one source (of several): where the scan was made gives it away.

    Read from the counts of the sites table's source rows (one ``n_<class>`` column per class)."""
    if res.sites is None:
        return None
    sources = res.sites[res.sites["level"] == "source"]
    if len(sources) < 2:
        return None
    owned: dict[str, list[str]] = {}
    for column in (c for c in sources.columns if c.startswith("n_")):
        giving = sources[sources[column] > 0]
        if len(giving) == 1:
            owned.setdefault(giving["source"].iloc[0] or cf.UNKNOWN_SITE, []).append(column.removeprefix("n_"))
    if not owned:
        return None
    given = "; ".join(f"every {' and '.join(classes)} subject comes from `{source}`" for source, classes in owned.items())
    return (f"**Source and label are confounded**: {given}, so these classes can be told apart by where a scan was "
            "made (scanner, protocol, preprocessing) as well as by anatomy (see *Where each class comes from*, "
            "*Shortcut check* and *Per-site results*).")


def _worse(check, baseline: str) -> str:
    worse = sc.clearly_worse(check, baseline)
    return f"; {worse} of them clearly worse" if worse else ""


def warnings_section(doc: Document, items: list[str]) -> None:
    if items:
        doc.heading("Warnings", 2)
        doc.bullets(items)


def located_cache(exp: Experiment) -> dict:
    """experiment.json's options with the cache entry found where it is now (a copied or renamed run folder)."""
    cache = exp.meta.get("cache")
    return {**exp.meta, "cache": exp.relocated(cache)} if isinstance(cache, str) else exp.meta


def what_ran_items(exp: Experiment, res: ConfoundResults) -> list[str]:
    items = [f"Preprocessing: {cf.preprocessing_text(located_cache(exp))}.", f"Registration: {cf.registration_text(res.options)}."]
    if res.baseline_arms:
        items.append(f"Baselines: {', '.join(display_name(m) for m, _ in res.baseline_arms)} "
                     f"({len(res.baseline_preds)} rows in baseline_predictions.csv, same outer folds as the deep arms).")
    else:
        items.append(f"Baselines: none ({res.baseline_note}).")
    return items


# ----------------------------------------------------------------------------------------- data section
def data_section(doc: Document, exp: Experiment, res: ConfoundResults) -> None:
    doc.heading("Data, cohort and confounds", 2)
    doc.para("On BraTS (HGG, LGG) + IXI (Healthy) the classes differ in scanner, site, voxel grid, skull stripping "
             "and intensity range as well as in anatomy. A model can score well by recognising where a scan came "
             "from; this section shows where each class comes from and how it was preprocessed.")
    if res.unavailable:
        doc.para("Not shown for lack of inputs (older runs do not write them):")
        doc.bullets(res.unavailable)
    _cohort(doc, exp, res)
    _origins(doc, exp, res)
    _acquisition(doc, exp)
    _stripping(doc, res)
    doc.heading("Spatial normalisation", 3)
    doc.para(f"Registration: {cf.registration_text(res.options)}.")
    _baseline_inputs(doc, exp, res)


def _cohort(doc: Document, exp: Experiment, res: ConfoundResults) -> None:
    doc.heading("Cohort", 3)
    paper = ("The paper used 259 HGG and 73 LGG (BraTS 2019, T1ce) and 259 Healthy (IXI, T1). "
             if res.cohort.comparable else "The classes are not the paper's three: there is no published cohort to "
                                           "compare with. ")
    doc.para(f"Subjects per class in this run, counted from {res.cohort.source}. {paper}*Available* is the count "
             "before a `--max-per-class` draw (when one was recorded).")
    doc.table(cf.cohort_display(res.cohort))


def _origins(doc: Document, exp: Experiment, res: ConfoundResults) -> None:
    doc.heading("Where each class comes from", 3)
    if res.sites is None:
        doc.para(f"Cannot be shown: {res.sites_source}.")
        return
    doc.para(f"Subjects per class by source (brats / ixi / manifest) and by site (BraTS: the `<site>` part of "
             f"`BraTS19_<site>_<n>_1`; IXI: Guys / HH / IOP; a manifest's site column), counted from "
             f"{res.sites_source}. **Flag**: a source or site that contributes a single class, or the only source "
             "of a class.")
    doc.table(cf.sites_display(res.sites, exp.classes, "source"))
    doc.bullets(cf.confound_sentences(res.sites, exp.classes))
    doc.table(cf.sites_display(res.sites, exp.classes, "site"))


def _acquisition(doc: Document, exp: Experiment) -> None:
    doc.heading("Acquisition per class", 3)
    table = (cf.acquisition_table(exp.subjects, exp.classes) if exp.subjects is not None and "label" in exp.subjects
             else pd.DataFrame())
    if table.empty:
        doc.para("Cannot be shown: subjects.csv is missing or has no acquisition columns (runs from before they were "
                 "recorded).")
        return
    doc.para("Subjects per class by the header of their first raw file, before preprocessing (subjects.csv): "
             "orientation, voxel size, matrix and data type. **Flag**: a value that only one class has.")
    doc.table(cf.acquisition_display(table, exp.classes))
    doc.bullets(cf.acquisition_sentences(table))


def _stripping(doc: Document, res: ConfoundResults) -> None:
    doc.heading("Skull stripping", 3)
    if res.stripping is None:
        doc.para(f"Cannot be shown: {res.stripping_source}.")
        return
    allowed = {True: "yes", False: "no", None: "not recorded"}[res.options.allow_unstripped]
    threshold = res.options.stripping_threshold
    share = f"at least {threshold:.0%} of" if threshold is not None else "(almost) all"
    doc.para(f"A volume counts as skull-stripped when {share} the voxels on the faces of its field of view are exactly "
             "zero (BraTS, and IXI after FSL BET, have ~100 %; a head as scanned ~0 %); a subject is stripped only "
             f"when all its files are. Counted from {res.stripping_source}; `--allow-unstripped`: {allowed}.")
    doc.table(res.stripping.rename(columns={"class": "Class", "stripped": "Stripped", "unstripped": "Unstripped"}))


def _baseline_inputs(doc: Document, exp: Experiment, res: ConfoundResults) -> None:
    doc.heading("Baselines", 3)
    if not res.baseline_arms:
        doc.para(f"No baselines: {res.baseline_note}.")
        return
    doc.para("Two scikit-learn baselines were fitted on the deep arms' own outer folds. Neither sees where anything is "
             "(the acquisition baseline only overall brain size), so a deep arm has to beat them to show that it uses the brain (see *Shortcut check*).")
    doc.bullets(cf.baseline_descriptions([m for m, _ in res.baseline_arms], exp.baseline_selection))
    if exp.baseline_selection is None:
        doc.para("baseline_selection.csv is missing: the choice of C per fold cannot be shown.")
        return
    doc.para("For every outer fold the regularisation C was chosen among the candidates by macro F1 on the fold's "
             "inner-validation part, fitting on its training part only (ties go to the smaller C); the test part was "
             "predicted once, with the chosen C.")
    doc.table(cf.selection_display(exp.baseline_selection))


# ----------------------------------------------------------------------------------------- shortcut check
def shortcut_section(doc: Document, res: ConfoundResults, classes: list[str], n_resamples: int, seed: int) -> None:
    doc.heading("Shortcut check", 2)
    if not res.baseline_arms:
        doc.para(f"Cannot be shown: {res.baseline_note}.")
        return
    doc.para("Does each deep arm beat each baseline by a clear margin? For every deep arm and baseline, the test "
             "predictions they share (same fold, same subject) are compared by a **paired subject-level bootstrap**: "
             f"{n_resamples} resamples of subjects with replacement (seed {seed}), each scoring both models on the "
             "same subjects; the difference deep − baseline of F1 per class and of macro F1 gets a 95% percentile "
             "interval. A resample without any subject of a class, where one of the two models never predicts it "
             "either, cannot measure that class's difference: it is left out of that class's interval (counted in "
             "tables/shortcut_check.csv, n_undefined_resamples). "
             "**Clearly better** means the lower end of that interval is above 0. Beating the baselines "
             "does not prove that a model uses anatomy (they miss spatial cues such as skull remnants or field of "
             "view); failing to beat them is the warning.")
    if res.shortcut.empty:
        doc.para("No deep arm has paper-protocol predictions to compare.")
        return
    baselines = [m for m, _ in res.baseline_arms]
    doc.bullets(sc.verdicts(res.shortcut, classes, baselines))
    doc.table(sc.shortcut_display(res.shortcut))


def per_site_section(doc: Document, res: ConfoundResults, classes: list[str]) -> None:
    doc.heading("Per-site results", 2)
    if res.per_site.empty:
        doc.para(f"Cannot be shown: {res.per_site_note}." if res.per_site_note.startswith("predictions.csv")
                 else "No test predictions.")
        return
    doc.para("For every arm (deep arms of the paper protocol, then the baselines in *italics*), its test predictions "
             f"pooled over folds and grouped by the subject's site ({res.per_site_note}): n predictions, accuracy "
             "(fraction correct) and the recall of each class present at the site (correct / subjects of that class "
             "there, count in brackets; blank where the site has none). A site with one class has accuracy = that "
             "class's recall. Small sites give noisy numbers.")
    if res.per_site_note.startswith("predictions.csv has no site"):
        doc.para(f"{res.per_site_note}; the baselines' rows are shown.")
    doc.table(sc.per_site_display(res.per_site, classes))
