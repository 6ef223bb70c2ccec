"""Fixture experiment directories written exactly as the orchestrator's contract says.

Predictions are generated from hand-written confusion matrices (rows = true class, columns =
predicted, class order HGG, LGG, Healthy), so tests can check metrics against arithmetic on those
matrices. Each fold has 10 test subjects: 4 HGG, 2 LGG, 4 Healthy. (A uniquely named module rather
than conftest.py, so tests can import its constants without clashing with other folders' conftests.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from search_spaces import space_table

REPO_ROOT = Path(__file__).resolve().parents[2]

CLASSES = ["HGG", "LGG", "Healthy"]
PAPER_DEFAULTS = {"lr": 1e-05, "weight_decay": 0.001, "dropout": 0.3, "augmentation": "light", "aug_strength": 1.0}
PAPER_CONFIG = "3f2a9c1d"
BUILT_BOOTSTRAP = 100  # resamples for the session-built report (the default 2000 only costs time here)

# (model, pretrained) -> one confusion matrix per fold
PAPER_MATRICES: dict[tuple[str, bool], list[list[list[int]]]] = {
    ("mc3_18", True): [
        [[3, 1, 0], [1, 1, 0], [0, 0, 4]],
        [[4, 0, 0], [0, 2, 0], [0, 0, 4]],
        [[4, 0, 0], [1, 1, 0], [0, 0, 4]],
    ],
    ("mc3_18", False): [
        [[3, 1, 0], [1, 1, 0], [0, 1, 3]],
        [[3, 1, 0], [1, 1, 0], [0, 0, 4]],
        [[2, 2, 0], [1, 1, 0], [0, 0, 4]],
    ],
    ("r3d_18", True): [
        [[4, 0, 0], [1, 1, 0], [0, 0, 4]],
        [[3, 1, 0], [0, 2, 0], [0, 0, 4]],
        [[4, 0, 0], [0, 2, 0], [1, 0, 3]],
    ],
}


def trial_name(model: str, pretrained: bool, fold: int, config_id: str = PAPER_CONFIG) -> str:
    return f"{model}-{'pretrained' if pretrained else 'scratch'}-{config_id}-f{fold}"


def prediction_rows(experiment: str, model: str, pretrained: bool, fold: int, config_id: str,
                    matrix: list[list[int]], name: str | None = None) -> list[dict]:
    """Rows realising `matrix`; subject ids are shared by all arms for the same fold (same split)."""
    rows, per_class_seen = [], {c: 0 for c in CLASSES}
    name = name or trial_name(model, pretrained, fold, config_id)
    for i, true in enumerate(CLASSES):
        for j, pred in enumerate(CLASSES):
            for _ in range(matrix[i][j]):
                k = per_class_seen[true]
                per_class_seen[true] += 1
                # a varying, valid softmax whose argmax is the prediction
                top = 0.55 + 0.04 * k + 0.01 * i
                probs = {c: (1 - top) / 2 for c in CLASSES}
                probs[pred] = top
                rows.append({"experiment": experiment, "model": model, "pretrained": pretrained, "fold": fold,
                             "config_id": config_id, "trial_name": name, "subject_id": f"{true}-{fold}-{k:02d}",
                             "label": true, "pred": pred, **{f"prob_{c}": probs[c] for c in CLASSES}})
    return rows


def epoch_rows(experiment: str, model: str, pretrained: bool, fold: int, config_id: str, n_epochs: int = 3,
               name: str | None = None) -> list[dict]:
    rows = []
    for e in range(1, n_epochs + 1):
        rows.append({"experiment": experiment, "model": model, "pretrained": pretrained, "fold": fold,
                     "config_id": config_id, "trial_name": name or trial_name(model, pretrained, fold, config_id), "epoch": e,
                     "train_loss": 1.0 / e + 0.01 * fold, "val_loss": 1.1 / e + 0.02 * fold,
                     "val_accuracy": 0.6 + 0.1 * e - 0.01 * fold, "val_macro_f1": 0.55 + 0.1 * e - 0.01 * fold,
                     **{f"val_f1_{c}": 0.5 + 0.1 * e for c in CLASSES}, "lr": 1e-5})
    return rows


def trial_row(experiment: str, model: str, pretrained: bool, fold: int, config_id: str, status: str = "TERMINATED",
              error: str = "", best_val: float = 0.8, hp: dict | None = None, name: str | None = None) -> dict:
    hp = hp or PAPER_DEFAULTS
    name = name or trial_name(model, pretrained, fold, config_id)
    return {"experiment": experiment, "trial_name": name, "model": model,
            "pretrained": pretrained, "fold": fold, "config_id": config_id, "status": status, "error": error, **hp,
            "epochs_run": 3, "best_epoch": 3, "best_val_macro_f1": best_val if status == "TERMINATED" else "",
            "n_train": 16, "n_val": 4, "n_test": 10}


def write_dir(out: Path, meta: dict, preds: list[dict], epochs: list[dict], trials: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(meta, indent=2))
    pd.DataFrame(preds).to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(epochs).to_csv(out / "epochs.csv", index=False)
    pd.DataFrame(trials).to_csv(out / "trials.csv", index=False)
    return out


def paper_meta(arms: list[tuple[str, bool]], planned: list[str]) -> dict:
    return {"experiment": "paper", "classes": CLASSES, "n_folds": 3, "split": "kfold", "seed": 0,
            "arms": [{"model": m, "pretrained": p} for m, p in arms], "planned_trials": planned,
            "paper_config_id": PAPER_CONFIG, "paper_defaults": PAPER_DEFAULTS, "unrelated_key": {"ignored": True}}


def build_paper_dir(out: Path) -> Path:
    preds, epochs, trials, planned = [], [], [], []
    for (model, pre), mats in PAPER_MATRICES.items():
        for fold, mat in enumerate(mats):
            preds += prediction_rows("paper", model, pre, fold, PAPER_CONFIG, mat)
            epochs += epoch_rows("paper", model, pre, fold, PAPER_CONFIG)
            trials.append(trial_row("paper", model, pre, fold, PAPER_CONFIG))
            planned.append(trial_name(model, pre, fold))
    return write_dir(out, paper_meta(list(PAPER_MATRICES), planned), preds, epochs, trials)


FAILED_TRIAL = trial_name("r3d_18", True, 2)
MISSING_TRIAL = trial_name("mc3_18", False, 1)
FAILED_ERROR = "RuntimeError: CUDA out of memory while allocating 2.00 GiB\nTraceback (most recent call last):\n  x"


UNRUN_ARM = ("r2plus1d_18", True)
UNRUN_TRIALS = [trial_name(*UNRUN_ARM, fold) for fold in range(3)]


def build_partial_dir(out: Path) -> Path:
    """r3d_18 pre-trained fold 2 ERRORed (no predictions); mc3_18 scratch fold 1 never ran (absent from
    trials.csv); r2plus1d_18 pre-trained is planned but has no trial at all; mc3_18 pre-trained is complete."""
    preds, epochs, trials, planned = [], [], [], list(UNRUN_TRIALS)
    for (model, pre), mats in PAPER_MATRICES.items():
        for fold, mat in enumerate(mats):
            name = trial_name(model, pre, fold)
            planned.append(name)
            if name == MISSING_TRIAL:
                continue
            if name == FAILED_TRIAL:
                trials.append(trial_row("paper", model, pre, fold, PAPER_CONFIG, status="ERROR", error=FAILED_ERROR))
                epochs += epoch_rows("paper", model, pre, fold, PAPER_CONFIG, n_epochs=1)
                continue
            preds += prediction_rows("paper", model, pre, fold, PAPER_CONFIG, mat)
            epochs += epoch_rows("paper", model, pre, fold, PAPER_CONFIG)
            trials.append(trial_row("paper", model, pre, fold, PAPER_CONFIG))
    # the orchestrator writes a planned trial that never started as a row with only name and status
    trials += [{"trial_name": name, "status": "MISSING", "error": ""} for name in UNRUN_TRIALS]
    return write_dir(out, paper_meta([*PAPER_MATRICES, UNRUN_ARM], planned), preds, epochs, trials)


def build_single_arm_dir(out: Path) -> Path:
    """The paper fixture reduced to one arm (mc3_18 pre-trained): the cheapest complete directory."""
    arm = ("mc3_18", True)
    preds, epochs, trials, planned = [], [], [], []
    for fold, mat in enumerate(PAPER_MATRICES[arm]):
        preds += prediction_rows("paper", *arm, fold, PAPER_CONFIG, mat)
        epochs += epoch_rows("paper", *arm, fold, PAPER_CONFIG)
        trials.append(trial_row("paper", *arm, fold, PAPER_CONFIG))
        planned.append(trial_name(*arm, fold))
    return write_dir(out, paper_meta([arm], planned), preds, epochs, trials)


# ------------------------------------------------------------------------------------------ search
SEARCH_ARMS = [("mc3_18", False), ("r3d_18", True)]
SEARCH_CONFIGS = {
    # config_id: (hyperparameters, inner-validation best_val_macro_f1 per fold, folds run)
    PAPER_CONFIG: (PAPER_DEFAULTS, [0.70, 0.72, 0.74], 3),
    "cfgA": ({**PAPER_DEFAULTS, "lr": 1e-4, "dropout": 0.5}, [0.80, 0.82, 0.84], 3),
    # highest inner score but only 2 of 3 folds finished: must not be chosen over cfgA
    "cfgB": ({**PAPER_DEFAULTS, "lr": 3e-4, "dropout": 0.1}, [0.95, 0.96], 2),
}
SEARCH_MATRICES = {
    PAPER_CONFIG: [[[3, 1, 0], [1, 1, 0], [0, 0, 4]]] * 3,
    "cfgA": [[[4, 0, 0], [1, 1, 0], [0, 0, 4]]] * 3,
    "cfgB": [[[2, 2, 0], [1, 1, 0], [0, 0, 4]]] * 2,
}


def _make_study(db: Path, name: str, values: list[tuple[dict, float]]) -> str:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{db}"
    study = optuna.create_study(study_name=name, storage=optuna.storages.RDBStorage(url), direction="maximize")
    dists = {"lr": optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True),
             "dropout": optuna.distributions.FloatDistribution(0.0, 0.6)}
    for params, value in values:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return url


def build_search_dir(out: Path) -> Path:
    preds, epochs, trials, planned = [], [], [], []
    for model, pre in SEARCH_ARMS:
        for cid, (hp, vals, n) in SEARCH_CONFIGS.items():
            for fold in range(n):
                planned.append(trial_name(model, pre, fold, cid))
                preds += prediction_rows("search", model, pre, fold, cid, SEARCH_MATRICES[cid][fold])
                epochs += epoch_rows("search", model, pre, fold, cid)
                trials.append(trial_row("search", model, pre, fold, cid, best_val=vals[fold], hp=hp))
    (out / "optuna").mkdir(parents=True, exist_ok=True)
    url1 = _make_study(out / "optuna" / "mc3_18-scratch.db", "mc3_18-scratch",
                       [({"lr": 1e-5, "dropout": 0.3}, 0.72), ({"lr": 1e-4, "dropout": 0.5}, 0.82),
                        ({"lr": 3e-4, "dropout": 0.1}, 0.955), ({"lr": 5e-6, "dropout": 0.2}, 0.60),
                        ({"lr": 2e-5, "dropout": 0.4}, 0.75)])
    url2 = _make_study(out / "optuna" / "r3d_18-pretrained.db", "r3d_18-pretrained", [({"lr": 1e-5, "dropout": 0.3}, 0.7)])
    meta = {"experiment": "search", "classes": CLASSES, "n_folds": 3, "split": "shuffle", "seed": 0,
            "arms": [{"model": m, "pretrained": p} for m, p in SEARCH_ARMS], "planned_trials": planned,
            "paper_config_id": PAPER_CONFIG, "paper_defaults": PAPER_DEFAULTS,
            "optuna_studies": [
                {"model": "mc3_18", "pretrained": False, "storage": url1, "study_name": "mc3_18-scratch"},
                {"model": "r3d_18", "pretrained": True, "storage": url2, "study_name": "r3d_18-pretrained"}]}
    return write_dir(out, meta, preds, epochs, trials)


# ------------------------------------------------------------------------------------- nested search
# A demo-style run: the paper grid and a nested search in one experiment. Each (arm, fold) study is handed
# the grid trial of its fold as an evaluated trial of the paper's configuration.
# NESTED_SCORES[arm][config] = inner-validation macro F1 per fold (None: not evaluated in that fold).
NESTED_SCORES: dict[tuple[str, bool], dict[str, list[float | None]]] = {
    # Fold 0 must choose cfgC (0.85) although cfgA holds the best score anywhere (0.95 in fold 1) and the best
    # mean over folds; fold 1 chooses cfgA; fold 2 chooses the handed grid trial (0.92 > 0.90).
    ("mc3_18", False): {PAPER_CONFIG: [0.70, 0.72, 0.92], "cfgA": [0.80, 0.95, 0.90], "cfgC": [0.85, 0.60, None]},
    # every fold chooses cfgA: the folds agree
    ("r3d_18", True): {PAPER_CONFIG: [0.70, 0.72, 0.74], "cfgA": [0.80, 0.95, 0.90], "cfgC": [0.75, 0.60, None]},
}
NESTED_HP = {PAPER_CONFIG: PAPER_DEFAULTS, "cfgA": {**PAPER_DEFAULTS, "lr": 1e-4, "dropout": 0.5},
             "cfgC": {**PAPER_DEFAULTS, "lr": 3e-4, "dropout": 0.1}}
NESTED_MATRICES = {PAPER_CONFIG: [[3, 1, 0], [1, 1, 0], [0, 0, 4]], "cfgA": [[4, 0, 0], [1, 1, 0], [0, 0, 4]],
                   "cfgC": [[4, 0, 0], [0, 2, 0], [0, 0, 4]]}
NESTED_ERROR_CONFIG = "cfgD"  # an ERRORed search trial of fold 0: never a candidate


def nested_trial_name(experiment: str, model: str, pretrained: bool, fold: int, config_id: str) -> str:
    """As trainables.ray_trainable.trial_name writes it: search trials carry a prefix."""
    prefix = "search-" if experiment == "search" else ""
    return f"{prefix}{model}-{'kinetics' if pretrained else 'scratch'}-f{fold}-{config_id}"


def study_name(model: str, pretrained: bool, fold: int) -> str:
    return f"{model}-{'kinetics' if pretrained else 'scratch'}-fold{fold}"


def fold_subjects(fold: int) -> list[str]:
    """The 10 test subjects prediction_rows writes for `fold`."""
    counts = {"HGG": 4, "LGG": 2, "Healthy": 4}
    return [f"{c}-{fold}-{k:02d}" for c, n in counts.items() for k in range(n)]


def nested_splits(n_folds: int = 3) -> dict:
    """splits.json: fold k tests its own subjects; of the others, each class's first subject validates."""
    folds = []
    for k in range(n_folds):
        rest = [s for j in range(n_folds) if j != k for s in fold_subjects(j)]
        val = [s for s in rest if s.endswith("-00")]
        folds.append({"fold": k, "train": [s for s in rest if s not in val], "val": val, "test": fold_subjects(k)})
    return {"scheme": "kfold", "n_splits": n_folds, "test_size": 0.3, "val_fraction": 0.2, "seed": 0, "folds": folds}


