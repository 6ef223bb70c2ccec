"""Optuna search figures: optimisation history and hyperparameter importances per study.

Studies are only read. A study that cannot be opened, or has too few finished trials for an
importance estimate, becomes a sentence in the report instead of a crash.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.figures import RC, save_figure  # noqa: E402
from analysis.names import arm_label  # noqa: E402

SQLITE_PREFIX = "sqlite:///"
# Fewer completed trials than this (or equal scores) give fANOVA nothing to apportion.
MIN_TRIALS_FOR_IMPORTANCE = 3


@dataclass
class StudyOutput:
    study_name: str
    label: str
    model: str | None = None
    pretrained: bool | None = None
    fold: int | None = None  # the outer fold of a nested search's study; None for a study over all folds
    n_trials: int = 0
    n_complete: int = 0
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    history_png: Path | None = None
    importance_png: Path | None = None
    importances: pd.DataFrame | None = None  # param, importance
    notes: list[str] = field(default_factory=list)


def resolve_storage(url: str, out_dir: Path) -> tuple[str | None, str | None]:
    """(url to open, note). Never creates a database: RDBStorage would create an empty one for a
    missing SQLite path. The search's studies live in OUT/optuna/: a SQLite path recorded elsewhere
    (OUT was moved or copied since) is read from OUT/optuna/<file name> when that file exists, so a
    copy's report shows the copy's studies, not the original folder's."""
    if not url.startswith(SQLITE_PREFIX):
        return url, None
    path = Path(url[len(SQLITE_PREFIX):])
    here = out_dir / "optuna" / path.name
    if here.is_file():
        if path.is_file() and path.resolve() == here.resolve():
            return url, None
        state = "found" if path.is_file() else "not found"
        return SQLITE_PREFIX + str(here.resolve()), f"storage {url} is outside this output folder ({state}); read {here}"
    if path.is_file():
        return url, None
    return None, f"storage {url} not found (nor {here})"


def study_label(study_spec: dict) -> str:
    """'ResNet3D (scratch), fold 1' for a nested search's study; without a fold, the arm (or the study's name)."""
    name = str(study_spec["study_name"])
    label = arm_label(study_spec["model"], bool(study_spec["pretrained"])) if "model" in study_spec else name
    return label if study_spec.get("fold") is None else f"{label}, fold {int(study_spec['fold'])}"


def objective_name(study_spec: dict) -> str:
    """What the study maximised: one fold's inner validation (nested), or the mean over folds (runs before it)."""
    fold = study_spec.get("fold")
    return ("inner-validation macro F1 (mean over folds)" if fold is None
            else f"inner-validation macro F1 (fold {int(fold)})")


def study_figures(study_spec: dict, out_dir: Path, figures_dir: Path, seed: int = 0) -> StudyOutput:
    """History and importance PNGs for one study of experiment.json's optuna_studies."""
    import optuna
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    name = str(study_spec["study_name"])
    fold = study_spec.get("fold")
    out = StudyOutput(study_name=name, label=study_label(study_spec), model=study_spec.get("model"),
                      pretrained=study_spec.get("pretrained"), fold=None if fold is None else int(fold))
    label = out.label
    url, note = resolve_storage(str(study_spec["storage"]), out_dir)
    if note:
        out.notes.append(note)
    if url is None:
        return out
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the caller's setting is restored below
    try:
        study = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url))
    except Exception as exc:  # noqa: BLE001 - a broken study must not take the report down
        out.notes.append(f"could not load study {name!r} from {url}: {type(exc).__name__}: {exc}")
        return out
    finally:
        optuna.logging.set_verbosity(verbosity)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    out.n_trials, out.n_complete = len(trials), len(complete)
    if not complete:
        out.notes.append(f"study {name!r} has no completed trial: no history, no importances")
        return out
    out.best_value, out.best_params = study.best_value, dict(study.best_params)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)

    with warnings.catch_warnings(), matplotlib.rc_context(RC):
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is "experimental" and says so loudly
        ax = plot_optimization_history(study, target_name=objective_name(study_spec))
        ax.set_title(f"Optimisation history: {label}", fontsize=11)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend() is not None:  # optuna puts it outside the axes, where the fixed-size figure cuts it
            ax.get_legend().remove()
            ax.legend(loc="lower right", fontsize=8)
        fig = ax.figure
        fig.set_size_inches(6.4, 4.0)
        fig.set_layout_engine("tight")
        out.history_png = save_figure(fig, figures_dir / f"optuna_history_{safe}.png")
        _close(fig)

        varying = sorted({p for t in complete for p in t.params
                          if len({repr(u.params.get(p)) for u in complete}) > 1})
        scores = {t.value for t in complete}
        if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or len(scores) < 2 or not varying:
            # fANOVA splits the variance of the scores among the parameters: with two points, or equal scores, it
            # still returns numbers (a third each), which would read as a finding.
            out.notes.append(f"study {name!r}: hyperparameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} "
                             f"completed trials with different scores and varying parameters ({len(complete)} "
                             f"completed, {len(scores)} distinct score(s), varying: {varying or 'none'})")
            return out
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        try:
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying)
            ax = plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
                                        params=varying, target_name=objective_name(study_spec))
        except Exception as exc:  # noqa: BLE001 - fANOVA can fail on degenerate studies
            out.notes.append(f"study {name!r}: importances could not be computed ({type(exc).__name__}: {exc})")
            return out
        out.importances = pd.DataFrame({"param": list(importances), "importance": list(importances.values())})
        # optuna titles this axis on the left; replace that title rather than adding a centred one over it
        ax.set_title(f"Hyperparameter importances (fANOVA, seed {seed})\n{label}", loc="left", fontsize=10)
        fig = ax.figure
        fig.set_size_inches(6.4, 1.8 + 0.4 * len(varying))
        fig.set_layout_engine("tight")
        out.importance_png = save_figure(fig, figures_dir / f"optuna_importance_{safe}.png")
        _close(fig)
    return out


def _close(fig) -> None:
    """optuna draws through pyplot; release the figure so repeated reports do not leak memory."""
    import matplotlib.pyplot as plt

    plt.close(fig)
