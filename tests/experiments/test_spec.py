"""Experiment specs: every problem at once by field, frozen results, a stable digest."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from experiments.errors import ExperimentError, SpecError
from experiments.spec import ACCOUNTANTS, ExperimentSpec
from privacy import accountant
from tests.peak_memory import MIB, peak_memory

EXAMPLE = Path(__file__).resolve().parents[2] / "experiments" / "examples" / "hypertension.toml"


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


def problems_of(mapping: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(SpecError) as info:
        ExperimentSpec.from_mapping(mapping, source="spec.toml")
    return info.value.problems


def with_changes(**tables: dict[str, Any]) -> dict[str, Any]:
    mapping = example()
    for table, values in tables.items():
        mapping.setdefault(table, {}).update(values)
    return mapping


def without(table: str, *keys: str) -> dict[str, Any]:
    mapping = example()
    for key in keys:
        del mapping[table][key]
    return mapping


# ---------------------------------------------------------------- the example


def test_the_example_spec_validates_with_its_values() -> None:
    spec = ExperimentSpec.from_toml(EXAMPLE)
    assert spec.experiment.task == "tabular-classification"
    assert spec.experiment.mlflow_experiment == spec.experiment.name  # defaults to the name
    assert spec.data.dataset == "htn_cohort"
    assert spec.data.label == "htn_onset_1y"
    assert len(spec.data.features) == 16 and "sbp_wearable_mean" in spec.data.features
    assert set(spec.data.scaling) == set(spec.data.features)
    assert spec.data.scaling["age"] == (50.0, 15.0)
    assert (spec.model.kind, spec.federation.strategy) == ("logistic", "fedavg")
    assert (spec.federation.rounds, spec.federation.min_nodes, spec.federation.learning_rate) == (5, 2, 0.5)
    assert (spec.privacy.delta, spec.privacy.sample_rate, spec.privacy.noise_multiplier) == (1e-5, 0.05, 1.0)
    assert spec.privacy.target_epsilon is None


def test_defaults_are_filled() -> None:
    mapping = example()
    del mapping["model"]
    mapping["model"] = {"kind": "mlp"}
    mapping["federation"] = {"rounds": 3}
    mapping["privacy"] = {"delta": 1e-5, "sample_rate": 0.1, "target_epsilon": 4}
    spec = ExperimentSpec.from_mapping(mapping)
    assert spec.model.hidden == (32, 16)
    assert spec.federation.model_dump() == {
        "strategy": "fedavg", "rounds": 3, "min_nodes": 2, "local_epochs": 1, "learning_rate": 0.1,
        "proximal_mu": 0.0, "server_learning_rate": 0.1, "node_wait_seconds": 120.0,
        "approval_wait_seconds": 3600.0, "round_timeout_seconds": 600.0, "fraction_per_round": 1.0, "round_deadline_seconds": None,
        "secure_aggregation": False, "secagg_num_shares": None, "secagg_reconstruction_threshold": None,
    }
    assert (spec.privacy.max_grad_norm, spec.privacy.accountant) == (1.0, "prv")
    assert spec.privacy.target_epsilon == 4.0 and isinstance(spec.privacy.target_epsilon, float)


def test_the_spec_is_frozen() -> None:
    spec = ExperimentSpec.from_toml(EXAMPLE)
    with pytest.raises(ValidationError):
        spec.privacy.delta = 0.5  # type: ignore[misc]


def test_the_accountants_are_the_privacy_packages() -> None:
    assert ACCOUNTANTS == accountant.ACCOUNTANTS


# ---------------------------------------------------------------- every problem at once


def test_four_distinct_problems_are_all_reported_in_field_order() -> None:
    mapping = with_changes(
        experiment={"name": "htn onset"},
        federation={"rounds": 0},
        privacy={"delta": 1.5, "colour": "blue"},
    )
    with pytest.raises(SpecError) as info:
        ExperimentSpec.from_mapping(mapping, source="spec.toml")
    assert info.value.problems == (
        "experiment.name must contain only letters, digits, '_', '.' and '-'; found 'htn onset'",
        "federation.rounds must be >= 1; found 0",
        "privacy.delta must be < 1; found 1.5",
        "privacy.colour is not a known key; the keys of [privacy] are delta, max_grad_norm, "
        "sample_rate, noise_multiplier, target_epsilon, accountant, min_cohort_size, count_epsilon, "
        "evaluation_epsilon, evaluate_every_round",
    )
    assert str(info.value) == "spec.toml has 4 problems:\n" + "\n".join(f"  {p}" for p in info.value.problems)


def test_spec_error_is_an_experiment_error_and_a_value_error() -> None:
    error = SpecError("spec.toml", ["privacy.delta is required"])
    assert isinstance(error, ExperimentError) and isinstance(error, ValueError)
    assert str(error) == "spec.toml has 1 problem:\n  privacy.delta is required"


def test_an_unknown_key_suggests_the_close_one_and_is_one_problem() -> None:
    mapping = example()
    mapping["privacy"]["dleta"] = mapping["privacy"].pop("delta")
    assert problems_of(mapping) == ("privacy.dleta is not a known key; did you mean 'delta'?",)


def test_an_unknown_table_suggests_the_close_one() -> None:
    mapping = example()
    mapping["federaton"] = mapping.pop("federation")
    assert problems_of(mapping) == ("[federaton] is not a known table; did you mean [federation]?",)


def test_missing_keys_and_tables_are_named() -> None:
    mapping = without("federation", "rounds")
    del mapping["privacy"]["sample_rate"]
    del mapping["model"]
    assert problems_of(mapping) == (
        "the [model] table is required",
        "federation.rounds is required",
        "privacy.sample_rate is required",
    )


@pytest.mark.parametrize(
    ("tables", "problem"),
    [
        ({"federation": {"rounds": "five"}}, "federation.rounds must be an integer; found 'five'"),
        ({"federation": {"rounds": 2.0}}, "federation.rounds must be an integer; found 2"),
        ({"federation": {"min_nodes": True}}, "federation.min_nodes must be an integer; found true"),
        ({"federation": {"learning_rate": True}}, "federation.learning_rate must be a number; found true"),
        ({"privacy": {"delta": "1e-5"}}, "privacy.delta must be a number; found '1e-5'"),
        ({"data": {"features": "age"}}, "data.features must be a list; found 'age'"),
        ({"data": {"features": ["age", 3]}}, "data.features[1] must be a string; found 3"),
        ({"model": {"hidden": [32, True]}}, "model.hidden[1] must be an integer; found true"),
        ({"experiment": {"description": 5}}, "experiment.description must be a string; found 5"),
        ({"data": {"scaling": [1, 2]}}, "data.scaling must be a table; found [1, 2]"),
    ],
)
def test_wrong_types_are_named_with_what_was_found(tables: dict[str, Any], problem: str) -> None:
    assert problems_of(with_changes(**tables)) == (problem,)


def test_a_table_given_as_a_value_is_named() -> None:
    mapping = example()
    mapping["data"] = "htn_cohort"
    assert problems_of(mapping) == ("data must be a table; found 'htn_cohort'",)


@pytest.mark.parametrize(
    ("tables", "problem"),
    [
        ({"privacy": {"delta": 1.5}}, "privacy.delta must be < 1; found 1.5"),
        ({"privacy": {"delta": 1}}, "privacy.delta must be < 1; found 1"),
        ({"privacy": {"delta": 0}}, "privacy.delta must be >= 1e-10; found 0"),
        ({"privacy": {"sample_rate": 0.0}}, "privacy.sample_rate must be >= 0.001; found 0"),
        ({"privacy": {"max_grad_norm": -1}}, "privacy.max_grad_norm must be > 0; found -1"),
        (
            {"privacy": {"noise_multiplier": float("inf")}},
            "privacy.noise_multiplier must be a finite number; found inf",
        ),
        ({"federation": {"local_epochs": 0}}, "federation.local_epochs must be >= 1; found 0"),
        ({"federation": {"proximal_mu": -0.1}}, "federation.proximal_mu must be >= 0; found -0.1"),
        ({"federation": {"node_wait_seconds": 0}}, "federation.node_wait_seconds must be > 0; found 0"),
        ({"model": {"kind": "mlp", "hidden": [32, 0]}}, "model.hidden[1] must be >= 1; found 0"),
        ({"model": {"hidden": []}}, "model.hidden must not be empty"),
        ({"data": {"features": []}}, "data.features must not be empty"),
        ({"data": {"dataset": ""}}, "data.dataset must not be empty"),
        ({"data": {"scaling": {"age": [50, 0]}}}, "data.scaling.age scale must be > 0; found 0"),
        ({"data": {"scaling": {"age": [50]}}}, "data.scaling.age must be a pair [center, scale]; found [50]"),
        ({"model": {"kind": "mpl"}}, "model.kind must be one of 'logistic', 'mlp'; found 'mpl'; did you mean 'mlp'?"),
        (
            {"experiment": {"task": "imaging"}},
            "experiment.task must be one of 'tabular-classification', 'imaging-classification'; found 'imaging'",
        ),
    ],
)
def test_out_of_range_values_are_named_with_the_rule(tables: dict[str, Any], problem: str) -> None:
    assert problems_of(with_changes(**tables)) == (problem,)


# ---------------------------------------------------------------- limits (privacy.limits)


@pytest.mark.parametrize(
    ("tables", "problem"),
    [
        ({"federation": {"rounds": 10**9}}, "federation.rounds must be <= 1000; found 1000000000"),
        ({"federation": {"local_epochs": 10**6}}, "federation.local_epochs must be <= 100; found 1000000"),
        ({"privacy": {"sample_rate": 1e-9}}, "privacy.sample_rate must be >= 0.001; found 1e-09"),
        ({"privacy": {"delta": 1e-300}}, "privacy.delta must be >= 1e-10; found 1e-300"),
        ({"privacy": {"noise_multiplier": 0.1}}, "privacy.noise_multiplier must be >= 0.5; found 0.1"),
        (
            {"federation": {"local_epochs": 2}, "privacy": {"sample_rate": 0.001}},
            "federation.local_epochs x steps per epoch (1 / privacy.sample_rate = 1000) must be <= 1000 DP-SGD "
            "steps per round; found 2000; lower local_epochs or raise the sample rate",
        ),
        (
            {"federation": {"rounds": 51}},
            "federation.rounds x steps per round (20) must be <= 1000 DP-SGD steps in all; found 1020; lower "
            "rounds or local_epochs, or raise the sample rate",
        ),
    ],
)
def test_values_beyond_the_limits_are_refused_by_field(tables: dict[str, Any], problem: str) -> None:
    assert problems_of(with_changes(**tables)) == (problem,)


def test_hostile_counts_are_all_refused_at_once_in_little_memory() -> None:
    mapping = with_changes(federation={"rounds": 10**9, "local_epochs": 10**6}, privacy={"sample_rate": 1e-9})
    problems, peak = peak_memory(lambda: problems_of(mapping))
    assert problems == (
        "federation.rounds must be <= 1000; found 1000000000",
        "federation.local_epochs must be <= 100; found 1000000",
        "privacy.sample_rate must be >= 0.001; found 1e-09",
    )
    assert peak < 16 * MIB  # costing these took 11-20 GB before the limits


def test_a_noise_whose_epsilon_is_beyond_the_limit_is_refused_with_its_rdp_bound() -> None:
    [problem] = problems_of(with_changes(privacy={"noise_multiplier": 0.5, "sample_rate": 0.5}))
    assert re.fullmatch(
        r"privacy.noise_multiplier must keep the experiment's epsilon \(RDP bound at privacy.delta\) <= 12; "
        r"found 0.5, which gives \d+(\.\d+)?; raise the noise or lower rounds, local_epochs or the sample rate",
        problem,
    ), problem


@pytest.mark.parametrize(("target", "shown"), [(12.5, "12.5"), (1e6, "1000000")])
def test_a_target_epsilon_beyond_the_limit_is_refused(target: float, shown: str) -> None:
    mapping = with_changes(privacy={"target_epsilon": target})
    del mapping["privacy"]["noise_multiplier"]
    assert problems_of(mapping) == (f"privacy.target_epsilon must be <= 12; found {shown}",)


def test_a_spec_at_every_limit_is_valid() -> None:
    spec = ExperimentSpec.from_mapping(
        with_changes(federation={"rounds": 1, "local_epochs": 1}, privacy={"sample_rate": 0.001, "noise_multiplier": 0.5, "delta": 1e-10})
    )
    assert (spec.federation.rounds, spec.privacy.sample_rate, spec.privacy.noise_multiplier) == (1, 0.001, 0.5)
    ExperimentSpec.from_mapping(with_changes(federation={"rounds": 1000}, privacy={"sample_rate": 1.0, "noise_multiplier": 50.0}))
    ExperimentSpec.from_mapping(with_changes(federation={"local_epochs": 100, "rounds": 10}, privacy={"sample_rate": 1.0, "noise_multiplier": 50.0}))


@pytest.mark.parametrize("target", [0, -1.0])
def test_a_target_epsilon_that_is_not_positive_is_refused(target: float) -> None:
    mapping = with_changes(privacy={"target_epsilon": target})
    del mapping["privacy"]["noise_multiplier"]
    assert problems_of(mapping) == (f"privacy.target_epsilon must be > 0; found {target:g}",)


def test_noise_and_target_together_are_refused() -> None:
    assert problems_of(with_changes(privacy={"target_epsilon": 2.0})) == (
        "privacy.noise_multiplier and privacy.target_epsilon are both set; keep exactly one "
        "(the noise is derived from the target)",
    )


def test_neither_noise_nor_target_is_refused() -> None:
    assert problems_of(without("privacy", "noise_multiplier")) == (
        "privacy needs exactly one of noise_multiplier or target_epsilon; found neither",
    )


def test_fedprox_without_a_proximal_term_is_refused() -> None:
    assert problems_of(with_changes(federation={"strategy": "fedprox"})) == (
        "federation.proximal_mu must be > 0 when strategy = 'fedprox'; found 0 (the default)",
    )
    assert problems_of(with_changes(federation={"strategy": "fedprox", "proximal_mu": 0})) == (
        "federation.proximal_mu must be > 0 when strategy = 'fedprox'; found 0",
    )
    spec = ExperimentSpec.from_mapping(with_changes(federation={"strategy": "fedprox", "proximal_mu": 0.01}))
    assert spec.federation.proximal_mu == 0.01


def test_secure_aggregation_is_off_by_default_and_out_of_the_digest() -> None:
    spec = ExperimentSpec.from_mapping(example())
    assert spec.federation.secure_aggregation is False
    assert spec.federation.secagg_num_shares is None and spec.federation.secagg_reconstruction_threshold is None
    assert "secure_aggregation" not in spec.to_mapping()["federation"]
    assert spec.digest() == "97169c267a96dae61f9ef3fa01225acd84c5609cdbf0fbfca3a7130000578912"
    assert ExperimentSpec.from_mapping(with_changes(federation={"secure_aggregation": False})).digest() == spec.digest()


def test_secure_aggregation_enters_the_digest_when_set() -> None:
    base = ExperimentSpec.from_mapping(example())
    secure = ExperimentSpec.from_mapping(
        with_changes(federation={"secure_aggregation": True, "min_nodes": 5, "secagg_num_shares": 5, "secagg_reconstruction_threshold": 3})
    )
    federation = secure.to_mapping()["federation"]
    assert (federation["secure_aggregation"], federation["secagg_num_shares"], federation["secagg_reconstruction_threshold"]) == (True, 5, 3)
    assert secure.digest() != base.digest()
    assert ExperimentSpec.from_json(secure.canonical_json()) == secure


@pytest.mark.parametrize(
    ("federation", "problem"),
    [
        ({"secure_aggregation": 1}, "federation.secure_aggregation must be true or false; found 1"),
        ({"secure_aggregation": "yes"}, "federation.secure_aggregation must be true or false; found 'yes'"),
        ({"secagg_num_shares": 3}, "federation.secagg_num_shares applies only when federation.secure_aggregation = true"),
        (
            {"secagg_reconstruction_threshold": 2},
            "federation.secagg_reconstruction_threshold applies only when federation.secure_aggregation = true",
        ),
        ({"secure_aggregation": True, "secagg_num_shares": 2}, "federation.secagg_num_shares must be >= 3; found 2"),
        (
            {"secure_aggregation": True, "secagg_reconstruction_threshold": 1},
            "federation.secagg_reconstruction_threshold must be >= 2; found 1",
        ),
        (
            {"secure_aggregation": True, "min_nodes": 3, "secagg_num_shares": 4},
            "federation.secagg_num_shares must be <= federation.min_nodes (3), the fewest nodes a round may have; found 4",
        ),
        (
            {"secure_aggregation": True, "min_nodes": 5, "secagg_num_shares": 3, "secagg_reconstruction_threshold": 3},
            "federation.secagg_reconstruction_threshold must be < federation.secagg_num_shares (3) so that a node may "
            "drop out; found 3",
        ),
        (
            {"secure_aggregation": True, "min_nodes": 3, "secagg_reconstruction_threshold": 3},
            "federation.secagg_reconstruction_threshold must be < federation.min_nodes (3) when every node of a round "
            "holds a share (secagg_num_shares unset); found 3",
        ),
        (
            {"secure_aggregation": True, "min_nodes": 1},
            "federation.min_nodes must be >= 2 with secure aggregation; found 1",
        ),
    ],
)
def test_secure_aggregation_settings_are_checked_by_field(federation: dict[str, Any], problem: str) -> None:
    assert problems_of(with_changes(federation=federation)) == (problem,)


@pytest.mark.parametrize(("strategy", "extra"), [("fedprox", {"proximal_mu": 0.1}), ("fedadam", {})])
def test_secure_aggregation_refuses_strategies_other_than_fedavg(strategy: str, extra: dict[str, Any]) -> None:
    assert problems_of(with_changes(federation={"secure_aggregation": True, "strategy": strategy, **extra})) == (
        f"federation.secure_aggregation = true works with strategy = 'fedavg' only; found '{strategy}' "
        "(SecAgg+ reveals only the weighted sum of the updates, which FedAvg alone aggregates)",
    )


def test_rules_between_fields_are_reported_beside_field_problems_of_the_same_table() -> None:
    # pydantic skips a table's after-validators when a field fails; we still report the rule.
    mapping = with_changes(privacy={"delta": 2.0, "target_epsilon": 1.0})
    assert problems_of(mapping) == (
        "privacy.delta must be < 1; found 2",
        "privacy.noise_multiplier and privacy.target_epsilon are both set; keep exactly one "
        "(the noise is derived from the target)",
    )


def test_data_rules_name_the_columns() -> None:
    mapping = with_changes(
        data={"features": ["age", "bmi", "age", "htn_onset_1y"], "scaling": {"age": [50, 15], "agee": [1, 1]}}
    )
    assert problems_of(mapping) == (
        "data.features lists 'age' more than once",
        "data.label 'htn_onset_1y' must not also be one of data.features",
        "data.scaling.agee is not one of data.features; did you mean 'age'?",
    )


def test_model_validate_keeps_the_rules_too() -> None:
    mapping = with_changes(privacy={"target_epsilon": 2.0})
    with pytest.raises(ValidationError, match="both set"):
        ExperimentSpec.model_validate(mapping)


def test_a_spec_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(SpecError, match="a spec must be a table of tables; found 3"):
        ExperimentSpec.from_mapping(3, source="x")  # type: ignore[arg-type]


# ---------------------------------------------------------------- files


def test_toml_syntax_errors_name_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text('[experiment]\nname = "htn"\ntask = \n')
    with pytest.raises(SpecError) as info:
        ExperimentSpec.from_toml(path)
    assert str(info.value).startswith(f"{path} has 1 problem:\n  not valid TOML: ")
    assert "line 3" in info.value.problems[0]


def test_an_unreadable_file_is_a_spec_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(SpecError, match=f"^{re.escape(str(path))} has 1 problem:\n  cannot read the file: No such file"):
        ExperimentSpec.from_toml(path)


def test_a_file_that_is_not_utf8_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_bytes(b"[experiment]\nname = \"\xff\"\n")
    with pytest.raises(SpecError, match="not UTF-8 text"):
        ExperimentSpec.from_toml(path)


def test_problems_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(EXAMPLE.read_text().replace("rounds = 5", "rounds = 0"))
    expected = f"{path} has 1 problem:\n  federation.rounds must be >= 1; found 0"
    with pytest.raises(SpecError, match=f"^{re.escape(expected)}$"):
        ExperimentSpec.from_toml(path)


# ---------------------------------------------------------------- canonical form and digest


def test_canonical_json_is_sorted_compact_and_complete() -> None:
    spec = ExperimentSpec.from_toml(EXAMPLE)
    text = spec.canonical_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert '"node_wait_seconds":120.0' in text and '"target_epsilon":null' in text
    assert spec.digest() == hashlib.sha256(text.encode()).hexdigest()


def test_json_and_mapping_round_trips_give_the_same_spec() -> None:
    spec = ExperimentSpec.from_toml(EXAMPLE)
    assert ExperimentSpec.from_json(spec.canonical_json()) == spec
    assert ExperimentSpec.from_mapping(spec.to_mapping()) == spec
    assert ExperimentSpec.from_json(spec.canonical_json()).digest() == spec.digest()


def test_invalid_json_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="^<json> has 1 problem:\n  not valid JSON: "):
        ExperimentSpec.from_json("{not json")


def test_the_digest_ignores_layout_key_order_and_int_versus_float() -> None:
    spec = ExperimentSpec.from_toml(EXAMPLE)
    mapping = example()
    reordered = {table: dict(reversed(list(mapping[table].items()))) for table in reversed(list(mapping))}
    reordered["federation"]["learning_rate"] = 0.5
    reordered["privacy"]["max_grad_norm"] = 1  # an int, as a partner may write it
    assert ExperimentSpec.from_mapping(reordered).digest() == spec.digest()


def _variants(mapping: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The mapping with each leaf value changed, one at a time, to another valid value."""
    choices = {"kind": "mlp", "strategy": "fedadam", "accountant": "rdp"}
    for table, values in mapping.items():
        for key, value in values.items():
            if key == "task" or value is None:
                continue  # one task kind so far; an absent target stays absent
            changed = copy.deepcopy(mapping)
            if key in choices:
                changed[table][key] = choices[key]
            elif key == "scaling":
                changed[table][key]["age"] = [51.0, 15.0]
            elif isinstance(value, list):
                changed[table][key] = [*value, "extra_column" if isinstance(value[0], str) else 8]
            elif isinstance(value, str):
                changed[table][key] = value + "-2"
            elif isinstance(value, int):
                changed[table][key] = value + 1
            else:
                changed[table][key] = value + 0.01 if value < 0.5 else value * 1.5
            if key == "strategy":
                changed[table]["proximal_mu"] = 0.0
            yield f"{table}.{key}", changed


