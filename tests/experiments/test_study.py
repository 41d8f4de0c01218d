"""Statistics specs (studies): TOML in, every problem at once, a stable digest, a kind that never passes for an experiment."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from experiments.errors import SpecError
from experiments.spec import ExperimentSpec
from experiments.study import KIND, StudySpec, study_cost
from privacy.events import MECHANISMS
from privacy.governance import spec_digest
from privacy.query import StatisticsQuery

EXAMPLES = Path(__file__).resolve().parents[2] / "experiments" / "examples"
PREVALENCE = EXAMPLES / "htn_prevalence.toml"
SURVIVAL = EXAMPLES / "stroke_survival.toml"
EXPERIMENT = EXAMPLES / "hypertension.toml"

# Runs once the dp-mechanisms branch gives DPEvent (and the PLD accountant) the Laplace mechanisms.
needs_laplace_events = pytest.mark.skipif(
    not {"laplace", "discrete-laplace"} <= set(MECHANISMS),
    reason="DPEvent has no Laplace mechanisms yet (branch dp-mechanisms)",
)


def small() -> dict[str, Any]:
    return {
        "study": {"name": "bmi-by-sex", "description": "Mean BMI by sex"},
        "data": {"dataset": "cohort", "group_by": ["sex"]},
        "columns": {
            "sex": {"type": "categorical", "levels": ["F", "M"]},
            "bmi": {"type": "numeric", "lower": 15, "upper": 45},
        },
        "statistics": [{"kind": "mean", "column": "bmi"}],
        "privacy": {"epsilon": 1, "delta": 1e-6},
    }


def problems_of(mapping: Any) -> tuple[str, ...]:
    with pytest.raises(SpecError) as info:
        StudySpec.from_mapping(mapping, source="study.toml")
    return info.value.problems


# ---------------------------------------------------------------- the examples


def test_the_prevalence_example_asks_by_age_band_and_sex() -> None:
    spec = StudySpec.from_toml(PREVALENCE)
    assert spec.kind == KIND == "statistics"
    assert spec.study.name == "htn-prevalence-age-sex"
    assert spec.study.mlflow_experiment == spec.study.name  # defaults to the name
    query = spec.query
    assert query.dataset == "htn_cohort"
    assert [g.column for g in query.group_by] == ["age", "sex_male"]
    assert query.n_cells == 10
    assert [s.kind for s in query.statistics] == ["proportion", "mean", "histogram"]
    assert query.epsilon == 1.0


def test_the_survival_example_asks_kaplan_meier_by_severity() -> None:
    spec = StudySpec.from_toml(SURVIVAL)
    query = spec.query
    assert query.dataset == "stroke_cohort"
    assert [c[0] for c in query.cells()] == ["[0, 5)", "[5, 16)", "[16, 21)", "[21, 42]"]
    survival = query.statistics[0]
    assert (survival.kind, survival.time, survival.event) == ("kaplan_meier", "followup_days", "died")
    assert survival.bins == (0.0, 7.0, 14.0, 30.0, 60.0, 90.0, 180.0, 270.0, 365.0)


def test_the_examples_columns_exist_in_the_synthetic_cohort() -> None:
    from medfed.synth import FEATURES, LABEL

    query = StudySpec.from_toml(PREVALENCE).query
    assert set(query.column_names) <= set(FEATURES) | {LABEL}


# ---------------------------------------------------------------- canonical JSON and digest


def test_the_canonical_json_carries_the_kind_and_every_default() -> None:
    spec = StudySpec.from_mapping(small())
    mapping = json.loads(spec.canonical_json())
    assert mapping["kind"] == "statistics"
    assert mapping["study"] == {"name": "bmi-by-sex", "description": "Mean BMI by sex", "mlflow_experiment": "bmi-by-sex"}
    assert mapping["privacy"] == {"epsilon": 1.0, "delta": 1e-6, "split": "equal", "mechanism": "laplace"}
    assert mapping["statistics"] == [{"kind": "mean", "name": "mean_bmi", "column": "bmi"}]
    assert spec.canonical_json() == json.dumps(mapping, sort_keys=True, separators=(",", ":"))


def test_the_digest_is_the_sha256_approvals_bind() -> None:
    spec = StudySpec.from_mapping(small())
    text = spec.canonical_json()
    assert spec.digest() == spec_digest(text) == hashlib.sha256(text.encode("ascii")).hexdigest()


def test_the_digest_is_stable() -> None:
    # A change here changes every approval of every study: only on purpose.
    assert StudySpec.from_mapping(small()).digest() == "a536b6e750c4140b9c56b6cc498d0a5deeebf6ebffbd4197227c37d31ef43b7c"


def test_the_digest_ignores_spelling_and_order_but_not_meaning() -> None:
    base = StudySpec.from_mapping(small()).digest()
    respelled = small()
    respelled["kind"] = "statistics"
    respelled["columns"] = dict(reversed(list(respelled["columns"].items())))
    respelled["columns"]["bmi"] = {"upper": 45.0, "lower": 15.0, "type": "numeric"}
    respelled["privacy"] = {"delta": 1e-6, "epsilon": 1.0, "split": "equal"}
    respelled["statistics"][0]["name"] = "mean_bmi"
    assert StudySpec.from_mapping(respelled).digest() == base
    changed = small()
    changed["privacy"]["epsilon"] = 1.01
    assert StudySpec.from_mapping(changed).digest() != base


def test_the_filter_digests_by_its_canonical_text() -> None:
    one, two = small(), small()
    one["data"]["filter"] = "bmi>=18 AND sex='F'"
    two["data"]["filter"] = 'bmi >= 18 and sex = "F"'
    spec = StudySpec.from_mapping(one)
    assert spec.digest() == StudySpec.from_mapping(two).digest()
    assert json.loads(spec.canonical_json())["data"]["filter"] == 'bmi >= 18 and sex = "F"'


@pytest.mark.parametrize("path", [PREVALENCE, SURVIVAL])
def test_a_study_reads_back_from_its_canonical_json_to_an_equal_spec(path: Path) -> None:
    spec = StudySpec.from_toml(path)
    again = StudySpec.from_json(spec.canonical_json())
    assert again == spec
    assert again.digest() == spec.digest()


def test_the_node_parses_the_same_query_from_the_canonical_json() -> None:
    spec = StudySpec.from_toml(PREVALENCE)
    assert StatisticsQuery.from_mapping(json.loads(spec.canonical_json())) == spec.query


# ---------------------------------------------------------------- the two kinds never mix


def test_an_experiment_spec_is_refused_as_a_study() -> None:
    with pytest.raises(SpecError) as info:
        StudySpec.from_toml(EXPERIMENT)
    assert info.value.problems == (
        "this is an experiment spec (it has an [experiment] table); use `medfed experiment` for it",
    )


def test_a_study_is_refused_as_an_experiment_spec() -> None:
    canonical = StudySpec.from_toml(PREVALENCE).canonical_json()
    with pytest.raises(SpecError) as info:
        ExperimentSpec.from_json(canonical)
    assert info.value.problems == ("this is a statistics spec (kind = 'statistics'); use `medfed study` for it",)


def test_a_study_and_an_experiment_never_share_a_digest_form() -> None:
    study = json.loads(StudySpec.from_toml(PREVALENCE).canonical_json())
    experiment = json.loads(ExperimentSpec.from_toml(EXPERIMENT).canonical_json())
    assert "kind" in study and "study" in study
    assert "kind" not in experiment and "study" not in experiment and "experiment" in experiment


def test_another_kind_is_refused() -> None:
    mapping = small()
    mapping["kind"] = "experiment"
    assert problems_of(mapping) == ("kind must be 'statistics' for a statistics spec; found 'experiment'",)


# ---------------------------------------------------------------- problems


def test_study_and_query_problems_come_together() -> None:
    mapping = small()
    mapping["study"] = {"name": "has spaces", "descripton": "x"}
    mapping["statistics"][0]["column"] = "weight"
    mapping["privacy"]["epsilon"] = -1
    assert problems_of(mapping) == (
        "study.descripton is not a known key; did you mean 'description'?",
        "study.name must contain only letters, digits, '_', '.' and '-'; found 'has spaces'",
        "privacy.epsilon must be > 0; found -1",
        "statistics[0].column 'weight' is not declared in [columns]; declared: sex, bmi",
    )


def test_the_study_table_is_required() -> None:
    mapping = small()
    del mapping["study"]
    assert problems_of(mapping) == ("the [study] table is required (name, description, mlflow_experiment)",)


def test_a_file_that_is_not_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text("[study\nname = 1\n")
    with pytest.raises(SpecError) as info:
        StudySpec.from_toml(path)
    assert info.value.problems[0].startswith("not valid TOML: ") and "line 1" in info.value.problems[0]


def test_a_missing_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        StudySpec.from_toml(tmp_path / "absent.toml")
    assert info.value.problems == ("cannot read the file: No such file or directory",)


def test_the_policy_cell_limit_reaches_the_query() -> None:
    with pytest.raises(SpecError) as info:
        StudySpec.from_toml(PREVALENCE, max_cells=8)
    assert info.value.problems == (
        "data.group_by gives 10 cells (age: 5 bins x sex_male: 2 levels); at most 8 are allowed",
    )


# ---------------------------------------------------------------- cost


@needs_laplace_events
def test_the_cost_is_the_pld_composition_of_the_releases_about_epsilon() -> None:
    spec = StudySpec.from_toml(PREVALENCE)
    cost = study_cost(spec)
    assert (cost.epsilon, cost.delta) == (1.0, 1e-6)
    assert len(cost.releases) == 5
    # Pure epsilon-DP releases compose to at most their sum; PLD's pessimistic grid may add
    # up to one interval (1e-3) per release (1.0020 here).
    slack = 1e-3 * len(cost.releases)
    assert max(r.epsilon for r in cost.releases) < cost.epsilon_charged_per_site <= cost.epsilon + slack


@needs_laplace_events
def test_the_cost_matches_dp_accountings_own_composition() -> None:
    from dp_accounting.dp_event import DiscreteLaplaceDpEvent, LaplaceDpEvent
    from dp_accounting.pld import PLDAccountant

    spec = StudySpec.from_mapping(small())
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for release in spec.query.releases():
        parameter = release.scale / release.sensitivity
        if release.mechanism == "laplace":
            accountant.compose(LaplaceDpEvent(parameter))
        else:
            accountant.compose(DiscreteLaplaceDpEvent(1 / parameter, 1))  # a = 1 / scale
    assert math.isclose(study_cost(spec).epsilon_charged_per_site, accountant.get_epsilon(1e-6), rel_tol=1e-2)


def test_the_release_plan_of_the_cost_is_the_querys() -> None:
    spec = StudySpec.from_toml(PREVALENCE)
    releases = spec.query.releases()
    assert math.isclose(sum(r.epsilon for r in releases), spec.query.epsilon, rel_tol=1e-12)


def test_the_examples_are_valid_toml_with_a_kind_line() -> None:
    for path in (PREVALENCE, SURVIVAL):
        assert tomllib.loads(path.read_text())["kind"] == "statistics"