def _trial_subject_rows(name: str, fold_split: dict) -> list[dict]:
    return [{"trial_name": name, "part": part, "subject_id": sid}
            for part in ("train", "val", "test") for sid in fold_split[part]]


def _nested_trials(arm: tuple[str, bool]) -> list[tuple[str, str, int, float]]:
    """(experiment, config_id, fold, inner score) of every finished trial of `arm`."""
    out = []
    for cid, scores in NESTED_SCORES[arm].items():
        for fold, score in enumerate(scores):
            if score is not None:
                out.append(("paper" if cid == PAPER_CONFIG else "search", cid, fold, score))
    return out


def build_nested_search_dir(out: Path, studies: bool = True) -> Path:
    """`studies=False` leaves search.db out (the report then says so per study): faster for table-only tests."""
    splits = nested_splits()
    preds, epochs, trials, used, planned = [], [], [], [], []
    for model, pre in NESTED_SCORES:
        for experiment, cid, fold, score in _nested_trials((model, pre)):
            name = nested_trial_name(experiment, model, pre, fold, cid)
            if experiment == "paper":
                planned.append(name)
            preds += prediction_rows(experiment, model, pre, fold, cid, NESTED_MATRICES[cid], name=name)
            epochs += epoch_rows(experiment, model, pre, fold, cid, name=name)
            trials.append(trial_row(experiment, model, pre, fold, cid, best_val=score, hp=NESTED_HP[cid], name=name))
            used += _trial_subject_rows(name, splits["folds"][fold])
        trials.append(trial_row("search", model, pre, 0, NESTED_ERROR_CONFIG, status="ERROR", error="ValueError: x",
                                name=nested_trial_name("search", model, pre, 0, NESTED_ERROR_CONFIG)))
    url = f"sqlite:///{out / 'optuna' / 'search.db'}"
    specs = [{"model": m, "pretrained": p, "fold": k, "storage": url, "study_name": study_name(m, p, k),
              "grid_trial": nested_trial_name("paper", m, p, k, PAPER_CONFIG)} for m, p in NESTED_SCORES for k in range(3)]
    if studies:
        (out / "optuna").mkdir(parents=True, exist_ok=True)
        for spec in specs:
            arm = (spec["model"], spec["pretrained"])
            _make_study(out / "optuna" / "search.db", spec["study_name"],
                        [({"lr": NESTED_HP[cid]["lr"], "dropout": NESTED_HP[cid]["dropout"]}, score)
                         for _, cid, fold, score in _nested_trials(arm) if fold == spec["fold"]])
    meta = {"experiment": "demo", "classes": CLASSES, "n_folds": 3, "split": "kfold", "seed": 0,
            "arms": [{"model": m, "pretrained": p} for m, p in NESTED_SCORES], "planned_trials": planned,
            "paper_config_id": PAPER_CONFIG, "paper_defaults": PAPER_DEFAULTS, "search_design": "nested",
            "optuna_studies": specs, "num_samples": 4, "search_space": space_table({"lr": 4e-4})}
    write_dir(out, meta, preds, epochs, trials)
    pd.DataFrame(used).to_csv(out / "trial_subjects.csv", index=False)
    (out / "splits.json").write_text(json.dumps(splits, indent=2))
    return out


