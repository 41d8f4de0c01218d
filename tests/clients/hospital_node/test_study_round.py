"""A node answers statistics studies: admission, noise, suppression on noisy counts, the ledger and the audit log.

Each test sends the node's real handler (`rounds.answer`) a message as the coordinator
would, with a study signed by the test partner. Where a refusal must come before any
data is read, the cohort file is deleted first: a connector error would then show that
the node had tried to read it.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.hospital_node import governance
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.rounds import answer
from clients.hospital_node.study_round import guard, noisy_answer, release_layout, suppressed_cells
from experiments.study import StudySpec
from federation.protocol import (
    AWAITING_APPROVAL,
    METRICS_KEY,
    REFUSED_BAD_INSTRUCTION,
    REFUSED_DATASET,
    REFUSED_POLICY,
    REFUSED_REPLAY,
    REFUSED_SIGNATURE,
    STATISTICS_ACTION,
    STATISTICS_KEY,
    STATISTICS_METRICS,
    ProtocolError,
    SignedSpec,
    SiteAnswer,
    read_metrics,
    read_refusal,
)
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from privacy.ledger import PrivacyLedger
from privacy.query import StatisticsQuery

from .conftest import OFFICER, govern, sign

EXAMPLE = Path(__file__).resolve().parents[3] / "experiments" / "examples" / "htn_prevalence.toml"
STATISTICS = f"{MessageType.QUERY}.{STATISTICS_ACTION}"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 77, 1, 1


def study(**tables: Any) -> StudySpec:
    """The example study, with tables updated (``data={...}``) or replaced (``columns``, ``statistics``)."""
    mapping = tomllib.loads(EXAMPLE.read_text())
    for name, value in tables.items():
        if isinstance(value, dict) and name != "columns":
            mapping.setdefault(name, {}).update(value)
        else:
            mapping[name] = value
    return StudySpec.from_mapping(mapping, source="test")


def study_message(kind: str, signed: SignedSpec, **extra: Any) -> Message:
    """A coordinator's message of a study: the signed spec in the config, and whatever else it adds."""
    config = signed.add_to(ConfigRecord(extra))
    return Message(content=RecordDict({"config": config}), dst_node_id=5, message_type=kind)


def raw_signed(mapping: dict[str, Any]) -> SignedSpec:
    """A study mapping signed as it is, valid or not (a hostile partner's, or a broken tool's)."""
    from privacy.governance import Submission, sign_submission

    from .conftest import PARTNER_KEY

    text = json.dumps(mapping, sort_keys=True, separators=(",", ":"))
    submission = Submission.new(text)
    signature = sign_submission(submission, PARTNER_KEY)
    return SignedSpec(text, signature.signature, signature.signer, submission.to_json())


@pytest.fixture
def cohort_path(tmp_path: Path) -> Path:
    path = tmp_path / "cohort.parquet"
    generate_cohort(2, n_hospitals=3, seed=7).to_parquet(path, index=False)
    return path


@pytest.fixture
def home(tmp_path: Path, cohort_path: Path) -> NodeHome:
    node = NodeHome.create(tmp_path / "home", name="hospital_9")
    node.register_dataset(
        DatasetEntry(name="htn_cohort", path=cohort_path, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES)
    )
    govern(node, "htn_cohort")
    return node


def _config(home: NodeHome) -> dict[str, str]:
    return {"home": str(home.path)}


def _approve(home: NodeHome, spec: StudySpec) -> None:
    governance.approve(home, spec.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)


def _kinds(home: NodeHome) -> list[str]:
    return [e.kind for e in home.audit_log().entries()]


def _ledger_untouched(home: NodeHome) -> None:
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.charges("htn_cohort") == []
        assert ledger.run_reservations("htn_cohort") == []


def _answered(home: NodeHome, spec: StudySpec) -> tuple[SiteAnswer, dict[str, float], SignedSpec]:
    _approve(home, spec)
    signed = sign(spec, fresh=True)
    admitted = answer("query", study_message(MessageType.QUERY, signed), _config(home))
    assert not admitted.has_error(), admitted.error
    reply = answer(STATISTICS_ACTION, study_message(STATISTICS, signed), _config(home))
    assert not reply.has_error(), reply.error
    return SiteAnswer.from_content(reply.content), read_metrics(reply.content, STATISTICS_METRICS), signed


# ---------------------------------------------------------------- the answer