def test_the_digest_changes_when_any_value_changes() -> None:
    spec = ExperimentSpec.from_toml(EXAMPLE)
    base = spec.to_mapping()
    seen = {spec.digest(): "base"}
    variants = list(_variants(base))
    assert len(variants) >= 20
    for where, changed in variants:
        digest = ExperimentSpec.from_mapping(changed, source=where).digest()
        assert digest not in seen, f"changing {where} left the digest equal to {seen.get(digest)}"
        seen[digest] = where


# ---------------------------------------------------------------- the imaging task

IMAGING_EXAMPLE = EXAMPLE.parent / "imaging.toml"


def imaging_example() -> dict[str, Any]:
    return tomllib.loads(IMAGING_EXAMPLE.read_text())


def imaging_with(**tables: dict[str, Any]) -> dict[str, Any]:
    mapping = imaging_example()
    for table, values in tables.items():
        mapping.setdefault(table, {}).update(values)
    return mapping


def test_the_imaging_example_validates_with_its_values() -> None:
    spec = ExperimentSpec.from_toml(IMAGING_EXAMPLE)
    assert spec.experiment.task == "imaging-classification"
    assert (spec.data.dataset, spec.data.features, spec.data.label) == ("chest_ct", None, None)
    assert spec.imaging is not None
    assert (spec.imaging.modalities, spec.imaging.body_parts) == (("CT",), ("CHEST",))
    assert (spec.imaging.size, spec.imaging.intensity, spec.imaging.projection) == (32, "window", "mip")
    assert (spec.imaging.window, spec.imaging.window_center, spec.imaging.window_width) == (None, 90.0, 100.0)
    assert (spec.model.kind, spec.model.channels) == ("cnn", (16, 32))


