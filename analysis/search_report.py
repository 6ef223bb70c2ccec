"""The report's hyperparameter-search section, for both search designs.

Nested runs (experiment.json search_design == "nested") lead with the nested estimate, then each fold's
choice, then the configuration to deploy, which is never shown with a test score. Runs made before nested
CV chose one configuration per arm by its mean over folds of inner-validation scores; for those the section
shows that choice with its test scores marked as optimistically biased and says that no nested estimate
exists. See `analysis.nested` for why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from analysis import figures as figs
from analysis import tables as tb
from analysis.document import Document
from analysis.load import HYPERPARAMETERS, Experiment
from analysis.names import arm_label, arm_sort_key
from analysis.nested import NestedSearch, analyse_nested
from search_spaces import TPE_STARTUP_TRIALS

CITATION = "Cawley & Talbot, *On over-fitting in model selection and subsequent selection bias in performance " \
           "evaluation*, JMLR 11, 2010"
NESTED = "nested"


class Writer(Protocol):
    """What the report's file writer offers (report._Writer)."""

    figures_dir: Path

    def csv(self, name: str, frame: pd.DataFrame) -> Path: ...

    def figure(self, path: Path | None) -> Path | None: ...


@dataclass
class SearchResults:
    nested: NestedSearch | None = None  # nested runs
    best: pd.DataFrame | None = None    # runs before nested CV: the mean-over-folds choice (biased test scores)
    figure: Path | None = None
    studies: list = field(default_factory=list)  # optuna_plots.StudyOutput, one per study


def is_nested(exp: Experiment) -> bool:
    return exp.search_design == NESTED


# ---------------------------------------------------------------------------------------- analysis
def analyse_search(exp: Experiment, w: Writer, out_dir: Path, seed: int) -> SearchResults:
    """Compute and write the search's tables and figures (nested or not), and every study's figures."""
    res = SearchResults()
    if is_nested(exp):
        res.nested = analyse_nested(exp)
        w.csv("nested_selection.csv", res.nested.selection)
        w.csv("nested_estimate.csv", res.nested.estimate)
        w.csv("deploy_config.csv", res.nested.deploy)
        res.figure = w.figure(figs.nested_vs_default_figure(
            res.nested.estimate, w.figures_dir / "search_nested_vs_default.png", exp.default_label))
    else:
        res.best = tb.best_configs(exp)
        w.csv("best_configs.csv", res.best)
        res.figure = w.figure(figs.best_vs_default_figure(
            res.best, w.figures_dir / "search_best_vs_default.png", exp.default_label))
    res.studies = study_outputs(exp, w, out_dir, seed)
    return res


def study_outputs(exp: Experiment, w: Writer, out_dir: Path, seed: int) -> list:
    """History and importance figures of every study, by arm then fold."""
    if not exp.optuna_studies:
        return []
    from analysis.optuna_plots import study_figures  # optuna is only needed for searches

    studies = []
    for spec in sorted(exp.optuna_studies, key=_study_key):
        st = study_figures(spec, out_dir, w.figures_dir, seed=seed)
        w.figure(st.history_png)
        w.figure(st.importance_png)
        if st.importances is not None:
            w.csv(f"optuna_importance_{st.history_png.stem.removeprefix('optuna_history_')}.csv", st.importances)
        studies.append(st)
    return studies


def _study_key(spec: dict) -> tuple:
    arm = arm_sort_key((str(spec["model"]), bool(spec["pretrained"]))) if "model" in spec else (99, "", False)
    fold = spec.get("fold")
    return (arm, -1 if fold is None else int(fold), str(spec["study_name"]))


def what_ran_item(exp: Experiment) -> str | None:
    """The 'What ran' bullet naming the search's design, or None when nothing was searched."""
    if is_nested(exp):
        return ("Search design: nested cross-validation: one Optuna study per arm and outer fold, each fold's "
                "configuration chosen on that fold's inner validation only.")
    if exp.optuna_studies:
        return ("Search design: one Optuna study per arm, configurations scored by their mean over folds (runs made "
                "before nested cross-validation): no nested estimate exists for this run.")
    return None