def test_admission_reserves_the_whole_query_and_its_reply_carries_no_number(home: NodeHome) -> None:
    spec = study()
    _approve(home, spec)
    reply = answer("query", study_message(MessageType.QUERY, sign(spec, fresh=True)), _config(home))
    assert not reply.has_error(), reply.error
    assert read_metrics(reply.content, ()) == {}
    assert set(reply.content) == {METRICS_KEY, "node"}
    with PrivacyLedger.open(home.ledger_path) as ledger:
        [reservation] = ledger.run_reservations("htn_cohort")
        assert list(reservation.events) == spec.query.events()
        assert (reservation.rounds, reservation.charged) == (1, 0)
        assert ledger.charges("htn_cohort") == []


def test_the_answer_is_the_release_plan_charged_once_per_release(home: NodeHome) -> None:
    spec = study()
    site_answer, metrics, _ = _answered(home, spec)
    query = spec.query
    assert site_answer.problems(release_layout(query), query.n_cells) == []
    assert [(r.statistic, r.name, r.mechanism, r.scale) for r in site_answer.releases] == [
        (r.statistic, r.name, r.mechanism, r.scale) for r in query.releases()
    ]
    with PrivacyLedger.open(home.ledger_path) as ledger:
        charges = ledger.charges("htn_cohort")
        assert [c.event for c in sorted(charges, key=lambda c: c.release)] == query.events()
        assert metrics["epsilon"] == ledger.spent("htn_cohort", delta=1e-5)
        [reservation] = ledger.run_reservations("htn_cohort")
        assert reservation.charged == 1
    # The charge is the PLD composition of the releases: never more than the spec's epsilon.
    assert 0 < metrics["epsilon-run"] <= query.epsilon * 1.01


def test_the_audit_log_records_exactly_what_left(home: NodeHome) -> None:
    spec = study()
    site_answer, metrics, signed = _answered(home, spec)
    [record] = [e.payload for e in home.audit_log().entries() if e.kind == "release" and e.payload["message"] == "statistics"]
    left = json.loads(site_answer.to_json())
    assert [{k: v for k, v in r.items() if k != "epsilon"} for r in record["releases"]] == left["releases"]
    assert record["suppressed"] == left["suppressed"]
    assert record["metric_values"] == metrics
    assert [r["epsilon"] for r in record["releases"]] == [r.epsilon for r in spec.query.releases()]
    assert record["spec_digest"] == spec.digest() and record["min_cell_size"] == 10
    assert [e["mechanism"] for e in record["charge"]["events"]] == [r.mechanism for r in spec.query.releases()]
    import hashlib

    assert record["sha256"] == hashlib.sha256(site_answer.to_json().encode()).hexdigest()
    # The ledger holds every charge the log records: the node's own integrity check agrees.
    assert governance.ledger_disagreement(home, home.audit_log().entries()) == []


def test_a_study_is_answered_once_per_submission(home: NodeHome) -> None:
    spec = study()
    _, _, signed = _answered(home, spec)
    again = answer(STATISTICS_ACTION, study_message(STATISTICS, signed), _config(home))
    assert again.error.code == REFUSED_REPLAY
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert len(ledger.charges("htn_cohort")) == len(spec.query.releases())


def test_fields_the_coordinator_adds_change_nothing_the_node_answers(home: NodeHome) -> None:
    spec = study()
    _approve(home, spec)
    signed = sign(spec, fresh=True)
    assert not answer("query", study_message(MessageType.QUERY, signed), _config(home)).has_error()
    forged = {"medfed.query": json.dumps({"data": {"dataset": "other"}}), "min_cell_size": 0, "epsilon": 50.0}
    reply = answer(STATISTICS_ACTION, study_message(STATISTICS, signed, **forged), _config(home))
    assert not reply.has_error(), reply.error
    layout = release_layout(spec.query)
    assert SiteAnswer.from_content(reply.content).problems(layout, spec.query.n_cells) == []


# ---------------------------------------------------------------- suppression on noisy counts only


def _count_query(levels: int = 2) -> StatisticsQuery:
    return study(
        data={"dataset": "htn_cohort", "group_by": ["sex_male"], "filter": "age >= 18"},
        columns={"age": {"type": "numeric", "lower": 18, "upper": 90}, "sex_male": {"type": "boolean"}},
        statistics=[{"kind": "count", "name": "n"}],
    ).query


