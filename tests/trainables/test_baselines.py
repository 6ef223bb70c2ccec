"""The acquisition and histogram baselines find shortcuts that exist, not ones that do not, and never peek at test."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from datasets.preprocessing import CachedDataset, PreprocessConfig, preprocess
from datasets.records import PAPER_CLASSES, SubjectRecord
from datasets.splits import Fold, SplitPlan, plan_splits
from trainables import baselines

SHAPE = (12, 12, 10)  # tiny 4 mm volumes: preprocessing 200 of them takes well under a second
VolumeMaker = Callable[[str, np.random.Generator], np.ndarray]


def _ellipsoid(radius2: float = 0.6) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    return (grid**2).sum(0) < radius2


def gaussian_brain(label: str, rng: np.random.Generator) -> np.ndarray:
    return np.where(_ellipsoid(), 100 + 20 * rng.standard_normal(SHAPE), 0)


def _subjects(labels: list[str], seed: int, shortcut: str | None = None) -> pd.DataFrame:
    """Acquisition features drawn from one distribution for every class, except ``shortcut``'s voxel size."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    ids = [f"s{i:03d}" for i in range(n)]
    frame = pd.DataFrame({
        "subject_id": ids, "label": labels, "group": ids,
        "source": ["ixi" if label == "Healthy" else "brats" for label in labels],
        "site": [f"site{i % 3}" for i in range(n)], "stripped": True,
        "voxel_x": rng.choice([0.94, 1.0, 1.2], n), "voxel_y": rng.choice([0.94, 1.0, 1.2], n),
        "voxel_z": rng.choice([1.0, 1.2, 5.0], n),
        "shape_x": rng.choice([240, 256], n), "shape_y": rng.choice([240, 256], n), "shape_z": rng.choice([150, 155], n),
        "fg_volume_ml": rng.normal(1200, 100, n), "fg_median": rng.normal(300, 50, n), "fg_p99": rng.normal(900, 100, n),
        "zero_fraction": rng.uniform(0.6, 0.9, n), "border_zero_fraction": rng.uniform(0.9, 1.0, n),
        "orientation": rng.choice(["LPS", "RAS", "PSR"], n), "dtype": rng.choice(["int16", "float32"], n),
    })
    if shortcut is not None:
        voxel = ["voxel_x", "voxel_y", "voxel_z"]
        frame[voxel] = 1.0
        frame.loc[frame["label"] == shortcut, voxel] = 1.2
    return frame


def _cache(root: Path, subjects: pd.DataFrame, make: VolumeMaker = gaussian_brain, seed: int = 0) -> CachedDataset:
    """A real cache entry from ``preprocess`` on tiny NIfTI files, one per subject."""
    rng = np.random.default_rng(seed)
    records = []
    for sid, label in zip(subjects["subject_id"], subjects["label"]):
        path = root / "raw" / f"{sid}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(make(label, rng).astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0])), str(path))
        records.append(SubjectRecord(sid, label, (str(path),), group=sid))
    return preprocess(records, PreprocessConfig(spacing=4.0), root / "cache", num_workers=1)


def _run(tmp_path: Path, subjects: pd.DataFrame, classes, make: VolumeMaker = gaussian_brain):
    plan = plan_splits(subjects, n_splits=3, seed=0)
    predictions, selection = baselines.run_baselines(subjects, _cache(tmp_path, subjects, make), plan, classes, seed=0)
    return plan, predictions, selection


def _pooled_f1(predictions: pd.DataFrame, model: str, classes) -> float:
    rows = predictions[predictions["model"] == model]
    return f1_score(rows["label"], rows["pred"], labels=list(classes), average="macro", zero_division=0)


def _balanced(n_per_class: int, classes=("Tumour", "Healthy")) -> list[str]:
    return [classes[i % len(classes)] for i in range(n_per_class * len(classes))]


def test_acquisition_baseline_finds_a_voxel_size_shortcut(tmp_path):
    classes = ("Tumour", "Healthy")
    subjects = _subjects(_balanced(30, classes), seed=1, shortcut="Healthy")
    _, predictions, _ = _run(tmp_path, subjects, classes)
    assert _pooled_f1(predictions, baselines.ACQUISITION, classes) > 0.9


def test_acquisition_baseline_is_at_chance_without_a_shortcut(tmp_path):
    # 150 per class: the chance F1 of a pooled 300-subject test set has a standard deviation near 0.03.
    classes = ("Tumour", "Healthy")
    subjects = _subjects(_balanced(150, classes), seed=2)
    _, predictions, _ = _run(tmp_path, subjects, classes)
    assert _pooled_f1(predictions, baselines.ACQUISITION, classes) < 0.6


