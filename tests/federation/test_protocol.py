"""The wire contract: instructions round-trip, bad ones are refused by field."""

from __future__ import annotations

import json
import re

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from federation.protocol import (
    IMAGING_TASK,
    INSTRUCTION_KEY,
    TRAIN_METRICS,
    ImagingInstruction,
    ProtocolError,
    TrainInstruction,
    node_record,
    read_metrics,
    read_refusal,
    read_site,
    refusal_reason,
)
from tests.peak_memory import MIB, peak_memory


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
        ("noise_multiplier", 0.0, "noise_multiplier must be >= 0.5; found 0.0"),
        ("sample_rate", 1.5, "sample_rate must be in [0.001, 1]; found 1.5"),
        ("delta", 1.0, "delta must be in [1e-10, 1); found 1.0"),
        ("steps", 0, "steps must be an integer in 1..1000; found 0"),
        ("dataset", "", "dataset must be a non-empty string"),
        ("features", (), "features must not be empty"),
    ],
)
def test_invalid_instruction_names_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        _instruction(**{field: value})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rounds": 10**9}, "rounds must be an integer in 1..1000; found 1000000000"),
        ({"rounds": 1e9}, "rounds must be an integer in 1..1000; found 1000000000.0"),
        ({"rounds": True}, "rounds must be an integer in 1..1000; found True"),
        ({"local_epochs": 10**6}, "local_epochs must be an integer in 1..100; found 1000000"),
        ({"steps": 10**6}, "steps must be an integer in 1..1000; found 1000000"),
        ({"sample_rate": 1e-9}, "sample_rate must be in [0.001, 1]; found 1e-09"),
        ({"delta": 1e-300}, "delta must be in [1e-10, 1); found 1e-300"),
        ({"noise_multiplier": 0.01}, "noise_multiplier must be >= 0.5; found 0.01"),
        ({"rounds": 60}, "rounds x steps must be <= 1000 DP-SGD steps in all; found 1200"),
    ],
)
def test_an_instruction_beyond_the_limits_is_refused_by_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _instruction(**changes)
    assert str(info.value) == f"invalid training instruction: {message}"


def test_a_hostile_instruction_on_the_wire_is_refused_at_once_in_little_memory() -> None:
    data = json.loads(_instruction().to_json())
    data |= {"rounds": 10**9, "local_epochs": 10**6, "steps": 10**9, "sample_rate": 1e-9}

    def parse() -> ProtocolError:
        with pytest.raises(ProtocolError) as info:
            TrainInstruction.from_json(json.dumps(data))
        return info.value

    refusal, peak = peak_memory(parse)
    assert str(refusal) == (
        "invalid training instruction: local_epochs must be an integer in 1..100; found 1000000; "
        "steps must be an integer in 1..1000; found 1000000000; rounds must be an integer in 1..1000; "
        "found 1000000000; sample_rate must be in [0.001, 1]; found 1e-09"
    )
    assert peak < MIB


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


# ---------------------------------------------------------------- the imaging task


def _imaging(**overrides: object) -> ImagingInstruction:
    values: dict[str, object] = dict(
        modalities=("CT",),
        body_parts=("CHEST",),
        series_description="axial",
        size=32,
        intensity="window",
        window_center=240.0,
        window_width=400.0,
        projection="mip",
    )
    values.update(overrides)
    return ImagingInstruction(**values)  # type: ignore[arg-type]


def _imaging_instruction(**overrides: object) -> TrainInstruction:
    values: dict[str, object] = dict(
        task=IMAGING_TASK, features=(), label="", scaling={}, model_kind="cnn", channels=(8, 16), imaging=_imaging()
    )
    values.update(overrides)
    return _instruction(**values)


def test_an_imaging_instruction_round_trips_through_a_config_record() -> None:
    instruction = _imaging_instruction()
    again = TrainInstruction.from_config(instruction.to_config(server_round=1))
    assert again == instruction
    assert isinstance(again.imaging, ImagingInstruction) and again.imaging.modalities == ("CT",)
    assert again.channels == (8, 16)


