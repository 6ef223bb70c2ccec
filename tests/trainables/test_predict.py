"""Fold-ensemble prediction (``python -m trainables.predict``) on a real tiny run: 2 arms x 2 folds, 16 mm, 1 epoch.

The run is made once per module with tune_main.main (Ray Tune on 2 CPUs, ~35 s); every prediction goes through the
real CLI entry ``predict.main(argv)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

import tune_main
from datasets.prepare import DataSpec, load_records
from datasets.preprocessing import CachedDataset, PreprocessConfig, preprocess_volumes
from analysis.load import load_experiment
from tests.analysis.analysis_fixtures import PAPER_CONFIG, build_nested_search_dir
from tests.conftest import write_head
from trainables import predict

CLASSES = ["LGG", "HGG", "Healthy"]
PROBS = [f"prob_{c}" for c in CLASSES]
ARM_ORDER = ["r2plus1d_18", "mc3_18"]  # the paper's table order breaks ties (analysis.names.PAPER_MODEL_ORDER)
# Each fold's own test predictions came from its float32 best weights, which the checkpoint keeps as they are:
# prediction reproduces them up to float32 kernel rounding (another batch size may pick other oneDNN kernels).
# When the checkpoint kept float16, the probabilities moved by up to 4e-3 (r2plus1d_18), near the ~1e-2 that a
# wrong preprocessing, layout or weight file causes; now such a mistake stands out by three orders of magnitude.
REPRODUCTION_TOLERANCE = 1e-5


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``predict.main(argv)`` with its stdout and stderr captured (module fixtures cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = predict.main(argv)
    return code, out.getvalue(), err.getvalue()


def outputs(csv: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The ensemble table, the per-fold table and the provenance JSON written for ``csv``."""
    read = lambda path: pd.read_csv(path, dtype={"subject_id": str, "label": str}, keep_default_na=False)
    return (read(csv), read(csv.with_name(f"{csv.stem}_folds.csv")),
            json.loads(csv.with_suffix(".json").read_text()))


