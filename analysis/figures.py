"""Figures with matplotlib (Agg): confusion matrices, class-wise heat-maps, ROC, learning curves.

Deterministic bytes: fixed size and dpi, sorted orders, fixed colours, and no "Software" PNG
metadata (it carries the matplotlib version). Figures are built as `Figure` objects rather than
through pyplot's global state, so the orchestrator's own plotting is not disturbed.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from datasets.atomic import write_bytes_atomic  # noqa: E402
from analysis.metrics import ArmMetrics  # noqa: E402
from analysis.names import Arm, arm_label, arm_mask, arm_slug, display_name  # noqa: E402

DPI = 100
RC = {"font.size": 9, "axes.titlesize": 10, "figure.dpi": DPI, "savefig.dpi": DPI, "path.simplify": True,
      "image.cmap": "viridis"}
CLASS_COLOURS = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def save_figure(fig, path: Path) -> Path:
    """PNG bytes without a Software tag, written atomically; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    write_bytes_atomic(path, buf.getvalue())
    return path


def _annotate(ax, values: np.ndarray, fmt: str, threshold: float, dark_high: bool) -> None:
    """Write each cell's value, white on dark cells (high values for Blues, low ones for viridis)."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "n/a" if not np.isfinite(v) else format(v, fmt)
            dark = np.isfinite(v) and ((v > threshold) if dark_high else (v < threshold))
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def confusion_figure(confusion: pd.DataFrame, arm: Arm, classes: list[str], path: Path, folds_label: str) -> Path:
    """Like the paper's Figs 4-6: counts summed over folds, and row-normalised (rows = true class)."""
    sel = confusion[arm_mask(confusion, arm)]
    idx = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)))
    fractions = np.full((len(classes), len(classes)), np.nan)
    for r in sel.itertuples(index=False):
        counts[idx[r.true], idx[r.pred]] = r.count
        fractions[idx[r.true], idx[r.pred]] = r.row_fraction
    with matplotlib.rc_context(RC):
        size = 2.2 + 0.9 * len(classes)
        fig = Figure(figsize=(2 * size + 1.0, size), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, values, title, fmt, vmax in ((axes[0], counts, "counts (summed over folds)", ".0f", max(counts.max(), 1)),
                                             (axes[1], fractions, "row-normalised (recall on diagonal)", ".2f", 1.0)):
            im = ax.imshow(np.nan_to_num(values), cmap="Blues", vmin=0, vmax=vmax)
            _annotate(ax, values, fmt, threshold=vmax / 2, dark_high=True)
            ax.set_xticks(range(len(classes)), classes)
            ax.set_yticks(range(len(classes)), classes)
            ax.set_xlabel("Predicted")
            ax.set_ylabel("True")
            ax.set_title(title)
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(f"{arm_label(*arm)}: {folds_label} folds")
        return save_figure(fig, path)


def heatmap_figure(metrics: ArmMetrics, arms: list[Arm], classes: list[str], path: Path) -> Path | None:
    """Fig 7: precision / recall / specificity / F1 per class (columns) and arm (rows), fold means."""
    pc = metrics.per_class
    arms = [a for a in arms if arm_mask(pc, a).any()]
    if not arms:
        return None
    grids = {}
    for metric in ("precision", "recall", "specificity", "f1"):
        values = np.full((len(arms), len(classes)), np.nan)
        for i, arm in enumerate(arms):
            for j, cls in enumerate(classes):
                sel = pc[arm_mask(pc, arm) & (pc["class"] == cls) & (pc["metric"] == metric)]
                if len(sel):
                    values[i, j] = sel["mean"].iloc[0]
        grids[metric] = values
    # One shared scale from a round number below the lowest value to 1, so differences near the top
    # (where these models live) stay visible, and the panels remain comparable with each other.
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin = float(np.floor(max(finite.min() - 0.02, 0.0) * 20) / 20) if finite.size else 0.0
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.5 + 2 * (0.5 + 0.8 * len(classes)), 1.0 + 2 * (0.6 + 0.42 * len(arms))),
                     layout="constrained")
        axes = fig.subplots(2, 2, sharey=True, sharex=True).ravel()
        for k, (metric, values) in enumerate(grids.items()):
            ax = axes[k]
            im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=1.0, aspect="auto")
            _annotate(ax, values, ".3f", threshold=vmin + 0.45 * (1.0 - vmin), dark_high=False)
            ax.set_xticks(range(len(classes)), classes)
            ax.set_yticks(range(len(arms)), [arm_label(*a) for a in arms])
            ax.set_title("F1" if metric == "f1" else metric.capitalize())
        fig.colorbar(im, ax=list(axes), shrink=0.6)
        fig.suptitle(f"Class-wise metrics, mean over folds (colour scale {vmin:.2f}-1)")
        return save_figure(fig, path)


