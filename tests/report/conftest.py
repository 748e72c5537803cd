"""Fixtures of the report tests: fake output folders of `kvsim run` (see fake_outputs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_outputs import RUNS, write_fake_run_folder

from kvsim.report import render_report


@pytest.fixture(scope="session")
def full_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with every optional file, rendered once per test session."""
    folder = write_fake_run_folder(tmp_path_factory.mktemp("full"))
    render_report(folder)
    return folder


@pytest.fixture
def bare_folder(tmp_path: Path) -> Path:
    """Only summary.json and scenario.yaml: no timeline, requests, attention, profile, plan or SLO; no prefix hits."""
    runs = {"contiguous": RUNS["contiguous"], "paged": RUNS["paged"]}
    return write_fake_run_folder(tmp_path / "bare", runs=runs, with_timeline=False, with_requests=False,
                                 with_attention=False, with_hit_rate_curve=False, with_profile=False,
                                 with_plan=False, with_slo=False)
