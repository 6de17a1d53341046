"""Fixtures for the analysis tests: one synthetic sweep (see synthetic_results.py), loaded once."""
from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_results import write_sweep


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="session")
def sweep_df(sweep_dir: Path):
    from analysis.load import load_results

    return load_results([sweep_dir])
