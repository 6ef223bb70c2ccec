"""Confound sections of the report: baselines in the paper tables, shortcut check, per-site results,
cohort and sites, warnings, and old experiment folders without any of the new inputs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from analysis import build_report
from analysis.__main__ import summary
from analysis.shortcut import paired_bootstrap
from analysis_fixtures import CLASSES, COPYCAT_ARM, PERFECT_ARM

ACQ_MEANING = "that class's score may reflect the data source rather than anatomy"
HIST_MEANING = ("nothing shows that the network learned more than intensity statistics (an interval that reaches 0 "
                "is no evidence either way; see the training check for whether it trained)")


def _md(out) -> str:
    return (out / "report" / "report.md").read_text(encoding="utf-8")


def _table(out, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "report" / "tables" / name, keep_default_na=False, na_values=[""])


# ----------------------------------------------------------------------------------------- baselines in the paper tables
def _hand_summary(per_fold: list[float]) -> tuple[float, float]:
    return float(np.mean(per_fold)), float(np.std(per_fold, ddof=1))


def test_baseline_rows_recompute_from_baseline_predictions(built_confound_report):
    preds = pd.read_csv(built_confound_report / "baseline_predictions.csv")
    comp = _table(built_confound_report, "paper_comparison.csv")
    base_rows = comp[comp["baseline"]]
    assert set(base_rows["model"]) == {"acquisition_baseline", "histogram_baseline"}
    assert base_rows["paper_mean"].isna().all() and not base_rows["winner"].any()
    for model, sel in preds.groupby("model"):
        folds = [g for _, g in sel.groupby("fold")]
        for cls in CLASSES:
            per_fold = [f1_score(g["label"], g["pred"], labels=[cls], average=None, zero_division=0)[0] for g in folds]
            row = base_rows[(base_rows["model"] == model) & (base_rows["metric"] == "f1")
                            & (base_rows["class"] == cls)].iloc[0]
            mean, std = _hand_summary(per_fold)
            assert (row["mean"], row["std"]) == pytest.approx((mean, std))
            assert row["pooled"] == pytest.approx(f1_score(sel["label"], sel["pred"], labels=[cls], average=None)[0])
        for metric, fn in (("macro_f1", lambda y, p: f1_score(y, p, labels=CLASSES, average="macro", zero_division=0)),
                           ("weighted_f1", lambda y, p: f1_score(y, p, labels=CLASSES, average="weighted")),
                           ("accuracy", accuracy_score)):
            row = base_rows[(base_rows["model"] == model) & (base_rows["metric"] == metric)].iloc[0]
            mean, std = _hand_summary([fn(g["label"], g["pred"]) for g in folds])
            assert (row["mean"], row["std"], row["pooled"]) == pytest.approx(
                (mean, std, fn(sel["label"], sel["pred"]))), (model, metric)


def test_baselines_are_marked_and_never_win(built_confound_report):
    comp = _table(built_confound_report, "paper_comparison.csv")
    # the acquisition baseline ties the perfect arm on Healthy F1 (1.0): only the deep arms may hold the star
    healthy = comp[(comp["metric"] == "f1") & (comp["class"] == "Healthy")]
    assert set(healthy[healthy["winner"]]["model"]) == {PERFECT_ARM[0], COPYCAT_ARM[0]}
    md = _md(built_confound_report)
    assert "| *acquisition-only baseline* | baseline | 3/3 | 1.0000 ± 0.0000 | 1.0000 |  |  |" in md
    assert "| *intensity-histogram baseline* | baseline | 3/3 |" in md


# ----------------------------------------------------------------------------------------- shortcut check
def _check(out) -> pd.DataFrame:
    return _table(out, "shortcut_check.csv").fillna({"class": ""})


def test_copy_of_the_acquisition_baseline_is_not_clearly_better_anywhere(built_confound_report):
    check = _check(built_confound_report)
    copy = check[(check["model"] == COPYCAT_ARM[0]) & (check["baseline"] == "acquisition_baseline")]
    assert len(copy) == 1 + len(CLASSES)  # macro F1 and every class
    assert not copy["clearly_better"].any()
    assert (copy["diff"] == 0).all() and (copy["low"] == 0).all() and (copy["high"] == 0).all()
    md = _md(built_confound_report)
    for cls in ("HGG", "LGG"):
        assert f"{cls}: ResNet3D (pre-trained) is not clearly better than the acquisition-only baseline: {ACQ_MEANING}." in md
    assert ("Healthy: no deep arm is clearly better than the acquisition-only baseline (ResNet3D (pre-trained); "
            f"ResNet Mixed Convolution (pre-trained)): {ACQ_MEANING}.") in md


def test_perfect_arm_is_clearly_better_than_a_baseline_at_chance(built_confound_report):
    check = _check(built_confound_report)
    perfect = check[(check["model"] == PERFECT_ARM[0]) & (check["baseline"] == "acquisition_baseline")].set_index("class")
    # the acquisition baseline tosses a coin between HGG and LGG: F1 10/18 and 4/12 per fold
    assert perfect.loc["HGG", "baseline_value"] == pytest.approx(10 / 18)
    assert perfect.loc["LGG", "baseline_value"] == pytest.approx(4 / 12)
    assert perfect.loc["HGG", "clearly_better"] and perfect.loc["LGG", "clearly_better"]
    assert perfect.loc["HGG", "low"] > 0 and perfect.loc["", "clearly_better"]  # macro F1 too
    assert not perfect.loc["Healthy", "clearly_better"]  # both are perfect on Healthy
    hist = check[(check["model"] == PERFECT_ARM[0]) & (check["baseline"] == "histogram_baseline")]
    assert hist["clearly_better"].all()
    md = _md(built_confound_report)
    assert "Healthy: every deep arm is clearly better than the intensity-histogram baseline." in md
    assert f"LGG: ResNet3D (pre-trained) is not clearly better than the intensity-histogram baseline: {HIST_MEANING}." in md
    assert "ResNet Mixed Convolution (pre-trained) is not clearly better" not in md


def test_an_arm_below_a_baseline_is_called_clearly_worse_not_only_not_better():
    # 12 subjects in two folds; the baseline is right about all of them, the deep arm calls every one the next class.
    rows = [{"fold": i % 2, "subject_id": f"s{i}", "label": CLASSES[i % 3]} for i in range(12)]
    base = pd.DataFrame([{**r, "pred": r["label"]} for r in rows])
    deep = pd.DataFrame([{**r, "pred": CLASSES[(CLASSES.index(r["label"]) + 1) % 3]} for r in rows])
    res = paired_bootstrap(deep, base, CLASSES, n_resamples=200, seed=0).set_index("class")
    assert (res["diff"] == -1.0).all() and (res["high"] < 0).all()
    assert res["clearly_worse"].all() and not res["clearly_better"].any()
    # Equal predictions: neither better nor worse.
    same = paired_bootstrap(base, base, CLASSES, n_resamples=200, seed=0)
    assert not same["clearly_worse"].any() and not same["clearly_better"].any()


def test_paired_bootstrap_point_values_match_sklearn_and_are_seeded(built_confound_report):
    deep = pd.read_csv(built_confound_report / "predictions.csv")
    base = pd.read_csv(built_confound_report / "baseline_predictions.csv")
    deep = deep[deep["model"] == COPYCAT_ARM[0]].copy()
    base = base[base["model"] == "histogram_baseline"]
    deep = deep[deep["fold"] != 2]  # only folds 0 and 1 are shared
    res = paired_bootstrap(deep, base, CLASSES, n_resamples=300, seed=7).set_index("class")
    shared = base[base["fold"] != 2]
    assert res.loc["", "n_subjects"] == len(shared)
    for i, cls in enumerate(CLASSES):
        assert res.loc[cls, "deep"] == pytest.approx(f1_score(deep["label"], deep["pred"], labels=CLASSES, average=None)[i])
        assert res.loc[cls, "baseline_value"] == pytest.approx(
            f1_score(shared["label"], shared["pred"], labels=CLASSES, average=None)[i])
        assert res.loc[cls, "low"] <= res.loc[cls, "diff"] <= res.loc[cls, "high"]
    again = paired_bootstrap(deep, base, CLASSES, n_resamples=300, seed=7)
    other = paired_bootstrap(deep, base, CLASSES, n_resamples=300, seed=8)
    assert again.equals(res.reset_index()[again.columns])
    assert not np.allclose(other["low"], again["low"])


def test_report_with_confounds_is_byte_identical_on_rerun(confound_dir):
    build_report(confound_dir, bootstrap_samples=50, seed=3)
    report = confound_dir / "report"
    first = {p.relative_to(report): p.read_bytes() for p in sorted(report.rglob("*")) if p.is_file()}
    build_report(confound_dir, bootstrap_samples=50, seed=3)
    second = {p.relative_to(report): p.read_bytes() for p in sorted(report.rglob("*")) if p.is_file()}
    assert first.keys() == second.keys()
    assert [str(k) for k in first if first[k] != second[k]] == []


# ----------------------------------------------------------------------------------------- per site
def test_per_site_accuracy_and_recall_by_hand(single_arm_dir):
    """mc3_18 pre-trained folds: [[3,1,0],[1,1,0],[0,0,4]], perfect, [[4,0,0],[1,1,0],[0,0,4]].

    Sites: HGG with even k at CBICA, odd k at TCIA01; every LGG at TCIA01; Healthy of fold 0 at Guys, else IOP.
    TCIA01 holds HGG k=1,3 of each fold (6; wrong only fold 0 k=3) and all 6 LGG (wrong: k=0 of folds 0 and 2).
    """
    preds = pd.read_csv(single_arm_dir / "predictions.csv")
    k = preds["subject_id"].str[-2:].astype(int)
    preds["source"] = np.where(preds["label"] == "Healthy", "ixi", "brats")
    preds["site"] = np.select([(preds["label"] == "HGG") & (k % 2 == 0), preds["label"] != "Healthy",
                               preds["fold"] == 0], ["CBICA", "TCIA01", "Guys"], "IOP")
    preds.to_csv(single_arm_dir / "predictions.csv", index=False)
    build_report(single_arm_dir, bootstrap_samples=20)
    site = _table(single_arm_dir, "per_site.csv").set_index("site")
    tcia = site.loc["TCIA01"]
    assert (tcia["n"], tcia["n_HGG"], tcia["n_LGG"], tcia["n_Healthy"]) == (12, 6, 6, 0)
    assert tcia["accuracy"] == pytest.approx(9 / 12)
    assert tcia["recall_HGG"] == pytest.approx(5 / 6) and tcia["recall_LGG"] == pytest.approx(4 / 6)
    assert np.isnan(tcia["recall_Healthy"])  # no Healthy at this site: no recall, not 0
    cbica = site.loc["CBICA"]  # HGG k = 0, 2 of every fold: all right
    assert (cbica["n"], cbica["accuracy"], cbica["recall_HGG"]) == (6, 1.0, 1.0)
    assert (site.loc["Guys", "n"], site.loc["IOP", "n"]) == (4, 8)
    md = _md(single_arm_dir)
    assert "| ResNet Mixed Convolution (pre-trained) | brats | TCIA01 | 12 | 0.7500 | 0.8333 (6) | 0.6667 (6) |  |" in md


# ----------------------------------------------------------------------------------------- cohort, sites, warnings
def test_cohort_flags_differences_from_the_paper(built_confound_report):
    cohort = _table(built_confound_report, "cohort.csv").set_index("class")
    assert cohort["ours"].to_dict() == {"HGG": 30, "LGG": 15, "Healthy": 30}
    assert cohort["paper"].to_dict() == {"HGG": 259, "LGG": 73, "Healthy": 259}
    assert cohort["differs"].all()
    assert cohort.loc["Healthy", "available"] == 40 and cohort.loc["Healthy", "max_per_class"] == 30


def test_paper_sized_cohort_is_not_flagged(confound_dir):
    # A run collected before subjects.csv existed: the cohort comes from experiment.json's draw.
    (confound_dir / "subjects.csv").unlink()
    meta = json.loads((confound_dir / "experiment.json").read_text())
    meta["cohort"]["drawn"] = {"HGG": 259, "LGG": 73, "Healthy": 259}
    (confound_dir / "experiment.json").write_text(json.dumps(meta))
    build_report(confound_dir, bootstrap_samples=20)
    assert not _table(confound_dir, "cohort.csv")["differs"].any()
    assert "The cohort differs from the paper" not in _md(confound_dir)


def test_sites_table_flags_single_class_sites_and_single_source_classes(built_confound_report):
    sites = _table(built_confound_report, "sites.csv").fillna({"site": "", "flag": ""})
    by_site = sites[sites["level"] == "site"].set_index("site")
    assert by_site.loc["TCIA09", "flag"] == "single class (LGG)"
    assert by_site.loc["TCIA01", "flag"] == ""  # HGG and LGG
    assert (by_site.loc["TCIA01", "n_HGG"], by_site.loc["TCIA01", "n_LGG"]) == (15, 9)
    ixi = sites[(sites["level"] == "source") & (sites["source"] == "ixi")].iloc[0]
    assert ixi["flag"] == "single class (Healthy); only source of Healthy"
    md = _md(built_confound_report)
    assert "Source `ixi` alone gives all subjects of Healthy (30 Healthy) and no other class: source and label are confounded" in md
    assert "5 of 6 site(s) contribute a single class" in md


def test_warnings_come_first_and_name_allow_unstripped(built_confound_report):
    md = _md(built_confound_report)
    assert md.index("## Warnings") < md.index("## What ran") < md.index("## Data, cohort and confounds")
    warnings = md[md.index("## Warnings"):md.index("## What ran")]
    assert "`--allow-unstripped`" in warnings and "Healthy 6 of 30" in warnings and "confound" in warnings
    assert "The cohort differs from the paper's" in warnings and "30 HGG / 15 LGG / 30 Healthy" in warnings
    assert "Registration: `--register none`: no spatial normalisation to a template, as in the paper" in md
    # The source confound is a warning too, not only a table row further down.
    assert ("**Source and label are confounded**: every HGG and LGG subject comes from `brats`; every Healthy "
            "subject comes from `ixi`, so these classes can be told apart by where a scan was made") in warnings


def test_no_source_warning_where_every_source_gives_every_class():
    from analysis.confound_report import _source_warning
    from analysis.confounds import sites_table

    origins = pd.DataFrame({"source": ["a", "a", "b", "b"], "site": ["s1", "s2", "s3", "s3"],
                            "label": ["x", "y", "x", "y"]})
    res = SimpleNamespace(sites=sites_table(origins, ["x", "y"]))
    assert _source_warning(res) is None
    one_sided = origins.assign(label=["x", "x", "y", "y"])
    assert _source_warning(SimpleNamespace(sites=sites_table(one_sided, ["x", "y"]))).startswith(
        "**Source and label are confounded**: every x subject comes from `a`; every y subject comes from `b`,")


def test_stripped_run_has_no_stripping_warning(confound_dir):
    meta = json.loads((confound_dir / "experiment.json").read_text())
    meta["stripping"] = {"by_class": {c: {"stripped": 30, "unstripped": 0} for c in CLASSES}, "unstripped": []}
    meta["allow_unstripped"] = False
    (confound_dir / "experiment.json").write_text(json.dumps(meta))
    md = (build_report(confound_dir, bootstrap_samples=20) / "report.md").read_text()
    assert "--allow-unstripped`, which" not in md and "Unstripped volumes" not in md


def test_baselines_inputs_are_described(built_confound_report):
    md = _md(built_confound_report)
    assert "13 features: `voxel_x`, `voxel_y`" in md and "`orientation`, `dtype`" in md
    assert "a 20-bin histogram on (0, 1] of the preprocessed brain" in md
    assert "| intensity-histogram baseline | 2 | 10 | 0.5000 |" in md


def test_summary_prints_baselines_and_the_shortcut_line(built_confound_report):
    text = summary(built_confound_report / "report")
    assert "acquisition-only baseline [baseline]" in text and "intensity-histogram baseline [baseline]" in text
    assert ("shortcut check: 4 of 6 deep-arm x class results are not clearly better than the acquisition-only "
            "baseline; 2 of 6 against the intensity-histogram baseline; see report") in text


# ----------------------------------------------------------------------------------------- old folders, bad inputs
def test_old_style_folder_says_what_cannot_be_shown(built_paper_report):
    md = _md(built_paper_report)
    for line in ("Class by source and site: cannot be shown",
                 "Skull-stripping status per class: cannot be shown",
                 "Baseline rows, baseline features and the shortcut check: cannot be shown (baseline_predictions.csv is missing",
                 "Per-site results of the deep arms: cannot be shown",
                 "Registration: not recorded in experiment.json"):
        assert line in md, line
    shortcut = md[md.index("## Shortcut check"):md.index("## Per-site results")]
    assert "Cannot be shown: baseline_predictions.csv is missing" in shortcut
    assert _table(built_paper_report, "shortcut_check.csv").empty
    assert _table(built_paper_report, "per_site.csv").empty
    assert "shortcut check: not available" in summary(built_paper_report / "report")
    comp = _table(built_paper_report, "paper_comparison.csv")
    assert not comp["baseline"].any()


def test_a_manifest_run_without_sites_is_not_called_free_of_site_confounds(confound_dir):
    """Every subject from one source and no site recorded: the origin was not checked, which is not "no confound"."""
    subjects = pd.read_csv(confound_dir / "subjects.csv", keep_default_na=False)
    subjects.assign(source="manifest", site="").to_csv(confound_dir / "subjects.csv", index=False)
    for name in ("predictions.csv", "baseline_predictions.csv"):
        frame = pd.read_csv(confound_dir / name, keep_default_na=False)
        frame.assign(source="manifest", site="").to_csv(confound_dir / name, index=False)
    md = (build_report(confound_dir, bootstrap_samples=20) / "report.md").read_text()
    assert "no site confound" not in md and "No class comes from a single source" not in md
    assert ("Class by source and site: cannot be shown (subjects.csv records no site for any subject, and one source "
            "(manifest), so whether scanner or site and label coincide was not checked: give the manifest a `site` "
            "column") in md


def test_malformed_baseline_file_costs_only_the_baselines(confound_dir):
    (confound_dir / "baseline_predictions.csv").write_text("model,fold\nx,0\n")
    md = (build_report(confound_dir, bootstrap_samples=20) / "report.md").read_text()
    assert "baseline_predictions.csv could not be read" in md and "missing column(s)" in md
    assert "## Shortcut check\n\nCannot be shown: baseline_predictions.csv could not be read" in md
    assert "| ResNet Mixed Convolution | yes | 3/3 |" in md  # the deep arms are still reported


# ----------------------------------------------------------------------------------------- preprocessing in "What ran"
def _cache(tmp_path, target_shape=None):
    cache = tmp_path / "cache" / "abc123"
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text(json.dumps({
        "config": {"spacing": 2.0, "percentiles": [0.5, 99.5], "target_shape": target_shape, "register": "none"},
        "shape": [72, 90, 77], "channels": 1, "n_subjects": 591, "spacing_mm": 2.0}))
    return cache


def test_preprocessing_names_the_one_quantity_shared_across_subjects(tmp_path):
    from analysis.confounds import preprocessing_text

    cache = _cache(tmp_path)
    text = preprocessing_text({"cache": str(cache)})
    assert text.startswith("each volume on its own: RAS orientation, resampling to 2 mm voxels, intensities "
                           "rescaled to its own brain's [0.5, 99.5] percentiles, cropped to its brain; then centred "
                           "in a 72 x 90 x 77 voxel box (X x Y x Z), the largest brain bounding box among the 591 "
                           "cached subjects. The box is the only quantity computed across subjects, test subjects "
                           "included")
    assert text.endswith(f"(from {cache / 'meta.json'})")
    fixed = preprocessing_text({"cache": str(_cache(tmp_path / "fixed", target_shape=[72, 90, 77]))})
    assert "centred in a fixed 72 x 90 x 77 voxel box (X x Y x Z, as asked for)" in fixed
    assert "test subjects included" not in fixed
    gone = tmp_path / "gone"
    assert preprocessing_text({"cache": str(gone)}) == (
        f"{gone / 'meta.json'} could not be read (FileNotFoundError): the cache is on another machine or was removed")
    assert preprocessing_text({}).startswith("not recorded in experiment.json (no `cache` key")


def test_what_ran_states_the_preprocessing(confound_dir, tmp_path):
    meta = json.loads((confound_dir / "experiment.json").read_text())
    meta["cache"] = str(_cache(tmp_path))
    (confound_dir / "experiment.json").write_text(json.dumps(meta))
    md = (build_report(confound_dir, bootstrap_samples=20) / "report.md").read_text()
    what_ran = md[md.index("## What ran"):md.index("## Data, cohort and confounds")]
    assert "- Preprocessing: each volume on its own: RAS orientation, resampling to 2 mm voxels" in what_ran
    assert "the largest brain bounding box among the 591 cached subjects" in what_ran
    assert what_ran.index("- Preprocessing:") < what_ran.index("- Registration:")


def test_a_renamed_run_folder_finds_its_cache_entry_inside_it(tmp_path):
    """experiment.json records absolute paths; after `mv OUT NEW` the report said the cache "was removed"."""
    from analysis.confound_report import located_cache
    from analysis.load import load_experiment
    from analysis_fixtures import build_paper_dir

    old, new = tmp_path / "old", tmp_path / "new"
    build_paper_dir(old)
    meta = json.loads((old / "experiment.json").read_text())
    entry = _cache(old)  # old/cache/abc123, inside the run folder as tune_main puts it by default
    meta.update(output=str(old), cache=str(entry))
    (old / "experiment.json").write_text(json.dumps(meta))
    old.rename(new)
    exp = load_experiment(new)
    assert located_cache(exp)["cache"] == str(new.resolve() / "cache" / "abc123")
    assert exp.relocated("s3://bucket/x") == "s3://bucket/x" and exp.relocated("/elsewhere/y") == "/elsewhere/y"
    md = (build_report(new, bootstrap_samples=20) / "report.md").read_text()
    assert "the largest brain bounding box among the 591 cached subjects" in md and "was removed" not in md


def test_the_cohort_counts_the_subjects_left_after_skip_invalid_not_the_draw():
    """One HGG drawn, then left out by preprocessing: the paper's 259 HGG is no longer matched, and the text says why."""
    from types import SimpleNamespace

    from analysis.confounds import cohort_table

    subjects = pd.DataFrame({"subject_id": [f"h{i}" for i in range(258)] + [f"l{i}" for i in range(73)]
                             + [f"i{i}" for i in range(259)],
                             "label": ["HGG"] * 258 + ["LGG"] * 73 + ["Healthy"] * 259})
    drawn = {"HGG": 259, "LGG": 73, "Healthy": 259}
    meta = {"cohort": {"available": drawn, "drawn": drawn, "max_per_class": {}}}
    cohort = cohort_table(SimpleNamespace(meta=meta, subjects=subjects, classes=["HGG", "LGG", "Healthy"],
                                          predictions=None))
    assert cohort.table.set_index("class")["ours"].to_dict() == {"HGG": 258, "LGG": 73, "Healthy": 259}
    assert cohort.differs
    assert cohort.source == ("subjects.csv (the subjects the folds were drawn from); the `--max-per-class` draw in "
                             "experiment.json had 1 more HGG, left out afterwards (--skip-invalid)")