def test_a_tabular_instruction_states_its_task_and_carries_no_imaging() -> None:
    assert '"task":"tabular-classification"' in _instruction().to_json()
    assert '"imaging":null' in _instruction().to_json()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": "segmentation"}, "task must be one of tabular-classification, imaging-classification; found 'segmentation'"),
        ({"imaging": None}, "task imaging-classification needs its imaging parameters"),
        ({"features": ("age",)}, "features, label, scaling and cohort apply only to task tabular-classification"),
        ({"model_kind": "mlp"}, "model_kind must be one of cnn for task imaging-classification; found 'mlp'"),
        ({"channels": ()}, r"channels must be one or more positive integers; found \[\]"),
        ({"channels": (8, 16, 32, 64, 128, 256)}, r"imaging.size must be a multiple of 2 \*\* len\(channels\) = 64"),
        ({"imaging": _imaging(window="lung")}, "imaging needs exactly one of window or window_center and window_width"),
        ({"imaging": _imaging(window_width=0.5)}, r"window_center and window_width must be finite, width >= 1; found \(240.0, 0.5\)"),
        ({"imaging": _imaging(intensity="minmax")}, "imaging.window applies only to intensity 'window'; found 'minmax'"),
        ({"imaging": _imaging(series_description="(")}, "imaging.series_description is not a valid regular expression"),
        ({"imaging": _imaging(size=4, projection="max", modalities=())}, "imaging.modalities must be one or more"),
    ],
)
def test_an_invalid_imaging_instruction_is_refused_by_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        _imaging_instruction(**overrides)


def test_every_imaging_problem_is_listed_at_once() -> None:
    with pytest.raises(ProtocolError) as info:
        _imaging_instruction(imaging=_imaging(size=4, projection="max", modalities=()))
    assert str(info.value) == (
        "invalid training instruction: imaging.modalities must be one or more non-empty strings; "
        "imaging.size must be an integer in 8..512; found 4; imaging.projection must be one of mip, middle; found 'max'"
    )


def test_a_tabular_instruction_refuses_imaging_parameters() -> None:
    with pytest.raises(ProtocolError, match="imaging and channels apply only to task imaging-classification"):
        _instruction(imaging=_imaging())


# ---------------------------------------------------------------- the signed spec


def _example(path: str = "hypertension.toml", **sections: dict[str, object]):  # type: ignore[no-untyped-def]
    import json
    import tomllib
    from pathlib import Path

    from experiments.cost import plan_privacy
    from experiments.spec import ExperimentSpec
    from federation.experiment import instruction_for

    mapping = tomllib.loads((Path(__file__).resolve().parents[2] / "experiments" / "examples" / path).read_text())
    for section, values in sections.items():
        mapping[section].update(values)
    spec = ExperimentSpec.from_mapping(mapping, source="test")
    return spec, instruction_for(spec, plan_privacy(spec)), json.loads(spec.canonical_json())


def test_the_signed_spec_travels_in_the_config_record() -> None:
    from federation.protocol import SignedSpec

    signed = SignedSpec('{"a":1}', "c2ln", "SHA256:x")
    config = signed.add_to(ConfigRecord({"server-round": 2}))
    assert SignedSpec.from_config(config) == signed
    assert signed.mapping() == {"a": 1}
    with pytest.raises(ProtocolError, match="carries no experiment spec"):
        SignedSpec.from_config(ConfigRecord({"server-round": 2}))
    with pytest.raises(ProtocolError, match="not valid JSON"):
        SignedSpec("{nope", "", "").mapping()


