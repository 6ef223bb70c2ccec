"""Data, cohort and confounds: what besides anatomy could tell the classes apart.

On BraTS (HGG, LGG) + IXI (Healthy) the Healthy class differs from the tumour classes in scanner,
site, voxel grid, skull stripping and intensity range. A classifier can score well by recognising
the data set instead of the brain, so the report states the cohort, where each class comes from,
how it was preprocessed and which baselines were fitted, before any score. Every input here is
optional (older runs lack them): a missing one turns its table into a sentence saying so.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import Experiment
from analysis.names import display_name
from analysis.paper import is_paper_task

PAPER_COHORT = {"HGG": 259, "LGG": 73, "Healthy": 259}
COHORT_COLUMNS = ["class", "ours", "available", "max_per_class", "paper", "differs"]
UNKNOWN_SITE = "(unknown)"
REGISTER_TEXT = {
    "none": "`--register none`: no spatial normalisation to a template, as in the paper: each volume is only "
            "turned to RAS, cropped to its brain and centred (see Preprocessing), so head size, pose within the "
            "box and brain shape stay as acquired and can differ by data source",
    "mni": "`--register mni`: N4 bias-field correction and affine registration to MNI152 with ANTsPy before "
           "resampling (the paper did not register)",
}


# ----------------------------------------------------------------------------------------- run options
@dataclass(frozen=True)
class DataOptions:
    """The data options recorded in experiment.json; None where the run did not record them."""

    allow_unstripped: bool | None
    register: str | None
    max_per_class: dict[str, int]
    available: dict[str, int] | None
    drawn: dict[str, int] | None
    stripping_by_class: dict[str, dict[str, int]] | None
    stripping_threshold: float | None  # border-zero fraction from which a volume counts as stripped


def data_options(meta: dict) -> DataOptions:
    """Read the optional keys defensively: a value of the wrong type counts as not recorded, never as a crash."""
    allow = meta.get("allow_unstripped")
    register = meta.get("register")
    caps = meta.get("max_per_class")
    cohort = meta.get("cohort") if isinstance(meta.get("cohort"), dict) else {}
    stripping = meta.get("stripping") if isinstance(meta.get("stripping"), dict) else {}
    return DataOptions(
        allow_unstripped=bool(allow) if isinstance(allow, bool) else None,
        register=str(register) if isinstance(register, str) else None,
        max_per_class=_counts(caps) or {},
        available=_counts(cohort.get("available")),
        drawn=_counts(cohort.get("drawn")),
        stripping_by_class=_stripping_counts(stripping.get("by_class")),
        stripping_threshold=_fraction(stripping.get("threshold_border_zero_fraction")),
    )


def _fraction(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1 else None


def _counts(value) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    try:
        return {str(k): int(v) for k, v in value.items()}
    except (TypeError, ValueError):
        return None


def _stripping_counts(value) -> dict[str, dict[str, int]] | None:
    if not isinstance(value, dict):
        return None
    out = {}
    for cls, counts in value.items():
        parsed = _counts(counts)
        if parsed is None:
            return None
        out[str(cls)] = {"stripped": parsed.get("stripped", 0), "unstripped": parsed.get("unstripped", 0)}
    return out


def preprocessing_text(meta: dict) -> str:
    """How the volumes were preprocessed, read from the cache's meta.json, naming the one quantity that every
    subject, test subjects included, has a say in: the box all volumes are centred in."""
    cache = meta.get("cache")
    if not isinstance(cache, str):
        return "not recorded in experiment.json (no `cache` key: a run from before it was saved)"
    path = Path(cache) / "meta.json"
    try:
        entry = json.loads(path.read_text())
        config, shape, n = entry["config"], [int(v) for v in entry["shape"]], int(entry["n_subjects"])
        low, high = config["percentiles"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{path} could not be read ({type(error).__name__}): the cache is on another machine or was removed"
    box = " x ".join(map(str, shape))
    spacing = entry.get("spacing_mm", config.get("spacing"))
    spacing = f"{spacing:g}" if isinstance(spacing, (int, float)) else str(spacing)
    per_volume = (f"each volume on its own: RAS orientation, resampling to {spacing} mm voxels, intensities rescaled to its own brain's [{low:g}, {high:g}] percentiles, cropped to its "
                  f"brain")
    if config.get("target_shape"):
        return f"{per_volume}; then centred in a fixed {box} voxel box (X x Y x Z, as asked for) (from {path})"
    return (f"{per_volume}; then centred in a {box} voxel box (X x Y x Z), the largest brain bounding box among the "
            f"{n} cached subjects. The box is the only quantity computed across subjects, test subjects included: it "
            f"decides how much zero padding every volume gets and uses no labels or intensities (from {path})")


def registration_text(options: DataOptions) -> str:
    if options.register is None:
        return ("not recorded in experiment.json (runs before the `--register` option had no spatial "
                "normalisation)")
    return REGISTER_TEXT.get(options.register, f"`--register {options.register}` (not described by this report)")


# ----------------------------------------------------------------------------------------- cohort
@dataclass(frozen=True)
class Cohort:
    table: pd.DataFrame   # COHORT_COLUMNS
    source: str           # where "ours" was counted, in words
    comparable: bool      # the classes are the paper's three

    @property
    def differs(self) -> bool:
        return self.comparable and bool(self.table["differs"].any())

    def text(self, classes: list[str]) -> str:
        """'259 HGG / 73 LGG / 259 Healthy' for ours (in class order)."""
        ours = self.table.set_index("class")["ours"]
        return " / ".join(f"{_int_text(ours.get(c))} {c}" for c in classes)


def _int_text(value) -> str:
    return "?" if value is None or pd.isna(value) else str(int(value))


def cohort_table(exp: Experiment) -> Cohort:
    """Subjects per class, ours beside the paper's 259 / 73 / 259, flagged where they differ.

    Ours is, in order of preference: subjects.csv (the subjects the folds were drawn from, after any left out by
    registration or preprocessing with --skip-invalid), the draw recorded in experiment.json (older runs), or
    (older still) the distinct subjects in predictions.csv, which misses any subject never tested.
    """
    options = data_options(exp.meta)
    if exp.subjects is not None:
        ours = exp.subjects["label"].value_counts().to_dict()
        source = "subjects.csv (the subjects the folds were drawn from)"
        dropped = {c: n - ours.get(c, 0) for c, n in (options.drawn or {}).items() if n > ours.get(c, 0)}
        if dropped:
            source += (f"; the `--max-per-class` draw in experiment.json had "
                       + ", ".join(f"{n} more {c}" for c, n in dropped.items())
                       + ", left out afterwards (--skip-invalid)")
    elif options.drawn is not None:
        ours, source = options.drawn, "experiment.json (cohort after the `--max-per-class` draw)"
    else:
        tested = exp.predictions.drop_duplicates("subject_id")
        ours = tested["label"].value_counts().to_dict()
        source = "the distinct subjects in predictions.csv, as subjects.csv and the cohort record are missing"
    comparable = is_paper_task(exp.classes)
    rows = []
    for cls in exp.classes:
        n = ours.get(cls)
        paper = PAPER_COHORT.get(cls) if comparable else None
        rows.append({"class": cls, "ours": int(n) if n is not None else np.nan,
                     "available": (options.available or {}).get(cls, np.nan),
                     "max_per_class": options.max_per_class.get(cls, np.nan),
                     "paper": paper if paper is not None else np.nan,
                     "differs": bool(paper is not None and (n is None or int(n) != paper))})
    table = pd.DataFrame(rows, columns=COHORT_COLUMNS)
    for col in ("ours", "available", "max_per_class", "paper"):
        table[col] = table[col].astype("Int64")
    return Cohort(table=table, source=source, comparable=comparable)


def cohort_display(cohort: Cohort) -> pd.DataFrame:
    t = cohort.table
    return pd.DataFrame({
        "Class": t["class"], "Ours": t["ours"].map(_int_text),
        "Available before the draw": t["available"].map(lambda v: "" if pd.isna(v) else str(int(v))),
        "--max-per-class": t["max_per_class"].map(lambda v: "" if pd.isna(v) else str(int(v))),
        "Paper": t["paper"].map(lambda v: "" if pd.isna(v) else str(int(v))),
        "Differs from the paper": [("**yes**" if d else "no") if cohort.comparable else "" for d in t["differs"]]})


# ----------------------------------------------------------------------------------------- skull stripping
def stripping_table(exp: Experiment) -> tuple[pd.DataFrame | None, str]:
    """Per class: subjects skull-stripped and not (experiment.json, else subjects.csv); None when unknown."""
    by_class = data_options(exp.meta).stripping_by_class
    source = "experiment.json"
    if by_class is None and exp.subjects is not None and "stripped" in exp.subjects.columns:
        known = exp.subjects[exp.subjects["stripped"].notna()]
        by_class = {c: {"stripped": int((known[known["label"] == c]["stripped"] == True).sum()),  # noqa: E712
                        "unstripped": int((known[known["label"] == c]["stripped"] == False).sum())}  # noqa: E712
                    for c in exp.classes}
        source = "subjects.csv"
    if by_class is None:
        return None, "neither experiment.json nor subjects.csv records it"
    classes = [c for c in exp.classes if c in by_class] + sorted(set(by_class) - set(exp.classes))
    return pd.DataFrame([{"class": c, **by_class[c]} for c in classes], columns=["class", "stripped", "unstripped"]), source


def stripping_warning(table: pd.DataFrame | None, options: DataOptions) -> str | None:
    """A warning when unstripped volumes are in the run: mixed with stripped ones they mark the class."""
    if table is None or int(table["unstripped"].sum()) == 0:
        return None
    per_class = ", ".join(f"{r['class']} {int(r['unstripped'])} of {int(r['stripped'] + r['unstripped'])}"
                          for r in table.to_dict("records"))
    n = int(table["unstripped"].sum())
    if int(table["stripped"].sum()) == 0:
        return (f"**No volume is skull-stripped** ({n} unstripped: {per_class}). The preprocessing crops each head "
                "to its whole field of view; the paper stripped IXI with FSL BET first.")
    allowed = ("The run was started with `--allow-unstripped`, which lets stripped and unstripped volumes mix. "
               if options.allow_unstripped else "")
    return (f"**Unstripped volumes**: {n} subject(s) are not skull-stripped (unstripped per class: {per_class}). "
            f"{allowed}This is a confound: skull and background differ by class, so a model can tell the classes "
            "apart without looking at the brain.")


# ----------------------------------------------------------------------------------------- sources and sites
def subject_origins(exp: Experiment) -> tuple[pd.DataFrame | None, str]:
    """One row per subject (subject_id, label, source, site): subjects.csv, else the predictions' columns; None when
    no subject's origin is recorded (no site anywhere and one source at most), which would otherwise read as "no
    confound" instead of "not checked"."""
    if exp.subjects is not None and "site" in exp.subjects.columns:
        rows, where = exp.subjects[["subject_id", "label", "source", "site"]].copy(), "subjects.csv"
    else:
        frames = [f for f in (exp.predictions, exp.baseline_predictions) if f is not None and "site" in f.columns]
        if not frames:
            return None, "neither subjects.csv nor the predictions record a site"
        rows = pd.concat([f.reindex(columns=["subject_id", "label", "source", "site"]).fillna("") for f in frames])
        rows = rows.drop_duplicates("subject_id").sort_values("subject_id", kind="stable").reset_index(drop=True)
        where = "the distinct subjects of the prediction files (subjects.csv is missing)"
    sites = set(rows["site"].fillna("").astype(str)) - {""}
    sources = set(rows["source"].fillna("").astype(str)) - {""}
    if not sites and len(sources) < 2:
        return None, (f"{where} records no site for any subject, and {'one source' if sources else 'no source'} "
                      f"({', '.join(sorted(sources)) or 'none'}), so whether scanner or site and label coincide "
                      "was not checked: give the manifest a `site` column (scanner or hospital of each scan)")
    return rows, where