def test_acquisition_per_class_flags_header_values_that_only_one_class_has():
    from analysis.confounds import acquisition_display, acquisition_sentences, acquisition_table

    subjects = pd.DataFrame({
        "label": ["x", "x", "y", "y", "y"],
        "orientation": ["LPS", "LPS", "LPS", "PSR", "PSR"],
        "voxel_x": [1.0, 1.0, 0.9375, 0.9375, 0.9375], "voxel_y": [1.0, 1.0, 0.9375, 0.9375, 0.9375],
        "voxel_z": [1.0, 1.0, 1.2, 1.2, 1.2],
        "shape_x": [240] * 5, "shape_y": [240] * 5, "shape_z": [155] * 5, "dtype": ["int16"] * 5})
    table = acquisition_table(subjects, ["x", "y"]).set_index(["field", "value"])
    assert table.loc[("orientation", "LPS"), ["n_x", "n_y", "flag"]].tolist() == [2, 1, ""]
    assert table.loc[("orientation", "PSR"), ["n_x", "n_y", "flag"]].tolist() == [0, 2, "only y"]
    assert table.loc[("voxel", "0.9375 x 0.9375 x 1.2"), "flag"] == "only y"
    assert table.loc[("voxel", "1 x 1 x 1"), "flag"] == "only x"
    assert table.loc[("matrix", "240 x 240 x 155"), "flag"] == ""  # one value for everyone tells nothing
    (sentence,) = acquisition_sentences(table.reset_index())
    assert "orientation: 2 of 5 subjects (PSR: only y); voxel size (mm): 5 of 5 subjects" in sentence
    # Many values: the report shows the commonest and sums the rest in one row.
    many = subjects.assign(shape_z=[150, 151, 152, 153, 153])
    shown = acquisition_display(acquisition_table(many, ["x", "y"]), ["x", "y"], per_field=2)
    matrix = shown[shown["Field"] == "Matrix"]
    assert matrix["Value"].tolist() == ["240 x 240 x 153", "240 x 240 x 150", "2 other values"]
    assert matrix.iloc[2][["x", "y", "Total", "Flag"]].tolist() == ["1", "1", "2", "**2 of them in one class only**"]
    assert "Every orientation" in acquisition_sentences(acquisition_table(subjects.assign(label="x"), ["x", "y"]))[0]