# ---------------------------------------------------------------------------------------- displays
def estimate_display(estimate: pd.DataFrame, classes: list[str], n_folds: int, default_label: str) -> pd.DataFrame:
    """Nested estimate and the defaults on the same folds, per arm: fold mean ± std and pooled values."""
    rows = []
    for r in estimate.to_dict("records"):
        gaps = _text(r.get("missing_folds"))  # studied folds without a trial here, and why (a failure, mostly)
        row = {**tb.arm_cells(r["model"], r["pretrained"]),
               "Configuration": "nested: chosen per fold" if r["estimate"] == NESTED else default_label,
               "Folds": f"{int(r['n_folds'])}/{n_folds}" + (f" ({gaps})" if gaps else ""),
               "Macro F1 (mean ± std)": tb.fmt_pm(r["test_macro_f1_mean"], r["test_macro_f1_std"]),
               "Macro F1 pooled": tb.fmt(r["test_macro_f1_pooled"]),
               "Accuracy (mean ± std)": tb.fmt_pm(r["test_accuracy_mean"], r["test_accuracy_std"]),
               "Accuracy pooled": tb.fmt(r["test_accuracy_pooled"])}
        for cls in classes:
            row[f"F1 {cls} pooled"] = tb.fmt(r[f"test_f1_{cls}_pooled"])
        rows.append(row)
    return pd.DataFrame(rows)