def test_suppression_reads_the_noisy_count_not_the_true_one() -> None:
    query = _count_query()
    true_counts = np.array([500, 2])
    # The noise turns the large true cell small and the small one large: suppression must follow the noise.
    noisy_counts = np.array([3, 50])

    def sampler(release, exact):  # type: ignore[no-untyped-def]
        assert list(exact) == list(true_counts)
        return noisy_counts

    result = noisy_answer(query, [true_counts], min_cell_size=10, sampler=sampler)
    assert result.suppressed == (0,)
    assert result.releases[0].values == (None, 50.0)


@settings(max_examples=60, deadline=None)
@given(
    exact=st.lists(st.integers(min_value=0, max_value=10_000), min_size=2, max_size=2),
    noisy=st.lists(st.integers(min_value=-50, max_value=200), min_size=2, max_size=2),
    floor=st.integers(min_value=0, max_value=100),
)
def test_the_answer_is_the_same_whatever_the_true_counts_behind_the_same_noise(
    exact: list[int], noisy: list[int], floor: int
) -> None:
    query = _count_query()
    noise = np.array(noisy)
    seen = noisy_answer(query, [np.array(exact)], min_cell_size=floor, sampler=lambda r, v: noise)
    other = noisy_answer(query, [np.array(exact[::-1]) + 7], min_cell_size=floor, sampler=lambda r, v: noise)
    assert seen == other
    assert list(seen.suppressed) == [i for i, v in enumerate(noisy) if floor > 0 and v < floor]  # 0: no suppression


def test_suppressed_cells_is_a_function_of_the_noisy_releases_alone() -> None:
    query = _count_query()
    assert suppressed_cells(query, [np.array([9, 10])], 10) == [0]
    assert suppressed_cells(query, [np.array([-4, 10])], 10) == [0]
    assert suppressed_cells(query, [np.array([9, 10])], 0) == []


def test_a_histogram_cell_is_sized_by_its_noisy_bins() -> None:
    query = study(
        data={"dataset": "htn_cohort", "group_by": ["sex_male"], "filter": "age >= 18"},
        columns={
            "age": {"type": "numeric", "lower": 18, "upper": 90},
            "sex_male": {"type": "boolean"},
            "sbp_home_mean": {"type": "numeric", "lower": 80, "upper": 180, "bins": [80, 120, 180]},
        },
        statistics=[{"kind": "histogram", "name": "sbp", "column": "sbp_home_mean"}],
    ).query
    assert suppressed_cells(query, [np.array([4, 5, 30, 2])], 10) == [0]


# ---------------------------------------------------------------- refused before any data is read, nothing charged


def _refused_before_reading(home: NodeHome, cohort_path: Path, signed: SignedSpec, kind: str = "query") -> tuple[int, str]:
    cohort_path.unlink()  # a read would now fail as a dataset refusal
    message_type = MessageType.QUERY if kind == "query" else STATISTICS
    reply = answer(kind, study_message(message_type, signed), _config(home))
    assert reply.has_error()
    _ledger_untouched(home)
    return reply.error.code, read_refusal(reply.error.reason, "?")[1]