@pytest.fixture(scope="module")
def run_dir(phantom_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict_run") / "run"
    argv = ["--experiment", "paper", "--data-root", str(phantom_root), "--output", str(out), "--models",
            "mc3_18,r2plus1d_18", "--pretrained", "none", "--folds", "2", "--spacing", "16", "--epochs", "1",
            "--set", "batch_size=4", "--no-report"]
    assert tune_main.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def ensemble(run_dir, phantom_root, tmp_path_factory) -> dict:
    """The whole phantom cohort (labelled by its folders) predicted with the default arm."""
    csv = tmp_path_factory.mktemp("predict_out") / "preds.csv"
    code, out, err = run_cli([str(run_dir), "--data-root", str(phantom_root), "--output", str(csv), "--workers", "1",
                              "--batch-size", "24"])
    assert code == 0, err
    table, folds, record = outputs(csv)
    return {"out": out, "err": err, "table": table, "folds": folds, "record": record}


def copy_tables(run_dir: Path, to: Path) -> Path:
    """The run's small files (tables, experiment.json) in another folder; checkpoints and cache stay where they are."""
    to.mkdir(parents=True)
    for path in [*run_dir.glob("*.csv"), *run_dir.glob("*.json")]:
        shutil.copy2(path, to / path.name)
    return to


def write_manifest(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------- 1. the numbers
def test_new_volumes_are_preprocessed_exactly_as_the_run_cached_them(run_dir, phantom_root):
    entry = CachedDataset(Path(json.loads((run_dir / "experiment.json").read_text())["cache"]))
    meta = entry.meta
    config = PreprocessConfig(spacing=meta["config"]["spacing"], percentiles=tuple(meta["config"]["percentiles"]),
                              target_shape=tuple(meta["shape"]))
    records = load_records(DataSpec(data_root=str(phantom_root)))
    volumes, problems = preprocess_volumes(records, config, num_workers=1)
    rows = entry.table.set_index("subject_id").loc[[r.subject_id for r in records], "index"].to_numpy()
    assert problems == []
    assert volumes.dtype == np.float16 and np.array_equal(volumes, entry.volumes()[rows])


def test_each_fold_reproduces_its_own_test_predictions_and_the_ensemble_is_their_mean(ensemble, run_dir):
    table, folds, record = ensemble["table"], ensemble["folds"], ensemble["record"]
    run_predictions = pd.read_csv(run_dir / "predictions.csv", dtype={"subject_id": str})
    assert [f["fold"] for f in record["folds"]] == [0, 1]
    for fold in record["folds"]:
        own = run_predictions[run_predictions["trial_name"] == fold["trial_name"]].set_index("subject_id")
        mine = folds[folds["fold"] == fold["fold"]].set_index("subject_id").loc[own.index]
        assert len(own) == 12 and (mine["trial_name"] == fold["trial_name"]).all()
        assert np.abs(mine[PROBS].to_numpy() - own[PROBS].to_numpy()).max() < REPRODUCTION_TOLERANCE
        assert (table.set_index("subject_id").loc[own.index, f"fold{fold['fold']}_pred"] == mine["pred"]).all()

    # The ensemble by hand: with two folds the mean is (p0 + p1) / 2 and the sample sd (ddof=1) is |p0 - p1| / sqrt 2.
    p0 = folds[folds["fold"] == 0].set_index("subject_id").loc[table["subject_id"], PROBS].to_numpy()
    p1 = folds[folds["fold"] == 1].set_index("subject_id").loc[table["subject_id"], PROBS].to_numpy()
    np.testing.assert_allclose(table[PROBS].to_numpy(), (p0 + p1) / 2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(table[[f"{c}_sd" for c in PROBS]].to_numpy(), np.abs(p0 - p1) / np.sqrt(2), atol=1e-12)
    assert list(table["pred"]) == [CLASSES[i] for i in ((p0 + p1) / 2).argmax(axis=1)]
    assert (table["n_folds"] == 2).all() and len(table) == 24
    np.testing.assert_allclose(table[PROBS].sum(axis=1), 1, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 2. the arm
def pooled_macro_f1(predictions: pd.DataFrame, model: str) -> float:
    rows = predictions[predictions["model"] == model]
    return f1_score(rows["label"], rows["pred"], labels=CLASSES, average="macro", zero_division=0)


def test_the_default_arm_has_the_best_validation_score_and_says_so(ensemble, run_dir):
    """Ranked on validation, not on the test estimate it then prints (that would be a choice made on test data)."""
    predictions = pd.read_csv(run_dir / "predictions.csv", dtype={"subject_id": str})
    scores = {model: pooled_macro_f1(predictions, model) for model in ARM_ORDER}
    grid = pd.read_csv(run_dir / "trials.csv")
    validation = {model: grid.loc[grid["model"] == model, "best_val_macro_f1"].mean() for model in ARM_ORDER}
    best = sorted(ARM_ORDER, key=lambda m: (-round(validation[m], 12), ARM_ORDER.index(m)))[0]
    other = next(m for m in ARM_ORDER if m != best)
    assert (f"Arm {best}:scratch: highest validation score of the paper configuration (no arm was searched); grid "
            f"estimate: validation macro F1 {validation[best]:.2f} (mean over folds), test pooled macro F1 "
            f"{scores[best]:.2f} over 2 folds; others: {other}:scratch grid validation {validation[other]:.2f}, test "
            f"{scores[other]:.2f} (chosen on validation scores; the test figure played no part)") in ensemble["out"]
    arm = ensemble["record"]["arm"]
    assert (arm["model"], arm["pretrained"], arm["estimate"]) == (best, False, "grid")
    assert arm["pooled_macro_f1"] == pytest.approx(scores[best], abs=1e-12)
    assert arm["validation_macro_f1"] == pytest.approx(validation[best], abs=1e-12)
    trials = pd.read_csv(run_dir / "trials.csv").set_index("trial_name")
    for fold in ensemble["record"]["folds"]:
        assert trials.loc[fold["trial_name"], "model"] == best
        assert fold["checkpoint"] == trials.loc[fold["trial_name"], "checkpoint"]
        assert fold["config"]["model"] == best and len(fold["best_weights_sha256"]) == 64


@pytest.fixture(scope="module")
def other_arm_on_an_old_run(ensemble, run_dir, phantom_root, tmp_path_factory) -> dict:
    """The arm the default did not pick, chosen with --arm, on a copy of the run whose trials.csv predates the
    checkpoint column, for a label-less manifest: two phantoms and an unstripped head."""
    tmp = tmp_path_factory.mktemp("old_run")
    old = copy_tables(run_dir, tmp / "run")
    pd.read_csv(old / "trials.csv").drop(columns="checkpoint").to_csv(old / "trials.csv", index=False)
    paths = {r.subject_id: r.paths[0] for r in load_records(DataSpec(data_root=str(phantom_root)))}
    chosen = sorted(paths)[:2]
    head = write_head(tmp / "head.nii.gz")  # the run trained on skull-stripped volumes only
    manifest = write_manifest(tmp / "new.csv", [*({"subject_id": s, "path": paths[s]} for s in chosen),
                                                {"subject_id": "head", "path": head.name}])  # relative to the manifest
    other = next(m for m in ARM_ORDER if m != ensemble["record"]["arm"]["model"])
    csv = tmp / "old.csv"
    code, out, err = run_cli([str(old), "--manifest", str(manifest), "--arm", f"{other}:scratch", "--output", str(csv),
                              "--workers", "1"])
    assert code == 0, err
    table, folds, record = outputs(csv)
    return {"arm": other, "subjects": [*chosen, "head"], "out": out, "err": err, "table": table, "folds": folds,
            "record": record}


def test_an_arm_can_be_chosen_and_one_that_is_not_in_the_run_is_refused_with_the_arms_present(
        other_arm_on_an_old_run, run_dir, tmp_path):
    prediction, other = other_arm_on_an_old_run, other_arm_on_an_old_run["arm"]
    assert f"Arm {other}:scratch: chosen with --arm (grid estimate: validation macro F1" in prediction["out"]
    record = prediction["record"]
    assert (record["arm"]["model"], record["arm"]["pretrained"]) == (other, False)
    assert [f["config"]["model"] for f in record["folds"]] == [other, other]
    assert list(prediction["table"]["subject_id"]) == prediction["subjects"]

    code, _, err = run_cli([str(run_dir), "--arm", "r3d_18:scratch", "--manifest", "unused.csv", "--output",
                            str(tmp_path / "p.csv")])
    assert code == 2
    assert f"--arm r3d_18:scratch is not an arm of {run_dir}; its arms: r2plus1d_18:scratch, mc3_18:scratch" in err


def test_a_nested_arm_predicts_with_each_folds_selected_configuration(tmp_path):
    """The analysis tests' nested search (hand-written confusion matrices): fold 0 chose cfgC, fold 1 cfgA, fold 2
    the grid trial it was handed; r3d_18:kinetics chose cfgA in every fold."""
    exp = load_experiment(build_nested_search_dir(tmp_path, studies=False))
    estimate, reason = predict.choose_arm(exp, None)
    assert estimate.arm == ("mc3_18", False) and estimate.kind == "nested"
    assert estimate.trials == {0: "search-mc3_18-scratch-f0-cfgC", 1: "search-mc3_18-scratch-f1-cfgA",
                               2: f"mc3_18-scratch-f2-{PAPER_CONFIG}"}
    # Pooled confusion matrices (rows true HGG, LGG, Healthy): mc3_18 [[11,1,0],[2,4,0],[0,0,12]] gives F1 22/25,
    # 8/11 and 1; r3d_18 [[12,0,0],[3,3,0],[0,0,12]] gives 24/27, 6/9 and 1.
    mc3, r3d = (22 / 25 + 8 / 11 + 1) / 3, (24 / 27 + 6 / 9 + 1) / 3
    assert estimate.macro_f1 == pytest.approx(mc3, abs=1e-12)
    # Chosen on the selected trials' inner-validation scores (trials.csv), the test estimates only printed.
    trials = exp.trials.set_index("trial_name")["best_val_macro_f1"]
    val_mc3 = trials.loc[list(estimate.trials.values())].mean()
    others = predict.arm_estimates(exp)[("r3d_18", True)]
    val_r3d = trials.loc[list(others.trials.values())].mean()
    assert val_mc3 > val_r3d and estimate.val_macro_f1 == pytest.approx(val_mc3, abs=1e-12)
    # Every arm was searched: ranked on the nested scores, each fold's best candidate for every arm alike.
    assert reason == (f"highest nested validation score (every arm was searched, so every arm is ranked on each fold's "
                      f"best candidate alike); nested estimate: validation macro F1 {val_mc3:.2f} (mean over folds of "
                      f"each fold's best candidate; the paper configuration's {(0.70 + 0.72 + 0.92) / 3:.2f}), test "
                      f"pooled macro F1 {mc3:.2f} over 3 folds; others: r3d_18:kinetics nested validation "
                      f"{val_r3d:.2f}, test {r3d:.2f} (chosen on validation scores; the test figure played no part)")
    # Its trials.csv predates the checkpoint column and no Tune run is left: refused with the command that fixes it.
    with pytest.raises(predict.PredictError, match=r"has no checkpoint column .* no Tune run with checkpoints was "
                                                   r"found .* Run `python tune_main.py --resume --output "):
        predict.fold_weights(exp, estimate)



def test_an_arm_searched_alone_does_not_win_on_its_best_of_candidates_score(tmp_path):
    """The nested fixture with r3d_18:kinetics not searched (its search trials and studies removed) and its paper
    configuration at 0.85 in every fold: above mc3_18's paper configuration (0.78) but below mc3_18's nested score
    (0.91, each fold's best of its candidates). Ranked on the nested score mc3_18 won by the selection alone."""
    out = build_nested_search_dir(tmp_path / "run", studies=False)
    trials = pd.read_csv(out / "trials.csv")
    searched = (trials["experiment"] == "search") & (trials["model"] == "r3d_18")
    gone = set(trials.loc[searched, "trial_name"])
    trials = trials[~searched].copy()
    trials.loc[trials["model"] == "r3d_18", "best_val_macro_f1"] = 0.85
    trials.to_csv(out / "trials.csv", index=False)
    for name in ("predictions.csv", "epochs.csv", "trial_subjects.csv"):
        table = pd.read_csv(out / name)
        table[~table["trial_name"].isin(gone)].to_csv(out / name, index=False)
    meta = json.loads((out / "experiment.json").read_text())
    meta["optuna_studies"] = [s for s in meta["optuna_studies"] if s["model"] != "r3d_18"]
    (out / "experiment.json").write_text(json.dumps(meta))
    exp = load_experiment(out)

    estimates = predict.arm_estimates(exp)
    mc3, r3d = estimates[("mc3_18", False)], estimates[("r3d_18", True)]
    assert (mc3.kind, r3d.kind) == ("nested", "grid")
    assert mc3.val_macro_f1 == pytest.approx((0.85 + 0.95 + 0.92) / 3) and mc3.val_macro_f1 > r3d.val_macro_f1
    assert mc3.paper_val_macro_f1 == pytest.approx((0.70 + 0.72 + 0.92) / 3)
    assert r3d.val_macro_f1 == r3d.paper_val_macro_f1 == pytest.approx(0.85)
    estimate, reason = predict.choose_arm(exp, None)
    assert estimate.arm == ("r3d_18", True) and estimate.kind == "grid"
    assert reason.startswith("highest validation score of the paper configuration, the footing every arm shares "
                             "(not every arm was searched: the nested score of mc3_18:scratch is each fold's best of "
                             "several candidates, which would beat a single configuration by the selection alone); "
                             "grid estimate: validation macro F1 0.85 (mean over folds)")
    assert "; others: mc3_18:scratch paper-configuration validation 0.78 (nested 0.91), test " in reason
    # Chosen, the searched arm still predicts with each fold's selected configuration.
    chosen, reason = predict.choose_arm(exp, ("mc3_18", False))
    assert chosen.kind == "nested" and chosen.trials == mc3.trials
    assert reason.startswith("chosen with --arm (nested estimate: validation macro F1 0.91 (mean over folds of each "
                             "fold's best candidate; the paper configuration's 0.78)")


# ---------------------------------------------------------------------------------------------- 3. runs
def test_a_folder_that_is_not_a_run_and_a_run_without_a_finished_fold_are_refused(run_dir, phantom_root, tmp_path):
    brats = str(sorted(phantom_root.rglob("*_t1ce.nii.gz"))[0])
    code, _, err = run_cli([str(tmp_path), brats, "--output", str(tmp_path / "p.csv")])
    assert code == 2 and f"{tmp_path} is not an experiment folder (no experiment.json)" in err

    failed = copy_tables(run_dir, tmp_path / "failed")
    trials = pd.read_csv(failed / "trials.csv")
    trials.assign(status="FAILED", error="RuntimeError: out of memory", checkpoint="").to_csv(failed / "trials.csv",
                                                                                              index=False)
    pd.read_csv(failed / "predictions.csv").iloc[:0].to_csv(failed / "predictions.csv", index=False)
    code, _, err = run_cli([str(failed), brats, "--output", str(tmp_path / "p.csv")])
    assert code == 2
    assert f"{failed} has no finished fold of any arm (trials.csv: 4 FAILED)" in err
    assert f"python tune_main.py --resume --output {failed}" in err
    code, _, err = run_cli([str(failed), "--arm", "mc3_18:scratch", brats, "--output", str(tmp_path / "p.csv")])
    assert code == 2 and "no finished fold of arm mc3_18:scratch (trials.csv: 2 FAILED)" in err
    assert not (tmp_path / "p.csv").exists()


def test_a_run_without_the_checkpoint_column_finds_its_weights_in_tunes_records(other_arm_on_an_old_run, run_dir):
    trials = pd.read_csv(run_dir / "trials.csv").set_index("trial_name")
    folds = other_arm_on_an_old_run["record"]["folds"]
    for fold in folds:
        recorded = Path(trials.loc[fold["trial_name"], "checkpoint"])
        assert Path(fold["checkpoint"]) == recorded
        assert fold["best_weights_sha256"] == hashlib.sha256((recorded / "best_weights.pt").read_bytes()).hexdigest()
    assert sorted(trials.loc[[f["trial_name"] for f in folds], "fold"]) == [0, 1]


def test_a_run_folder_moved_elsewhere_finds_its_recorded_paths_under_its_new_place(run_dir, phantom_root, tmp_path):
    # As if the run had been made in /gone/run and copied here: its cache entry recorded under the old place.
    entry = Path(json.loads((run_dir / "experiment.json").read_text())["cache"])
    moved = copy_tables(run_dir, tmp_path / "moved")
    shutil.copytree(entry, moved / "cache" / entry.name, ignore=shutil.ignore_patterns("volumes.npy"))
    record = json.loads((moved / "experiment.json").read_text())
    record.update(output="/gone/run", cache=f"/gone/run/cache/{entry.name}")
    (moved / "experiment.json").write_text(json.dumps(record))
    csv = tmp_path / "p.csv"
    code, _, err = run_cli([str(moved), str(sorted(phantom_root.rglob("*_t1ce.nii.gz"))[0]), "--output", str(csv),
                            "--workers", "1"])
    assert code == 0, err
    assert outputs(csv)[2]["preprocessing"]["cache_entry"] == str(moved / "cache" / entry.name)


def broken_copy(run_dir: Path, to: Path, arm_model: str, fold: int) -> tuple[Path, Path]:
    """The run's tables in ``to`` with ``arm_model``'s fold ``fold`` pointing at a copy of its checkpoint folder, which
    the caller may damage: (the run copy, the checkpoint copy). The run's own files stay untouched."""
    copy = copy_tables(run_dir, to)
    trials = pd.read_csv(copy / "trials.csv")
    row = (trials["model"] == arm_model) & (trials["fold"] == fold)
    checkpoint = to / "checkpoint"
    shutil.copytree(trials.loc[row, "checkpoint"].item(), checkpoint)
    trials.loc[row, "checkpoint"] = str(checkpoint)
    trials.to_csv(copy / "trials.csv", index=False)
    return copy, checkpoint


def test_damaged_or_deleted_fold_files_are_refused_before_any_volume_is_read(run_dir, phantom_root, tmp_path,
                                                                             monkeypatch):
    def no_preprocessing(*args, **kwargs):
        raise AssertionError("volumes were preprocessed before the fold weights were checked")

    monkeypatch.setattr(predict, "prepare_volumes", no_preprocessing)
    csv = str(tmp_path / "p.csv")
    # A copy cut short (an interrupted transfer of the run): torch.load's RuntimeError became a traceback.
    copy, checkpoint = broken_copy(run_dir, tmp_path / "truncated", "mc3_18", 1)
    weights = checkpoint / "best_weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli([str(copy), "--arm", "mc3_18:scratch", "--data-root", str(phantom_root), "--output", csv])
    assert code == 2, err
    assert f"{weights} is damaged and cannot be read (RuntimeError: PytorchStreamReader failed" in err
    assert f"delete the folder {checkpoint} and run `python tune_main.py --resume --output {copy}`" in err
    # A summary cut short: its JSON error alone would not say which file.
    copy, checkpoint = broken_copy(run_dir, tmp_path / "summary", "mc3_18", 0)
    (checkpoint / "result.json").write_text('{"config": {"mod')
    code, _, err = run_cli([str(copy), "--arm", "mc3_18:scratch", "--data-root", str(phantom_root), "--output", csv])
    assert code == 2 and f"{checkpoint / 'result.json'} is damaged and cannot be read (JSONDecodeError" in err
    # A deleted file: the fix is the same --resume, which trains the fold again.
    copy, checkpoint = broken_copy(run_dir, tmp_path / "deleted", "mc3_18", 1)
    (checkpoint / "best_weights.pt").unlink()
    code, _, err = run_cli([str(copy), "--arm", "mc3_18:scratch", "--data-root", str(phantom_root), "--output", csv])
    assert code == 2 and "checkpoint has no readable best_weights.pt" in err
    assert "if the checkpoint or the file was deleted, the same command trains that fold again" in err
    assert not Path(csv).exists()


def test_contrasts_other_than_the_runs_are_predicted_with_a_warning(run_dir, phantom_root, tmp_path):
    # BraTS subjects whose only file is a FLAIR: one channel as the run, but not the contrast its weights learnt.
    root = tmp_path / "flair"
    for volume in sorted(phantom_root.rglob("*_t1ce.nii.gz"))[:2]:
        folder = root / volume.relative_to(phantom_root).parent
        folder.mkdir(parents=True)
        shutil.copy(volume, folder / volume.name.replace("_t1ce", "_flair"))
    code, _, err = run_cli([str(run_dir), "--data-root", str(root), "--contrasts", "flair", "--output",
                            str(tmp_path / "p.csv"), "--workers", "1"])
    assert code == 0, err
    assert (f"warning: --contrasts flair are not the contrasts {run_dir} was trained on (t1ce, in that order)") in err
    # The RSNA spelling of the run's contrast is the same contrast: no warning.
    exp = load_experiment(run_dir)
    assert predict.contrast_warning(["T1wCE"], exp) is None and predict.contrast_warning(["t1ce"], exp) is None
    assert "are not the contrasts" in predict.contrast_warning(["t2"], exp)


# ---------------------------------------------------------------------------------------------- 4. inputs
def test_inputs_that_do_not_match_the_run_are_refused_with_the_file_and_the_fix(run_dir, phantom_root, tmp_path,
                                                                                  other_arm_on_an_old_run):
    # Allowed, with a warning: a volume stripped differently from every training volume is out of distribution.
    assert ("1 of 3 new volume(s) look unstripped (no zero background), while every volume of the run was "
            "skull-stripped") in other_arm_on_an_old_run["err"] and "(head)" in other_arm_on_an_old_run["err"]
    files = sorted(str(p) for p in phantom_root.rglob("*_t1ce.nii.gz"))[:2]
    csv = str(tmp_path / "p.csv")
    # A volume that fails the training's validation, named with its reason.
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 7, dtype=np.float32), np.eye(4)), str(flat))
    code, _, err = run_cli([str(run_dir), files[0], str(flat), "--output", csv])
    assert code == 2
    assert "1 of 2 subjects failed validation" in err
    assert f"{flat}: constant image (every voxel is 7) (subject flat)" in err
    code, _, err = run_cli([str(run_dir), files[0], str(flat), "--skip-invalid", "--output", str(tmp_path / "kept.csv"),
                            "--workers", "1"])
    assert code == 0 and "left out (--skip-invalid), 1 subject(s) failed validation" in err
    assert list(pd.read_csv(tmp_path / "kept.csv")["subject_id"]) == [Path(files[0]).name.removesuffix(".nii.gz")]
    # Two bare FILES with one name in two folders: before, both were refused as one duplicated subject, and the fix
    # offered (distinct ids) could not be given to bare files.
    (tmp_path / "p1").mkdir()
    (tmp_path / "p2").mkdir()
    twins = [shutil.copy(files[0], tmp_path / "p1" / "t1ce.nii.gz"), shutil.copy(files[1], tmp_path / "p2" / "t1ce.nii.gz")]
    code, _, err = run_cli([str(run_dir), *map(str, twins), "--output", csv])
    assert code == 2
    twins = [Path(t).resolve() for t in twins]
    assert (f"FILES {twins[0]}, {twins[1]} would all be subject t1ce: a bare FILE's id is its name without the suffix "
            "(1 such name(s)). Rename them, or write a manifest with subject_id and path columns and pass --manifest") in err
    # A label that is not a class of the run cannot be scored.
    labelled = write_manifest(tmp_path / "labelled.csv", [{"subject_id": "s1", "label": "tumour", "path": files[0]}])
    code, _, err = run_cli([str(run_dir), "--manifest", str(labelled), "--output", csv])
    assert code == 2 and "Label(s) 'tumour' (e.g. subject(s) s1) are not classes of the run (LGG, HGG, Healthy)" in err
    # A manifest with two channels for a one-channel run.
    manifest = write_manifest(tmp_path / "two.csv",
                              [{"subject_id": "s1", "path_t1ce": files[0], "path_flair": files[1]}])
    code, _, err = run_cli([str(run_dir), "--manifest", str(manifest), "--output", csv])
    assert code == 2
    assert f"--manifest {manifest} has 2 path column(s), but {run_dir} was trained on 1 input channel(s) (t1ce)" in err

    # The run's records as a two-contrast run (t1ce, flair) writes them: bare FILES cannot say which file is which.
    entry = Path(json.loads((run_dir / "experiment.json").read_text())["cache"])
    two = copy_tables(run_dir, tmp_path / "two_contrasts")
    shutil.copytree(entry, two / "cache_entry", ignore=shutil.ignore_patterns("volumes.npy"))
    meta = json.loads((two / "cache_entry" / "meta.json").read_text())
    (two / "cache_entry" / "meta.json").write_text(json.dumps({**meta, "channels": 2}))
    record = json.loads((two / "experiment.json").read_text())
    record.update(contrasts=["t1ce", "flair"], cache=str(two / "cache_entry"))
    (two / "experiment.json").write_text(json.dumps(record))
    code, _, err = run_cli([str(two), *files, "--output", csv])
    assert code == 2
    assert f"{two} was trained on 2 input channel(s) (t1ce, flair); bare FILES give one volume per subject" in err
    assert "pass --manifest" in err
    # Given two files per subject, the run's one-channel weights cannot read them: refused before any volume is read.
    code, _, err = run_cli([str(two), "--manifest", str(manifest), "--arm", "mc3_18:scratch", "--output", csv])
    assert code == 2
    assert "best_weights.pt does not fit mc3_18 with 2 input channel(s) and 3 classes (size mismatch for " in err

    # A cache entry without meta.json: the crop shape the models saw is unknown.
    (two / "cache_entry" / "meta.json").unlink()
    code, _, err = run_cli([str(two), *files, "--output", csv])
    assert code == 2 and f"cache entry {two / 'cache_entry'} has no meta.json" in err
    assert not Path(csv).exists()



def manifest_run(run_dir: Path, to: Path, columns: list[str]) -> tuple[Path, Path]:
    """The run's tables as a --manifest run with ``columns`` as path columns records them: experiment.json names its
    manifest (beside ``to``) and a cache entry of len(columns) channels (meta.json only: inputs are checked before
    any volume is read). (the run copy, its manifest)"""
    entry = Path(json.loads((run_dir / "experiment.json").read_text())["cache"])
    run = copy_tables(run_dir, to)
    shutil.copytree(entry, run / "cache_entry", ignore=shutil.ignore_patterns("volumes.npy"))
    meta = json.loads((run / "cache_entry" / "meta.json").read_text())
    (run / "cache_entry" / "meta.json").write_text(json.dumps({**meta, "channels": len(columns)}))
    manifest = write_manifest(to.with_name(f"{to.name}_training.csv"),
                              [{"subject_id": "x", "label": "HGG", **{c: f"x_{c}.nii.gz" for c in columns}}])
    record = json.loads((run / "experiment.json").read_text())
    record.update(manifest=str(manifest), data_root=None, cache=str(run / "cache_entry"))
    record["options"].update(manifest=str(manifest), data_root=None)
    (run / "experiment.json").write_text(json.dumps(record))
    return run, manifest


def test_a_manifest_whose_path_columns_are_not_the_runs_channels_in_its_order_is_refused(run_dir, phantom_root,
                                                                                          tmp_path, monkeypatch):
    """Channel k of a manifest goes to the weights trained on the run's channel k: path_flair,path_t1ce given to a
    run trained on path_t1ce,path_flair ran silently, every channel read by weights trained on another contrast."""
    def no_preprocessing(*args, **kwargs):
        raise AssertionError("the manifest's channels were not checked before its volumes were read")

    monkeypatch.setattr(predict, "prepare_volumes", no_preprocessing)
    files = sorted(str(p) for p in phantom_root.rglob("*_t1ce.nii.gz"))[:2]
    csv = str(tmp_path / "p.csv")
    run, training = manifest_run(run_dir, tmp_path / "run", ["path_t1ce", "path_flair"])
    swapped = write_manifest(tmp_path / "swapped.csv",
                             [{"subject_id": "s1", "path_flair": files[1], "path_t1ce": files[0]}])
    code, _, err = run_cli([str(run), "--manifest", str(swapped), "--arm", "mc3_18:scratch", "--output", csv])
    assert code == 2, err
    assert (f"--manifest {swapped} has path columns path_flair, path_t1ce (in that order), but {run} was trained on "
            f"path_t1ce, path_flair (the path columns of its manifest {training}, in that order): the run's contrasts "
            "in another order.") in err
    assert "Reorder the path columns to path_t1ce, path_flair, in that order" in err
    other = write_manifest(tmp_path / "other.csv", [{"subject_id": "s1", "path_t1ce": files[0], "path_t2": files[1]}])
    code, _, err = run_cli([str(run), "--manifest", str(other), "--arm", "mc3_18:scratch", "--output", csv])
    assert code == 2 and "path_t1ce, path_t2 (in that order)" in err and "other contrasts than the run's" in err
    assert "Rename (or replace) the path columns so that they are path_t1ce, path_flair, in that order" in err
    # The run's contrasts in its order, spelt as RSNA does and in another case: past the check, to the weights (this
    # copy's one-channel weights do not fit two channels, which is refused next, still before any volume is read).
    spelt = write_manifest(tmp_path / "spelt.csv",
                           [{"subject_id": "s1", "path_T1wCE": files[0], "path_FLAIR": files[1]}])
    code, _, err = run_cli([str(run), "--manifest", str(spelt), "--arm", "mc3_18:scratch", "--output", csv])
    assert code == 2 and "best_weights.pt does not fit mc3_18 with 2 input channel(s)" in err
    # The run's manifest gone: its column names are recorded nowhere else, so the order cannot be checked; said.
    training.unlink()
    code, _, err = run_cli([str(run), "--manifest", str(swapped), "--arm", "mc3_18:scratch", "--output", csv])
    assert code == 2 and "best_weights.pt does not fit mc3_18 with 2 input channel(s)" in err
    assert (f"note: whether --manifest {swapped}'s path columns (path_flair, path_t1ce) are the run's channels in its "
            f"order cannot be checked: {run} was trained on a manifest whose path columns name its channels; its "
            f"experiment.json (written before runs recorded channel_names) and the cache entry record only their "
            f"number, and its manifest {training} is no longer there") in err
    # Runs record their channel names (tune_main.channel_names): checked without the run's manifest.
    record = json.loads((run / "experiment.json").read_text())
    (run / "experiment.json").write_text(json.dumps({**record, "channel_names": ["path_t1ce", "path_flair"]}))
    code, _, err = run_cli([str(run), "--manifest", str(swapped), "--arm", "mc3_18:scratch", "--output", csv])
    assert code == 2 and (f"but {run} was trained on path_t1ce, path_flair ({run}/experiment.json channel_names, in "
                          "that order): the run's contrasts in another order.") in err

    # A --data-root run (t1ce): a manifest's path column names another contrast.
    flair = write_manifest(tmp_path / "flair.csv", [{"subject_id": "s1", "path_flair": files[0]}])
    code, _, err = run_cli([str(run_dir), "--manifest", str(flair), "--output", csv])
    assert code == 2
    assert (f"--manifest {flair} has path columns path_flair (in that order), but {run_dir} was trained on t1ce "
            f"({run_dir}/experiment.json channel_names, in that order): other contrasts than the run's.") in err
    assert "Rename (or replace) the path columns so that they are path_t1ce, in that order" in err
    assert not Path(csv).exists()


def test_a_data_root_on_a_manifest_run_takes_its_manifests_channels_and_warns_about_others(run_dir, tmp_path, capsys):
    """contrast_warning returned None for every manifest run, and --data-root defaulted to t1ce for them."""
    root = tmp_path / "data"
    subject = root / "HGG" / "BraTS19_CBICA_AAA_1"
    subject.mkdir(parents=True)
    for contrast in ("t1ce", "flair"):
        (subject / f"BraTS19_CBICA_AAA_1_{contrast}.nii.gz").write_bytes(b"")  # listed, never opened here
    run, _ = manifest_run(run_dir, tmp_path / "run", ["path_t1ce", "path_flair"])
    exp = load_experiment(run)
    args = predict.build_parser().parse_args([str(run), "--data-root", str(root), "--output", "p.csv"])
    records, channels = predict.input_records(args, exp, 2)
    assert [Path(p).name for p in records[0].paths] == ["BraTS19_CBICA_AAA_1_t1ce.nii.gz",
                                                        "BraTS19_CBICA_AAA_1_flair.nii.gz"]
    assert channels.as_json()["channels"] == ["t1ce", "flair"] and channels.check == "same as the run's"
    assert channels.as_json()["run_channels"] == ["path_t1ce", "path_flair"]
    assert "are not the contrasts" not in capsys.readouterr().err
    args = predict.build_parser().parse_args([str(run), "--data-root", str(root), "--contrasts", "flair,t1ce",
                                              "--output", "p.csv"])
    records, channels = predict.input_records(args, exp, 2)
    assert (f"warning: --contrasts flair,t1ce are not the contrasts {run} was trained on (path_t1ce, path_flair: the "
            "path columns of its manifest") in capsys.readouterr().err
    assert channels.check.startswith("differs from the run's")
    assert "are not the contrasts" in predict.contrast_warning(["flair", "t1ce"], exp)


def test_a_data_root_prediction_lists_the_runs_classes_as_training_did(run_dir, tmp_path, monkeypatch):
    """A --classes LGG,HGG run on a BraTS + IXI root: training left IXI out, prediction listed its Healthy scans (for
    a FLAIR run it refused the root for IXI's missing FLAIR, and its advice, --contrasts t1ce, fed T1ce)."""
    root = tmp_path / "data"
    for grade, sid in (("HGG", "BraTS19_CBICA_AAA_1"), ("LGG", "BraTS19_TCIA01_BBB_1")):
        (root / grade / sid).mkdir(parents=True)
        for contrast in ("t1ce", "flair"):
            (root / grade / sid / f"{sid}_{contrast}.nii.gz").write_bytes(b"")  # listed, never opened here
    (root / "IXI").mkdir()
    (root / "IXI" / "IXI002-Guys-0828-T1.nii.gz").write_bytes(b"")
    run = copy_tables(run_dir, tmp_path / "run")
    record = json.loads((run / "experiment.json").read_text())
    record["options"]["classes"] = ["lgg", "HGG"]  # as given on the command line: any spelling
    (run / "experiment.json").write_text(json.dumps(record))
    listed = []

    def stop_before_reading(args, exp, records, *rest):
        listed.append(sorted((Path(r.paths[0]).name, r.label) for r in records))
        raise predict.PredictError("stopped before any volume is read")

    monkeypatch.setattr(predict, "prepare_volumes", stop_before_reading)
    code, _, err = run_cli([str(run), "--data-root", str(root), "--output", str(tmp_path / "p.csv")])
    assert code == 2 and "stopped before any volume is read" in err, err
    assert listed == [[("BraTS19_CBICA_AAA_1_t1ce.nii.gz", "HGG"), ("BraTS19_TCIA01_BBB_1_t1ce.nii.gz", "LGG")]]
    assert (f"note: {run} was trained on --classes lgg,HGG (its experiment.json options), so only --data-root subjects "
            "of those classes are listed, as training listed them") in err
    # A FLAIR run of those classes: IXI (T1 only) is not listed, so the root is not refused for IXI's missing FLAIR.
    code, _, err = run_cli([str(run), "--data-root", str(root), "--contrasts", "flair", "--output",
                            str(tmp_path / "p.csv")])
    assert code == 2 and "stopped before any volume is read" in err, err
    assert listed[1] == [("BraTS19_CBICA_AAA_1_flair.nii.gz", "HGG"), ("BraTS19_TCIA01_BBB_1_flair.nii.gz", "LGG")]
    # The provenance names the selection.
    exp = load_experiment(run)
    args = predict.build_parser().parse_args([str(run), "--data-root", str(root), "--output", "p.csv"])
    assert predict.input_records(args, exp, 1)[1].as_json()["selected_classes"] == ["lgg", "HGG"]


# ---------------------------------------------------------------------------------------------- 5. labels
def test_given_labels_are_scored_with_sklearn_and_training_subjects_are_flagged(ensemble, run_dir,
                                                                                 other_arm_on_an_old_run):
    table, record = ensemble["table"], ensemble["record"]
    cohort = pd.read_csv(run_dir / "subjects.csv", dtype={"subject_id": str}).set_index("subject_id")
    assert list(table["label"]) == list(cohort.loc[table["subject_id"], "label"])
    accuracy = accuracy_score(table["label"], table["pred"])
    macro_f1 = f1_score(table["label"], table["pred"], labels=CLASSES, average="macro", zero_division=0)
    assert (f"Score on 24 labelled subject(s): accuracy {accuracy:.3f}, macro F1 {macro_f1:.3f}; 24 of them are in the "
            "run's training data, so this is no independent test") in ensemble["out"]
    assert record["score"] == pytest.approx({"n_labelled": 24, "accuracy": accuracy, "macro_f1": macro_f1,
                                             "macro_f1_classes": CLASSES, "classes_without_subjects": [],
                                             "n_in_run_cohort": 24})
    # Every phantom was training data of the run: flagged per row and warned about.
    assert table["in_run_cohort"].all()
    assert "warning: 24 of 24 subject(s) are in the run's own subjects.csv" in ensemble["err"]
    assert "fold 2/2 (run fold 1, " in ensemble["out"] and ": 24/24 volumes" in ensemble["out"]
    # Without labels (a manifest without a label column) nothing is scored, and nothing pretends to be a score.
    unlabelled = other_arm_on_an_old_run
    assert "label" not in unlabelled["table"].columns and unlabelled["record"]["score"] is None
    assert "No labels given: no score." in unlabelled["out"] and "Score on" not in unlabelled["out"]
    assert list(unlabelled["table"]["in_run_cohort"]) == [True, True, False]



def test_macro_f1_is_over_the_classes_with_labelled_subjects_and_names_the_others():
    """Ten correctly predicted Healthy scans scored macro F1 0.333 for a three-class run (two F1s of 0 averaged in)."""
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(10)], "label": ["Healthy"] * 10,
                          "pred": ["Healthy"] * 10, "in_run_cohort": [False] * 10})
    result = predict.score(table, CLASSES)
    assert result == {"n_labelled": 10, "accuracy": 1.0, "macro_f1": 1.0, "macro_f1_classes": ["Healthy"],
                      "classes_without_subjects": ["LGG", "HGG"], "n_in_run_cohort": 0}
    # A prediction of an absent class still costs its subject's class: Healthy F1 = 2 * 1 * 0.8 / 1.8.
    table.loc[:1, "pred"] = "HGG"
    assert predict.score(table, CLASSES)["macro_f1"] == pytest.approx(
        f1_score(table["label"], table["pred"], labels=["Healthy"], average="macro", zero_division=0))
    assert predict.score(table, CLASSES)["macro_f1"] == pytest.approx(16 / 18)