def bimodal_healthy(label: str, rng: np.random.Generator) -> np.ndarray:
    """Healthy brains have two tissue peaks, tumour brains one: the histogram's shape differs."""
    if label == "Healthy":
        values = np.where(rng.random(SHAPE) < 0.5, 80, 120) + 8 * rng.standard_normal(SHAPE)
    else:
        values = 100 + 20 * rng.standard_normal(SHAPE)
    return np.where(_ellipsoid(), values, 0)


def brighter_healthy(label: str, rng: np.random.Generator) -> np.ndarray:
    """Healthy brains three times brighter, same intensity shape: invisible after percentile rescaling."""
    scale = 3.0 if label == "Healthy" else 1.0
    return np.where(_ellipsoid(), scale * (100 + 20 * rng.standard_normal(SHAPE)), 0)


def test_histogram_baseline_separates_different_intensity_distributions(tmp_path):
    classes = ("Tumour", "Healthy")
    _, predictions, _ = _run(tmp_path, _subjects(_balanced(30, classes), seed=3), classes, bimodal_healthy)
    assert _pooled_f1(predictions, baselines.HISTOGRAM, classes) > 0.9


def test_histogram_baseline_is_at_chance_when_only_the_scale_differs(tmp_path):
    classes = ("Tumour", "Healthy")
    _, predictions, _ = _run(tmp_path, _subjects(_balanced(150, classes), seed=4), classes, brighter_healthy)
    assert _pooled_f1(predictions, baselines.HISTOGRAM, classes) < 0.6


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    """The paper's three classes, with NaN features and, in fold 0's test part only, an unseen orientation."""
    tmp_path = tmp_path_factory.mktemp("three")
    subjects = _subjects([PAPER_CLASSES[i % 3] for i in range(36)], seed=5, shortcut="Healthy")
    plan = plan_splits(subjects, n_splits=3, seed=0)
    subjects.loc[[0, 5, 9], "fg_median"] = np.nan
    subjects.loc[subjects["subject_id"] == plan.folds[0].test[0], "orientation"] = "ASL"
    predictions, selection = baselines.run_baselines(subjects, _cache(tmp_path, subjects, bimodal_healthy), plan,
                                                     PAPER_CLASSES, seed=0)
    return subjects, plan, predictions, selection


def test_prediction_table_matches_predictions_csv(three_class_run):
    from trainables.collect import KEY_COLUMNS

    subjects, plan, predictions, _ = three_class_run
    probs = [f"prob_{c}" for c in PAPER_CLASSES]
    assert list(predictions.columns) == [*KEY_COLUMNS, "subject_id", "label", "pred", *probs, "source", "site"]
    assert len(predictions) == 2 * sum(len(f.test) for f in plan.folds)
    for (model, fold), rows in predictions.groupby(["model", "fold"]):
        assert sorted(rows["subject_id"]) == plan.folds[fold].test
        assert set(rows["trial_name"]) == {f"{model}-f{fold}"} and rows["config_id"].str.fullmatch(r"C=[0-9.e+-]+").all()
    assert set(predictions["model"]) == {baselines.ACQUISITION, baselines.HISTOGRAM}
    assert (predictions["experiment"] == "baseline").all() and not predictions["pretrained"].any()
    assert np.allclose(predictions[probs].sum(axis=1), 1.0)
    assert (predictions["pred"] == np.array(PAPER_CLASSES)[predictions[probs].to_numpy().argmax(axis=1)]).all()
    truth = subjects.set_index("subject_id")
    assert (predictions["label"].to_numpy() == truth.loc[predictions["subject_id"], "label"].to_numpy()).all()
    assert (predictions["site"].to_numpy() == truth.loc[predictions["subject_id"], "site"].to_numpy()).all()
    assert (predictions["source"].to_numpy() == truth.loc[predictions["subject_id"], "source"].to_numpy()).all()
    ordered = predictions.sort_values(["model", "fold", "subject_id"], ignore_index=True)
    assert predictions.equals(ordered)


