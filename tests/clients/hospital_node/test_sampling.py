"""Node sampling on the node: it reserves its scheduled rounds only, and trains no other round.

A spec with ``federation.fraction_per_round`` = 0.5 over 4 rounds gives every node
exactly 2 rounds. The coordinator's query carries the node's own rounds; the node checks
them against the signed spec, reserves those 2 rounds (not 4), records them at
admission, and refuses a train message for any other round before anything is read or
charged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Message, MessageType
from flwr.supercore.task_identity import TaskIdentity

from clients.hospital_node.governance import budget_status
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.rounds import answer
from experiments.cost import plan_privacy
from experiments.spec import ExperimentSpec
from federation.protocol import REFUSED_BAD_INSTRUCTION, SCHEDULE_KEY, read_refusal
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from models.tabular import build_tabular_model
from privacy.ledger import LIVE, USED_UP, PrivacyLedger

from .conftest import example_spec, govern, sign, signed_message

DATASET = "htn_cohort"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 78, 1, 1


def _spec() -> ExperimentSpec:
    return example_spec(federation={"rounds": 4, "fraction_per_round": 0.5})


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    path = tmp_path / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(path, index=False)
    node = NodeHome.create(tmp_path / "home", name="hospital_8")
    node.register_dataset(DatasetEntry(name=DATASET, path=path, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES))
    govern(node, DATASET, approve_spec=_spec())
    return node


def _message(kind: str, *, server_round: int = 0, schedule: list[int] | None = None) -> Message:
    spec = _spec()
    arrays = None
    if kind in (MessageType.TRAIN, MessageType.EVALUATE):
        model = build_tabular_model(spec.model.kind, len(spec.data.features or ()))
        arrays = ArrayRecord(model.state_dict())
    message = signed_message(kind, spec, server_round=server_round, arrays=arrays)
    if schedule is not None:
        message.content["config"][SCHEDULE_KEY] = schedule
    return message


def _ask(home: NodeHome, kind: str, **message: object) -> Message:
    return answer(kind, _message(kind, **message), {"home": str(home.path)})  # type: ignore[arg-type]


def _refusal(reply: Message) -> str:
    assert reply.has_error() and reply.error.code == REFUSED_BAD_INSTRUCTION, reply.error
    return read_refusal(reply.error.reason, "")[1]


def _charged_rounds(home: NodeHome) -> list[int]:
    with PrivacyLedger.open(home.ledger_path) as ledger:
        return sorted(c.round for c in ledger.charges(DATASET) if c.round > 0)


def test_the_query_reserves_the_scheduled_rounds_only_and_records_them(home: NodeHome) -> None:
    reply = _ask(home, "query", schedule=[4, 2])
    assert not reply.has_error(), reply.error
    with PrivacyLedger.open(home.ledger_path) as ledger:
        [reservation] = ledger.run_reservations(DATASET)
    assert (reservation.rounds, reservation.charged) == (2, 0)  # 2 of the 4 rounds: no budget held for the others
    [admitted] = [e.payload for e in home.audit_log().entries() if e.kind == "submission"]
    assert (admitted["schedule"], admitted["rounds_reserved"]) == ([2, 4], 2)
    # What the node holds is what the preview said: epsilon over the 2 rounds it trains.
    plan = plan_privacy(_spec())
    assert plan.rounds_per_node == 2 and plan.total_steps == 2 * plan.steps_per_round
    [row] = budget_status(home)  # the query charged the noisy size; the rest is held: 2 rounds and the final histogram
    assert row.held == pytest.approx(plan.epsilon_charged_per_site, rel=1e-6)
    every_round = plan_privacy(example_spec(federation={"rounds": 4}))
    assert row.held < every_round.epsilon_charged_per_site  # what reserving all 4 rounds would have held


def test_a_train_message_for_a_round_off_the_schedule_is_refused_with_nothing_charged(home: NodeHome) -> None:
    assert not _ask(home, "query", schedule=[2, 4]).has_error()
    releases_before = [e for e in home.audit_log().entries() if e.kind == "release"]
    reason = _refusal(_ask(home, "train", server_round=3))
    assert "round 3 is not in this node's schedule" in reason and "(rounds 2, 4)" in reason and "nothing was read or charged" in reason
    assert _charged_rounds(home) == []
    assert [e for e in home.audit_log().entries() if e.kind == "release"] == releases_before  # nothing left
    [refusal] = [e.payload for e in home.audit_log().entries() if e.kind == "refusal"]
    assert refusal["code"] == REFUSED_BAD_INSTRUCTION  # the refusal itself is audited


def test_a_query_with_more_rounds_than_the_signed_spec_allows_is_refused_before_any_reservation(home: NodeHome) -> None:
    reason = _refusal(_ask(home, "query", schedule=[1, 2, 3]))
    assert "the signed spec's federation.fraction_per_round 0.5 of 4 round(s) gives every node exactly 2" in reason
    assert "nothing was reserved or charged" in reason
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.run_reservations(DATASET) == [] and ledger.charges(DATASET) == []
    assert [e for e in home.audit_log().entries() if e.kind == "submission"] == []  # not admitted


@pytest.mark.parametrize(
    ("schedule", "problem"),
    [([2, 2], "more than once"), ([0, 5], "lie outside 1..4"), (None, "must carry its scheduled rounds")],
)
def test_a_bad_or_missing_schedule_is_refused_naming_the_problem(home: NodeHome, schedule: list[int] | None, problem: str) -> None:
    assert problem in _refusal(_ask(home, "query", schedule=schedule))
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.run_reservations(DATASET) == []


def test_a_later_message_may_not_change_the_recorded_schedule(home: NodeHome) -> None:
    assert not _ask(home, "query", schedule=[1, 3]).has_error()
    reason = _refusal(_ask(home, "query", schedule=[2, 4]))
    assert "(rounds 2, 4) is not the one it recorded" in reason and "(rounds 1, 3)" in reason


def test_the_reservation_is_used_up_by_the_scheduled_rounds_and_the_final_evaluation(home: NodeHome) -> None:
    assert not _ask(home, "query", schedule=[1, 3]).has_error()
    for server_round in (1, 3):
        reply = _ask(home, "train", server_round=server_round)
        assert not reply.has_error(), reply.error
    with PrivacyLedger.open(home.ledger_path) as ledger:
        [reservation] = ledger.run_reservations(DATASET)
        assert (reservation.rounds, reservation.charged) == (2, 2)
        assert reservation.state(hold=home.policy().reservation_hold, now=ledger.now()) == LIVE  # the final evaluation is still held
    assert not _ask(home, "evaluate", server_round=4).has_error()
    assert _charged_rounds(home) == [1, 3]
    trained = sorted(e.payload["round"] for e in home.audit_log().entries() if e.kind == "release" and e.payload["message"] == "train")
    assert trained == [1, 3]
    [row] = budget_status(home)
    assert row.open_reservations == 0 and [r.state for r in row.reservations] == [USED_UP]


def test_an_early_end_gives_back_the_unused_scheduled_rounds(home: NodeHome) -> None:
    assert not _ask(home, "query", schedule=[2, 4]).has_error()
    assert not _ask(home, "train", server_round=2).has_error()
    from federation.protocol import RELEASE_ACTION

    release = signed_message(f"{MessageType.QUERY}.{RELEASE_ACTION}", _spec(), server_round=0)
    assert not answer("release", release, {"home": str(home.path)}).has_error()
    [row] = budget_status(home)
    assert row.open_reservations == 0 and row.held == pytest.approx(row.spent)  # nothing held for round 4
    assert _charged_rounds(home) == [2]
    assert sign(_spec()).submission_id  # the same signed submission throughout