def test_labelled_scans_of_one_class_are_scored_on_it_and_the_json_names_the_inputs_own_channels(
        run_dir, phantom_root, tmp_path, ensemble, other_arm_on_an_old_run):
    """The provenance's inputs.contrasts was the run's contrasts whatever was fed; now the input's own channel
    names, beside the run's and what their comparison found."""
    hgg = [r for r in load_records(DataSpec(data_root=str(phantom_root))) if r.label == "HGG"][:3]
    manifest = write_manifest(tmp_path / "hgg.csv", [{"subject_id": f"new{i}", "label": "HGG", "path_T1wCE": r.paths[0]}
                                                     for i, r in enumerate(hgg)])
    csv = tmp_path / "p.csv"
    code, out, err = run_cli([str(run_dir), "--manifest", str(manifest), "--output", str(csv), "--workers", "1"])
    assert code == 0, err
    table, _, record = outputs(csv)
    macro_f1 = f1_score(table["label"], table["pred"], labels=["HGG"], average="macro", zero_division=0)
    accuracy = accuracy_score(table["label"], table["pred"])
    assert record["score"] == pytest.approx({"n_labelled": 3, "accuracy": accuracy, "macro_f1": macro_f1,
                                             "macro_f1_classes": ["HGG"],
                                             "classes_without_subjects": ["LGG", "Healthy"], "n_in_run_cohort": 3})
    assert (f"Score on 3 labelled subject(s): accuracy {accuracy:.3f}, macro F1 {macro_f1:.3f} over the classes with "
            "labelled subjects (HGG; left out of the mean for want of a labelled subject: LGG, Healthy)") in out
    inputs = record["inputs"]
    assert "contrasts" not in inputs
    assert (inputs["channels"], inputs["run_channels"], inputs["channel_check"]) == (["path_T1wCE"], ["t1ce"],
                                                                                     "same as the run's")
    assert inputs["channels_from"] == f"the path columns of --manifest {manifest}"
    assert inputs["run_channels_from"] == f"{run_dir}/experiment.json channel_names"
    # --data-root without --contrasts: the run's contrasts, checked.
    assert ensemble["record"]["inputs"]["channels"] == ["t1ce"]
    assert ensemble["record"]["inputs"]["channel_check"] == "same as the run's"
    # A bare `path` column names no contrast: not checked, and said so.
    unnamed = other_arm_on_an_old_run["record"]["inputs"]
    assert unnamed["channels"] == ["path"] and unnamed["channel_check"].startswith(
        "not checked: a column `path` names no contrast")
    assert "path columns (path) are the run's channels in its order cannot be checked" in other_arm_on_an_old_run["err"]