def test_an_instruction_made_from_the_spec_matches_it_and_each_change_is_named() -> None:
    from dataclasses import replace

    from federation.protocol import spec_mismatches

    spec, instruction, mapping = _example()
    assert spec_mismatches(instruction, mapping) == []
    changed = replace(instruction, learning_rate=5.0, features=instruction.features[:-1], scaling={}, rounds=50)
    problems = spec_mismatches(changed, mapping)
    assert "learning_rate is 5.0, the signed spec says federation.learning_rate = 0.5" in problems
    assert "rounds is 50, the signed spec says federation.rounds = 5" in problems
    assert "features differ from the signed spec's data.features" in problems
    assert "scaling differs from the signed spec's data.scaling" in problems


def test_an_imaging_instruction_is_checked_field_by_field() -> None:
    from dataclasses import replace

    from federation.protocol import spec_mismatches

    _, instruction, mapping = _example("imaging.toml")
    assert spec_mismatches(instruction, mapping) == []
    assert instruction.imaging is not None
    wider = replace(instruction, imaging=replace(instruction.imaging, size=64))
    assert spec_mismatches(wider, mapping) == ["imaging.size differs from the signed spec's imaging.size"]


# ---------------------------------------------------------------- a study's answer under SecAgg+


def _plan() -> list:  # type: ignore[type-arg]
    from federation.protocol import ReleaseLayout

    return [
        ReleaseLayout("n", "count", "discrete-laplace", 2.0, 1.0, (3,)),
        ReleaseLayout("bp", "sum", "laplace", 150.0, 50.0, (3,)),
        ReleaseLayout("km", "events", "discrete-laplace", 2.0, 1.0, (2, 3, 2)),
    ]


def _answer(count: list, total: list, events: list, suppressed: tuple = ()):  # type: ignore[no-untyped-def, type-arg]
    from federation.protocol import SiteAnswer, SiteRelease

    return SiteAnswer(
        (
            SiteRelease("n", "count", tuple(count), 2.0, "discrete-laplace", 1.0),
            SiteRelease("bp", "sum", tuple(total), 150.0, "laplace", 50.0),
            SiteRelease("km", "events", tuple(events), 2.0, "discrete-laplace", 1.0),
        ),
        suppressed,
    )


def test_secure_settings_keep_integers_exact_and_the_sum_inside_the_modulus() -> None:
    from federation.protocol import SECAGG_MODULUS, secure_clipping_range, secure_sum_problems

    for nodes in (2, 3, 30, 540, 1000):
        c = secure_clipping_range(nodes)
        assert 2 * c <= 2**31 - 1 and nodes * 2 * c < SECAGG_MODULUS
        assert secure_sum_problems(
            sample_num=nodes, clipping_range=float(c), quantization_range=2 * c, modulus_range=SECAGG_MODULUS, max_weight=1.0
        ) == []
    assert secure_clipping_range(3) == 715_827_882


def test_secure_settings_that_would_distort_or_reveal_an_answer_are_named() -> None:
    from federation.protocol import secure_sum_problems

    good = {"sample_num": 3, "clipping_range": 100.0, "quantization_range": 200, "modulus_range": 1 << 32, "max_weight": 1.0}
    assert secure_sum_problems(**{**good, "sample_num": 1}) == [
        "a secure sum over 1 site(s) would reveal a site's answer; it needs at least 2"
    ]
    assert secure_sum_problems(**{**good, "max_weight": 400.0}) == [
        "SecAgg+ max_weight must be 1 (each answer unscaled); found 400.0"
    ]
    assert secure_sum_problems(**{**good, "clipping_range": 8.0, "quantization_range": 1 << 22})[0].startswith(
        "SecAgg+ quantization_range must be twice an integral clipping_range"
    )
    assert secure_sum_problems(**{**good, "clipping_range": float(2**30), "quantization_range": 2**31}) == [
        "SecAgg+ quantization_range must fit an int32; found 2147483648"
    ]
    assert secure_sum_problems(**{**good, "sample_num": 4, "clipping_range": float(2**29), "quantization_range": 2**30}) == [
        "SecAgg+ modulus_range 4294967296 would wrap around the sum of 4 site(s) at quantization range 1073741824"
    ]


