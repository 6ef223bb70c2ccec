"""The report built from fixture experiment directories: files, tables, partial results, HTML, re-runs, CLI."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pandas as pd
import pytest
from PIL import Image

from analysis import build_report
from analysis_fixtures import FAILED_TRIAL, MISSING_TRIAL, PAPER_CONFIG, REPO_ROOT, UNRUN_TRIALS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(frame: pd.DataFrame, **eq) -> pd.DataFrame:
    for k, v in eq.items():
        frame = frame[frame[k] == v]
    return frame


# ----------------------------------------------------------------------------------------- paper
def test_report_files_exist(built_paper_report):
    report = built_paper_report / "report"
    for name in ("report.md", "report.html", "tables/per_class.csv", "tables/overall.csv",
                 "tables/paper_comparison.csv", "tables/pairwise_tests.csv", "tables/bootstrap_ci.csv",
                 "tables/per_fold_class.csv", "tables/per_fold_overall.csv", "tables/confusion.csv",
                 "tables/roc_auc.csv", "tables/failed_trials.csv", "tables/missing_trials.csv", "tables/arms.csv",
                 "figures/heatmap_classwise.png", "figures/macro_f1_by_arm.png"):
        assert (report / name).is_file(), name
    for slug in ("mc3_18-pretrained", "mc3_18-scratch", "r3d_18-pretrained"):
        for kind in ("confusion", "roc", "learning"):
            assert (report / "figures" / f"{kind}_{slug}.png").is_file()
    assert not list(report.rglob("*.tmp"))
    # k-fold: every subject is tested once, and the confusion captions say so.
    assert "(each subject once, in the fold that held it out)" in (report / "report.md").read_text()


def test_per_class_and_overall_csv_columns_and_values(built_paper_report):
    tables = built_paper_report / "report" / "tables"
    pc = pd.read_csv(tables / "per_class.csv")
    ov = pd.read_csv(tables / "overall.csv")
    assert list(pc.columns) == ["model", "pretrained", "class", "metric", "mean", "std", "pooled"]
    assert list(ov.columns) == ["model", "pretrained", "metric", "mean", "std", "pooled"]
    assert set(pc["metric"]) == {"precision", "recall", "specificity", "f1"}
    assert set(ov["metric"]) == {"accuracy", "macro_f1", "weighted_f1"}
    assert len(pc) == 3 * 3 * 4 and len(ov) == 3 * 3
    # mc3_18 pre-trained: folds [[3,1,0],[1,1,0],[0,0,4]], [[4,0,0],[0,2,0],[0,0,4]], [[4,0,0],[1,1,0],[0,0,4]]
    lgg = _rows(pc, model="mc3_18", pretrained=True, **{"class": "LGG"}, metric="f1").iloc[0]
    assert lgg["mean"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert lgg["pooled"] == pytest.approx(8 / 11)  # summed: TP 4, FP 1, FN 2
    hgg_spec = _rows(pc, model="mc3_18", pretrained=True, **{"class": "HGG"}, metric="specificity").iloc[0]
    assert hgg_spec["pooled"] == pytest.approx(16 / 18)
    acc = _rows(ov, model="mc3_18", pretrained=True, metric="accuracy").iloc[0]
    assert acc["pooled"] == pytest.approx(27 / 30)
    assert acc["mean"] == pytest.approx((8 / 10 + 10 / 10 + 9 / 10) / 3)


def test_paper_values_and_differences(built_paper_report):
    comp = pd.read_csv(built_paper_report / "report" / "tables" / "paper_comparison.csv")
    row = _rows(comp, model="mc3_18", pretrained=True, metric="f1", **{"class": "LGG"}).iloc[0]
    assert row["paper_mean"] == pytest.approx(0.8949)
    assert row["paper_std"] == pytest.approx(0.033)
    assert row["difference"] == pytest.approx(13 / 18 - 0.8949)
    assert row["table"] == 2
    macro = _rows(comp, model="r3d_18", pretrained=True, metric="macro_f1").iloc[0]
    assert macro["paper_mean"] == pytest.approx(0.8925)
    # r3d_18 pre-trained has the best mean macro F1 of the fixture; the paper's best is mc3_18 pre-trained
    winners = _rows(comp, metric="macro_f1")
    assert list(winners[winners["winner"]]["model"]) == ["r3d_18"]
    assert list(winners[winners["paper_winner"]]["model"]) == ["mc3_18"]
    md = (built_paper_report / "report" / "report.md").read_text()
    assert "0.8949 ± 0.0330" in md  # published LGG F1 of pre-trained MC3, beside ours
    assert f"{13 / 18 - 0.8949:+.4f}" in md
    assert "★" in md and "Table 5" in md
    assert "Synthetic data" not in md and "Experiment: `paper`." in md  # only the demo is said to be synthetic


def test_a_baseline_above_every_arm_does_not_take_the_star_from_the_best_arm():
    from analysis.metrics import arm_metrics
    from analysis.partial import PartialResults
    from analysis.tables import paper_comparison

    classes = ["HGG", "LGG", "Healthy"]

    def predictions(model: str, wrong: int) -> pd.DataFrame:
        """Three folds of six subjects (two per class); the first `wrong` of each fold are called the next class."""
        return pd.DataFrame([{"model": model, "pretrained": False, "fold": fold, "trial_name": f"{model}-{fold}",
                              "subject_id": f"s{fold}-{i}", "label": classes[i % 3],
                              "pred": classes[(i + 1) % 3] if i < wrong else classes[i % 3]}
                             for fold in range(3) for i in range(6)])

    arms, baseline = [("mc3_18", False), ("r3d_18", False)], [("acquisition_baseline", False)]
    deep = pd.concat([predictions("mc3_18", 2), predictions("r3d_18", 3)])
    folds = pd.DataFrame([{"model": m, "pretrained": p, "folds_planned": 3, "folds_present": 3, "missing_folds": "",
                           "failed_folds": "", "trials": 3, "n_predictions": 18} for m, p in arms])
    comparison = paper_comparison(arm_metrics(deep, classes, arms), arms, classes,
                                  PartialResults(failed=pd.DataFrame(), missing=pd.DataFrame(), arm_folds=folds, notes=[]),
                                  arm_metrics(predictions("acquisition_baseline", 0), classes, baseline), baseline)
    accuracy = comparison[comparison["metric"] == "accuracy"].set_index("model")
    # 4/6, 3/6 and 6/6 right in every fold: the baseline is best, the star still goes to the best arm.
    assert accuracy["mean"].to_dict() == pytest.approx({"mc3_18": 4 / 6, "r3d_18": 3 / 6, "acquisition_baseline": 1.0})
    assert accuracy["winner"].to_dict() == {"mc3_18": True, "r3d_18": False, "acquisition_baseline": False}


def test_statistics_section(built_paper_report):
    md = (built_paper_report / "report" / "report.md").read_text()
    assert "Nadeau-Bengio" in md and "Holm" in md
    assert "very little power" in md
    assert "Bootstrap 95% confidence intervals" in md
    tests = pd.read_csv(built_paper_report / "report" / "tables" / "pairwise_tests.csv")
    assert len(tests) == 3  # all pairs of 3 arms
    assert (tests["df"] == 2).all()
    assert tests["n_test_over_n_train"].tolist() == pytest.approx([10 / 16] * 3)
    boot = pd.read_csv(built_paper_report / "report" / "tables" / "bootstrap_ci.csv")
    assert ((boot["low"] <= boot["pooled"] + 1e-12) & (boot["pooled"] <= boot["high"] + 1e-12)).all()


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if attrs.get(key, "").startswith(("http:", "https:", "//", "file:")) or (tag == "link" and key in attrs):
                self.external.append(f"{tag} {attrs.get(key)}")


def test_html_is_self_contained_and_images_decode(built_paper_report):
    report = built_paper_report / "report"
    parser = _Images()
    parser.feed((report / "report.html").read_text(encoding="utf-8"))
    parser.close()
    md = (report / "report.md").read_text()
    assert len(parser.srcs) == md.count("](figures/") > 0
    assert parser.external == []
    for src in parser.srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        data = base64.b64decode(src[len(prefix):], validate=True)
        assert data[:8] == PNG_SIGNATURE
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_rerun_is_byte_identical_and_prunes_stale_files(single_arm_dir):
    build_report(single_arm_dir, bootstrap_samples=50, seed=0)
    report = single_arm_dir / "report"
    first = {p.relative_to(report): p.read_bytes() for p in sorted(report.rglob("*")) if p.is_file()}
    assert {"report.md", "report.html", "tables/per_class.csv", "tables/overall.csv"} <= {p.as_posix() for p in first}
    stale = report / "figures" / "confusion_old_model-scratch.png"
    stale.write_bytes(b"old")
    build_report(single_arm_dir, bootstrap_samples=50, seed=0)
    second = {p.relative_to(report): p.read_bytes() for p in sorted(report.rglob("*")) if p.is_file()}
    assert not stale.exists()
    assert first.keys() == second.keys()
    for rel in first:
        assert first[rel] == second[rel], f"{rel} differs between runs"


# ----------------------------------------------------------------------------------------- partial
def test_partial_results_are_named_and_not_zero_filled(partial_dir):
    report = build_report(partial_dir, bootstrap_samples=20, seed=0)
    md = (report / "report.md").read_text()
    for name in (FAILED_TRIAL, MISSING_TRIAL, *UNRUN_TRIALS):
        assert name in md
    assert "RuntimeError: CUDA out of memory while allocating 2.00 GiB" in md
    assert "Traceback" not in md  # first line of the error only
    # r3d_18 pre-trained fold 2 ERRORed: named as failed; mc3_18 scratch fold 1 never ran: missing
    assert "2/3 (fold 2 failed)" in md and "2/3 (missing fold 1)" in md
    assert "ERROR (crashed; retries used up)" in md and "1 trial(s) failed" in md
    assert "0/3 (missing folds 0, 1, 2)" in md and "no results" in md  # planned arm that never ran
    tables = report / "tables"
    failed = pd.read_csv(tables / "failed_trials.csv")
    missing = pd.read_csv(tables / "missing_trials.csv")
    assert failed["trial_name"].tolist() == [FAILED_TRIAL]
    assert sorted(missing["trial_name"]) == sorted([MISSING_TRIAL, *UNRUN_TRIALS])
    fo = pd.read_csv(tables / "per_fold_overall.csv")
    assert len(fo) == 3 + 2 + 2
    assert FAILED_TRIAL not in set(fo["trial_name"]) and MISSING_TRIAL not in set(fo["trial_name"])
    pc = pd.read_csv(tables / "per_class.csv")
    assert "r2plus1d_18" not in set(pc["model"])  # no zero-filled rows for the arm without results
    # r3d_18 pre-trained folds 0 and 1 only: LGG F1 2/3 and 4/5 -> 11/15 (a zero-filled third fold would give 22/45)
    lgg = _rows(pc, model="r3d_18", pretrained=True, metric="f1", **{"class": "LGG"}).iloc[0]
    assert lgg["mean"] == pytest.approx(11 / 15)
    arms = pd.read_csv(tables / "arms.csv").set_index(["model", "pretrained"])
    assert arms.loc[("r3d_18", True), "folds_present"] == 2
    assert arms.loc[("mc3_18", False), "folds_present"] == 2
    assert arms.loc[("mc3_18", True), "folds_present"] == 3
    assert arms.loc[("r2plus1d_18", True), "folds_present"] == 0
    comp = pd.read_csv(tables / "paper_comparison.csv")
    unrun = _rows(comp, model="r2plus1d_18", metric="macro_f1").iloc[0]
    assert pd.isna(unrun["mean"]) and unrun["paper_mean"] == pytest.approx(0.9237)
    tests = pd.read_csv(tables / "pairwise_tests.csv")
    pair = _rows(tests, model_a="r3d_18", model_b="mc3_18", pretrained_b=False).iloc[0]
    assert pair["folds"] == 1 and "at least 2" in pair["note"]  # they share only fold 0
    # The interval and AUC tables say which folds and how many subjects each row covers: 10 test subjects a fold.
    for section in ("### Bootstrap 95% confidence intervals", "### ROC curves (one-vs-rest)"):
        table = md.split(section)[1].split("###")[0]
        r3d = next(line for line in table.splitlines() if line.startswith("| ResNet3D | yes"))
        assert "| 2/3 (fold 2 failed) | 20 |" in r3d, r3d
        complete = next(line for line in table.splitlines() if line.startswith("| ResNet Mixed Convolution | yes"))
        assert "| 3/3 | 30 |" in complete, complete


# ----------------------------------------------------------------------------------------- search
def test_search_report_best_config_and_optuna(search_dir, tmp_path):
    # move OUT after the run: the absolute sqlite paths in experiment.json no longer exist
    moved = tmp_path / "moved_out"
    shutil.move(str(search_dir), str(moved))
    report = build_report(moved, bootstrap_samples=50, seed=0)
    best = pd.read_csv(report / "tables" / "best_configs.csv", dtype={"config_id": str})
    for arm in best[["model", "pretrained"]].drop_duplicates().itertuples(index=False):
        rows = _rows(best, model=arm.model, pretrained=arm.pretrained).set_index("role")
        # cfgB has the highest inner score but only 2 of 3 folds: cfgA wins
        assert rows.loc["best", "config_id"] == "cfgA"
        assert rows.loc["best", "inner_val_macro_f1_mean"] == pytest.approx(0.82)
        assert rows.loc["best", "lr"] == pytest.approx(1e-4)
        assert rows.loc["best", "test_macro_f1_mean"] == pytest.approx((8 / 9 + 2 / 3 + 1) / 3)
        assert rows.loc["paper_default", "config_id"] == PAPER_CONFIG
        assert rows.loc["paper_default", "test_macro_f1_mean"] == pytest.approx(3 / 4)
    # main tables come from config_id == paper_config_id
    ov = pd.read_csv(report / "tables" / "overall.csv")
    assert _rows(ov, metric="macro_f1")["mean"].tolist() == pytest.approx([3 / 4, 3 / 4])
    # A shuffle run (this fixture's split) may test a subject several times: the captions count predictions.
    md = (report / "report.md").read_text()
    assert "(a subject once per split that tested it: random splits may test it several times or never)" in md
    assert "each subject once" not in md
    figs = report / "figures"
    assert (figs / "optuna_history_mc3_18-scratch.png").is_file()
    assert (figs / "optuna_importance_mc3_18-scratch.png").is_file()
    assert (figs / "optuna_history_r3d_18-pretrained.png").is_file()
    assert not (figs / "optuna_importance_r3d_18-pretrained.png").exists()
    assert (figs / "search_best_vs_default.png").is_file()
    imp = pd.read_csv(report / "tables" / "optuna_importance_mc3_18-scratch.csv")
    assert set(imp["param"]) == {"lr", "dropout"} and imp["importance"].sum() == pytest.approx(1.0)
    md = (report / "report.md").read_text()
    assert "need at least 3 completed trials with different scores" in md
    assert "is outside this output folder (not found); read" in md  # a moved OUT's studies, found under OUT/optuna
    assert "(default 1e-05)" in md and "Grid hyperparameters (paper defaults):" in md
    assert "3 independent random 70:30" in md
    assert "played no part" not in md  # the choice by the mean over folds saw every fold's test subjects


def test_set_overrides_are_not_called_the_papers_defaults(search_dir):
    """The demo trains with --set lr=3e-4: the report must name that, not pass it off as the paper's recipe."""
    meta = json.loads((search_dir / "experiment.json").read_text())
    meta["overrides"] = {"lr": 3e-4, "batch_size": 4, "bn_recalibration": True}
    (search_dir / "experiment.json").write_text(json.dumps(meta))
    md = (build_report(search_dir, bootstrap_samples=20, seed=0) / "report.md").read_text()
    assert "Grid hyperparameters (paper defaults with --set batch_size=4 bn_recalibration=true lr=0.0003):" in md
    assert ("Configuration chosen by the mean over folds, against the paper defaults with --set batch_size=4 "
            "bn_recalibration=true lr=0.0003") in md
    assert "paper defaults with --set batch_size=4 bn_recalibration=true lr=0.0003 `" + PAPER_CONFIG + "`" in md