# ------------------------------------------------------------------------------------- confounds
# 3 folds x (10 HGG, 5 LGG, 10 Healthy) = 75 subjects: enough for the paired bootstrap to separate a
# perfect arm from a baseline at chance. Healthy comes only from IXI (a source confound), LGG k >= 3 only
# from TCIA09 (a single-class site), and 2 Healthy per fold are unstripped (run with --allow-unstripped).
CONFOUND_PER_FOLD = {"HGG": 10, "LGG": 5, "Healthy": 10}
PERFECT_ARM = ("mc3_18", True)    # every prediction right
COPYCAT_ARM = ("r3d_18", True)    # predicts exactly what the acquisition baseline predicts
ACQ_FEATURES = ["voxel_x", "voxel_y", "voxel_z", "shape_x", "shape_y", "shape_z", "fg_volume_ml", "fg_median",
                "fg_p99", "zero_fraction", "border_zero_fraction", "orientation", "dtype"]
HIST_FEATURES = [f"ch0_bin{b:02d}" for b in range(20)]
IXI_SITES = ["Guys", "HH", "IOP"]


def confound_subject(cls: str, fold: int, k: int) -> dict:
    """One subject of the confound fixture: id, label, source, site, stripped."""
    if cls == "Healthy":
        source, site = "ixi", IXI_SITES[k % 3]
    elif cls == "HGG":
        source, site = "brats", "CBICA" if k % 2 == 0 else "TCIA01"
    else:
        source, site = "brats", "TCIA01" if k < 3 else "TCIA09"
    return {"subject_id": f"{cls}-{fold}-{k:02d}", "label": cls, "source": source, "site": site,
            "stripped": not (cls == "Healthy" and k < 2), "fold": fold, "k": k}