def test_a_run_volume_under_another_file_name_is_flagged_with_the_run_subject_it_is(run_dir, phantom_root, tmp_path):
    """Bare FILES take their id from the file name, so the id check alone misses the run's own volumes passed as
    files: BraTS's <id>_t1ce.nii.gz as it lies (id <id>_t1ce), a copy under another name, the same volume re-saved
    uncompressed (other bytes), another scan of a cohort subject named as BraTS names it. A volume the run never saw
    (a phantom of another seed) stays unflagged."""
    from datasets.synthetic import write_synthetic_dataset

    cohort = {r.subject_id: Path(r.paths[0]) for r in load_records(DataSpec(data_root=str(phantom_root)))}
    as_is, copied, resaved, other_scan = sorted(s for s in cohort if s.startswith("BraTS"))[:4]
    copy = shutil.copy(cohort[copied], tmp_path / "new_scan_07.nii.gz")
    uncompressed = tmp_path / "patient_b.nii"
    nib.save(nib.load(cohort[resaved]), str(uncompressed))
    assert uncompressed.read_bytes() != cohort[resaved].read_bytes()
    image = nib.load(cohort[other_scan])  # not the run's volume: other intensities, same subject by its name
    flair = tmp_path / "flair" / f"{other_scan}_flair.nii.gz"
    flair.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * 2, image.affine), str(flair))
    unseen = next(write_synthetic_dataset(tmp_path / "unseen", n_hgg=1, n_lgg=0, n_healthy=0, seed=11,
                                          downsample=4).rglob("*_t1ce.nii.gz"))
    unrelated = shutil.copy(unseen, tmp_path / "unrelated.nii.gz")  # its phantom id is reused across seeds
    files = [str(cohort[as_is]), str(copy), str(uncompressed), str(flair), str(unrelated)]
    csv = tmp_path / "p.csv"
    code, _, err = run_cli([str(run_dir), *files, "--output", str(csv), "--workers", "1"])
    assert code == 0, err
    table, _, record = outputs(csv)
    ids = [f"{as_is}_t1ce", "new_scan_07", "patient_b", f"{other_scan}_flair", "unrelated"]
    assert list(table["subject_id"]) == ids and list(table["in_run_cohort"]) == [True, True, True, True, False]
    assert record["inputs"]["in_run_cohort"] == ids[:4]
    assert record["inputs"]["in_run_cohort_matches"] == {
        f"{as_is}_t1ce": {"run_subject_ids": [as_is], "by": "content"},
        "new_scan_07": {"run_subject_ids": [copied], "by": "content"},
        "patient_b": {"run_subject_ids": [resaved], "by": "content"},
        f"{other_scan}_flair": {"run_subject_ids": [other_scan], "by": "name"}}
    assert (f"warning: 4 of 5 subject(s) are in the run's own subjects.csv ({as_is}_t1ce = run subject {as_is} (the "
            f"same volume, by content), new_scan_07 = run subject {copied} (the same volume, by content), patient_b = "
            f"run subject {resaved} (the same volume, by content), {other_scan}_flair = run subject {other_scan} "
            "(another scan of that subject, by file name)): they were training data of the run") in err
    assert "unrelated" not in err.split("subjects.csv (")[1].split("):")[0]

    # A run whose subjects.csv predates the profiles: only ids and names can be matched, and the output says so.
    old = copy_tables(run_dir, tmp_path / "old")
    subjects = pd.read_csv(old / "subjects.csv", dtype=str, keep_default_na=False)
    subjects[["subject_id", "label", "group", "source", "site", "stripped"]].to_csv(old / "subjects.csv", index=False)
    code, _, err = run_cli([str(old), str(copy), str(flair), "--output", str(tmp_path / "old.csv"), "--workers", "1"])
    assert code == 0, err
    assert list(outputs(tmp_path / "old.csv")[0]["in_run_cohort"]) == [False, True]
    assert f"{old}/subjects.csv records no acquisition profiles" in err
    assert "a cohort volume copied under another name is not recognised" in err