def test_a_sites_answer_is_sent_in_whole_quanta_with_its_reported_cells() -> None:
    from federation.protocol import SUM_QUANTA_PER_SCALE, secure_encoding

    answer = _answer([12.0, None, -3.0], [1000.2, None, -75.1], [1, 2, None, None, 5, 6, 7, 8, None, None, 11, 12], (1,))
    sent, vectors = secure_encoding(answer, _plan(), 3)
    quantum = 150.0 / SUM_QUANTA_PER_SCALE
    assert [list(v) for v in vectors] == [
        [12.0, 0.0, -3.0],
        [round(1000.2 / quantum), 0.0, round(-75.1 / quantum)],
        [1, 2, 0, 0, 5, 6, 7, 8, 0, 0, 11, 12],
        [1.0, 0.0, 1.0],
    ]
    # The values sent are the rounded ones, within half a quantum of the noisy ones; counts unchanged.
    assert sent.releases[0].values == answer.releases[0].values and sent.suppressed == (1,)
    assert sent.releases[1].values[1] is None
    assert abs(sent.releases[1].values[0] - 1000.2) <= quantum / 2 and sent.releases[1].values[0] == vectors[1][0] * quantum


def test_the_sum_of_the_sites_vectors_reads_back_as_their_totals_and_reporting_sites() -> None:
    import numpy as np

    from federation.protocol import SecureTotals, secure_encoding

    answers = [
        _answer([12.0, None, -3.0], [1000.2, None, -75.1], [1, 2, None, None, 5, 6, 7, 8, None, None, 11, 12], (1,)),
        _answer([20.0, None, 4.0], [-10.0, None, 3.3], [1, 1, None, None, 1, 1, 1, 1, None, None, 1, 1], (1,)),
        _answer([30.0, 9.0, 1.0], [5.0, 6.0, 7.0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ]
    encoded = [secure_encoding(a, _plan(), 3) for a in answers]
    sums = [sum(v[i] for _, v in encoded) / 3 * 3 for i in range(4)]  # the workflow's mean times the contributors
    totals = SecureTotals.from_sums(sums, _plan(), 3, contributors=3)
    assert totals.sites == (3, 1, 3)
    assert totals.releases[0].values == (62.0, 9.0, 2.0)
    sent = [s for s, _ in encoded]
    for index in (0, 2):
        assert totals.releases[1].values[index] == pytest.approx(sum(s.releases[1].values[index] for s in sent), abs=1e-9)
    assert totals.to_mapping()["suppressed"] == [] and totals.to_mapping()["sites"] == [3, 1, 3]
    only_third = SecureTotals.from_sums([np.where(np.arange(v.size) >= 0, v, 0) for v in encoded[2][1]], _plan(), 3, contributors=1)
    assert only_third.sites == (1, 1, 1)


def test_sums_that_honest_sites_cannot_give_are_refused() -> None:
    import numpy as np

    from federation.protocol import SecureTotals

    good = [np.array([3.0, 0.0, 1.0]), np.array([2.0, 0.0, 5.0]), np.zeros(12), np.array([2.0, 0.0, 1.0])]
    assert SecureTotals.from_sums(good, _plan(), 3, contributors=2).releases[0].values == (3.0, None, 1.0)
    with pytest.raises(ProtocolError, match="vector 1 of the secure sum is not in whole quanta"):
        SecureTotals.from_sums([good[0], good[1] + 0.4, *good[2:]], _plan(), 3, contributors=2)
    with pytest.raises(ProtocolError, match="more than 2 site"):
        SecureTotals.from_sums([*good[:3], np.array([3.0, 0.0, 1.0])], _plan(), 3, contributors=2)
    with pytest.raises(ProtocolError, match="the secure sum of n.count has a value in a cell no site reported"):
        SecureTotals.from_sums([np.array([3.0, 1.0, 1.0]), *good[1:]], _plan(), 3, contributors=2)
    with pytest.raises(ProtocolError, match="holds 3 vector"):
        SecureTotals.from_sums(good[:3], _plan(), 3, contributors=2)