def confound_subjects() -> list[dict]:
    return [confound_subject(cls, fold, k) for fold in range(3) for cls, n in CONFOUND_PER_FOLD.items() for k in range(n)]


def acquisition_guess(subject: dict) -> str:
    """Healthy is found from the source; HGG vs LGG is a coin toss by k's parity (chance)."""
    if subject["label"] == "Healthy":
        return "Healthy"
    return "HGG" if subject["k"] % 2 == 0 else "LGG"


def histogram_guess(subject: dict) -> str:
    """Chance on every class: the prediction cycles through the classes with k."""
    return CLASSES[subject["k"] % 3]


def _confound_prediction(experiment: str, model: str, pretrained: bool, config: str, trial: str, subject: dict,
                         pred: str) -> dict:
    probs = {c: 0.2 for c in CLASSES}
    probs[pred] = 0.6
    return {"experiment": experiment, "model": model, "pretrained": pretrained, "fold": subject["fold"],
            "config_id": config, "trial_name": trial, "subject_id": subject["subject_id"], "label": subject["label"],
            "pred": pred, **{f"prob_{c}": probs[c] for c in CLASSES}, "source": subject["source"], "site": subject["site"]}


def confound_meta(planned: list[str]) -> dict:
    drawn = {c: 3 * n for c, n in CONFOUND_PER_FOLD.items()}
    return {**paper_meta([PERFECT_ARM, COPYCAT_ARM], planned), "allow_unstripped": True, "register": "none",
            "max_per_class": {"Healthy": 30}, "cohort": {"available": {**drawn, "Healthy": 40}, "drawn": drawn},
            "stripping": {"by_class": {"HGG": {"stripped": 30, "unstripped": 0}, "LGG": {"stripped": 15, "unstripped": 0},
                                       "Healthy": {"stripped": 24, "unstripped": 6}},
                          "unstripped": [{"subject_id": s["subject_id"], "label": s["label"], "path": f"/d/{s['subject_id']}.nii",
                                          "border_zero_fraction": 0.01} for s in confound_subjects() if not s["stripped"]]}}


