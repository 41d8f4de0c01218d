"""A study's [data.cohort]: statistics on a cohort each node builds from its OMOP source."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from experiments.errors import SpecError
from experiments.study import StudySpec

EXAMPLE = Path(__file__).parents[2] / "experiments" / "examples" / "omop_htn_incidence.toml"


def _raw() -> dict:
    return tomllib.loads(EXAMPLE.read_text())


def test_the_example_keeps_its_cohort_with_iso_dates() -> None:
    spec = StudySpec.from_toml(EXAMPLE)
    assert spec.query.cohort == {"task": "hypertension_onset", "index_date": "2024-01-01",
                                 "reading_window_days": [-90, 0], "time_at_risk_days": [1, 365]}
    assert spec.to_mapping()["data"]["cohort"]["index_date"] == "2024-01-01"
    assert StudySpec.from_json(spec.canonical_json()).digest() == spec.digest()


def test_a_study_without_a_cohort_carries_none() -> None:
    spec = StudySpec.from_toml(EXAMPLE.parent / "htn_prevalence.toml")
    assert spec.query.cohort is None and "cohort" not in spec.to_mapping()["data"]


def test_declared_columns_must_be_the_tasks_covariates_or_label() -> None:
    raw = _raw()
    raw["columns"]["parity"] = {"type": "numeric", "lower": 0, "upper": 10}
    raw["statistics"].append({"kind": "mean", "name": "mean_parity", "column": "parity"})
    with pytest.raises(SpecError, match="columns names 'parity', which task 'hypertension_onset' cannot provide"):
        StudySpec.from_mapping(raw)


def test_a_cohort_problem_is_named_by_field() -> None:
    raw = _raw()
    raw["data"]["cohort"]["reading_window_days"] = [-90, 3]
    raw["data"]["cohort"]["task"] = "hypertension_onset"
    del raw["data"]["cohort"]["index_date"]
    with pytest.raises(SpecError) as caught:
        StudySpec.from_mapping(raw)
    assert "data.cohort.reading_window_days must end on or before the index day" in str(caught.value)
    assert "data.cohort.index_date is required for task 'hypertension_onset'" in str(caught.value)


def test_a_cohort_that_is_not_a_table_is_refused() -> None:
    raw = _raw()
    raw["data"]["cohort"] = "hypertension_onset"
    with pytest.raises(SpecError, match="data.cohort must be a table"):
        StudySpec.from_mapping(raw)