def _mapping(**changes: Any) -> dict[str, Any]:
    mapping = json.loads(study().canonical_json())
    for name, value in changes.items():
        table, _, key = name.partition("__")
        if key:
            mapping[table][key] = value
        else:
            mapping[table] = value
    return mapping


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"data__filter": "age >= 18 and weight > 3"}, "data.filter"),
        ({"data__filter": "age >= 18; drop table patients"}, "data.filter"),
        ({"data__filter": "__import__('os').system('id')"}, "data.filter"),
        ({"privacy__epsilon": 0}, "privacy.epsilon"),
        ({"privacy__epsilon": -1.0}, "privacy.epsilon"),
    ],
)
def test_a_bad_or_hostile_query_is_refused_naming_the_field(
    home: NodeHome, cohort_path: Path, changes: dict[str, Any], field: str
) -> None:
    signed = raw_signed(_mapping(**changes))
    governance.approve(home, __import__("privacy.governance").governance.spec_digest(signed.spec_json),
                       dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    code, reason = _refused_before_reading(home, cohort_path, signed)
    assert code == REFUSED_BAD_INSTRUCTION
    assert field in reason
    assert "request" not in _kinds(home)


def test_missing_bounds_and_bins_that_do_not_cover_them_are_refused(home: NodeHome, cohort_path: Path) -> None:
    mapping = _mapping()
    del mapping["columns"]["age"]["lower"]
    mapping["columns"]["sbp_home_mean"]["bins"] = [90, 120, 180]
    code, reason = _refused_before_reading(home, cohort_path, raw_signed(mapping))
    assert code == REFUSED_BAD_INSTRUCTION
    assert "columns.age" in reason and "columns.sbp_home_mean" in reason


def test_a_column_not_registered_for_research_is_refused(home: NodeHome, cohort_path: Path) -> None:
    mapping = _mapping()
    mapping["data"]["filter"] = "age >= 18 and sbp_home_mean is not null and patient_id is not null"
    mapping["columns"]["patient_id"] = {"type": "categorical", "levels": ["x"]}
    signed = raw_signed(mapping)
    code, reason = _refused_before_reading(home, cohort_path, signed)
    assert code == REFUSED_DATASET
    assert "column 'patient_id' is not registered for research" in reason


def test_a_group_by_over_the_policys_cell_limit_is_refused(home: NodeHome, cohort_path: Path) -> None:
    governance.set_policy(home, {"max_cells": 4}, by=OFFICER)
    spec = study()  # 10 cells
    _approve(home, spec)
    code, reason = _refused_before_reading(home, cohort_path, sign(spec, fresh=True))
    assert code == REFUSED_POLICY
    assert "10 cells" in reason and "at most 4" in reason


def test_a_policy_without_the_statistics_task_refuses_studies(home: NodeHome, cohort_path: Path) -> None:
    governance.set_policy(home, {"allowed_tasks": ["tabular-classification"]}, by=OFFICER)
    spec = study()
    _approve(home, spec)
    code, reason = _refused_before_reading(home, cohort_path, sign(spec, fresh=True))
    assert code == REFUSED_POLICY and "does not allow task statistics" in reason


def test_a_study_edited_after_signing_is_refused(home: NodeHome, cohort_path: Path) -> None:
    spec = study()
    _approve(home, spec)
    signed = sign(spec, fresh=True)
    edited = json.loads(signed.spec_json)
    edited["privacy"]["epsilon"] = 10.0
    forged = SignedSpec(json.dumps(edited, sort_keys=True, separators=(",", ":")), signed.signature, signed.signer, signed.submission)
    code, _ = _refused_before_reading(home, cohort_path, forged)
    assert code == REFUSED_SIGNATURE


def test_an_unapproved_study_awaits_the_officer_with_its_cost_recorded(home: NodeHome, cohort_path: Path) -> None:
    spec = study()
    code, _ = _refused_before_reading(home, cohort_path, sign(spec, fresh=True))
    assert code == AWAITING_APPROVAL
    [pending] = governance.pending_requests(home)
    assert pending.request.spec_digest == spec.digest()
    assert pending.request.payload["task"] == "statistics"
    assert 0 < pending.cost <= spec.query.epsilon * 1.01


def test_an_answer_without_admission_first_is_still_admitted_and_charged_once(home: NodeHome) -> None:
    spec = study()
    _approve(home, spec)
    reply = answer(STATISTICS_ACTION, study_message(STATISTICS, sign(spec, fresh=True)), _config(home))
    assert not reply.has_error(), reply.error
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert len(ledger.charges("htn_cohort")) == len(spec.query.releases())


def test_a_study_takes_no_train_message(home: NodeHome) -> None:
    spec = study()
    _approve(home, spec)
    reply = answer("train", study_message(MessageType.TRAIN, sign(spec, fresh=True)), _config(home))
    assert reply.error.code == REFUSED_BAD_INSTRUCTION
    _ledger_untouched(home)


# ---------------------------------------------------------------- the egress guard


def test_the_egress_guard_refuses_anything_beyond_the_declared_answer() -> None:
    query = study().query
    good = noisy_answer(query, [np.zeros(r.size, dtype=np.int64 if r.kind == "count" else np.float64) for r in query.releases()],
                        min_cell_size=0, sampler=lambda r, v: v)
    metrics = MetricRecord({"epsilon": 1.0, "epsilon-run": 0.5})
    guard(STATISTICS_ACTION, RecordDict({STATISTICS_KEY: good.to_record(), METRICS_KEY: metrics}), query)
    with pytest.raises(ProtocolError, match="may carry only"):
        guard(STATISTICS_ACTION, RecordDict({STATISTICS_KEY: good.to_record(), METRICS_KEY: metrics, "extra": ConfigRecord()}), query)
    with pytest.raises(ProtocolError, match="undeclared metric"):
        guard(STATISTICS_ACTION, RecordDict({STATISTICS_KEY: good.to_record(), METRICS_KEY: MetricRecord({"num-examples": 9.0})}), query)
    short = SiteAnswer(good.releases[:-1], ())
    with pytest.raises(ProtocolError, match="release plan"):
        guard(STATISTICS_ACTION, RecordDict({STATISTICS_KEY: short.to_record(), METRICS_KEY: metrics}), query)
    with pytest.raises(ProtocolError, match="release plan"):
        # A suppressed cell whose values still leave.
        guard(STATISTICS_ACTION, RecordDict({STATISTICS_KEY: SiteAnswer(good.releases, (0,)).to_record(), METRICS_KEY: metrics}), query)


# ---------------------------------------------------------------- the officer's views


def _cli(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from clients.hospital_node.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120", "MEDFED_OFFICER": OFFICER})


def test_the_officer_sees_a_pending_study_with_its_releases_and_cost(home: NodeHome) -> None:
    spec = study()
    answer("query", study_message(MessageType.QUERY, sign(spec, fresh=True)), _config(home))
    result = _cli("requests", "--home", str(home.path))
    assert result.exit_code == 0, result.output
    assert "htn-prevalence-age-sex" in result.output and "statistics (answers under formal DP)" in result.output
    assert "5 DP releases over 10 cell(s)" in result.output
    assert "policy, registered columns and cell limit allow it" in result.output


def test_egress_lists_each_noisy_value_that_left(home: NodeHome) -> None:
    site_answer, _, _ = _answered(home, study())
    result = _cli("egress", "--home", str(home.path))
    assert result.exit_code == 0, result.output
    assert "statistics" in result.output and "5 DP releases" in result.output
    first = next(v for v in site_answer.releases[0].values if v is not None)
    assert f"{first:g}" in result.output
    budget = _cli("budget", "--home", str(home.path))
    assert budget.exit_code == 0, budget.output
    assert "1 of 1 round(s) (5 releases each) charged" in budget.output


def test_the_evidence_pack_lists_each_release_charge(home: NodeHome, tmp_path: Path) -> None:
    _answered(home, study())
    result = _cli("report", "--home", str(home.path), "--out", str(tmp_path / "pack"))
    assert result.exit_code == 0, result.output
    evidence = json.loads(next((tmp_path / "pack").glob("*.json")).read_text())
    assert [c["mechanism"] for c in evidence["charges"]] == [r.mechanism for r in study().query.releases()]


def test_the_officer_sets_the_cell_floor_and_limit_with_policy_set(home: NodeHome) -> None:
    result = _cli("policy", "set", "min_cell_size=25", "max_cells=200", "--home", str(home.path))
    assert result.exit_code == 0, result.output
    assert (home.policy().min_cell_size, home.policy().max_cells) == (25, 200)
    bad = _cli("policy", "set", "min_cell_size=-1", "max_cells=5000", "--home", str(home.path))
    assert bad.exit_code != 0
    assert "policy.min_cell_size must be an integer >= 0" in str(bad.exception or bad.output)
    assert "policy.max_cells must be an integer in 1..1000" in str(bad.exception or bad.output)


def test_a_larger_cell_floor_suppresses_on_the_noisy_counts_the_answer_carries(home: NodeHome) -> None:
    governance.set_policy(home, {"min_cell_size": 120}, by=OFFICER)
    spec = study()
    site_answer, _, _ = _answered(home, spec)
    [record] = [e.payload for e in home.audit_log().entries() if e.kind == "release" and e.payload["message"] == "statistics"]
    assert record["min_cell_size"] == 120 and site_answer.suppressed
    # Suppressed exactly where the noisy count of some statistic in the cell fell below the floor.
    query = spec.query
    hidden = set(site_answer.suppressed)
    for index, release in enumerate(query.releases()):
        values = site_answer.releases[index].values
        if release.name == "count":
            shown = [v for cell, v in enumerate(values) if cell not in hidden]
            assert all(v is not None and v >= 120 for v in shown)


def test_a_release_message_gives_the_reservation_back_and_the_study_is_not_answered_after(home: NodeHome) -> None:
    spec = study()
    _approve(home, spec)
    signed = sign(spec, fresh=True)
    assert not answer("query", study_message(MessageType.QUERY, signed), _config(home)).has_error()
    released = answer("release", study_message(f"{MessageType.QUERY}.release", signed), _config(home))
    assert not released.has_error(), released.error
    with PrivacyLedger.open(home.ledger_path) as ledger:
        [reservation] = ledger.run_reservations("htn_cohort")
        assert reservation.released_at is not None
    late = answer(STATISTICS_ACTION, study_message(STATISTICS, signed), _config(home))
    assert late.error.code == REFUSED_REPLAY
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.charges("htn_cohort") == []


def test_an_unsigned_study_or_one_signed_by_a_stranger_is_refused_before_reading(home: NodeHome, cohort_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    spec = study()
    _approve(home, spec)
    unsigned = SignedSpec(spec.canonical_json())
    stranger = sign(spec, Ed25519PrivateKey.generate(), fresh=True)
    cohort_path.unlink()
    for signed in (unsigned, stranger):
        reply = answer(STATISTICS_ACTION, study_message(STATISTICS, signed), _config(home))
        assert reply.error.code == REFUSED_SIGNATURE
    _ledger_untouched(home)


def test_a_dataset_below_the_minimum_cohort_is_refused_and_gives_its_reservation_back(home: NodeHome) -> None:
    governance.set_policy(home, {"min_cohort_size": 100_000}, by=OFFICER)
    spec = study()
    signed = sign(spec, fresh=True)
    assert answer("query", study_message(MessageType.QUERY, signed), _config(home)).error.code == AWAITING_APPROVAL
    foreseen = _cli("requests", "--home", str(home.path))
    assert "fewer patients than the minimum cohort of 100000" in " ".join(foreseen.output.split())
    _approve(home, spec)
    reply = answer("query", study_message(MessageType.QUERY, signed), _config(home))
    assert reply.error.code == REFUSED_POLICY
    reason = read_refusal(reply.error.reason, "?")[1]
    assert reason == "dataset 'htn_cohort' has fewer patients than the minimum cohort of 100000"  # the count stays here
    with PrivacyLedger.open(home.ledger_path) as ledger:
        [reservation] = ledger.run_reservations("htn_cohort")
        assert reservation.released_at is not None and ledger.charges("htn_cohort") == []


# ---------------------------------------------------------------- secure aggregation (SecAgg+'s collect stage)


def _secure_study() -> StudySpec:
    return study(federation={"secure_aggregation": True})


def _settings(**changes: Any):  # type: ignore[no-untyped-def]
    from clients.hospital_node.secure_aggregation import SecAggSettings
    from federation.protocol import SECAGG_MODULUS, secure_clipping_range

    c = secure_clipping_range(3)
    values = {"sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": float(c), "quantization_range": 2 * c,
              "modulus_range": SECAGG_MODULUS, "max_weight": 1.0} | changes
    return SecAggSettings(**values)


def _collect_message(signed: SignedSpec) -> Message:
    """The collect stage as the node's handler receives it from secaggplus_mod: the legacy fit layout."""
    from flwr.app import ArrayRecord

    return Message(
        content=RecordDict({"fitins.config": signed.add_to(ConfigRecord()), "fitins.parameters": ArrayRecord()}),
        dst_node_id=5, message_type=MessageType.TRAIN,
    )


def _admitted(home: NodeHome, spec: StudySpec) -> SignedSpec:
    _approve(home, spec)
    signed = sign(spec, fresh=True)
    assert not answer("query", study_message(MessageType.QUERY, signed), _config(home)).has_error()
    return signed


def _vectors(reply: Message) -> list[np.ndarray]:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    return parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)


def test_a_secure_study_answers_whole_quanta_with_weight_one_recorded_as_masked(home: NodeHome) -> None:
    import flwr.compat.common.recorddict_compat as compat

    from federation.protocol import SUM_QUANTA_PER_SCALE, release_quantum

    spec = _secure_study()
    signed = _admitted(home, spec)
    reply = answer("train", _collect_message(signed), _config(home), secagg=_settings())
    assert not reply.has_error(), reply.error
    assert set(reply.content) == {"fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status", METRICS_KEY, "node"}
    assert STATISTICS_KEY not in reply.content  # the plain answer never leaves
    assert compat.recorddict_to_fitres(reply.content, keep_input=True).num_examples == 1
    vectors = _vectors(reply)
    [record] = [e.payload for e in home.audit_log().entries() if e.kind == "release" and e.payload["message"] == "statistics"]
    releases = spec.query.releases()
    assert len(vectors) == len(releases) + 1
    for vector, sent, release in zip(vectors, record["releases"], releases, strict=False):
        quantum = release_quantum(release.mechanism, release.scale)
        assert np.all(vector == np.rint(vector))
        # The audit log records each value as it entered the masked vector; 0 in suppressed cells.
        assert [0.0 if v is None else v for v in sent["values"]] == pytest.approx(list(vector * quantum), rel=1e-12)
    assert release_quantum("laplace", 256.0) == 256.0 / SUM_QUANTA_PER_SCALE
    assert list(vectors[-1]) == [0.0 if c in record["suppressed"] else 1.0 for c in range(spec.query.n_cells)]
    secure = record["secure_aggregation"]
    assert (secure["protocol"], secure["masked"], secure["weight"], secure["max_weight"]) == ("SecAgg+", True, 1, 1.0)
    assert secure["reported_cells"] == [int(x) for x in vectors[-1]]
    assert record["sha256"] == __import__("hashlib").sha256(b"".join(v.astype("<f8").tobytes() for v in vectors)).hexdigest()
    # `medfed node egress` tells the officer the values left masked, as this site's part of a sum.
    from clients.hospital_node.egress_records import what_left

    [entry] = [e for e in home.audit_log().entries() if e.kind == "release" and e.payload["message"] == "statistics"]
    assert what_left(entry)[1].startswith("SecAgg+ masked, as whole quanta beside a reported-cell vector")
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert len(ledger.charges("htn_cohort")) == len(releases)
    assert governance.ledger_disagreement(home, home.audit_log().entries()) == []


def test_a_secure_study_is_not_answered_in_plain_and_a_plain_one_not_through_secagg(home: NodeHome, cohort_path: Path) -> None:
    secure = _admitted(home, _secure_study())
    plain = _admitted(home, study())
    cohort_path.unlink()  # a refusal before any row is read
    reply = answer(STATISTICS_ACTION, study_message(STATISTICS, secure), _config(home))
    assert reply.error.code == REFUSED_BAD_INSTRUCTION
    assert "asks for secure aggregation (federation.secure_aggregation): its answer leaves only masked" in reply.error.reason
    reply = answer("train", _collect_message(plain), _config(home), secagg=_settings())
    assert reply.error.code == REFUSED_BAD_INSTRUCTION
    assert "does not ask for secure aggregation" in reply.error.reason
    _ledger_charges_none(home)


def _ledger_charges_none(home: NodeHome) -> None:
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.charges("htn_cohort") == []


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"max_weight": 400.0}, "SecAgg+ max_weight must be 1"),
        ({"sample_num": 1}, "a secure sum over 1 site(s) would reveal a site's answer"),
        ({"clipping_range": 8.0, "quantization_range": 1 << 22}, "quantization_range must be twice an integral clipping_range"),
        ({"modulus_range": 1 << 16}, "would wrap around the sum of 3 site(s)"),
    ],
)
def test_secagg_settings_that_would_reveal_or_distort_the_answer_are_refused_before_any_row_is_read(
    home: NodeHome, cohort_path: Path, changes: dict[str, Any], named: str
) -> None:
    signed = _admitted(home, _secure_study())
    cohort_path.unlink()  # reading it would fail with a connector error instead
    reply = answer("train", _collect_message(signed), _config(home), secagg=_settings(**changes))
    assert reply.error.code == REFUSED_BAD_INSTRUCTION
    assert "the coordinator's SecAgg+ settings would not keep this site's answer hidden and exact" in reply.error.reason
    assert named in reply.error.reason and "nothing was read or sent" in reply.error.reason
    _ledger_charges_none(home)
    missing = answer("train", _collect_message(signed), _config(home), secagg=None)
    assert "must be the collect stage of a SecAgg+ round" in missing.error.reason