def sites_table(origins: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Class counts per source and per (source, site), flagging where origin and label coincide.

    A site (or source) that contributes a single class, or a class that comes from a single source,
    lets a model predict that class from where the scan was made.
    """
    frame = origins.assign(site=origins["site"].replace("", UNKNOWN_SITE))
    only_source = _single_source_classes(frame, classes)
    rows = []
    for (source,), grp in frame.groupby(["source"], sort=True):
        flags = _single_class_flag(grp, classes) + [f"only source of {c}" for c, s in only_source.items() if s == source]
        rows.append(_count_row("source", source, "", grp, classes, flags))
    for (source, site), grp in frame.groupby(["source", "site"], sort=True):
        rows.append(_count_row("site", source, site, grp, classes, _single_class_flag(grp, classes)))
    return pd.DataFrame(rows, columns=["level", "source", "site", *[f"n_{c}" for c in classes], "total", "flag"])


def _single_source_classes(frame: pd.DataFrame, classes: list[str]) -> dict[str, str]:
    """class -> its only source, for classes whose subjects all come from one source (of several)."""
    out = {}
    if frame["source"].nunique() < 2:
        return out
    for cls in classes:
        sources = sorted(set(frame[frame["label"] == cls]["source"]))
        if len(sources) == 1:
            out[cls] = sources[0]
    return out


def _single_class_flag(grp: pd.DataFrame, classes: list[str]) -> list[str]:
    present = [c for c in classes if (grp["label"] == c).any()]
    return [f"single class ({present[0]})"] if len(present) == 1 and len(classes) > 1 else []


def _count_row(level: str, source: str, site: str, grp: pd.DataFrame, classes: list[str], flags: list[str]) -> dict:
    counts = {f"n_{c}": int((grp["label"] == c).sum()) for c in classes}
    return {"level": level, "source": source, "site": site, **counts, "total": len(grp), "flag": "; ".join(flags)}


def sites_display(table: pd.DataFrame, classes: list[str], level: str) -> pd.DataFrame:
    sel = table[table["level"] == level]
    out = pd.DataFrame({"Source": sel["source"].replace("", UNKNOWN_SITE)})
    if level == "site":
        out["Site"] = sel["site"]
    for c in classes:
        out[c] = sel[f"n_{c}"].astype(str)
    out["Total"] = sel["total"].astype(str)
    out["Flag"] = sel["flag"].map(lambda f: f"**{f}**" if f else "")
    return out.reset_index(drop=True)


def confound_sentences(table: pd.DataFrame, classes: list[str]) -> list[str]:
    """In words: which classes their source gives away, and how many sites give a single class."""
    sources = table[table["level"] == "source"]
    present = [c for c in classes if int(sources[f"n_{c}"].sum()) > 0]
    sentences = [s for s in (_source_sentence(r, present, sources) for r in sources.to_dict("records")) if s]
    sites = table[table["level"] == "site"]
    single = sites[sites["flag"] != ""]
    if len(single):
        names = ", ".join(f"{r.site} ({r.flag.removeprefix('single class (').rstrip(')')})"
                          for r in single.itertuples(index=False))
        sentences.append(f"{len(single)} of {len(sites)} site(s) contribute a single class: {names}. At those sites "
                         "site and label are confounded.")
    if not sentences:
        sentences.append("No class comes from a single source and no site contributes a single class.")
    return sentences


def _source_sentence(row: dict, present: list[str], sources: pd.DataFrame) -> str | None:
    """A sentence when a source gives a class that no other source gives (with several sources only)."""
    if len(sources) < 2:
        return None
    given = [c for c in present if row[f"n_{c}"] > 0]
    exclusive = [c for c in given if int((sources[f"n_{c}"] > 0).sum()) == 1]
    if not exclusive:
        return None
    name = f"`{row['source'] or UNKNOWN_SITE}`"
    counts = ", ".join(f"{row[f'n_{c}']} {c}" for c in exclusive)
    if len(exclusive) == len(given) and len(given) < len(present):
        rest = [c for c in present if c not in given]
        return (f"Source {name} alone gives all subjects of {' and '.join(exclusive)} ({counts}) and no other class: "
                f"source and label are confounded, so {' / '.join(exclusive)} can be told from {' / '.join(rest)} by "
                "where a scan came from (scanner, protocol, preprocessing) rather than by anatomy.")
    others = [c for c in given if c not in exclusive]
    return (f"Source {name} alone gives all subjects of {' and '.join(exclusive)} ({counts}), and also "
            f"{' and '.join(others)}: the source partly identifies the class.")


# ----------------------------------------------------------------------------------------- baselines
def baseline_feature_text(model: str, selection: pd.DataFrame | None) -> str:
    """The features a baseline was fitted on, by name (histogram bins summarised)."""
    if selection is None:
        return "features not recorded (baseline_selection.csv is missing)"
    rows = selection[selection["model"] == model]
    if rows.empty:
        return "features not recorded (no row in baseline_selection.csv)"
    features = [f for f in str(rows["features"].iloc[0]).split(",") if f]
    bins = [re.fullmatch(r"ch(\d+)_bin(\d+)", f) for f in features]
    if features and all(bins):
        channels = sorted({int(m.group(1)) for m in bins})
        per = len(features) // max(len(channels), 1)
        return (f"{len(features)} features: a {per}-bin histogram on (0, 1] of the preprocessed brain (voxels > 0), "
                f"normalised to sum to 1, for each of {len(channels)} channel(s)")
    return f"{len(features)} features: " + ", ".join(f"`{f}`" for f in features)


BASELINE_DESCRIPTIONS = {
    "acquisition_baseline": "class-weighted logistic regression on header and acquisition measurements of each "
                            "subject's first raw file (no voxel positions, so no anatomy beyond overall brain size); "
                            "source, site and the stripped flag are deliberately not features (but the share of "
                            "zero voxels on the volume's border is, and it separates stripped from unstripped volumes)",
    "histogram_baseline": "class-weighted logistic regression on the intensity histogram of the brain after the same "
                          "preprocessing the deep models get (no spatial information)",
}


def baseline_descriptions(models: list[str], selection: pd.DataFrame | None) -> list[str]:
    return [f"*{display_name(m)}* (`{m}`): {BASELINE_DESCRIPTIONS.get(m, 'a baseline (not described by this report)')}; "
            f"{baseline_feature_text(m, selection)}." for m in models]


def selection_display(selection: pd.DataFrame) -> pd.DataFrame:
    """Per baseline and fold: the C chosen on inner validation, its score, every candidate's score."""
    fmt = lambda v: "" if pd.isna(v) else f"{float(v):.4f}"  # noqa: E731
    count = lambda v: "" if pd.isna(v) else str(int(v))  # noqa: E731
    return pd.DataFrame({
        "Baseline": selection["model"].map(display_name), "Fold": selection["fold"].astype(str),
        "Chosen C": selection["chosen_C"].map(lambda v: "" if pd.isna(v) else f"{float(v):g}"),
        "Inner-val macro F1": selection["val_macro_f1"].map(fmt),
        "Candidates (C: inner-val macro F1)": selection["candidates"].str.replace(";", "; "),
        "n train / val / test": [f"{count(a)} / {count(b)} / {count(c)}" for a, b, c in
                                 zip(selection["n_train"], selection["n_val"], selection["n_test"])]})


# ----------------------------------------------------------------------------------------- acquisition per class
# Header fields of each subject's first raw file (subjects.csv) that a scanner or a data set fixes: where one
# value is given by one class only and by all of it, that field alone tells the class apart.
ACQUISITION_FIELDS = {"orientation": "Orientation", "voxel": "Voxel size (mm)", "matrix": "Matrix", "dtype": "Data type"}


def acquisition_table(subjects: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per (field, value): subjects per class, flagged where the value alone identifies a class.

    Empty when subjects.csv lacks the acquisition columns (runs from before they were recorded).
    """
    frame = subjects.copy()
    columns = {"orientation": ["orientation"], "voxel": ["voxel_x", "voxel_y", "voxel_z"],
               "matrix": ["shape_x", "shape_y", "shape_z"], "dtype": ["dtype"]}
    rows = []
    several = frame.loc[frame["label"].isin(classes), "label"].nunique() > 1  # a flag needs another class present
    for field, needed in columns.items():
        if not set(needed) <= set(frame.columns):
            continue
        if field == "voxel":
            values = frame[needed].apply(lambda r: " x ".join(f"{float(v):g}" for v in r), axis=1)
        elif field == "matrix":
            values = frame[needed].apply(lambda r: " x ".join(str(int(v)) for v in r), axis=1)
        else:
            values = frame[needed[0]].astype(str)
        for value in sorted(set(values)):
            given = frame["label"][values == value]
            counts = {f"n_{c}": int((given == c).sum()) for c in classes}
            present = [c for c in classes if counts[f"n_{c}"]]
            flag = f"only {present[0]}" if len(present) == 1 and several and len(set(values)) > 1 else ""
            rows.append({"field": field, "value": value, **counts, "total": int(len(given)), "flag": flag})
    return pd.DataFrame(rows, columns=["field", "value", *[f"n_{c}" for c in classes], "total", "flag"])


def acquisition_display(table: pd.DataFrame, classes: list[str], per_field: int = 10) -> pd.DataFrame:
    """The table for the report: per field its ``per_field`` most common values, the rest summed in one row."""
    shown = []
    for field, rows in table.groupby("field", sort=False):
        rows = rows.sort_values("total", ascending=False, kind="stable")
        rest = rows.iloc[per_field:]
        shown.append(rows.iloc[:per_field])
        if len(rest):
            shown.append(pd.DataFrame([{"field": field, "value": f"{len(rest)} other values",
                                        **{f"n_{c}": int(rest[f"n_{c}"].sum()) for c in classes},
                                        "total": int(rest["total"].sum()),
                                        "flag": f"{int((rest['flag'] != '').sum())} of them in one class only"
                                        if (rest["flag"] != "").any() else ""}]))
    table = pd.concat(shown, ignore_index=True) if shown else table
    out = pd.DataFrame({"Field": table["field"].map(ACQUISITION_FIELDS), "Value": table["value"]})
    for c in classes:
        out[c] = table[f"n_{c}"].astype(str)
    out["Total"] = table["total"].astype(str)
    out["Flag"] = table["flag"].map(lambda f: f"**{f}**" if f else "")
    return out.reset_index(drop=True)


def acquisition_sentences(table: pd.DataFrame) -> list[str]:
    """Per field, how many subjects carry a value that only one class has: for them the header gives the class."""
    flagged = table[table["flag"] != ""]
    if flagged.empty:
        return ["Every orientation, voxel size, matrix and data type seen here occurs in more than one class."]
    parts = []
    for field, rows in flagged.groupby("field", sort=False):
        total = int(table.loc[table["field"] == field, "total"].sum())
        parts.append(f"{ACQUISITION_FIELDS[field].lower()}: {int(rows['total'].sum())} of {total} subjects ("
                     + ", ".join(f"{r.value}: {r.flag}" for r in rows.itertuples(index=False)) + ")")
    return ["Subjects whose header value occurs in one class only, so that it alone gives their class: "
            + "; ".join(parts) + ". The deep models see volumes resampled to one voxel size and turned to RAS, but "
            "resampling leaves traces of the original grid (sharpness, interpolation, the brain's box) that a network "
            "can use; the acquisition-only baseline measures how far these fields go."]