def test_missing_optuna_db_is_a_sentence_and_is_not_created(tmp_path):
    from analysis.optuna_plots import study_figures

    db = tmp_path / "gone" / "optuna" / "x.db"
    spec = {"model": "mc3_18", "pretrained": False, "storage": f"sqlite:///{db}", "study_name": "x"}
    out = study_figures(spec, tmp_path / "OUT", tmp_path / "figs")
    assert out.history_png is None and out.importance_png is None
    assert any("not found" in n for n in out.notes)
    assert not db.exists()  # reading never creates an empty study database


# ----------------------------------------------------------------------------------------- CLI
def test_cli_writes_report_and_summary(single_arm_dir):
    proc = subprocess.run([sys.executable, "-m", "analysis", str(single_arm_dir), "--bootstrap", "20"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "report written to" in proc.stdout
    assert "ResNet Mixed Convolution (pre-trained)" in proc.stdout and "3/3" in proc.stdout
    assert (single_arm_dir / "report" / "report.html").is_file()


def test_cli_missing_predictions_fails_naming_the_file(single_arm_dir):
    (single_arm_dir / "predictions.csv").unlink()
    proc = subprocess.run([sys.executable, "-m", "analysis", str(single_arm_dir)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert str(single_arm_dir / "predictions.csv") in proc.stderr
    assert not (single_arm_dir / "report").exists()


def test_grid_trials_of_the_default_configuration_compete_in_the_search(search_dir):
    """Grid and search in one run (the demo): the search does not retrain the default, the grid's folds stand in."""
    trials = pd.read_csv(search_dir / "trials.csv", dtype={"config_id": str})
    predictions = pd.read_csv(search_dir / "predictions.csv", dtype={"config_id": str})
    is_default = trials["config_id"] == PAPER_CONFIG
    trials.loc[is_default, "experiment"] = "paper"
    trials.loc[is_default, "best_val_macro_f1"] = 0.97  # better than every searched configuration
    predictions.loc[predictions["config_id"] == PAPER_CONFIG, "experiment"] = "paper"
    trials.to_csv(search_dir / "trials.csv", index=False)
    predictions.to_csv(search_dir / "predictions.csv", index=False)
    best = pd.read_csv(build_report(search_dir, bootstrap_samples=20) / "tables" / "best_configs.csv", dtype={"config_id": str})
    for arm in best[["model", "pretrained"]].drop_duplicates().itertuples(index=False):
        rows = _rows(best, model=arm.model, pretrained=arm.pretrained).set_index("role")
        assert rows.loc["best", "config_id"] == PAPER_CONFIG
        assert rows.loc["paper_default", "inner_val_macro_f1_mean"] == pytest.approx(0.97)
        assert rows.loc["paper_default", "test_macro_f1_mean"] == pytest.approx(3 / 4)


def test_the_report_reads_the_studies_of_its_own_output_folder(tmp_path):
    """experiment.json records the absolute database path; a copied OUT's report must show the copy's studies even
    while the original folder (whose studies may have moved on) still exists."""
    from analysis.optuna_plots import resolve_storage

    original, copy = tmp_path / "original", tmp_path / "copy"
    for out in (original, copy):
        (out / "optuna").mkdir(parents=True)
        (out / "optuna" / "search.db").write_bytes(b"")
    recorded = f"sqlite:///{original / 'optuna' / 'search.db'}"
    assert resolve_storage(recorded, original) == (recorded, None)
    url, note = resolve_storage(recorded, copy)
    assert url == f"sqlite:///{(copy / 'optuna' / 'search.db').resolve()}"
    assert note == f"storage {recorded} is outside this output folder (found); read {copy / 'optuna' / 'search.db'}"
    assert resolve_storage(recorded, tmp_path / "elsewhere") == (recorded, None)  # no own copy: the recorded one
    missing = f"sqlite:///{tmp_path / 'gone' / 'search.db'}"
    assert resolve_storage(missing, tmp_path / "elsewhere") == (
        None, f"storage {missing} not found (nor {tmp_path / 'elsewhere' / 'optuna' / 'search.db'})")


def test_what_ran_says_how_the_class_weights_entered_the_loss_also_for_older_runs():
    from analysis.report import LOSS_TEXT, _loss_text
    from trainables.metrics import LOSS_PER_BATCH, LOSS_PER_SAMPLE

    assert set(LOSS_TEXT) == {LOSS_PER_SAMPLE, LOSS_PER_BATCH}
    current = pd.DataFrame({"loss": [LOSS_PER_SAMPLE] * 3})
    assert _loss_text(current) == f"Loss: {LOSS_TEXT[LOSS_PER_SAMPLE]}."
    # Collected before trials.csv had the column: those folds trained with torch's per-batch weighted mean.
    assert _loss_text(pd.DataFrame({"fold": [0, 1]})) == f"Loss: {LOSS_TEXT[LOSS_PER_BATCH]}."
    mixed = pd.DataFrame({"loss": [LOSS_PER_SAMPLE, None, LOSS_PER_SAMPLE]})  # one fold from an older run
    assert _loss_text(mixed) == (f"Loss: {LOSS_TEXT[LOSS_PER_BATCH]} (1 trial(s)); "
                                 f"{LOSS_TEXT[LOSS_PER_SAMPLE]} (2 trial(s)).")


def test_without_the_models_package_the_report_says_published_values_are_left_out(monkeypatch):
    from analysis import names
    from analysis.paper import published

    names._model_tables.cache_clear()
    monkeypatch.setitem(sys.modules, "models", None)  # `import models` now fails, as without torch
    try:
        assert names.display_name("mc3_18") == "mc3_18"
        assert "no published value shown" in names.display_names_note()
        assert published("mc3_18", True, "macro_f1")[2] is None
    finally:
        names._model_tables.cache_clear()
    monkeypatch.undo()
    assert published("mc3_18", True, "macro_f1")[0] == pytest.approx(0.9345)


def test_only_a_demo_is_called_synthetic_and_by_the_generator_of_its_task():
    from types import SimpleNamespace

    from analysis.report import synthetic_data_warning

    (tumour,) = synthetic_data_warning(SimpleNamespace(experiment="demo", meta={"demo_task": "tumour"}))
    assert "`datasets.synthetic` (BraTS/IXI-shaped" in tumour
    (mgmt,) = synthetic_data_warning(SimpleNamespace(experiment="demo", meta={"demo_task": "mgmt"}))
    assert "`datasets.synthetic_rsna` (RSNA-MICCAI-shaped DICOM series" in mgmt
    (older,) = synthetic_data_warning(SimpleNamespace(experiment="demo", meta={}))  # before --demo-task existed
    assert "BraTS/IXI-shaped" in older
    assert synthetic_data_warning(SimpleNamespace(experiment="paper", meta={"demo_task": "tumour"})) == []


def test_learning_curves_say_over_how_many_folds_each_epoch_is_a_mean(tmp_path):
    """Folds that ran 10, 3 and 3 epochs (patience): epochs 4-10 are fold 0's alone, and the title says so rather than
    "over 3 folds"; a figure whose folds all ran the same epochs keeps the short title."""
    from analysis.figures import learning_curve_figure, learning_curve_title

    rows = [{"model": "mc3_18", "pretrained": False, "fold": fold, "epoch": epoch, "train_loss": 1.0, "val_loss": 1.0,
             "val_macro_f1": 0.35 + 0.05 * epoch if fold == 0 else 0.5, "val_accuracy": 0.5}
            for fold, epochs in ((0, 10), (1, 3), (2, 3)) for epoch in range(1, epochs + 1)]
    epochs = pd.DataFrame(rows)
    reached = epochs.groupby("epoch")["fold"].nunique()
    title = learning_curve_title(("mc3_18", False), reached)
    assert title.endswith("mean ± 1 std over the folds that reached each epoch\n(3 at first; 1 from epoch 4)"), title
    full = epochs[epochs["epoch"] <= 3]
    assert learning_curve_title(("mc3_18", False), full.groupby("epoch")["fold"].nunique()).endswith(
        "mean ± 1 std over 3 fold(s)")
    path = learning_curve_figure(epochs, ("mc3_18", False), tmp_path / "curve.png")
    assert path is not None and path.stat().st_size > 0