def test_an_answer_secagg_would_clip_is_not_sent_and_the_refusal_is_charged(home: NodeHome) -> None:
    from clients.hospital_node.egress_records import what_left

    spec = _secure_study()
    signed = _admitted(home, spec)
    # A clipping range of 5 quanta: the synthetic cohort's noisy counts do not fit.
    reply = answer("train", _collect_message(signed), _config(home), secagg=_settings(clipping_range=5.0, quantization_range=10))
    assert reply.error.code == REFUSED_BAD_INSTRUCTION
    assert "does not fit the SecAgg+ clipping range of 5 quanta" in reply.error.reason
    assert "nothing was sent" in reply.error.reason and "The study was charged" in reply.error.reason
    [entry] = [e for e in home.audit_log().entries() if e.kind == "release" and e.payload["message"] == "statistics"]
    assert entry.payload["releases"] == [] and entry.payload["refused"]["code"] == REFUSED_BAD_INSTRUCTION
    assert what_left(entry)[1].startswith("refusal code 4001: this site's noisy answer does not fit")
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert len(ledger.charges("htn_cohort")) == len(spec.query.releases())
    assert governance.ledger_disagreement(home, home.audit_log().entries()) == []
    # Answered (by its refusal) once: a second collect stage is a replay.
    again = answer("train", _collect_message(signed), _config(home), secagg=_settings())
    assert again.error.code == REFUSED_REPLAY


