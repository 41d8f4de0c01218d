"""The clinical task catalogue and a spec's [data.cohort] definition."""

from __future__ import annotations

from datetime import date

import pytest

from models.clinical_tasks import (
    CONCEPTS,
    COVARIATE_KINDS,
    SIGNALS,
    TASKS,
    CohortDefinition,
    CohortDefinitionError,
    cohort_problems,
)


def _fields(raw: dict) -> dict[str, str]:
    return dict(cohort_problems(raw))


def test_every_task_names_known_concepts_and_covariates() -> None:
    for task in TASKS.values():
        assert set(task.outcome) <= set(CONCEPTS) and set(task.exclusion) <= set(CONCEPTS)
        assert set(task.covariates) <= set(COVARIATE_KINDS)
        assert task.lookback_days[1] <= 0 < task.time_at_risk_days[0]
    for signal in SIGNALS:
        assert CONCEPTS[signal].domain == "measurement" and CONCEPTS[CONCEPTS[signal].unit].domain == "unit"
    assert len({c.concept_id for c in CONCEPTS.values()}) == len(CONCEPTS)


def test_a_calendar_cohort_fills_the_task_windows() -> None:
    definition = CohortDefinition.from_mapping(
        {"task": "diabetes_onset", "index_date": date(2024, 1, 1), "covariates": ["age", "glucose_mean"]}
    )
    assert definition.label == "t2d_onset_1y"
    assert (definition.lookback_days, definition.reading_window_days, definition.time_at_risk_days) == ((-365, 0), (-90, 0), (1, 365))
    assert definition.to_mapping() == {
        "task": "diabetes_onset", "covariates": ["age", "glucose_mean"], "lookback_days": [-365, 0],
        "reading_window_days": [-90, 0], "time_at_risk_days": [1, 365], "index_date": "2024-01-01",
    }
    assert CohortDefinition.from_mapping(definition.to_mapping()) == definition


def test_a_pregnancy_cohort_needs_a_period_and_keeps_its_gestation_index() -> None:
    definition = CohortDefinition.from_mapping(
        {"task": "infant_lbw_preterm", "period": ["2021-01-01", "2024-06-30"], "covariates": ["age", "sbp_mean"]}
    )
    assert definition.period == (date(2021, 1, 1), date(2024, 6, 30)) and definition.index_gestation_days == 140
    assert definition.to_mapping()["index_gestation_days"] == 140
    problems = _fields({"task": "maternal_gdm_preeclampsia", "covariates": ["age"], "index_date": "2024-01-01",
                        "index_gestation_days": 7})
    assert "is required" in problems["data.cohort.period"]
    assert "applies only to calendar tasks" in problems["data.cohort.index_date"]
    assert "from 28 to 182" in problems["data.cohort.index_gestation_days"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lookback_days", [-365, 1], "must end on or before the index day"),
        ("reading_window_days", [-30, 10], "must end on or before the index day"),
        ("time_at_risk_days", [0, 365], "must start after the index day"),
        ("time_at_risk_days", [30, 10], "start <= end"),
        ("lookback_days", "a year", "must be [start, end]"),
    ],
)
def test_windows_reaching_past_the_index_day_are_refused_by_field(key: str, value: object, message: str) -> None:
    raw = {"task": "hypertension_onset", "index_date": "2024-01-01", "covariates": ["age"], key: value}
    assert message in _fields(raw)[f"data.cohort.{key}"]
    with pytest.raises(CohortDefinitionError, match=f"data.cohort.{key}"):
        CohortDefinition.from_mapping(raw)


def test_every_problem_is_named_at_once() -> None:
    problems = _fields({"task": "hypertension_onset", "covariates": ["age", "age", "history_hypertension"],
                        "index_date": "2024-13-01", "lookbak_days": [-1, 0]})
    assert "did you mean 'lookback_days'?" in problems["data.cohort.lookbak_days"]
    assert "must be a date" in problems["data.cohort.index_date"]
    # one field, two problems: the later one is kept by dict(); both are in the list
    listed = [m for f, m in cohort_problems({"task": "hypertension_onset", "covariates": ["age", "age", "history_hypertension"],
                                              "index_date": "2024-01-01"}) if f == "data.cohort.covariates"]
    assert any("more than once" in m for m in listed)
    assert any("'history_hypertension', which task 'hypertension_onset' cannot provide" in m for m in listed)
    assert "must be one of 'hypertension_onset'" in _fields({"task": "htn", "covariates": ["age"]})["data.cohort.task"]