def test_adding_the_imaging_task_left_tabular_digests_unchanged() -> None:
    # Computed with the spec module as it was before the imaging task existed: approvals
    # given to tabular specs then still name the same specs.
    assert ExperimentSpec.from_toml(EXAMPLE).digest() == "97169c267a96dae61f9ef3fa01225acd84c5609cdbf0fbfca3a7130000578912"
    assert "imaging" not in ExperimentSpec.from_toml(EXAMPLE).to_mapping()
    assert "channels" not in ExperimentSpec.from_toml(EXAMPLE).to_mapping()["model"]


def test_keys_added_later_stay_out_of_the_digest_at_their_default_and_count_when_set() -> None:
    mapping = tomllib.loads(EXAMPLE.read_text())
    base = ExperimentSpec.from_mapping(mapping)
    assert "approval_wait_seconds" not in base.to_mapping()["federation"]
    assert "min_cohort_size" not in base.to_mapping()["privacy"]
    mapping["privacy"]["min_cohort_size"] = 500
    stricter = ExperimentSpec.from_mapping(mapping)
    assert stricter.to_mapping()["privacy"]["min_cohort_size"] == 500
    assert stricter.digest() != base.digest()
    assert ExperimentSpec.from_json(stricter.canonical_json()) == stricter
    assert "count_epsilon" not in base.to_mapping()["privacy"] and base.privacy.count_epsilon == 0.1
    mapping["privacy"]["count_epsilon"] = 0.2
    assert ExperimentSpec.from_mapping(mapping).to_mapping()["privacy"]["count_epsilon"] == 0.2