def _text(value) -> str:
    """A cell as text; NaN (how an empty CSV cell reads back) is empty."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _config_text(config_id: str, paper_config_id: str | None, default_label: str) -> str:
    if not config_id:
        return "none (no finished candidate)"
    return f"{default_label} `{config_id}`" if config_id == paper_config_id else f"`{config_id}`"


def selection_display(selection: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """Per (arm, fold): the chosen configuration, its scores and the candidates it beat."""
    rows = []
    for r in selection.to_dict("records"):
        chosen = bool(r["config_id"])
        row = {**tb.arm_cells(r["model"], r["pretrained"]),
               "Fold": str(r["fold"]), "Chosen": _config_text(r["config_id"], exp.paper_config_id, exp.default_label),
               **(tb.hp_cells(r, exp.paper_defaults, show_default=r["config_id"] != exp.paper_config_id) if chosen
                  else dict.fromkeys(HYPERPARAMETERS, "")),
               "Inner-val macro F1": tb.fmt(r["inner_val_macro_f1"]),
               "Test macro F1 (this fold)": tb.fmt(r["test_macro_f1"]),
               "Candidates": str(r["n_candidates"]) + (f" ({r['n_failed']} failed)" if r.get("n_failed") else "")}
        if "leak_check" in r:
            row["Leak check"] = r["leak_check"]
        rows.append(row)
    return pd.DataFrame(rows)


def agreement_sentences(selection: pd.DataFrame, exp: Experiment) -> list[str]:
    """Per arm, whether the folds chose the same configuration: a search whose choice changes with the fold
    says little about which configuration is best, and the nested estimate carries that instability."""
    out = []
    for (model, pretrained), grp in selection.groupby(["model", "pretrained"], sort=False):
        made = grp[grp["config_id"] != ""].sort_values("fold")
        ids = list(dict.fromkeys(made["config_id"]))
        if not ids:
            continue
        what = ", ".join(f"fold {f}: {_config_text(c, exp.paper_config_id, exp.default_label)}"
                         for f, c in zip(made["fold"], made["config_id"]))
        verdict = (f"all {len(made)} folds chose the same configuration" if len(ids) == 1
                   else f"the folds chose {len(ids)} different configurations")
        out.append(f"{arm_label(model, bool(pretrained))}: {verdict} ({what}).")
    return out


def leak_sentence(selection: pd.DataFrame) -> str:
    """What the leak check found, in one sentence."""
    if "leak_check" not in selection.columns:
        return ("trial_subjects.csv is missing, so the leak check (no candidate of fold k trained or was selected on "
                "fold k's test subjects) was not run.")
    bad = selection[selection["leak_check"] != "ok"]
    if bad.empty:
        return ("Leak check (trial_subjects.csv against splits.json): no candidate of any fold trained or was selected "
                "on a subject of that fold's test part.")
    where = "; ".join(f"{arm_label(r.model, bool(r.pretrained))} fold {r.fold}: {r.leak_check}"
                      for r in bad.itertuples(index=False))
    return f"**Leak check: {len(bad)} fold(s) not ok** ({where})."


def deploy_display(deploy: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """The configuration to deploy per arm, with inner-validation scores only: never a test score."""
    rows = []
    for r in deploy.to_dict("records"):
        configured = bool(_text(r["config_id"]))
        rows.append({**tb.arm_cells(r["model"], r["pretrained"]),
                     "Configuration": (_config_text(r["config_id"], exp.paper_config_id, exp.default_label)
                                       if configured else "none"),
                     **(tb.hp_cells(r, exp.paper_defaults, show_default=r["config_id"] != exp.paper_config_id)
                        if configured else dict.fromkeys(HYPERPARAMETERS, "")),
                     "Inner-val macro F1 (mean over evaluated folds)": tb.fmt(r["inner_val_macro_f1_mean"]),
                     "Evaluated in folds": str(r["evaluated_folds"]).replace(";", ", "),
                     "Chosen in folds": str(r["chosen_in_folds"]).replace(";", ", ") or "none",
                     "Rule": r["rule"], "Not ranked (a fold failed)": _text(r.get("excluded_configs")) or "none"})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------- section
def search_section(doc: Document, exp: Experiment, res: SearchResults, report_dir: Path) -> None:
    doc.heading("Hyperparameter search", 2)
    _search_space(doc, exp)
    if res.nested is not None:
        _nested_estimate(doc, exp, res, report_dir)
        _fold_choices(doc, exp, res.nested)
        _deploy(doc, exp, res.nested)
    else:
        _before_nested(doc, exp, res, report_dir)
    _studies(doc, res.studies, report_dir, nested=res.nested is not None)


def _search_space(doc: Document, exp: Experiment) -> None:
    """What was searched and how hard: the ranges (as run, re-centred on --set values), the trials per study."""
    space = exp.meta.get("search_space")
    if not space:
        return
    doc.heading("Search space", 3)
    grid = exp.paper_defaults
    rows = [{"Parameter": f"`{r['name']}`",
             "Searched": (f"{tb.fmt_hp(r['searched_low'])} - {tb.fmt_hp(r['searched_high'])}"
                          if r.get("searched", True) else "no"),
             "Scale": "log" if r["log"] else "linear",
             "Grid value": tb.fmt_hp(grid.get(r["name"], r["default"])), "Paper": tb.fmt_hp(r["paper"]),
             "Why this range": r["reason"] + ("" if (r["searched_low"], r["searched_high"]) == (r["low"], r["high"])
                                              or not r.get("searched", True)
                                              else f" (moved with the --set value from {tb.fmt_hp(r['low'])} - "
                                                   f"{tb.fmt_hp(r['high'])})")}
            for r in space]
    doc.table(pd.DataFrame(rows))
    samples = exp.meta.get("num_samples")
    if samples:
        doc.para(search_effort_text(int(samples), is_nested(exp)))


def search_effort_text(samples: int, nested: bool) -> str:
    """How many trials each study ran and whether TPE ever guided one: its start-up trials count the grid's
    configuration (the study's first, enqueued or handed over), so the 11th trial is the first TPE suggestion."""
    per_study = "per (arm, outer fold) study" if nested else "per arm"
    text = (f"{samples} trial(s) {per_study}, the grid's configuration first; the sampler is Optuna's TPE "
            f"(seeded), which starts guiding a study once it holds {TPE_STARTUP_TRIALS} finished trials: the "
            f"grid's configuration and {TPE_STARTUP_TRIALS - 1} random draws from these ranges (more draws where "
            "trials failed).")
    if samples <= TPE_STARTUP_TRIALS:
        text += (" With this many trials no study got past them: this was a random search around the grid's "
                 "configuration, not a model-guided one.")
    return text


def _nested_estimate(doc: Document, exp: Experiment, res: SearchResults, report_dir: Path) -> None:
    doc.heading("Nested cross-validation estimate", 3)
    doc.para("How it was obtained: per arm and outer fold, one Optuna study (seeded TPE) searched the "
             "hyperparameters; its trials trained on that fold's training part and were scored on its inner "
             "validation part (drawn from the training part) only. The grid's configuration "
             f"({exp.default_label}) entered every study (where the grid ran in the same experiment, as its grid "
             "trial of that fold). Fold k's configuration was chosen from fold k's trials alone (highest "
             "inner-validation macro F1; ties to the grid's configuration, then to the smallest trial name) and scored **once** on fold k's test part, which no "
             "trial of that study trained or was selected on. Cells are mean ± sample std (ddof = 1) over those "
             "folds, and *pooled* over all their test predictions concatenated. The estimate is of the whole "
             f"procedure (search and choice), not of one configuration ({CITATION}). The {exp.default_label} on the "
             "same folds are shown beside it. *Folds* names a studied fold that adds nothing (no finished candidate: "
             "its trials failed or did not run); the mean is then over the other folds only.")
    doc.table(estimate_display(res.nested.estimate, exp.classes, exp.n_folds, exp.default_label),
              empty="No finished search trials: no nested estimate.")
    if res.figure is not None:
        doc.image(res.figure, _rel(res.figure, report_dir),
                  f"Test macro F1: nested estimate vs {exp.default_label} on the same folds (mean ± std over folds).")


def _fold_choices(doc: Document, exp: Experiment, nested: NestedSearch) -> None:
    doc.heading("Configuration chosen in each fold", 3)
    doc.para("One row per arm and outer fold: the chosen trial's hyperparameters (a value that differs from the "
             f"{exp.default_label} names the default in brackets), its inner-validation macro F1 (what it was chosen "
             "on), its macro F1 on the fold's test part (its contribution to the nested estimate) and the number of "
             "candidates (finished trials of that fold's study; nested_selection.csv names them, and the study's "
             "failed trials, which never compete).")
    doc.table(selection_display(nested.selection, exp), empty="No studies.")
    doc.bullets(agreement_sentences(nested.selection, exp))
    doc.para(leak_sentence(nested.selection))


def _deploy(doc: Document, exp: Experiment, nested: NestedSearch) -> None:
    if nested.deploy.empty:
        return
    doc.heading("Configuration to deploy (for a final model, not an estimate)", 3)
    doc.para("To train one final model, per arm: the configuration evaluated in every fold with the best mean "
             "inner-validation macro F1 (identical seeds make the studies' first suggestions coincide across folds, "
             f"and the grid's configuration, {exp.default_label}, is in every study); when none was evaluated in every "
             "fold, the fold-chosen configuration with the best inner-validation macro F1. Ties go to the grid's "
             "configuration, then to the smallest config id. A configuration with a failed fold is not ranked (a mean "
             "over its other folds would hide the failure) and is named in the last column. This choice uses every "
             "fold's inner validation, so it comes with no test score: the performance to expect is the nested "
             "estimate above.")
    doc.table(deploy_display(nested.deploy, exp))


def _before_nested(doc: Document, exp: Experiment, res: SearchResults, report_dir: Path) -> None:
    doc.para("This run was made before nested cross-validation (experiment.json has no `search_design`): each arm "
             "had one Optuna study, every suggestion was trained on all folds and scored by its mean over folds of "
             "inner-validation macro F1. **No nested estimate exists for this run**: rerun the search "
             "(`--experiment search`) to get one. What it can show is below: the configuration chosen by that "
             "mean, and the defaults on the same folds.")
    doc.heading(f"Configuration chosen by the mean over folds, against the {exp.default_label}", 3)
    doc.para("The chosen configuration's test scores are **optimistically biased** and are not an estimate of "
             "performance: fold j's inner validation part is drawn from fold j's training part, which holds fold "
             "k's test subjects, so the choice saw this fold's test subjects through the other folds' validation "
             f"scores ({CITATION}). Its cells are marked *(biased)*. The {exp.default_label} were fixed before the "
             "search, so their test scores carry no selection bias. Configurations with all folds finished rank "
             "first; hyperparameters that differ from the defaults show the default value in brackets.")
    doc.table(tb.best_configs_display(res.best, exp.paper_defaults, exp.default_label),
              empty="No finished search trials.")
    if res.figure is not None:
        doc.image(res.figure, _rel(res.figure, report_dir),
                  f"Test macro F1: configuration chosen by the mean over folds (optimistically biased) vs "
                  f"{exp.default_label}.")


def _studies(doc: Document, studies: list, report_dir: Path, nested: bool) -> None:
    if not studies:
        return
    doc.heading("Optuna studies", 3)
    if nested:
        doc.para("One study per arm and outer fold; each optimised its own fold's inner-validation macro F1.")
    for st in studies:
        doc.heading(f"Study `{st.study_name}` ({st.label})", 4)
        objective = ("inner-validation macro F1 (mean over folds)" if st.fold is None
                     else f"inner-validation macro F1 of fold {st.fold}")
        items = [f"{st.n_trials} trial(s), {st.n_complete} completed; objective = {objective}, maximised."]
        if st.best_value is not None:
            # Optuna's own pick: on a tie its storage's order decides, and a trial retrained since keeps its first
            # score here; the selection the report scores breaks ties its own way (analysis.nested.choose).
            items.append(f"Optuna's best trial: value {tb.fmt(st.best_value)} with " + ", ".join(
                f"{k}={tb.fmt_hp(v)}" for k, v in sorted(st.best_params.items())) + "."
                + (" The configuration this fold uses is the one under \"Configuration chosen in each fold\" "
                   "(ties there go to the grid's configuration)." if nested and st.fold is not None else ""))
        doc.bullets(items + st.notes)
        if st.history_png is not None:
            doc.image(st.history_png, _rel(st.history_png, report_dir), f"Optimisation history, {st.label}.")
        if st.importance_png is not None:
            doc.image(st.importance_png, _rel(st.importance_png, report_dir),
                      f"Hyperparameter importances (fANOVA), {st.label}.")
            doc.table(st.importances.assign(importance=st.importances["importance"].map(tb.fmt)))


def _rel(path: Path, report_dir: Path) -> str:
    return path.relative_to(report_dir).as_posix()
