"""Analysis and report for an experiment directory: the paper's tables and figures from fold results,
side by side with the published numbers, with honest statistics.

    from analysis import build_report
    report_dir = build_report("OUT")          # writes OUT/report/
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["build_report", "load_experiment"]


def build_report(out_dir: str | Path, bootstrap_samples: int = 2000, seed: int = 0) -> Path:
    """Write OUT/report/ (report.md, report.html, tables/, figures/) and return its path."""
    # Imported here so `import analysis` stays cheap for callers that only need it at the very end.
    from analysis.report import build_report as _build

    return _build(out_dir, bootstrap_samples=bootstrap_samples, seed=seed)


def load_experiment(out_dir: str | Path):
    """Read and validate OUT (see analysis.load.Experiment)."""
    from analysis.load import load_experiment as _load

    return _load(out_dir)