def build_confound_dir(out: Path) -> Path:
    """Deep arms, both baselines, subjects.csv, baseline_selection.csv and the new experiment.json keys."""
    subjects = confound_subjects()
    preds, epochs, trials, planned = [], [], [], []
    for model, pre in (PERFECT_ARM, COPYCAT_ARM):
        for fold in range(3):
            name = trial_name(model, pre, fold)
            planned.append(name)
            epochs += epoch_rows("paper", model, pre, fold, PAPER_CONFIG)
            trials.append(trial_row("paper", model, pre, fold, PAPER_CONFIG))
            for s in (s for s in subjects if s["fold"] == fold):
                pred = s["label"] if (model, pre) == PERFECT_ARM else acquisition_guess(s)
                preds.append(_confound_prediction("paper", model, pre, PAPER_CONFIG, name, s, pred))
    write_dir(out, confound_meta(planned), preds, epochs, trials)
    baseline, selection = [], []
    for model, guess, features in (("acquisition_baseline", acquisition_guess, ACQ_FEATURES),
                                   ("histogram_baseline", histogram_guess, HIST_FEATURES)):
        for fold in range(3):
            baseline += [_confound_prediction("baseline", model, False, "C=1", f"{model}-f{fold}", s, guess(s))
                         for s in subjects if s["fold"] == fold]
            selection.append({"model": model, "fold": fold, "chosen_C": [0.1, 1.0, 10.0][fold], "val_macro_f1": 0.5,
                              "candidates": "0.01:0.4000;0.1:0.5000;1:0.5000", "n_train": 40, "n_val": 10,
                              "n_test": 25, "features": ",".join(features), "test_macro_f1": 0.5})
    pd.DataFrame(baseline).to_csv(out / "baseline_predictions.csv", index=False)
    pd.DataFrame(selection).to_csv(out / "baseline_selection.csv", index=False)
    rows = [{**{k: v for k, v in s.items() if k not in ("fold", "k")}, "group": s["subject_id"],
             "border_zero_fraction": 1.0 if s["stripped"] else 0.01, "voxel_x": 1.0, "voxel_y": 1.0, "voxel_z": 1.0,
             "shape_x": 240, "shape_y": 240, "shape_z": 155, "orientation": "LPS", "dtype": "int16",
             "fg_volume_ml": 1400.0, "fg_median": 300.0, "fg_p99": 900.0, "zero_fraction": 0.8} for s in subjects]
    pd.DataFrame(rows).to_csv(out / "subjects.csv", index=False)
    return out
