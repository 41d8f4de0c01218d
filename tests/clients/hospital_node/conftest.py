"""Synthetic cohorts and dataset registrations shared by the hospital node tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from clients.hospital_node.home import DatasetEntry
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort

# Planted in synthetic cells; must never appear in any message.
SENTINEL = "PHI-SENTINEL-123"

EntryFactory = Callable[..., DatasetEntry]


@pytest.fixture(scope="session")
def _cohort() -> pd.DataFrame:
    # A tier-2 site: a few hundred patients keeps the tests fast.
    return generate_cohort(2, n_hospitals=3, seed=7)


@pytest.fixture
def cohort(_cohort: pd.DataFrame) -> pd.DataFrame:
    """One hospital's cohort; each test gets its own copy to plant problems in."""
    return _cohort.copy()


@pytest.fixture(scope="session")
def _alliance_frame() -> pd.DataFrame:
    return pd.concat([generate_cohort(i, n_hospitals=3, seed=7) for i in (1, 2, 3)], ignore_index=True)


@pytest.fixture
def alliance_frame(_alliance_frame: pd.DataFrame) -> pd.DataFrame:
    """A 'real-like' extract: three hospitals' rows in one table with a site column."""
    return _alliance_frame.copy()


@pytest.fixture
def make_entry(tmp_path: Path) -> EntryFactory:
    """Build a registration of the synthetic cohort; keyword arguments override fields."""

    def make(**overrides: Any) -> DatasetEntry:
        fields: dict[str, Any] = {
            "name": "htn_cohort",
            "path": tmp_path / "cohort.csv",
            "id_column": ID_COLUMN,
            "label_column": LABEL,
            "feature_columns": FEATURES,
        }
        fields.update(overrides)
        return DatasetEntry(**fields)

    return make