def test_the_secure_egress_guard_lets_only_the_plans_whole_quanta_leave() -> None:
    from clients.hospital_node.secure_aggregation import legacy_fit_result
    from clients.hospital_node.study_round import guard_secure

    query = _secure_study().query
    good = [np.zeros(r.size) for r in query.releases()] + [np.ones(query.n_cells)]
    guard_secure(legacy_fit_result(good, 1, {"epsilon": 1.0}), query, 100.0)
    with pytest.raises(ProtocolError, match="weight 1 and no legacy metrics"):
        guard_secure(legacy_fit_result(good, 7, {"epsilon": 1.0}), query, 100.0)
    with pytest.raises(ProtocolError, match="not whole quanta within the clipping range"):
        guard_secure(legacy_fit_result([good[0] + 0.5, *good[1:]], 1, {}), query, 100.0)
    with pytest.raises(ProtocolError, match="not whole quanta within the clipping range"):
        guard_secure(legacy_fit_result([good[0] + 101, *good[1:]], 1, {}), query, 100.0)
    with pytest.raises(ProtocolError, match="not the query's release plan"):
        guard_secure(legacy_fit_result(good[:-1], 1, {}), query, 100.0)
    with pytest.raises(ProtocolError, match="reported cells of a secure vector must be 0 or 1"):
        guard_secure(legacy_fit_result([*good[:-1], good[-1] * 2], 1, {}), query, 100.0)
    with pytest.raises(ProtocolError, match="undeclared metric\\(s\\) num-examples"):
        guard_secure(legacy_fit_result(good, 1, {"num-examples": 300.0}), query, 100.0)
    content = legacy_fit_result(good, 1, {})
    content[STATISTICS_KEY] = ConfigRecord({"medfed.answer": "{}"})
    with pytest.raises(ProtocolError, match="may carry only the legacy fit result"):
        guard_secure(content, query, 100.0)