def test_a_run_volume_with_a_rewritten_header_is_recognised_by_its_voxels(run_dir, phantom_root, tmp_path):
    """Another voxel size in the header changes every profile field that measures size, but not the voxels: the
    digest subjects.csv records (content_sha256) still names the run subject."""
    subjects = pd.read_csv(run_dir / "subjects.csv", dtype=str, keep_default_na=False)
    assert subjects["content_sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    cohort = {r.subject_id: Path(r.paths[0]) for r in load_records(DataSpec(data_root=str(phantom_root)))}
    subject = sorted(s for s in cohort if s.startswith("BraTS"))[5]
    image = nib.load(cohort[subject])
    stretched = image.affine @ np.diag([1.1, 1.1, 1.1, 1.0])
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), stretched), str(tmp_path / "fixed_header.nii.gz"))
    csv = tmp_path / "p.csv"
    code, _, err = run_cli([str(run_dir), str(tmp_path / "fixed_header.nii.gz"), "--output", str(csv), "--workers", "1"])
    assert code == 0, err
    table, _, record = outputs(csv)
    assert table["in_run_cohort"].tolist() == [True]
    assert record["inputs"]["in_run_cohort_matches"] == {"fixed_header": {"run_subject_ids": [subject], "by": "content"}}


def test_prediction_asks_cudnn_for_full_float32_and_gives_the_setting_back():
    """TF32 is cuDNN's default for float32 convolutions on recent GPUs; inside prediction it is off, after it as before."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with pytest.raises(RuntimeError, match="inside"):
        with predict.ieee_float32_convolutions():
            assert conv.fp32_precision == "ieee"
            raise RuntimeError("inside")
    assert conv.fp32_precision == before


def test_ctrl_c_while_new_volumes_are_preprocessed_exits_130_without_a_traceback(run_dir, phantom_root, tmp_path,
                                                                                  monkeypatch, caplog):
    """It printed a traceback ending in datasets.workers.Interrupted and exited 1."""
    import datasets.preprocessing as preprocess_module

    real, calls = preprocess_module._resample_and_crop, []

    def interrupted_at_the_third(paths, config):
        calls.append(paths)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(paths, config)

    monkeypatch.setattr(preprocess_module, "_resample_and_crop", interrupted_at_the_third)
    csv = tmp_path / "preds.csv"
    with caplog.at_level("WARNING", logger="datasets.preprocessing"):
        code, _, err = run_cli([str(run_dir), "--data-root", str(phantom_root), "--output", str(csv), "--workers", "1"])
    assert code == 130 and "Traceback" not in err
    assert re.search(r"Preprocessing interrupted after 2 of \d+ volumes \(volumes preprocessed for prediction are "
                     r"not cached\); rerunning the same command preprocesses them again\.", caplog.text)
    assert not csv.exists()


def test_a_new_scan_of_a_run_patient_is_matched_by_the_manifest_s_group():
    """``P1_t1`` (group P1) beside a run whose ``P1_t0`` is in group P1: the same patient and tumour, though its id,
    file name and voxels are new. Records without a group (group = own id) are not matched by it."""
    from types import SimpleNamespace

    from datasets.records import SubjectRecord
    from trainables import predict

    run = SimpleNamespace(subjects=pd.DataFrame({"subject_id": ["P1_t0", "P2_t0", "P1_t0b"],
                                                 "group": ["P1", "P2", "P1"], "label": ["HGG", "LGG", "HGG"]}))
    records = [SubjectRecord("P1_t1", "", ("/new/a.nii.gz",), group="P1", source="manifest"),
               SubjectRecord("P3_t0", "", ("/new/b.nii.gz",), group="P3", source="manifest"),
               SubjectRecord("P2", "", ("/new/c.nii.gz",), group="P2", source="files"),  # a bare file named P2
               SubjectRecord("P2", "", ("/new/d.nii.gz",), group="P2", source="manifest")]  # named after its patient
    matches = predict.run_cohort_matches(records, {}, run)
    assert matches[0] == predict.CohortMatch(("P1_t0", "P1_t0b"), "group")
    assert matches[1] is None
    assert matches[2] is None  # its group is only its file name
    assert matches[3] == predict.CohortMatch(("P2_t0",), "group")
    assert predict.cohort_warning(records[:3], matches[:3]).startswith(
        "1 of 3 subject(s) are in the run's own subjects.csv (P1_t1 = run subject P1_t0 / P1_t0b (the same group "
        "(patient), by the manifest's group column)): they were training data")