def roc_figure(curves: dict, arm: Arm, classes: list[str], path: Path) -> Path | None:
    """One-vs-rest ROC per class from pooled out-of-fold probabilities, AUC in the legend."""
    keys = [(arm[0], arm[1], c) for c in classes if (arm[0], arm[1], c) in curves]
    if not keys:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(4.6, 4.2), layout="constrained")
        ax = fig.subplots()
        for key in keys:
            fpr, tpr, auc = curves[key]
            ax.plot(fpr, tpr, color=CLASS_COLOURS[classes.index(key[2]) % len(CLASS_COLOURS)],
                    label=f"{key[2]} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("False positive rate (1 − specificity)")
        ax.set_ylabel("True positive rate (recall)")
        ax.set_title(f"{arm_label(*arm)}: one-vs-rest ROC, pooled folds")
        ax.legend(loc="lower right")
        return save_figure(fig, path)


def learning_curve_figure(epochs: pd.DataFrame, arm: Arm, path: Path) -> Path | None:
    """Loss and validation scores per epoch: mean over folds with a ±1 std band (folds may stop at
    different epochs, so each epoch's mean uses the folds that reached it, and the count is shown)."""
    sel = epochs[arm_mask(epochs, arm)]
    if sel.empty:
        return None
    panels = [("Loss", [("train_loss", "train", "tab:blue"), ("val_loss", "validation", "tab:orange")]),
              ("Validation score", [("val_macro_f1", "macro F1", "tab:green"), ("val_accuracy", "accuracy", "tab:purple")])]
    reached = sel.groupby("epoch")["fold"].nunique()
    drops = _fold_count_drops(reached)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(9.0, 3.4), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, (title, series) in zip(axes, panels):
            drawn = False
            for column, label, colour in series:
                if column not in sel or sel[column].isna().all():
                    continue
                g = sel.groupby("epoch")[column]
                mean, std, count = g.mean(), g.std(ddof=1), g.count()
                x = mean.index.to_numpy()
                ax.plot(x, mean.to_numpy(), color=colour, label=label, marker="o" if len(x) < 15 else None,
                        markersize=3)
                lo, hi = (mean - std).to_numpy(), (mean + std).to_numpy()
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():
                    ax.fill_between(x[ok], lo[ok], hi[ok], color=colour, alpha=0.2, linewidth=0)
                drawn = True
            for i, (epoch, count) in enumerate(drops):  # past here the mean is over fewer folds: say so there
                ax.axvline(epoch - 0.5, color="grey", linestyle=":", linewidth=1)
                ax.annotate(f"{count} fold{'s' if count > 1 else ''}", (epoch - 0.5, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(2, -10 - 9 * (i % 3)), textcoords="offset points", fontsize=7, color="grey")
            ax.set_xlabel("Epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(title)
            if drawn:
                ax.legend()
        fig.suptitle(learning_curve_title(arm, reached))
        return save_figure(fig, path)


def _fold_count_drops(reached: pd.Series) -> list[tuple[int, int]]:
    """(epoch, folds) at each epoch where fewer folds reach it than reached the one before (early stopping)."""
    return [(int(epoch), int(count)) for epoch, count, before in zip(reached.index[1:], reached.to_numpy()[1:],
                                                                     reached.to_numpy()[:-1]) if count < before]


def learning_curve_title(arm: Arm, reached: pd.Series) -> str:
    """The figure's title: over how many folds each part of the curves is a mean (``reached``: epoch -> folds)."""
    start = int(reached.iloc[0])
    drops = _fold_count_drops(reached)
    if not drops:
        return f"{arm_label(*arm)}: mean ± 1 std over {start} fold(s)"
    later = "; ".join(f"{count} from epoch {epoch}" for epoch, count in drops)
    # two or more lines: the figure is 9 inches wide, and ten folds stopping at different epochs make a long list
    return "\n".join([f"{arm_label(*arm)}: mean ± 1 std over the folds that reached each epoch",
                      *textwrap.wrap(f"({start} at first; {later})", width=90)])


def macro_f1_figure(metrics: ArmMetrics, arms: list[Arm], path: Path, paper_lookup) -> Path | None:
    """Macro F1 per arm: each fold as a dot, the fold mean as a bar, the published value as a cross."""
    fo = metrics.per_fold_overall
    arms = [a for a in arms if arm_mask(fo, a).any()]
    if not arms:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(2.8 + 1.1 * len(arms), 3.8), layout="constrained")
        ax = fig.subplots()
        for i, arm in enumerate(arms):
            vals = fo[arm_mask(fo, arm)].sort_values("fold")["macro_f1"].to_numpy()
            ax.bar(i, vals.mean(), color="tab:blue" if arm[1] else "tab:gray", alpha=0.5, width=0.6)
            ax.scatter(np.full(len(vals), i), vals, color="black", s=12, zorder=3,
                       label="fold" if i == 0 else None)
            paper = paper_lookup(arm)
            if np.isfinite(paper):
                ax.scatter([i], [paper], marker="x", color="tab:red", s=40, zorder=4,
                           label="published" if "published" not in ax.get_legend_handles_labels()[1] else None)
        ax.set_xticks(range(len(arms)), [f"{display_name(m)}\n{'pre-trained' if p else 'scratch'}" for m, p in arms],
                      rotation=30, ha="right")
        ax.set_ylabel("Macro F1 (test folds)")
        ax.set_ylim(0, 1.02)
        ax.set_title("Macro F1 per arm (bar = fold mean)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return save_figure(fig, path)


def best_vs_default_figure(best: pd.DataFrame, path: Path, default_label: str = "paper defaults") -> Path | None:
    """Search run before nested CV: the configuration chosen by its mean over folds against the grid's defaults.

    The chosen one's bar is labelled biased: its choice saw every fold's validation subjects."""
    return _paired_bars(best, "role", [("paper_default", "tab:gray", textwrap.fill(default_label, 28)),
                                       ("best", "tab:orange", "chosen by mean over folds\n(optimistically biased)")],
                        path, "Search (before nested CV): chosen vs defaults")


def nested_vs_default_figure(estimate: pd.DataFrame, path: Path, default_label: str = "paper defaults") -> Path | None:
    """Nested search: the nested estimate (each fold's own choice on its test part) against the defaults."""
    return _paired_bars(estimate, "estimate", [("paper_default", "tab:gray", textwrap.fill(default_label, 28)),
                                               ("nested", "tab:blue", "nested estimate\n(chosen per fold)")],
                        path, "Search: nested estimate vs defaults")


def _paired_bars(frame: pd.DataFrame, key: str, series: list[tuple[str, str, str]], path: Path,
                 title: str) -> Path | None:
    """Test macro F1 (mean ± std over folds) per arm, one bar per `series` entry (value of `key`, colour, label);
    None when no arm has a test score (an empty chart would only look like a failure)."""
    if frame.empty or not np.isfinite(frame["test_macro_f1_mean"].astype(float)).any():
        return None
    arms = list(dict.fromkeys(zip(frame["model"], frame["pretrained"])))
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(max(5.0, 2.4 + 1.6 * len(arms)), 4.4), layout="constrained")
        ax = fig.subplots()
        for k, (value, colour, label) in enumerate(series):
            xs, ys, es = [], [], []
            for i, arm in enumerate(arms):
                r = frame[arm_mask(frame, arm) & (frame[key] == value)]
                if len(r) and np.isfinite(r["test_macro_f1_mean"].iloc[0]):
                    xs.append(i + (k - 0.5) * 0.35)
                    ys.append(r["test_macro_f1_mean"].iloc[0])
                    es.append(np.nan_to_num(r["test_macro_f1_std"].iloc[0]))
            if xs:
                ax.bar(xs, ys, width=0.35, yerr=es, color=colour, label=label, capsize=3)
        # Labels wrapped, not rotated, and the legend under the axes: long arm and configuration names must not be
        # cut at the figure's edge or squeeze the bars.
        ax.set_xticks(range(len(arms)), [textwrap.fill(arm_label(*a), 16) for a in arms], fontsize=8)
        ax.set_ylabel("Test macro F1\n(mean ± std over folds)")
        ax.set_ylim(0, 1.02)
        fig.legend(loc="outside lower center", ncols=len(series), fontsize=8)
        ax.set_title(title)
        return save_figure(fig, path)


def figure_name(kind: str, arm: Arm | None = None) -> str:
    return f"{kind}_{arm_slug(*arm)}.png" if arm is not None else f"{kind}.png"


ARM_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def _unit_axes(ax, xlabel: str, ylabel: str, title: str, legend: str) -> None:
    """Axes of a curve whose both coordinates are rates in [0, 1] (a little headroom for a curve at 1)."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend, fontsize=7)


def _arm_curves_figure(curves: dict, arms: list[Arm], path: Path, draw, axes: tuple[str, str, str],
                       legend: str) -> Path | None:
    """One unit-square figure with a curve per arm that has one: ``draw(ax, arms)`` plots, the rest is shared."""
    arms = [a for a in arms if a in curves]
    if not arms:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(5.6, 4.2), layout="constrained")
        ax = fig.subplots()
        draw(ax, arms)
        _unit_axes(ax, *axes, legend=legend)
        return save_figure(fig, path)


def precision_recall_figure(curves: dict, arms: list[Arm], positive: str, path: Path) -> Path | None:
    """Two-class runs: precision-recall curve of the positive class per arm (pooled folds), AP in the legend,
    with the positive prevalence (a classifier without skill) as a dotted line per arm."""
    def draw(ax, arms: list[Arm]) -> None:
        for i, arm in enumerate(arms):
            recall, precision, ap, prevalence = curves[arm]
            colour = ARM_COLOURS[i % len(ARM_COLOURS)]
            ax.step(recall, precision, where="post", color=colour, label=f"{arm_label(*arm)} (AP {ap:.3f})")
            ax.axhline(prevalence, color=colour, linestyle=":", linewidth=0.8)

    return _arm_curves_figure(curves, arms, path, draw, (f"Recall (sensitivity) of {positive}", f"Precision of {positive}",
                              f"Precision-recall, positive class {positive}, pooled folds"), legend="lower left")


def reliability_figure(curves: dict, arms: list[Arm], path: Path) -> Path | None:
    """Reliability diagram: accuracy against mean top-class confidence per non-empty bin (10 equal-width
    bins, sklearn's calibration_curve), one line per arm; the diagonal is perfect calibration."""
    def draw(ax, arms: list[Arm]) -> None:
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8, label="perfect calibration")
        for i, arm in enumerate(arms):
            confidence, accuracy = curves[arm]
            ax.plot(confidence, accuracy, marker="o", markersize=3, color=ARM_COLOURS[i % len(ARM_COLOURS)],
                    label=arm_label(*arm))

    return _arm_curves_figure(curves, arms, path, draw, ("Mean top-class confidence (bin)", "Accuracy (bin)",
                              "Reliability diagram, pooled folds (10 equal-width bins)"), legend="upper left")