@pytest.mark.parametrize(("value", "problem"), [(0.0, "must be > 0; found 0"), (1.5, "must be <= 1; found 1.5")])
def test_a_count_epsilon_outside_its_range_is_a_problem_naming_the_field(value: float, problem: str) -> None:
    mapping = tomllib.loads(EXAMPLE.read_text())
    mapping["privacy"]["count_epsilon"] = value
    with pytest.raises(SpecError) as info:
        ExperimentSpec.from_mapping(mapping)
    assert info.value.problems == (f"privacy.count_epsilon {problem}",)


def test_imaging_canonical_form_fills_defaults_leaves_out_tabular_keys_and_round_trips() -> None:
    mapping = imaging_example()
    mapping["imaging"] = {"modalities": ["DX"]}
    del mapping["model"]["channels"]
    spec = ExperimentSpec.from_mapping(mapping)
    tables = spec.to_mapping()
    assert tables["imaging"] == {
        "modalities": ["DX"], "body_parts": None, "series_description": None, "size": 32, "intensity": "minmax",
        "window": None, "window_center": None, "window_width": None, "projection": "mip",
    }
    assert tables["model"]["channels"] == [8, 16]
    assert set(tables["data"]) == {"dataset", "scaling"}
    assert ExperimentSpec.from_json(spec.canonical_json()) == spec
    assert ExperimentSpec.from_json(spec.canonical_json()).digest() == spec.digest()


