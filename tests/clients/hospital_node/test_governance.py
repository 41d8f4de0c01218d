"""The node decides: signatures, approvals, policy, caps and budgets, and hostile input of each kind.

Each test sends the node's real handler (`rounds.answer`) a message as the coordinator
would, with a spec signed by the test partner, and checks the refusal code, the reason
the researcher sees, the audit log and the ledger. Where a refusal must come before any
data is read, the cohort file is deleted first: a connector error would then show that
the node had tried to read it.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, Message, MessageType
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from clients.hospital_node import governance
from clients.hospital_node.cli import app
from clients.hospital_node.errors import DatasetNotFoundError, GovernanceError
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.policy import NodePolicy
from clients.hospital_node.rounds import answer
from experiments.cost import plan_privacy
from experiments.spec import ExperimentSpec
from federation.experiment import instruction_for
from federation.protocol import (
    AWAITING_APPROVAL,
    QUERY_METRICS,
    REFUSED_APPROVAL,
    REFUSED_BAD_INSTRUCTION,
    REFUSED_BUDGET,
    REFUSED_INTEGRITY,
    REFUSED_POLICY,
    REFUSED_REPLAY,
    REFUSED_SIGNATURE,
    SignedSpec,
    read_metrics,
    read_refusal,
)
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from models.tabular import build_tabular_model
from privacy.accountant import epsilon
from privacy.events import DPEvent
from privacy.ledger import Budget, PrivacyLedger
from tests.peak_memory import MIB, peak_memory

from .conftest import OFFICER, PARTNER, example_spec, govern, sign, signed_message


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 31, 1, 1


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    path = tmp_path / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(path, index=False)
    node = NodeHome.create(tmp_path / "home", name="hospital_4")
    node.register_dataset(
        DatasetEntry(name="htn_cohort", path=path, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES)
    )
    govern(node, "htn_cohort")  # trusted partner and a budget; no approval yet
    return node


SPEC = example_spec(federation={"rounds": 2})


def _ask(home: NodeHome, message: Message, kind: str = "query") -> Message:
    return answer(kind, message, {"home": str(home.path)})


def _refusal(reply: Message) -> tuple[int, str]:
    assert reply.has_error(), "the node answered instead of refusing"
    site, reason = read_refusal(reply.error.reason, "?")
    assert site == "hospital_4"
    return reply.error.code, reason


def _kinds(home: NodeHome) -> list[str]:
    return [e.kind for e in home.audit_log().entries()]


def _train(home: NodeHome, spec: ExperimentSpec, server_round: int = 1, *, signed: SignedSpec | None = None) -> Message:
    arrays = ArrayRecord(build_tabular_model("logistic", len(FEATURES)).state_dict())
    return _ask(home, signed_message(MessageType.TRAIN, spec, server_round=server_round, arrays=arrays, signed=signed), "train")


def _hide_the_data(home: NodeHome) -> None:
    home.dataset("htn_cohort").path.unlink()


# ---------------------------------------------------------------- approvals


def test_an_unseen_spec_is_recorded_once_as_a_request_and_awaits_the_officer(home: NodeHome) -> None:
    _hide_the_data(home)
    for _ in range(2):
        code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))
        assert code == AWAITING_APPROVAL
        assert reason == f"awaiting approval by this node's data-governance officer (spec {SPEC.digest()[:12]}, dataset 'htn_cohort')"
    assert _kinds(home).count("request") == 1
    [pending] = governance.pending_requests(home)
    assert pending.request.spec_digest == SPEC.digest()
    assert pending.request.signer == PARTNER
    plan = plan_privacy(SPEC)
    # The officer sees what the researcher's `cost` says each site is charged: every release
    # of the run (rounds, training-set size, final evaluation) composed by PLD.
    assert pending.cost == pytest.approx(plan.epsilon_charged_per_site, rel=1e-6)
    assert pending.cost > plan.epsilon_training_charged_per_site  # the count and the evaluation compose on top
    assert pending.position is not None and pending.position.budget == Budget(50.0, 1e-5)
    assert pending.projected == pytest.approx(plan.epsilon_charged_per_site, rel=1e-6)


def test_after_approval_the_same_spec_is_accepted(home: NodeHome) -> None:
    _ask(home, signed_message(MessageType.QUERY, SPEC))
    governance.approve(home, SPEC.digest()[:10], dataset="htn_cohort", by=OFFICER)
    reply = _ask(home, signed_message(MessageType.QUERY, SPEC))
    assert not reply.has_error(), reply.error
    assert read_metrics(reply.content, QUERY_METRICS)["num-examples"] > 100
    assert governance.pending_requests(home) == []


def test_a_changed_spec_is_a_new_request_even_with_an_old_approval(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    changed = example_spec(federation={"rounds": 3})
    code, _ = _refusal(_ask(home, signed_message(MessageType.QUERY, changed)))
    assert code == AWAITING_APPROVAL
    assert [p.request.spec_digest for p in governance.pending_requests(home)] == [changed.digest()]


def test_a_denial_reaches_the_researcher_with_its_reason(home: NodeHome) -> None:
    _ask(home, signed_message(MessageType.QUERY, SPEC))
    governance.deny(home, SPEC.digest()[:12], dataset="htn_cohort", reason="no secondary use of maternal data", by=OFFICER)
    _hide_the_data(home)
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))
    assert (code, reason) == (REFUSED_APPROVAL, "denied by this node's officer: no secondary use of maternal data")
    assert _kinds(home)[-1] == "refusal"


def test_a_revoked_approval_stops_the_next_round_and_is_final(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _train(home, SPEC, 1).has_error()
    governance.revoke(home, SPEC.digest()[:12], dataset="htn_cohort", reason="consent withdrawn", by=OFFICER)
    code, reason = _refusal(_train(home, SPEC, 2))
    assert (code, reason) == (REFUSED_APPROVAL, "approval revoked by this node's officer: consent withdrawn")
    with pytest.raises(GovernanceError, match="revocation is final"):
        governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert [c.round for c in ledger.charges("htn_cohort")] == [0, 1]  # 0: the run's noisy training size


def test_an_expired_approval_is_refused(home: NodeHome) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    home.audit_log().append(
        "approval", {"spec_digest": SPEC.digest(), "dataset": "htn_cohort", "max_epsilon": None, "expires": past, "by": OFFICER}
    )
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))
    assert code == REFUSED_APPROVAL and reason.startswith("the officer's approval expired at ")
    with pytest.raises(GovernanceError, match="is in the past"):
        governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, expires=datetime.fromisoformat(past), not_yet_requested=True)


def test_a_forged_approved_flag_in_the_message_changes_nothing(home: NodeHome) -> None:
    message = signed_message(MessageType.QUERY, SPEC)
    message.content["config"]["approved"] = True
    message.content["config"]["medfed.approved"] = "yes"
    code, _ = _refusal(_ask(home, message))
    assert code == AWAITING_APPROVAL


def test_an_approval_cap_below_the_experiments_cost_is_refused(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, max_epsilon=0.5, not_yet_requested=True)
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))
    assert code == REFUSED_APPROVAL
    assert "over the officer's approval cap of 0.5" in reason


def test_officer_mistakes_get_one_line_messages(home: NodeHome) -> None:
    with pytest.raises(GovernanceError, match="no request or decision for a spec hash starting with 'deadbeef'"):
        governance.approve(home, "deadbeef", dataset="htn_cohort", by=OFFICER)
    with pytest.raises(GovernanceError, match="too short"):
        governance.approve(home, "abc", dataset="htn_cohort", by=OFFICER)
    with pytest.raises(DatasetNotFoundError, match="dataset 'ecg' is not registered"):
        governance.approve(home, SPEC.digest(), dataset="ecg", by=OFFICER, not_yet_requested=True)
    with pytest.raises(GovernanceError, match="one non-empty line"):
        governance.deny(home, SPEC.digest(), dataset="htn_cohort", reason="  ", by=OFFICER)
    with pytest.raises(GovernanceError, match="nothing to revoke"):
        governance.revoke(home, SPEC.digest(), dataset="htn_cohort", reason="x", by=OFFICER)


# ---------------------------------------------------------------- signatures


def test_an_unsigned_spec_is_refused_before_any_data_is_read(home: NodeHome) -> None:
    _hide_the_data(home)
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC, signed=SignedSpec(SPEC.canonical_json()))))
    assert code == REFUSED_SIGNATURE
    assert reason == "the experiment spec is not signed; the research partner must submit it with their key"
    [refusal] = [e for e in home.audit_log().entries() if e.kind == "refusal"]
    assert refusal.payload["code"] == REFUSED_SIGNATURE and refusal.payload["spec_digest"] == SPEC.digest()
    assert "request" not in _kinds(home)


def test_a_spec_signed_by_an_unknown_key_is_refused(home: NodeHome) -> None:
    stranger = Ed25519PrivateKey.generate()
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC, signed=sign(SPEC, stranger))))
    assert code == REFUSED_SIGNATURE
    assert "is not a trusted partner of this node" in reason


def test_a_damaged_signature_is_refused(home: NodeHome) -> None:
    good = sign(SPEC)
    raw = bytearray(base64.b64decode(good.signature))
    raw[0] ^= 1
    forged = SignedSpec(good.spec_json, base64.b64encode(bytes(raw)).decode(), good.signer)
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC, signed=forged)))
    assert code == REFUSED_SIGNATURE and "does not verify with the key of trusted partner 'test_partner'" in reason


def test_a_coordinator_that_alters_the_signed_spec_or_the_instruction_is_refused(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    # A spec edited after signing: the signature no longer verifies.
    good = sign(SPEC)
    edited = json.loads(good.spec_json)
    edited["privacy"]["noise_multiplier"] = 0.3
    tampered = SignedSpec(json.dumps(edited, sort_keys=True, separators=(",", ":")), good.signature, good.signer)
    code, _ = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC, signed=tampered)))
    assert code == REFUSED_SIGNATURE
    # The signed spec intact, but an instruction that spends more than it says.
    instruction = instruction_for(SPEC, plan_privacy(SPEC))
    greedy = type(instruction)(**(instruction.__dict__ | {"noise_multiplier": 0.6}))
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC, instruction=greedy)))
    assert code == REFUSED_SIGNATURE
    assert "noise_multiplier is 0.6, the signed spec says privacy.noise_multiplier = 1.0" in reason


def test_a_target_epsilon_spec_cannot_be_given_less_noise_than_its_target_needs(home: NodeHome) -> None:
    spec = example_spec(federation={"rounds": 2}, privacy={"noise_multiplier": None, "target_epsilon": 2.0})
    governance.approve(home, spec.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    honest = instruction_for(spec, plan_privacy(spec))
    assert not _ask(home, signed_message(MessageType.QUERY, spec, instruction=honest)).has_error()
    greedy = type(honest)(**(honest.__dict__ | {"noise_multiplier": honest.noise_multiplier * 0.8}))
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, spec, instruction=greedy)))
    assert code == REFUSED_SIGNATURE and "over the signed target_epsilon 2" in reason


# ---------------------------------------------------------------- limits (privacy.limits)


def test_hostile_counts_are_refused_at_the_node_in_little_memory(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _ask(home, signed_message(MessageType.QUERY, SPEC)).has_error()  # warm: imports are not the request's
    with PrivacyLedger.open(home.ledger_path) as ledger:
        warm = ledger.charges("htn_cohort")  # the warm query's release of the noisy training size
    message = signed_message(MessageType.QUERY, SPEC)
    config = message.content["config"]
    hostile = json.loads(config["medfed.instruction"]) | {"rounds": 10**9, "local_epochs": 10**6, "steps": 10**9, "sample_rate": 1e-9}
    config["medfed.instruction"] = json.dumps(hostile)
    reply, peak = peak_memory(lambda: _ask(home, message))
    code, reason = _refusal(reply)
    assert code == REFUSED_BAD_INSTRUCTION
    assert "rounds must be an integer in 1..1000; found 1000000000" in reason
    assert "sample_rate must be in [0.001, 1]; found 1e-09" in reason
    assert peak < 16 * MIB
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.charges("htn_cohort") == warm


def test_a_noise_whose_epsilon_is_beyond_the_limit_is_refused_before_a_tight_accountant_runs(home: NodeHome) -> None:
    # Full-batch steps (q = 1) with a target: the coordinator picks the noise, the node bounds it.
    spec = example_spec(federation={"rounds": 2}, privacy={"sample_rate": 1.0, "noise_multiplier": None, "target_epsilon": 2.0})
    governance.approve(home, spec.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    honest = instruction_for(spec, plan_privacy(spec))
    greedy = type(honest)(**(honest.__dict__ | {"noise_multiplier": 0.5}))
    reply, peak = peak_memory(lambda: _ask(home, signed_message(MessageType.QUERY, spec, instruction=greedy)))
    code, reason = _refusal(reply)
    assert code == REFUSED_BAD_INSTRUCTION
    assert re.fullmatch(
        r"the experiment would cost epsilon \d+(\.\d+)? \(RDP bound at its delta\), over the limit of 12 for any "
        r"experiment; the partner raises the noise or lowers the rounds",
        reason,
    ), reason
    assert peak < 64 * MIB


def test_a_request_recorded_beyond_the_limits_is_listed_but_not_costed(home: NodeHome) -> None:
    # Written before the limits existed: the officer sees it; nothing composes it.
    _ask(home, signed_message(MessageType.QUERY, SPEC))
    [entry] = [e for e in home.audit_log().entries() if e.kind == "request"]
    hostile = dict(entry.payload) | {"spec_digest": "ab" * 32, "rounds": 10**9, "sample_rate": 1e-9}
    home.audit_log().append("request", hostile)
    pending, peak = peak_memory(lambda: governance.pending_requests(home))
    [old] = [p for p in pending if p.request.spec_digest == "ab" * 32]
    assert math.isnan(old.cost) and old.projected is None
    assert peak < 64 * MIB


def test_a_spec_at_the_limits_is_admitted_in_bounded_memory(home: NodeHome) -> None:
    # The most steps (one epoch of 1000 at the smallest sample rate), the least noise, the smallest delta.
    spec = example_spec(federation={"rounds": 1}, privacy={"sample_rate": 0.001, "noise_multiplier": 0.5, "delta": 1e-10})
    governance.approve(home, spec.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    message = signed_message(MessageType.QUERY, spec)
    reply, peak = peak_memory(lambda: _ask(home, message))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert peak < 128 * MIB


# ---------------------------------------------------------------- policy and budget


def _policy(home: NodeHome, **changes: object) -> None:
    from dataclasses import replace

    home.policy_path.write_text(replace(NodePolicy(), **changes).render())


def test_policy_refusals_name_the_rule(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    _policy(home, allowed_tasks=("imaging-classification",))
    assert _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC))) == (
        REFUSED_POLICY, "this node's policy does not allow task tabular-classification"
    )
    _policy(home, require_secure_aggregation=True)
    assert _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))[1] == (
        "this node's policy requires secure aggregation; the spec does not use it"
    )
    _policy(home, max_epsilon_per_experiment=0.5)
    assert "over this node's policy limit per experiment of 0.5" in _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))[1]
    _policy(home, min_cohort_size=100_000)
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))
    assert (code, reason) == (REFUSED_POLICY, "dataset 'htn_cohort' has fewer patients than the minimum cohort of 100000")


def test_a_node_that_requires_secure_aggregation_accepts_a_spec_that_uses_it(home: NodeHome) -> None:
    _policy(home, require_secure_aggregation=True)
    secure = example_spec(federation={"rounds": 2, "secure_aggregation": True, "min_nodes": 3})
    governance.approve(home, secure.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    reply = _ask(home, signed_message(MessageType.QUERY, secure))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert read_metrics(reply.content, QUERY_METRICS)["num-examples"] > 0


def test_a_spec_may_tighten_the_policy_but_not_loosen_it(home: NodeHome) -> None:
    _policy(home, min_cohort_size=10)
    stricter = example_spec(federation={"rounds": 2}, privacy={"min_cohort_size": 100_000})
    governance.approve(home, stricter.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    # The spec's floor is judged on the released (noisy, charged) size, never the exact count.
    reason = _refusal(_ask(home, signed_message(MessageType.QUERY, stricter)))[1]
    assert "released training-set size is below the spec's privacy.min_cohort_size of 100000" in reason
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert [(c.round, c.event.mechanism) for c in ledger.charges("htn_cohort")] == [(0, "discrete-laplace")]
    _policy(home, min_cohort_size=100_000)
    looser = example_spec(federation={"rounds": 2}, privacy={"min_cohort_size": 1})
    governance.approve(home, looser.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert "minimum cohort of 100000" in _refusal(_ask(home, signed_message(MessageType.QUERY, looser)))[1]


def test_a_bad_policy_file_is_reported_by_field(home: NodeHome) -> None:
    home.policy_path.write_text('[policy]\nmin_cohort_size = 0\nallowed_tasks = ["x"]\ncolour = 1\n')
    with pytest.raises(Exception, match=r"(?s)policy.colour is not a policy setting.*allowed_tasks must be a list.*min_cohort_size must be an integer >= 1"):
        home.policy()


def test_a_dataset_without_a_budget_is_refused(tmp_path: Path, home: NodeHome) -> None:
    path = tmp_path / "other.csv"
    generate_cohort(1, n_hospitals=3, seed=7).to_csv(path, index=False)
    home.register_dataset(DatasetEntry(name="other", path=path, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES))
    spec = example_spec(data={"dataset": "other"})
    governance.approve(home, spec.digest(), dataset="other", by=OFFICER, not_yet_requested=True)
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, spec)))
    assert code == REFUSED_BUDGET and "has no lifetime privacy budget on this node" in reason


def _one_round(spec: ExperimentSpec = SPEC) -> float:
    plan = plan_privacy(spec)
    return epsilon([DPEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], delta=1e-5, accountant="pld")


def _as_run(run_id: int) -> None:
    """Messages built from here on belong to Flower run `run_id` (and so to that submission)."""
    TaskIdentity.run_id = run_id


def test_a_run_beyond_the_budget_is_refused_before_reading_and_reserves_nothing(home: NodeHome) -> None:
    governance.set_budget(home, "htn_cohort", epsilon_=_one_round() * 1.05, delta=1e-5, by=OFFICER)
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    _hide_the_data(home)
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))
    assert code == REFUSED_BUDGET
    assert re.fullmatch(
        r"dataset 'htn_cohort' would reach epsilon \d\.\d{3} at delta 1e-05, over its lifetime budget of \d\.\d+ "
        r"\(0\.000 spent or reserved\); the run is refused",
        reason,
    ), reason
    # A coordinator that skips the query and trains anyway: the whole run (2 rounds) does not fit.
    assert _refusal(_train(home, SPEC, 1))[0] == REFUSED_BUDGET
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.charges("htn_cohort") == [] and ledger.run_reservations() == []


def test_of_two_concurrent_runs_on_a_budget_that_fits_one_the_second_is_refused_at_its_query(home: NodeHome) -> None:
    governance.set_budget(home, "htn_cohort", epsilon_=epsilon([DPEvent(1.0, 0.05, 40)], delta=1e-5, accountant="pld") * 1.2, delta=1e-5, by=OFFICER)
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, runs=2, not_yet_requested=True)
    first, second = sign(SPEC, fresh=True), sign(SPEC, fresh=True)
    _as_run(31)
    assert not _ask(home, signed_message(MessageType.QUERY, SPEC, signed=first)).has_error()
    _as_run(32)
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC, signed=second)))
    assert code == REFUSED_BUDGET and "spent or reserved" in reason
    assert _refusal(_train(home, SPEC, 1, signed=second))[0] == REFUSED_BUDGET  # nothing trains for it either
    # The first run trains both its rounds: its budget was held from its query on.
    _as_run(31)
    assert not _train(home, SPEC, 1, signed=first).has_error()
    assert not _train(home, SPEC, 2, signed=first).has_error()
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert [(c.run_id, c.round, c.submission) for c in ledger.charges("htn_cohort")] == [
            ("31", 0, first.submission_id), ("31", 1, first.submission_id), ("31", 2, first.submission_id)
        ]  # round 0: the noisy training size, released with the query
        assert [r.submission for r in ledger.run_reservations()] == [first.submission_id]


def test_a_run_that_ends_early_gives_back_what_it_did_not_use(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _train(home, SPEC, 1).has_error()  # round 2 never comes: the coordinator ends the run
    [before] = governance.budget_status(home)
    assert before.reserved > 0 and before.open_reservations == 1
    reply = _ask(home, signed_message(MessageType.EVALUATE, SPEC, arrays=ArrayRecord(build_tabular_model("logistic", len(FEATURES)).state_dict())), "evaluate")
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    [after] = governance.budget_status(home)
    assert (after.open_reservations, after.reserved, after.held) == (0, 0.0, after.spent)
    # The evaluation released its charged histogram; the unused round went back.
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert [(c.round, c.release, c.event.mechanism) for c in ledger.charges("htn_cohort")] == [
            (0, 1, "discrete-laplace"), (1, 0, "poisson-gaussian"), (0, 2, "discrete-laplace")
        ]
        assert after.spent == pytest.approx(ledger.spent("htn_cohort", delta=1e-5)) and after.spent > before.spent - before.reserved
    [status] = after.reservations
    assert (status.state, status.reservation.charged, status.reservation.rounds, status.expires_at) == ("released", 1, 2, None)
    # The submission is closed: a late round 2 is refused as a replay.
    code, reason = _refusal(_train(home, SPEC, 2))
    assert code == REFUSED_REPLAY and "its run ended; a replay trains nowhere" in reason


def test_the_rounds_of_a_submission_are_capped(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _train(home, SPEC, 1).has_error()
    assert not _train(home, SPEC, 2).has_error()
    code, reason = _refusal(_train(home, SPEC, 1))  # round 1 again, though the run has used both its rounds
    assert code == REFUSED_BUDGET and "has been charged all 2 round(s) it reserved" in reason
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert [c.round for c in ledger.charges("htn_cohort")] == [0, 1, 2]


def test_an_admitted_run_keeps_its_reservation_when_the_budget_is_lowered(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, runs=2, not_yet_requested=True)
    assert not _train(home, SPEC, 1).has_error()
    governance.set_budget(home, "htn_cohort", epsilon_=_one_round() * 1.05, delta=1e-5, by=OFFICER)
    assert not _train(home, SPEC, 2).has_error()  # held since admission; the officer stops a run by revoking it
    _as_run(32)
    assert _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC, signed=sign(SPEC, fresh=True))))[0] == REFUSED_BUDGET


def test_a_failure_during_training_charges_nothing_and_keeps_the_reservation(home: NodeHome, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.training

    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(models.training, "train_dp", broken)
    with pytest.raises(RuntimeError):
        _train(home, SPEC, 1)
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.charges("htn_cohort") == []
        [held] = ledger.run_reservations()
        assert (held.submission, held.rounds, held.charged, held.released_at) == (sign(SPEC).submission_id, 2, 0, None)
    monkeypatch.undo()
    assert not _train(home, SPEC, 1).has_error()  # the retry takes its round from the same reservation


def test_a_reservation_whose_run_vanished_shows_in_the_budget_until_it_expires(home: NodeHome) -> None:
    plan = plan_privacy(SPEC)
    event = DPEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    hold = home.policy().reservation_hold
    now = datetime.now(UTC)
    for submission, at in (("9", now - timedelta(hours=1)), ("8", now - hold - timedelta(minutes=1))):
        with PrivacyLedger.open(home.ledger_path, clock=lambda at=at: at) as ledger:
            ledger.reserve_run("htn_cohort", submission=submission, event=event, rounds=2, budget=Budget(50.0, 1e-5), hold=hold)
    [row] = governance.budget_status(home)
    assert (row.charges, row.open_reservations, row.spent) == (0, 1, 0.0)
    # Only the live one counts; the one whose run went quiet a day ago is listed, and no longer held.
    assert row.held == pytest.approx(epsilon([event.times(2)], delta=1e-5, accountant="pld"), rel=1e-9)
    assert row.remaining == pytest.approx(50.0 - row.held)
    assert [(s.reservation.submission, s.state) for s in row.reservations] == [("9", "live"), ("8", "expired")]
    assert row.reservations[0].expires_at == row.reservations[0].reservation.active_at + hold
    shown = _cli("budget", "--home", str(home.path))
    assert shown.exit_code == 0, shown.output
    assert "htn_cohort: 1 live run reservation(s) hold ε" in shown.output
    assert "htn_cohort  submission 9  live: 0 of 2 round(s) charged, expires " in shown.output
    assert "htn_cohort  submission 8  expired: 0 of 2 round(s) charged, expired " in shown.output


# ---------------------------------------------------------------- tampering


def test_a_tampered_audit_log_stops_all_work(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    lines = home.audit_log_path.read_text().splitlines()
    edited = json.loads(lines[-1])
    edited["payload"]["max_epsilon"] = 1000.0
    home.audit_log_path.write_text("\n".join([*lines[:-1], json.dumps(edited, sort_keys=True, separators=(",", ":"))]) + "\n")
    code, reason = _refusal(_ask(home, signed_message(MessageType.QUERY, SPEC)))
    assert code == REFUSED_INTEGRITY
    assert reason.startswith("the node's audit log failed verification (1 problem(s))")
    with pytest.raises(GovernanceError, match="audit log failed verification"):
        governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)


def test_a_charge_deleted_from_the_ledger_stops_all_work(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _train(home, SPEC, 1).has_error()
    conn = sqlite3.connect(home.ledger_path)
    conn.execute("DROP TRIGGER charges_are_never_deleted")
    conn.execute("DELETE FROM charges")
    conn.commit()
    conn.close()
    code, reason = _refusal(_train(home, SPEC, 2))
    assert code == REFUSED_INTEGRITY
    # Both the round and the once-per-run training size it released are missing.
    assert "lacks 2 charge(s) its audit log records (first: seq" in reason and "once-per-run release num-examples" in reason


# ---------------------------------------------------------------- the checkpoint each message checks from


def _checkpoint(home: NodeHome) -> dict:  # type: ignore[type-arg]
    header, attachment = home.audit_log().checkpoint_path.read_text().splitlines()[:2]
    return {**json.loads(header), "attachment": json.loads(attachment)}


def test_each_message_checks_the_log_from_a_checkpoint_that_moves_forward(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not home.audit_log().checkpoint_path.exists()
    before = len(home.audit_log().entries())
    assert not _ask(home, signed_message(MessageType.QUERY, SPEC)).has_error()  # no checkpoint yet: the full check writes one
    first = _checkpoint(home)
    assert first["count"] == before  # what the query's admission verified, before it recorded anything
    assert not _train(home, SPEC, 1).has_error()
    second = _checkpoint(home)
    assert second["count"] > first["count"]
    # What the next message will verify: the entries the round wrote after its admission, nothing before.
    tail = home.audit_log().verify_tail(home.audit_log()._signing_key.public_key())  # type: ignore[union-attr]
    assert tail.ok and [e.kind for e in tail.entries] == ["release"]
    # The checkpoint carries the governance state the message decides by, and the ledger's composition.
    assert governance.GovernanceState.from_snapshot(second["attachment"]["governance"]).status(SPEC.digest(), "htn_cohort") == "approved"



def test_the_state_a_message_decides_by_is_the_state_the_whole_log_replays_to(home: NodeHome) -> None:
    other = example_spec(federation={"rounds": 3})
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    _ask(home, signed_message(MessageType.QUERY, other))  # a request, pending
    governance.deny(home, other.digest(), dataset="htn_cohort", by=OFFICER, reason="too many rounds")
    assert not _train(home, SPEC, 1).has_error()
    assert not _train(home, SPEC, 2).has_error()
    from_checkpoint = governance.checked_state(home)
    replayed = governance.GovernanceState.from_entries(home.audit_log().entries())
    for name in ("budgets", "requests", "decisions", "history", "submissions"):
        assert getattr(from_checkpoint, name) == getattr(replayed, name), name
    assert len(replayed.submissions) == 1 and len(replayed.history) == 2


def test_an_edit_before_the_checkpoint_is_caught_by_the_full_check_which_then_stops_all_work(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _ask(home, signed_message(MessageType.QUERY, SPEC)).has_error()
    lines = home.audit_log_path.read_bytes().split(b"\n")
    budget = next(i for i, line in enumerate(lines) if b'"kind":"budget"' in line)
    lines[budget] = lines[budget].replace(b'"epsilon":50.0', b'"epsilon":90.0')  # the same length, its hash kept
    home.audit_log_path.write_bytes(b"\n".join(lines))
    # The per-message check does not read entries before the checkpoint (documented); its
    # decisions come from the checkpoint's signed state, so the edit changes nothing it decides.
    assert not _train(home, SPEC, 1).has_error()
    with pytest.raises(governance.Refusal, match=re.escape("the node's audit log failed verification (1 problem(s))")):
        governance.full_check(home)  # at node start, or `medfed node audit verify`
    assert not home.audit_log().checkpoint_path.exists()
    code, reason = _refusal(_train(home, SPEC, 2))
    assert code == REFUSED_INTEGRITY and "failed verification" in reason


def test_a_forged_checkpoint_stops_all_work(home: NodeHome) -> None:
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _ask(home, signed_message(MessageType.QUERY, SPEC)).has_error()
    header, attachment, signature = home.audit_log().checkpoint_path.read_text().splitlines()
    edited = json.loads(attachment)
    edited["governance"]["budgets"][0][1] = 1000.0  # a larger budget, as if the officer had set one
    attachment = json.dumps(edited, sort_keys=True, separators=(",", ":"))
    home.audit_log().checkpoint_path.write_text("\n".join([header, attachment, signature]) + "\n")
    code, reason = _refusal(_train(home, SPEC, 1))
    assert code == REFUSED_INTEGRITY
    assert reason.startswith("the node's audit log failed verification (1 problem(s))")


def test_charges_deleted_with_their_running_composition_stop_all_work(home: NodeHome) -> None:
    spec = example_spec(federation={"rounds": 3})
    governance.approve(home, spec.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _train(home, spec, 1).has_error()
    assert not _train(home, spec, 2).has_error()  # its admission recorded round 1's charges in the checkpoint
    conn = sqlite3.connect(home.ledger_path)
    with conn:
        conn.execute("DROP TRIGGER charges_are_never_deleted")
        conn.execute("DROP TRIGGER charge_groups_only_grow")
        (steps,) = conn.execute("SELECT steps FROM charges WHERE round = 1").fetchone()
        conn.execute("DELETE FROM charges WHERE round = 1")
        conn.execute(
            "UPDATE charge_groups SET steps = steps - ?, charges = charges - 1 WHERE mechanism = 'poisson-gaussian'", (steps,)
        )
    conn.close()
    code, reason = _refusal(_train(home, spec, 3))
    assert code == REFUSED_INTEGRITY
    assert "the node's privacy ledger's running composition disagrees with its charges" in reason
    assert "the checkpoint recorded and the charges since add up to 40 step(s) of 2 charge(s), the running composition holds 20" in reason


# ---------------------------------------------------------------- the officer's commands


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def test_the_officer_reviews_approves_and_reads_the_budget_from_the_command_line(home: NodeHome, tmp_path: Path) -> None:
    _ask(home, signed_message(MessageType.QUERY, SPEC))
    shown = _cli("requests", "--home", str(home.path))
    assert shown.exit_code == 0, shown.output
    assert SPEC.digest()[:16] in shown.output and PARTNER in shown.output
    approved = _cli("approve", SPEC.digest()[:12], "--dataset", "htn_cohort", "--max-epsilon", "9", "--expires", "2099-01-01", "--home", str(home.path), "--by", "j.doe")
    assert approved.exit_code == 0, approved.output
    assert f"approved spec {SPEC.digest()[:16]} on dataset 'htn_cohort' (1 run, capped at ε 9, until 2099-01-01)" in approved.output
    assert not _train(home, SPEC, 1).has_error()
    budget = _cli("budget", "--home", str(home.path))
    assert budget.exit_code == 0, budget.output
    [row] = governance.budget_status(home)
    assert "htn_cohort" in budget.output and f"{row.spent:.3f}" in budget.output and f"{row.remaining:.3f}" in budget.output
    changed = _cli("budget", "set", "htn_cohort", "--epsilon", "8", "--delta", "1e-6", "--home", str(home.path))
    assert changed.exit_code == 0 and "lifetime budget ε 8 at δ 1e-06" in changed.output
    assert governance.governance_state(home).budgets["htn_cohort"].delta == 1e-6
    bad = _cli("approve", "0123456789", "--dataset", "htn_cohort", "--home", str(home.path))
    assert isinstance(bad.exception, GovernanceError)
    bad_date = _cli("approve", SPEC.digest(), "--dataset", "htn_cohort", "--expires", "next week", "--home", str(home.path))
    assert isinstance(bad_date.exception, GovernanceError) and "is not a date" in str(bad_date.exception)


def test_the_evidence_pack_holds_decisions_charges_releases_and_a_plot(home: NodeHome, tmp_path: Path) -> None:
    _ask(home, signed_message(MessageType.QUERY, SPEC))
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    assert not _train(home, SPEC, 1).has_error()
    assert not _train(home, SPEC, 2).has_error()
    out = tmp_path / "pack"
    made = _cli("report", "--out", str(out), "--home", str(home.path))
    assert made.exit_code == 0, made.output
    assert sorted(p.name for p in out.iterdir()) == ["audit_verification.txt", "epsilon.png", "evidence.json", "report.html"]
    assert (out / "epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["audit"]["ok"] is True
    assert [d["kind"] for d in evidence["decisions"]] == ["request", "approval"]
    assert [(c["run"], c["round"]) for c in evidence["charges"]] == [("31", 0), ("31", 1), ("31", 2)]  # 0: the noisy size
    assert len(evidence["releases"]) == 2
    curve = [v for _, v in evidence["cumulative_epsilon"]["htn_cohort"]]
    assert len(curve) == 3 and 0 < curve[0] < curve[1] < curve[2] <= 50.0  # the noisy size, then two rounds
    assert "OK: " in (out / "audit_verification.txt").read_text()
    assert "What left the site" in (out / "report.html").read_text()
    again = _cli("report", "--out", str(out), "--home", str(home.path))
    assert isinstance(again.exception, GovernanceError) and "is not an empty folder" in str(again.exception)
    other = _cli("report", "--out", str(tmp_path / "one"), "--spec", SPEC.digest()[:12], "--home", str(home.path))
    assert other.exit_code == 0, other.output
    assert json.loads((tmp_path / "one" / "evidence.json").read_text())["scope"] == f"experiment {SPEC.digest()}"


def test_partners_are_added_listed_and_removed_with_an_audit_entry(home: NodeHome, tmp_path: Path) -> None:
    from privacy.keys import generate_keypair

    pair = generate_keypair(tmp_path / "keys", "acme")
    added = _cli("partners", "add", "acme", str(pair.public_key_path), "--home", str(home.path))
    assert added.exit_code == 0 and pair.fingerprint in added.output
    listed = _cli("partners", "list", "--home", str(home.path))
    assert "acme" in listed.output and PARTNER in listed.output
    removed = _cli("partners", "remove", "acme", "--home", str(home.path))
    assert removed.exit_code == 0
    keys = [e.payload for e in home.audit_log().entries() if e.kind == "key"]
    assert [(k["action"], k["partner"]) for k in keys] == [("trust", "acme"), ("distrust", "acme")]


def test_deny_and_revoke_from_the_command_line_find_the_dataset_from_the_request(home: NodeHome) -> None:
    _ask(home, signed_message(MessageType.QUERY, SPEC))
    denied = _cli("deny", SPEC.digest()[:10], "--reason", "not in our remit", "--home", str(home.path))
    assert denied.exit_code == 0 and f"denied spec {SPEC.digest()[:16]} on dataset 'htn_cohort'" in denied.output
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    revoked = _cli("revoke", SPEC.digest()[:10], "--reason", "consent withdrawn", "--home", str(home.path))
    assert revoked.exit_code == 0, revoked.output
    state = governance.governance_state(home)
    assert [d.status for d in state.history] == ["denied", "approved", "revoked"]


@pytest.mark.parametrize("kind", ["query", "evaluate"])
def test_query_and_evaluate_are_admitted_without_importing_torch(home: NodeHome, kind: str) -> None:
    # Each message is a fresh ClientApp process: Opacus and torch would add ~3 s to it.
    import subprocess
    import sys

    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True)
    script = (
        "import sys\n"
        "from clients.hospital_node.governance import admit\n"
        "from clients.hospital_node.home import NodeHome\n"
        "from federation.protocol import SignedSpec, TrainInstruction\n"
        f"instruction = TrainInstruction.from_json(sys.argv[1])\n"
        f"signed = SignedSpec(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[7])\n"
        f"admission = admit(NodeHome.open(sys.argv[5]), instruction, signed, run_id='1', kind=sys.argv[6])\n"
        "print(admission.budget is None, 'opacus' in sys.modules, 'torch' in sys.modules)\n"
    )
    signed = sign(SPEC, fresh=True)
    instruction = instruction_for(SPEC, plan_privacy(SPEC))
    if kind == "evaluate":  # only a submission the node admitted to train has anything to evaluate
        governance.admit(home, instruction, signed, run_id="1", kind="query")
    done = subprocess.run(
        [sys.executable, "-c", script, instruction.to_json(), signed.spec_json, signed.signature, signed.signer, str(home.path), kind,
         signed.submission],
        capture_output=True, text=True, timeout=120, check=False,
    )
    # Both are admitted with the dataset's budget (an evaluation releases a charged histogram).
    assert done.stdout.split() == ["False", "False", "False"], done.stderr