def test_reported_scores_match_a_recomputation_from_the_rows(three_class_run):
    _, plan, predictions, selection = three_class_run
    assert list(selection.columns) == baselines.SELECTION_COLUMNS and len(selection) == 2 * len(plan.folds)
    for row in selection.itertuples():
        rows = predictions[(predictions["model"] == row.model) & (predictions["fold"] == row.fold)]
        by_hand = f1_score(rows["label"], rows["pred"], labels=list(PAPER_CLASSES), average="macro", zero_division=0)
        assert row.test_macro_f1 == pytest.approx(by_hand)
        fold = plan.folds[row.fold]
        assert (row.n_train, row.n_val, row.n_test) == (len(fold.train), len(fold.val), len(fold.test))
        assert set(rows["config_id"]) == {f"C={row.chosen_C:g}"}
    acquisition = selection[selection["model"] == baselines.ACQUISITION].iloc[0]
    assert acquisition["features"].split(",") == [*baselines.ACQUISITION_NUMERIC, *baselines.ACQUISITION_CATEGORICAL]


def _candidates(text: str) -> dict[float, float]:
    return {float(c): float(s) for c, s in (item.split(":") for item in text.split(";"))}


def test_chosen_c_is_the_first_best_inner_validation_score(three_class_run):
    _, _, _, selection = three_class_run
    for row in selection.itertuples():
        scores = _candidates(row.candidates)
        assert list(scores) == list(baselines.C_GRID)
        best = max(scores.values())
        assert row.chosen_C == min(c for c, s in scores.items() if s == best)
        assert row.val_macro_f1 == pytest.approx(scores[row.chosen_C], abs=5e-5)


def weakly_bimodal_healthy(label: str, rng: np.random.Generator) -> np.ndarray:
    """A faint, noisy difference, so candidate Cs score differently on validation."""
    gap = rng.uniform(0, 14) if label == "Healthy" else rng.uniform(0, 6)
    values = np.where(rng.random(SHAPE) < 0.5, 100 - gap, 100 + gap) + 15 * rng.standard_normal(SHAPE)
    return np.where(_ellipsoid(), values, 0)


def test_c_choice_and_test_predictions_match_an_independent_refit(tmp_path):
    """Refit each C by hand on train, score on val: the reported scores, choice and test probabilities must agree."""
    classes = ("Tumour", "Healthy")
    subjects = _subjects(_balanced(30, classes), seed=6)
    cached = _cache(tmp_path, subjects, weakly_bimodal_healthy)
    plan = plan_splits(subjects, n_splits=3, seed=0)
    predictions, selection = baselines.run_baselines(subjects, cached, plan, classes)
    features = baselines.histogram_features(cached)
    y = subjects.set_index("subject_id")["label"]
    varied = False
    for fold in plan.folds:
        scores, models = {}, {}
        for C in baselines.C_GRID:
            models[C] = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced",
                                                                           max_iter=baselines.MAX_ITER))
            models[C].fit(features.loc[fold.train], y.loc[fold.train])
            scores[C] = f1_score(y.loc[fold.val], models[C].predict(features.loc[fold.val]), average="macro")
        varied |= len(set(scores.values())) > 1
        chosen = baselines.choose_c(scores)
        row = selection[(selection["model"] == baselines.HISTOGRAM) & (selection["fold"] == fold.fold)].iloc[0]
        assert row["chosen_C"] == chosen
        assert _candidates(row["candidates"]) == pytest.approx({c: round(s, 4) for c, s in scores.items()}, abs=1e-9)
        ours = predictions[(predictions["model"] == baselines.HISTOGRAM) & (predictions["fold"] == fold.fold)]
        hand = models[chosen].predict_proba(features.loc[ours["subject_id"]])
        assert np.allclose(ours[[f"prob_{c}" for c in models[chosen].classes_]].to_numpy(), hand, atol=1e-6)
    assert varied, "every C scored the same on every fold: the data no longer tests the choice"


def test_ties_go_to_the_smaller_c():
    assert baselines.choose_c({0.01: 0.5, 0.1: 0.7, 1.0: 0.7, 10.0: 0.6}) == 0.1
    assert baselines.choose_c({100.0: 0.4, 10.0: 0.4}) == 10.0


def test_no_test_subject_is_fitted_or_scored_before_its_prediction(three_class_run, monkeypatch, tmp_path):
    """Every fit sees exactly a fold's train part; val is scored per C; the fold's test part is predicted once, last."""
    subjects, plan, _, _ = three_class_run
    events: list[tuple[str, frozenset]] = []

    class Recording(baselines.Pipeline):
        def fit(self, X, y=None, **params):
            if self.steps[-1][0] == "model":  # the column transformer's inner pipelines see the same rows
                events.append(("fit", frozenset(X.index)))
            return super().fit(X, y, **params)

        def predict_proba(self, X, **params):
            events.append(("predict", frozenset(X.index)))
            return super().predict_proba(X, **params)

    monkeypatch.setattr(baselines, "Pipeline", Recording)
    baselines.run_baselines(subjects, _cache(tmp_path, subjects, bimodal_healthy), plan, PAPER_CLASSES)
    expected = []
    for _ in (baselines.ACQUISITION, baselines.HISTOGRAM):
        for fold in plan.folds:
            for _ in baselines.C_GRID:
                expected += [("fit", frozenset(fold.train)), ("predict", frozenset(fold.val))]
            expected.append(("predict", frozenset(fold.test)))
    assert events == expected
    for fold in plan.folds:  # the protocol above is only safe because the plan's parts are disjoint
        assert not set(fold.test) & (set(fold.train) | set(fold.val))