def test_a_policy_that_requires_secure_aggregation_admits_a_secure_study_and_shows_the_officer_how_it_leaves(home: NodeHome) -> None:
    from dataclasses import replace

    from typer.testing import CliRunner

    from clients.hospital_node.cli import app as node_cli

    home.policy_path.write_text(replace(home.policy(), require_secure_aggregation=True).render())
    plain = answer("query", study_message(MessageType.QUERY, sign(study(), fresh=True)), _config(home))
    assert plain.error.code == REFUSED_POLICY
    assert read_refusal(plain.error.reason, "")[1] == (
        "this node's policy requires secure aggregation; the study does not use it (federation.secure_aggregation)"
    )
    secure = _secure_study()
    pending = answer("query", study_message(MessageType.QUERY, sign(secure, fresh=True)), _config(home))
    assert pending.error.code == AWAITING_APPROVAL  # requested, not refused
    [request] = [e.payload for e in home.audit_log().entries() if e.kind == "request" and e.payload["spec_digest"] == secure.digest()]
    assert request["secure_aggregation"] is True
    shown = CliRunner().invoke(node_cli, ["requests", "--home", str(home.path)], env={"COLUMNS": "200"})
    assert "how it leaves" in shown.output
    assert "securely aggregated (SecAgg+): masked, the coordinator sees only totals over the sites" in shown.output
    assert "the node will refuse it" not in shown.output.split(secure.digest())[1]
