"""The wire contract: instructions round-trip, bad ones are refused by field."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from federation.protocol import (
    INSTRUCTION_KEY,
    TRAIN_METRICS,
    ProtocolError,
    TrainInstruction,
    node_record,
    read_metrics,
    read_refusal,
    read_site,
    refusal_reason,
)


def _instruction(**overrides: object) -> TrainInstruction:
    values: dict[str, object] = dict(
        experiment="htn",
        spec_digest="ab" * 32,
        dataset="htn_cohort",
        features=("age", "bmi"),
        label="htn_onset_1y",
        model_kind="logistic",
        hidden=(32, 16),
        local_epochs=1,
        learning_rate=0.5,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.05,
        steps=20,
        delta=1e-5,
        accountant="prv",
        rounds=3,
        scaling={"age": (50.0, 15.0)},
    )
    values.update(overrides)
    return TrainInstruction(**values)  # type: ignore[arg-type]


def test_instruction_round_trips_through_a_config_record() -> None:
    instruction = _instruction()
    config = instruction.to_config(server_round=2)
    assert config["server-round"] == 2
    assert TrainInstruction.from_config(config) == instruction


def test_instruction_json_is_canonical() -> None:
    assert _instruction().to_json() == _instruction(scaling={"age": (50, 15)}).to_json()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("noise_multiplier", 0.0, "noise_multiplier must be > 0; found 0.0"),
        ("sample_rate", 1.5, "sample_rate must be in (0, 1]; found 1.5"),
        ("delta", 1.0, "delta must be in (0, 1); found 1.0"),
        ("steps", 0, "steps must be >= 1; found 0"),
        ("dataset", "", "dataset must be a non-empty string"),
        ("features", (), "features must not be empty"),
    ],
)
def test_invalid_instruction_names_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        _instruction(**{field: value})


def test_missing_or_malformed_instruction_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match=f"no '{INSTRUCTION_KEY}'"):
        TrainInstruction.from_config(ConfigRecord({"server-round": 1}))
    with pytest.raises(ProtocolError, match="malformed"):
        TrainInstruction.from_json('{"experiment": "x"}')


def test_read_metrics_refuses_undeclared_keys() -> None:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10.0, "patient-age": 61.0})})
    with pytest.raises(ProtocolError, match="undeclared metrics: patient-age"):
        read_metrics(content, TRAIN_METRICS)


def test_read_metrics_returns_floats() -> None:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "epsilon": 0.5})})
    assert read_metrics(content, TRAIN_METRICS) == {"num-examples": 10.0, "epsilon": 0.5}


def test_site_and_refusal_reason_round_trip() -> None:
    assert read_site(RecordDict({"node": node_record("hospital_2")}), "node-9") == "hospital_2"
    assert read_site(RecordDict({}), "node-9") == "node-9"
    assert read_refusal(refusal_reason("hospital_2", "dataset 'x' is not registered"), "node-9") == (
        "hospital_2",
        "dataset 'x' is not registered",
    )
    assert read_refusal("Traceback (most recent call last):\n...", "node-9")[0] == "node-9"