def test_an_imaging_spec_refuses_tabular_keys_and_a_tabular_model() -> None:
    mapping = imaging_with(data={"features": ["age"], "label": "y"}, model={"kind": "logistic"})
    del mapping["model"]["channels"]
    assert problems_of(mapping) == (
        "data.features applies only to experiment.task = 'tabular-classification'; an imaging dataset's "
        "inputs are its images and its labels are registered on each node",
        "data.label applies only to experiment.task = 'tabular-classification'; an imaging dataset's "
        "inputs are its images and its labels are registered on each node",
        "model.kind 'logistic' does not fit experiment.task = 'imaging-classification'; use 'cnn'",
    )


def test_an_imaging_spec_needs_its_imaging_table() -> None:
    mapping = imaging_example()
    del mapping["imaging"]
    assert problems_of(mapping) == ("the [imaging] table is required for experiment.task = 'imaging-classification'",)


def test_a_tabular_spec_refuses_imaging_keys_and_a_cnn_and_needs_its_columns() -> None:
    mapping = with_changes(model={"kind": "cnn"})
    mapping["imaging"] = {"modalities": ["CT"]}
    del mapping["data"]["label"]
    assert problems_of(mapping) == (
        "data.label is required",
        "[imaging] applies only to experiment.task = 'imaging-classification'; found 'tabular-classification'",
        "model.kind 'cnn' does not fit experiment.task = 'tabular-classification'; use one of 'logistic', 'mlp'",
    )
    assert problems_of(with_changes(model={"kind": "mlp", "channels": [4]})) == (
        "model.channels applies only to model.kind = 'cnn'; found kind 'mlp'",
    )


