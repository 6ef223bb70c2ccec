"""The MGMT task end to end: a synthetic RSNA-MICCAI 2021 DICOM tree through tune_main (two series as
channels, two classes), the two-class report without the paper's published values, and fold-ensemble
prediction on the same DICOM layout."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import tune_main
from datasets.synthetic_rsna import write_synthetic_rsna
from trainables import predict


@pytest.fixture(scope="module")
def mgmt_run(tmp_path_factory):
    root = write_synthetic_rsna(tmp_path_factory.mktemp("rsna"), n_methylated=6, n_unmethylated=6, seed=2,
                                downsample=4, sequences=("flair", "t1wce"), sagittal=("flair",))
    out = tmp_path_factory.mktemp("mgmt") / "out"
    argv = ["--experiment", "paper", "--data-root", str(root), "--contrasts", "flair,t1wce", "--output", str(out),
            "--models", "mc3_18", "--pretrained", "none", "--folds", "2", "--spacing", "16", "--epochs", "1",
            "--set", "batch_size=4"]
    assert tune_main.main(argv) == 0
    return root, out


def test_an_rsna_tree_trains_two_channels_on_two_classes_and_reports_without_published_values(mgmt_run):
    root, out = mgmt_run
    record = json.loads((out / "experiment.json").read_text())
    assert record["classes"] == ["unmethylated", "methylated"]  # methylated second: the positive class
    subjects = pd.read_csv(out / "subjects.csv", dtype={"subject_id": str})
    assert len(subjects) == 12 and set(subjects["source"]) == {"rsna"} and subjects["subject_id"].str.len().eq(5).all()
    predictions = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    assert sorted(predictions["subject_id"]) == sorted(subjects["subject_id"])  # every subject tested once
    assert {"prob_unmethylated", "prob_methylated"} <= set(predictions.columns)
    comparison = pd.read_csv(out / "report/tables/paper_comparison.csv")
    assert comparison["paper_mean"].isna().all()  # another task: the paper's numbers are not shown beside ours
    report = (out / "report/report.md").read_text(encoding="utf-8")
    assert "are not the paper's three" in report and "## Two-class results" in report
    assert "Positive class: `methylated`" in report


def test_predict_reads_the_same_dicom_layout_and_names_the_training_overlap(mgmt_run, tmp_path, capsys):
    root, out = mgmt_run
    preds_file = tmp_path / "preds.csv"
    assert predict.main([str(out), "--data-root", str(root), "--output", str(preds_file)]) == 0
    printed = capsys.readouterr().out
    preds = pd.read_csv(preds_file, dtype={"subject_id": str})
    assert len(preds) == 12 and preds["in_run_cohort"].all()
    assert "no independent test" in printed
    folds = pd.read_csv(tmp_path / "preds_folds.csv", dtype={"subject_id": str})
    mean = folds.groupby("subject_id")["prob_methylated"].mean()
    assert preds.set_index("subject_id")["prob_methylated"].to_dict() == pytest.approx(mean.to_dict(), abs=1e-12)


def test_demo_task_mgmt_sets_the_rsna_demo_and_is_refused_outside_the_demo(tmp_path, capsys):
    args = tune_main.build_parser().parse_args(["--experiment", "demo", "--demo-task", "mgmt"])
    config = tune_main.config_from_args(args)
    assert (config.demo_task, config.contrasts) == ("mgmt", ("flair", "t1wce"))
    assert Path(config.output).name == "demo-mgmt"  # its own folder: the three-class demo's is not "changed"
    assert tune_main.main(["--experiment", "paper", "--demo-task", "mgmt", "--output", str(tmp_path / "o")]) == 2
    assert "--demo-task is for --experiment demo" in capsys.readouterr().err
