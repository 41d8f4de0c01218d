"""A spec's [data.cohort]: a cohort each node builds from its OMOP source."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from experiments.errors import SpecError
from experiments.spec import ExperimentSpec
from medfed.demo import EXAMPLE_SPEC

EXAMPLES = Path(EXAMPLE_SPEC).parent
# The experiment specs among them (omop_htn_incidence.toml is a statistics study).
COHORT_EXAMPLES = sorted(p for p in EXAMPLES.glob("omop_*.toml") if tomllib.loads(p.read_text()).get("kind") != "statistics")


def _raw(name: str = "omop_hypertension.toml") -> dict:
    return tomllib.loads((EXAMPLES / name).read_text())


def _problems(raw: dict) -> str:
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_mapping(raw, source="spec.toml")
    return str(caught.value)


@pytest.mark.parametrize("path", COHORT_EXAMPLES, ids=lambda p: p.name)
def test_the_cohort_examples_validate(path: Path) -> None:
    spec = ExperimentSpec.from_toml(path)
    assert spec.data.cohort is not None and "covariates" not in spec.data.cohort


def test_there_is_an_example_for_each_care_service() -> None:
    tasks = {tomllib.loads(p.read_text())["data"]["cohort"]["task"] for p in COHORT_EXAMPLES}
    assert tasks == {"hypertension_onset", "diabetes_onset", "maternal_gdm_preeclampsia", "infant_lbw_preterm"}


def test_the_cohort_is_signed_in_canonical_form() -> None:
    raw = _raw()
    spec = ExperimentSpec.from_mapping(raw)
    assert spec.to_mapping()["data"]["cohort"] == {
        "task": "hypertension_onset", "index_date": "2024-01-01", "lookback_days": [-365, 0],
        "reading_window_days": [-90, 0], "time_at_risk_days": [1, 365],
    }
    # A TOML date and its ISO text, a default window spelled out or left out: one spec, one digest.
    raw["data"]["cohort"]["index_date"] = "2024-01-01"
    del raw["data"]["cohort"]["lookback_days"]
    assert ExperimentSpec.from_mapping(raw).digest() == spec.digest()


def test_a_spec_without_a_cohort_keeps_its_digest() -> None:
    spec = ExperimentSpec.from_toml(EXAMPLE_SPEC)
    assert "cohort" not in spec.to_mapping()["data"]


def test_cohort_problems_are_named_by_field() -> None:
    raw = _raw()
    raw["data"]["cohort"]["task"] = "diabetes_onset"
    raw["data"]["cohort"]["time_at_risk_days"] = [0, 365]
    raw["data"]["features"].append("history_pregnancy")
    message = _problems(raw)
    assert "data.label must be 't2d_onset_1y', the label of task 'diabetes_onset'; found 'htn_onset_1y'" in message
    assert "data.cohort.time_at_risk_days must start after the index day" in message
    assert "data.features names 'history_pregnancy', which task 'diabetes_onset' cannot provide" in message
    assert "data.scaling needs (center, scale) for every covariate of a cohort" in message and "missing: history_pregnancy" in message


def test_covariates_are_the_features_not_a_cohort_key() -> None:
    raw = _raw()
    raw["data"]["cohort"]["covariates"] = ["age"]
    assert "data.cohort.covariates is not a key: a cohort's covariates are data.features" in _problems(raw)


def test_an_unknown_task_is_refused_with_the_known_ones() -> None:
    raw = _raw()
    raw["data"]["cohort"]["task"] = "stroke"
    assert "data.cohort.task must be one of 'hypertension_onset', 'diabetes_onset'" in _problems(raw)


def test_an_imaging_spec_has_no_cohort() -> None:
    from medfed.demo_imaging import EXAMPLE_SPEC as IMAGING_SPEC

    raw = tomllib.loads(IMAGING_SPEC.read_text())
    raw["data"]["cohort"] = {"task": "hypertension_onset", "index_date": "2024-01-01"}
    assert "data.cohort applies only to experiment.task = 'tabular-classification'" in _problems(raw)