def test_a_class_missing_from_a_draw_gives_no_difference_there_rather_than_a_0():
    """The deep arm is right about all 20 subjects; the baseline about all but the 2 LGG ones (called HGG). Every
    draw that holds an LGG subject scores the LGG difference 1 - 0; a draw without one (12%) cannot measure LGG. Scored
    0 - 0 there, those draws put the interval's low end at 0 and the deep arm was not "clearly better" on LGG."""
    labels = ["LGG"] * 2 + ["HGG"] * 9 + ["Healthy"] * 9
    deep = pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(20)], "fold": 0, "label": labels, "pred": labels})
    base = deep.assign(pred=deep["label"].replace({"LGG": "HGG"}))
    res = paired_bootstrap(deep, base, CLASSES, n_resamples=400, seed=0).set_index("class")
    assert res.loc["LGG", "diff"] == 1.0 and res.loc["LGG", "low"] == res.loc["LGG", "high"] == 1.0
    assert res.loc["LGG", "clearly_better"]
    # the draws without an LGG subject are counted: about (18/20)^20 = 12% of 400; every draw defines the rest
    assert 0.07 * 400 < res.loc["LGG", "n_undefined_resamples"] < 0.18 * 400
    assert res.loc["", "n_undefined_resamples"] == res.loc["HGG", "n_undefined_resamples"] == 0
