"""Fixtures for the analysis tests; the directory builders live in analysis_fixtures.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
REPO_ROOT = _HERE.parents[1]
for _p in (REPO_ROOT, _HERE):  # plain `pytest` (not `python -m pytest`) does not add the repo root
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from analysis_fixtures import (  # noqa: E402
    BUILT_BOOTSTRAP,
    build_confound_dir,
    build_nested_search_dir,
    build_paper_dir,
    build_partial_dir,
    build_search_dir,
    build_single_arm_dir,
)


@pytest.fixture
def paper_dir(tmp_path: Path) -> Path:
    return build_paper_dir(tmp_path / "paper_out")


@pytest.fixture
def partial_dir(tmp_path: Path) -> Path:
    return build_partial_dir(tmp_path / "partial_out")


@pytest.fixture
def search_dir(tmp_path: Path) -> Path:
    return build_search_dir(tmp_path / "search_out")


@pytest.fixture
def single_arm_dir(tmp_path: Path) -> Path:
    return build_single_arm_dir(tmp_path / "single_out")


@pytest.fixture
def confound_dir(tmp_path: Path) -> Path:
    return build_confound_dir(tmp_path / "confound_out")


@pytest.fixture
def nested_dir(tmp_path: Path) -> Path:
    """A nested search without its Optuna database: enough for the selection and estimate tables."""
    return build_nested_search_dir(tmp_path / "nested_out", studies=False)


@pytest.fixture(scope="session")
def built_nested_report(tmp_path_factory) -> Path:
    """The nested search's full report (with its six per-fold studies), built once for the read-only checks."""
    from analysis import build_report

    out = build_nested_search_dir(tmp_path_factory.mktemp("built_nested") / "OUT")
    build_report(out, bootstrap_samples=BUILT_BOOTSTRAP, seed=0)
    return out


@pytest.fixture(scope="session")
def built_confound_report(tmp_path_factory) -> Path:
    """The confound fixture's report, built once for the read-only checks."""
    from analysis import build_report

    out = build_confound_dir(tmp_path_factory.mktemp("built_confound") / "OUT")
    build_report(out, bootstrap_samples=BUILT_BOOTSTRAP, seed=0)
    return out


@pytest.fixture(scope="session")
def built_paper_report(tmp_path_factory) -> Path:
    """One report built once per session for the read-only checks (a build costs a few seconds)."""
    from analysis import build_report

    out = build_paper_dir(tmp_path_factory.mktemp("built") / "OUT")
    build_report(out, bootstrap_samples=BUILT_BOOTSTRAP, seed=0)
    return out