def test_a_class_missing_from_train_or_val_still_gets_its_columns(tmp_path):
    subjects = _subjects([PAPER_CLASSES[i % 3] for i in range(18)], seed=7, shortcut="Healthy")
    by_label = subjects.groupby("label")["subject_id"].apply(list)
    lgg, hgg, healthy = by_label["LGG"], by_label["HGG"], by_label["Healthy"]
    plan = SplitPlan("kfold", 2, 0.3, 0.2, 0, folds=[
        # fold 0: no LGG to train on, and no HGG in validation
        Fold(0, sorted(hgg[:4] + healthy[:4]), sorted(healthy[4:5]), sorted(lgg + hgg[4:] + healthy[5:])),
        # fold 1: one class only in train, so there is nothing for logistic regression to separate
        Fold(1, sorted(healthy[:4]), sorted(hgg[:1] + healthy[4:5]), sorted(lgg + hgg[1:] + healthy[5:])),
    ])
    predictions, selection = baselines.run_baselines(subjects, _cache(tmp_path, subjects), plan, PAPER_CLASSES)
    probs = [f"prob_{c}" for c in PAPER_CLASSES]
    assert np.allclose(predictions[probs].sum(axis=1), 1.0)
    assert (predictions.loc[predictions["fold"] == 0, "prob_LGG"] == 0).all()
    fold1 = predictions[predictions["fold"] == 1]
    assert (fold1["pred"] == "Healthy").all() and (fold1["config_id"] == "constant").all()
    # With labels= all classes, the absent HGG scores 0 instead of being dropped from the validation average.
    fold0 = selection[selection["fold"] == 0]
    assert (fold0["val_macro_f1"] <= 1 / 3 + 1e-9).all()


def test_histogram_uses_fixed_bins_on_the_brain_only(tmp_path):
    """Background 0 is not brain; 1.0 falls in the top bin; each channel sums to 1."""
    folder = tmp_path / "entry"
    folder.mkdir()
    volumes = np.zeros((2, 2, 2, 2, 1), dtype=np.float16)
    volumes[0, 0, :, :, 0] = [[0.0, 0.01], [0.5, 1.0]]
    volumes[0, 1, :, :, 0] = [[0.0, 0.0], [0.99, 0.99]]
    volumes[1, 0, :, :, 0] = 0.33  # float16 0.3 would round down into bin 5
    np.save(folder / "volumes.npy", volumes)
    pd.DataFrame({"index": [0, 1], "subject_id": ["b", "a"], "label": ["x", "y"], "group": ["b", "a"]}).to_csv(
        folder / "subjects.csv", index=False)
    (folder / "meta.json").write_text(json.dumps({"channels": 2}))
    table = baselines.histogram_features(CachedDataset(folder), bins=20)
    assert list(table.index) == ["b", "a"] and table.shape == (2, 40)
    first = table.loc["b"]
    assert first[["ch0_bin00", "ch0_bin10", "ch0_bin19"]].tolist() == pytest.approx([1 / 3] * 3)
    assert first["ch1_bin19"] == 1.0 and table.loc["a", "ch0_bin06"] == 1.0
    assert table.loc["a"].filter(like="ch1_").sum() == 0  # an empty channel is all zeros, not NaN
    assert np.allclose(table.loc["b"].filter(like="ch0_").sum(), 1.0)


def test_acquisition_features_need_every_column_and_keep_missing_values():
    subjects = _subjects(["LGG", "HGG"], seed=8)
    subjects.loc[0, ["voxel_x", "orientation"]] = [np.nan, np.nan]
    features = baselines.acquisition_features(subjects)
    assert np.isnan(features.loc["s000", "voxel_x"]) and features.loc["s000", "orientation"] == "missing"
    with pytest.raises(KeyError, match="border_zero_fraction"):
        baselines.acquisition_features(subjects.drop(columns="border_zero_fraction"))
