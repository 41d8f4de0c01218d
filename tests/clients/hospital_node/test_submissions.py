"""Approvals are spent, not replayed: a signed submission spends one run of an approval.

Each test drives the node's real handler with a coordinator's messages. The submission
(spec digest, submission id, signing time) is what the partner signs; the node records
which submission spent the approval, treats the same submission in another Flower run
as the run continuing, and refuses a stale one or one for which the approval has no
run left, before any data is read.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flwr.app import Message, MessageType
from flwr.supercore.task_identity import TaskIdentity

from clients.hospital_node import governance
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.rounds import answer
from federation.protocol import REFUSED_REPLAY, REFUSED_SIGNATURE, SignedSpec, read_refusal
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from privacy.governance import Submission, sign_submission

from .conftest import OFFICER, PARTNER_KEY, example_spec, govern, sign, signed_message

SPEC = example_spec(federation={"rounds": 2}, experiment={"name": "spent-once"})


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    path = tmp_path / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(path, index=False)
    node = NodeHome.create(tmp_path / "home", name="hospital_4")
    node.register_dataset(DatasetEntry(name="htn_cohort", path=path, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES))
    govern(node, "htn_cohort", approve_spec=SPEC)
    return node


def _query(home: NodeHome, signed: SignedSpec, *, run: int = 31) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run, 1, 1
    return answer("query", signed_message(MessageType.QUERY, SPEC, signed=signed), {"home": str(home.path)})


def _refusal(reply: Message) -> tuple[int, str]:
    assert reply.has_error(), "the node answered instead of refusing"
    return reply.error.code, read_refusal(reply.error.reason, "?")[1]


def _signed(signed_at: datetime) -> SignedSpec:
    submission = Submission(SPEC.digest(), uuid.uuid4().hex, signed_at)
    signature = sign_submission(submission, PARTNER_KEY)
    return SignedSpec(SPEC.canonical_json(), signature.signature, signature.signer, submission.to_json())


def _spent(home: NodeHome) -> list[str]:
    return [e.payload["submission_id"] for e in home.audit_log().entries() if e.kind == "submission"]


def test_a_submission_spends_the_approval_and_another_submission_is_refused(home: NodeHome) -> None:
    first = sign(SPEC, fresh=True)
    assert not _query(home, first).has_error()
    assert _spent(home) == [first.submission_id]
    home.dataset("htn_cohort").path.unlink()  # the refusal must come before any data is read
    code, reason = _refusal(_query(home, sign(SPEC, fresh=True), run=32))
    assert code == REFUSED_REPLAY
    assert f"allows 1 run(s), spent by submission(s) {first.submission_id[:12]}" in reason
    assert "ask the officer to approve it again" in reason
    assert _spent(home) == [first.submission_id]


def test_the_same_submission_in_a_new_flower_run_is_the_run_continuing(home: NodeHome) -> None:
    signed = sign(SPEC, fresh=True)
    assert not _query(home, signed, run=41).has_error()
    assert not _query(home, signed, run=42).has_error()  # the coordinator restarted
    assert _spent(home) == [signed.submission_id]


def test_an_approval_for_two_runs_admits_two_submissions_and_no_third(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, runs=2)
    assert not _query(home, sign(SPEC, fresh=True), run=51).has_error()
    assert not _query(home, sign(SPEC, fresh=True), run=52).has_error()
    code, reason = _refusal(_query(home, sign(SPEC, fresh=True), run=53))
    assert code == REFUSED_REPLAY and "allows 2 run(s)" in reason


def test_approving_again_allows_a_new_run(home: NodeHome) -> None:
    assert not _query(home, sign(SPEC, fresh=True), run=61).has_error()
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER)
    assert not _query(home, sign(SPEC, fresh=True), run=62).has_error()
    assert len(_spent(home)) == 2


def test_a_stale_submission_is_refused(home: NodeHome) -> None:
    code, reason = _refusal(_query(home, _signed(datetime.now(UTC) - timedelta(hours=73))))
    assert code == REFUSED_REPLAY
    assert "more than 72 h ago; it is stale: submit the spec again" in reason
    assert _spent(home) == []


def test_a_submission_signed_in_the_future_is_refused(home: NodeHome) -> None:
    code, reason = _refusal(_query(home, _signed(datetime.now(UTC) + timedelta(hours=2))))
    assert code == REFUSED_REPLAY and "in the future of this node's clock" in reason


def test_a_continuation_is_admitted_however_old_its_submission(home: NodeHome) -> None:
    signed = _signed(datetime.now(UTC) - timedelta(hours=71))
    assert not _query(home, signed, run=71).has_error()
    home.policy_path.write_text(home.policy_path.read_text().replace("max_submission_age_hours = 72.0", "max_submission_age_hours = 1.0"))
    assert not _query(home, signed, run=72).has_error()  # continuing, not starting


def test_evaluate_of_a_submission_that_never_trained_here_is_refused(home: NodeHome) -> None:
    TaskIdentity.run_id = 81
    reply = answer("evaluate", signed_message(MessageType.EVALUATE, SPEC, signed=sign(SPEC, fresh=True)), {"home": str(home.path)})
    code, reason = _refusal(reply)
    assert code == REFUSED_REPLAY and "never trained on this node" in reason


def test_a_submission_of_another_spec_is_refused_as_a_signature_problem(home: NodeHome) -> None:
    other = example_spec(experiment={"name": "something-else"})
    submission = Submission.new(other.canonical_json())
    signature = sign_submission(submission, PARTNER_KEY)
    forged = SignedSpec(SPEC.canonical_json(), signature.signature, signature.signer, submission.to_json())
    code, reason = _refusal(_query(home, forged))
    assert code == REFUSED_SIGNATURE and "names another spec" in reason


def _reservations(home: NodeHome) -> list[tuple[str, str]]:
    from privacy.ledger import PrivacyLedger

    with PrivacyLedger.open(home.ledger_path) as ledger:
        now, hold = ledger.now(), home.policy().reservation_hold
        return [(r.submission, r.state(hold=hold, now=now)) for r in ledger.run_reservations()]


def test_a_finished_submission_sent_again_trains_nowhere(home: NodeHome) -> None:
    signed = sign(SPEC, fresh=True)
    assert not _query(home, signed, run=91).has_error()
    TaskIdentity.run_id = 91
    evaluated = answer("evaluate", signed_message(MessageType.EVALUATE, SPEC, signed=signed, arrays=_model()), {"home": str(home.path)})
    assert not evaluated.has_error()
    assert _reservations(home) == [(signed.submission_id, "released")]
    home.dataset("htn_cohort").path.unlink()  # refused before any data is read
    code, reason = _refusal(_query(home, signed, run=92))  # the coordinator replays the whole submission
    assert code == REFUSED_REPLAY and "already ran on this node and its run ended; a replay trains nowhere" in reason


def test_a_release_gives_back_a_run_that_ended_early_and_needs_the_signed_submission(home: NodeHome) -> None:
    signed = sign(SPEC, fresh=True)
    assert not _query(home, signed, run=93).has_error()
    assert _reservations(home) == [(signed.submission_id, "live")]
    forged = SignedSpec(signed.spec_json, signed.signature, signed.signer, sign(SPEC, fresh=True).submission)
    refused = answer("release", signed_message(f"{MessageType.QUERY}.release", SPEC, signed=forged), {"home": str(home.path)})
    assert _refusal(refused)[0] == REFUSED_SIGNATURE  # someone else's envelope: nothing given back
    assert _reservations(home) == [(signed.submission_id, "live")]
    released = answer("release", signed_message(f"{MessageType.QUERY}.release", SPEC, signed=signed), {"home": str(home.path)})
    assert not released.has_error() and dict(released.content["metrics"]) == {}
    assert _reservations(home) == [(signed.submission_id, "released")]


def _model():  # type: ignore[no-untyped-def]
    from flwr.app import ArrayRecord

    from models.tabular import build_tabular_model

    return ArrayRecord(build_tabular_model("logistic", len(FEATURES)).state_dict())


def test_a_runs_final_evaluation_is_answered_once(home: NodeHome) -> None:
    signed = sign(SPEC, fresh=True)
    assert not _query(home, signed, run=95).has_error()
    config = {"home": str(home.path)}
    first = answer("evaluate", signed_message(MessageType.EVALUATE, SPEC, signed=signed, arrays=_model()), config)
    assert not first.has_error()
    again = answer("evaluate", signed_message(MessageType.EVALUATE, SPEC, signed=signed, arrays=_model()), config)
    code, reason = _refusal(again)  # a coordinator probing the validation split with models of its choosing
    assert code == REFUSED_REPLAY and "its final evaluation is answered once" in reason