def test_a_misspelt_model_kind_lists_the_kinds_of_the_task() -> None:
    assert problems_of(imaging_with(model={"kind": "cnnn"})) == ("model.kind must be one of 'cnn'; found 'cnnn'",)


@pytest.mark.parametrize(
    ("imaging", "problem"),
    [
        ({"window": "lung"}, "imaging.window and imaging.window_center are both set; give a preset or a centre and width, not both"),
        ({"window_width": None}, "imaging.window_center needs imaging.window_width too"),
        ({"window_center": None, "window_width": None}, "imaging.intensity = 'window' needs imaging.window (a preset or 'voi') or imaging.window_center and imaging.window_width"),
        ({"intensity": "zscore"}, "imaging.window_center applies only when imaging.intensity = 'window'; found 'zscore'"),
        ({"window_center": None, "window_width": None, "window": "lungs"}, "imaging.window must be one of 'abdomen', 'bone', 'brain', 'liver', 'lung', 'mediastinum', 'soft_tissue', 'stroke', 'subdural', 'voi'; found 'lungs'; did you mean 'lung'?"),
        ({"window_width": 0.5}, "imaging.window_width must be >= 1; found 0.5"),
        ({"series_description": "axial("}, "imaging.series_description is not a valid regular expression (RE2 syntax, which nodes match in linear time): missing ): axial("),
        ({"size": 4}, "imaging.size must be >= 8; found 4"),
        ({"size": 36.0}, "imaging.size must be an integer; found 36"),
        ({"size": 36}, None),
        ({"size": 34}, "imaging.size must be a multiple of 4 (each of the 2 model.channels blocks halves the image); found 34"),
        ({"modalities": "CT"}, "imaging.modalities must be a list; found 'CT'"),
        ({"modalities": []}, "imaging.modalities must not be empty"),
        ({"projection": "max"}, "imaging.projection must be one of 'mip', 'middle'; found 'max'"),
        ({"projecton": "mip"}, "imaging.projecton is not a known key; did you mean 'projection'?"),
    ],
)
def test_imaging_problems_are_named_with_the_rule(imaging: dict[str, Any], problem: str | None) -> None:
    mapping = imaging_example()
    mapping["imaging"].update(imaging)
    mapping["imaging"] = {k: v for k, v in mapping["imaging"].items() if v is not None}
    if problem is None:
        assert ExperimentSpec.from_mapping(mapping).imaging.size == imaging["size"]  # type: ignore[union-attr]
    else:
        assert problems_of(mapping) == (problem,)


def test_imaging_vocabularies_match_the_packages_that_use_them() -> None:
    from federation import protocol
    from imaging.preprocess import WINDOW_PRESETS as PRESETS
    from models.imaging import IMAGING_MODEL_KINDS
    from models.tabular import MODEL_KINDS as TABULAR_KINDS

    from experiments.spec import MODEL_KINDS_BY_TASK, TASKS, WINDOW_PRESETS

    assert set(WINDOW_PRESETS) == {*PRESETS, "voi"}
    assert TASKS == protocol.TASKS
    assert MODEL_KINDS_BY_TASK == dict(protocol.MODEL_KINDS_BY_TASK)
    assert MODEL_KINDS_BY_TASK == {"tabular-classification": TABULAR_KINDS, "imaging-classification": IMAGING_MODEL_KINDS}
