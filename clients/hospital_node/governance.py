"""The node decides: is this run signed, approved, within policy and within budget?

Every message of a run passes :func:`admit` before any patient row is read. It trusts
nothing the coordinator says about legitimacy; it reads only the node's own state:

1. the audit log verifies against the node key, and every release it records is charged
   in the ledger (otherwise the ledger or the log was tampered with). Per message this
   is :func:`checked_state`, whose cost does not grow with the node's history: it checks
   the log from its signed checkpoint on (:meth:`privacy.audit.AuditLog.verify_tail`),
   reads the governance state the checkpoint carries instead of replaying the log,
   checks the releases recorded since against the ledger, and checks that the ledger's
   running composition is exactly the checkpoint's plus the charges recorded since; then
   moves the checkpoint to the end it verified. The full verification
   (:func:`full_check`: every entry, every release against the ledger, the running
   composition recomputed from every charge) runs when the node starts, in ``medfed
   node audit verify``, and for any message that finds no checkpoint; a full check that
   fails removes the checkpoint, so every later message runs it too and is refused;
2. the run carries a submission of its spec signed by a partner the officer trusts
   (:class:`privacy.governance.Submission`: spec digest, submission id, signing time),
   and the instruction is exactly what that spec says;
3. the node policy allows the task, and secure aggregation if the policy requires it;
4. the officer approved this spec digest for this dataset, and the approval has not
   expired or been revoked (an unseen spec is recorded as a pending request);
5. the submission may spend the approval: a submission this node admitted before is the
   same run continuing (after a coordinator restart, say); a new one must be fresh
   (signed within the policy's ``max_submission_age_hours``) and the approval must have
   a run left (``approve --runs``, 1 by default). A replayed submission is therefore never
   a new run, and the node records which submission spent the approval;
6. the experiment's own epsilon fits the approval's cap, the policy's per-experiment cap
   and the spec's own target; the dataset's lifetime budget can afford every round of
   the run this node trains, which the ledger then reserves for it
   (:meth:`PrivacyLedger.reserve_run`), once per submission: of two runs that the budget
   cannot both afford, the second is refused here, before it trains. The rounds of a
   submission are capped at the spec's, continuations included.

Node sampling: a spec with ``federation.fraction_per_round`` = f < 1 trains each node in
exactly ``k = ceil(f x rounds)`` rounds (:func:`privacy.limits.rounds_per_node`), which the
coordinator draws before the run and sends each node in its query
(:data:`federation.protocol.SCHEDULE_KEY`). Admission checks the node's schedule against
the signed spec (k distinct rounds within 1..rounds: a coordinator cannot give a node
more rounds than the signed spec allows), costs and reserves those k rounds only (no
budget is held for rounds the node is not sampled in, and the whole share is still held
up front, so no epsilon goes to a run that cannot finish), and records the schedule in
the submission's audit entry; every later message of the submission is held to that
recorded schedule, and a train message for another round is refused before anything is
read or charged (:mod:`clients.hospital_node.rounds`). Sampling nodes gives no
amplification: the node knows it was picked, so its patients' epsilon is that of its k
rounds.

A statistics study takes the same path (:func:`admit_study`): its query is parsed by the
node from the signed spec, step 2 checks that it reads only the dataset's registered
research columns and no more cells than the policy's ``max_cells``, and step 6 reserves
one round of one event per release of the query (its whole cost) before any row is read;
its answer charges them all, and a submission is answered once.

The final evaluate message (the run completed) is admitted like a round, since it
releases the run's charged validation-score histogram; once it is answered, or refused,
the run ends (:func:`end_run`). A release message (the run ended early) ends it at once.
An ended run gives back what it reserved and did not use; the node takes no further
message of it, so a replayed finished submission trains and evaluates nowhere.

Every epsilon the node computes is the ledger's (dp-accounting's PLD): the experiment's
own at the spec's delta (also against the spec's ``target_epsilon``, which the
coordinator meets by the same accountant), the dataset's at its budget's delta.

A refusal is a :class:`Refusal` with a protocol code and a one-line reason for the
researcher. The officer's side (budgets, approvals, denials, revocations) writes the
same audit log, through the functions at the end of this module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from clients.hospital_node.errors import GovernanceError, NodeError
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.policy import NodePolicy
from federation.protocol import (
    AWAITING_APPROVAL,
    IMAGING_TASK,
    REFUSED_APPROVAL,
    REFUSED_BAD_INSTRUCTION,
    REFUSED_BUDGET,
    REFUSED_DATASET,
    REFUSED_INTEGRITY,
    REFUSED_POLICY,
    REFUSED_REPLAY,
    REFUSED_SIGNATURE,
    STATISTICS_ACTION,
    STATISTICS_TASK,
    SCHEDULE_KEY,
    ProtocolError,
    SignedSpec,
    TrainInstruction,
    is_statistics_spec,
    schedule_problems,
    spec_fraction,
    spec_mismatches,
)
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon, epsilon_bound
from privacy.audit import AuditEntry, AuditLog
from privacy.errors import AccountingError, BudgetExhaustedError, KeyFileError, LedgerError, SignatureError
from privacy.events import DPEvent, TrainingReleases, count_event, training_releases
from privacy.governance import (
    APPROVED,
    DENIED,
    EXPIRED,
    Decision,
    PENDING,
    REVOKED,
    GovernanceState,
    Request,
    SpecSignature,
    Submission,
    SubmissionUse,
    spec_digest,
    verify_submission,
)
from privacy.keys import load_public_key
from privacy.limits import (
    DEFAULT_COUNT_EPSILON,
    DEFAULT_EVALUATION_EPSILON,
    MAX_COUNT_EPSILON,
    MAX_EPSILON,
    MAX_EVALUATION_EPSILON,
    fraction_problem,
    rounds_per_node,
)
from privacy.limits import schedule_problems as limit_problems
from privacy.ledger import LIVE, RELEASED, USED_UP, Budget, PrivacyLedger, RunReservation

__all__ = [
    "Admission",
    "CHECKPOINT_VERSION",
    "DatasetBudget",
    "PendingRequest",
    "Refusal",
    "ReservationStatus",
    "admit",
    "admit_study",
    "approve",
    "audited_policy",
    "budget_status",
    "checked_state",
    "decision_dataset",
    "deny",
    "foreseen_refusals",
    "full_check",
    "governance_state",
    "ledger_disagreement",
    "parse_expiry",
    "pending_requests",
    "revoke",
    "set_budget",
    "set_policy",
    "study_column_problems",
]

if TYPE_CHECKING:  # the query module is imported by the statistics handler, which parses it
    from privacy.query import StatisticsQuery

logger = logging.getLogger(__name__)

# The spec's own target may be met to this relative slack (the coordinator's search for
# the noise and the node's check compose the same events with the same accountant).
_TARGET_SLACK = 1e-6


class Refusal(Exception):
    """The node refuses a message: a protocol refusal code and a one-line reason."""

    def __init__(self, code: int, reason: str, *, record: bool = True) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.record = record  # False when the refusal must not (or cannot) go to the audit log


@dataclass(frozen=True)
class Admission:
    """What an admitted message may do: the dataset's budget, the run's own cap and its reservation."""

    signer: str
    spec_digest: str
    policy: NodePolicy
    submission: Submission
    # None for a release message, which releases nothing and is admitted on its signature alone.
    budget: Budget | None = None
    run_cap: Budget | None = None
    cost: float | None = None  # this experiment's own epsilon on the dataset, all its rounds, at the spec's delta
    reservation: RunReservation | None = None  # the run's rounds, held in the ledger
    schedule: tuple[int, ...] = ()  # the rounds this node trains (every round without sampling); () for a release


def _round_event(instruction: TrainInstruction) -> DPEvent:
    return DPEvent(instruction.noise_multiplier, instruction.sample_rate, instruction.steps)


def training_releases_of(instruction: TrainInstruction, spec: Mapping[str, Any]) -> TrainingReleases:
    """What a training run releases on this node, by the instruction and the signed `spec`'s privacy options.

    The node reads the options from the signed spec itself (never from the coordinator's
    config) and checks them as the spec's validation does: a value out of range is refused.
    """
    privacy = spec.get("privacy", {})
    options = {}
    for key, default, limit in (
        ("count_epsilon", DEFAULT_COUNT_EPSILON, MAX_COUNT_EPSILON),
        ("evaluation_epsilon", DEFAULT_EVALUATION_EPSILON, MAX_EVALUATION_EPSILON),
    ):
        value = privacy.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limit:
            raise Refusal(REFUSED_BAD_INSTRUCTION, f"privacy.{key} must be a number in (0, {limit:g}]; found {value!r}")
        options[key] = float(value)
    every_round = privacy.get("evaluate_every_round", False)
    if not isinstance(every_round, bool):
        raise Refusal(REFUSED_BAD_INSTRUCTION, f"privacy.evaluate_every_round must be true or false; found {every_round!r}")
    return training_releases(_round_event(instruction), evaluate_every_round=every_round, **options)


def _experiment_event(instruction: TrainInstruction, rounds: int) -> DPEvent:
    """Every round the node trains (`rounds`) as one event, refused if its epsilon is beyond any node's limit.

    The RDP bound costs the same at any step count and never reads tighter than PLD or
    PRV, so a hostile noise multiplier is refused here before a tight accountant would
    build a grid the size of its epsilon.
    """
    event = _round_event(instruction).times(rounds)
    bound = epsilon_bound([event], delta=instruction.delta)
    if bound > MAX_EPSILON:
        raise Refusal(
            REFUSED_BAD_INSTRUCTION,
            f"the experiment would cost epsilon {bound:.4g} (RDP bound at its delta), over the limit of "
            f"{MAX_EPSILON:g} for any experiment; the partner raises the noise or lowers the rounds",
        )
    return event


def verified_entries(home: NodeHome) -> tuple[AuditEntry, ...]:
    """The audit log's entries, once it has verified against the node key.

    Raises
    ------
    Refusal
        REFUSED_INTEGRITY: the log, its head or the key fails verification.
    """
    log = home.audit_log()
    if not log.path.exists():
        return ()
    try:
        public_key = load_public_key(home.audit_public_key_path)
    except KeyFileError as err:
        raise Refusal(REFUSED_INTEGRITY, f"the node's audit key cannot be read ({err})", record=False) from None
    verification = log.verify(public_key)
    if not verification.ok:
        log.drop_checkpoint()  # no message is admitted on the strength of an older checkpoint
        raise _integrity(len(verification.problems))
    return verification.entries


#: What a node signs into its audit checkpoint besides the position: the layout's version.
CHECKPOINT_VERSION = 1


def _integrity(problems: int) -> Refusal:
    return Refusal(
        REFUSED_INTEGRITY,
        f"the node's audit log failed verification ({problems} problem(s)); "
        "the node refuses all work until its officer runs `medfed node audit verify`",
        record=False,
    )


def _audit_key(home: NodeHome) -> Any:
    try:
        return load_public_key(home.audit_public_key_path)
    except KeyFileError as err:
        raise Refusal(REFUSED_INTEGRITY, f"the node's audit key cannot be read ({err})", record=False) from None


def _ledger_refusal(missing: Sequence[str]) -> Refusal:
    return Refusal(
        REFUSED_INTEGRITY,
        f"the node's privacy ledger lacks {len(missing)} charge(s) its audit log records "
        f"(first: {missing[0]}); the node refuses all work until its officer restores the ledger",
        record=False,
    )


def _composition_refusal(problems: Sequence[str]) -> Refusal:
    return Refusal(
        REFUSED_INTEGRITY,
        f"the node's privacy ledger's running composition disagrees with its charges ({len(problems)} problem(s); "
        f"first: {problems[0]}); the node refuses all work until its officer restores the ledger",
        record=False,
    )


def ledger_floor(ledger: PrivacyLedger) -> dict[str, Any]:
    """The ledger's running composition as plain JSON, with the newest charge it counts: what a checkpoint records."""
    last, groups = ledger.composition_state()
    return {
        "last_charge": last,
        "groups": [[g.dataset, g.event.mechanism, g.event.noise_multiplier, g.event.sample_rate, g.event.steps, g.charges] for g in groups],
    }


def floor_problems(ledger: PrivacyLedger, floor: Mapping[str, Any]) -> list[str]:
    """Where the ledger's running composition is not `floor` (a checkpoint's) plus the charges recorded since.

    Charges only add to the running composition, and each adds its own steps: so the
    composition now must be exactly the checkpoint's with every later charge added.
    Anything else means charges or their composition were removed, edited or added
    around the ledger's rules. Costs one read of the composition and of the charges
    since the checkpoint.
    """
    try:
        last = int(floor["last_charge"])
        expected: dict[tuple[str, str, float, float], list[int]] = {
            (str(d), str(m), float(sigma), float(q)): [int(steps), int(count)] for d, m, sigma, q, steps, count in floor["groups"]
        }
    except (KeyError, TypeError, ValueError) as err:
        return [f"the checkpoint's ledger record is unreadable ({err!r})"]
    groups, since = ledger.composition_since(last)
    for _, charge in since:
        e = charge.event
        held = expected.setdefault((charge.dataset, e.mechanism, e.noise_multiplier, e.sample_rate), [0, 0])
        held[0] += e.steps
        held[1] += 1
    now = {(g.dataset, g.event.mechanism, g.event.noise_multiplier, g.event.sample_rate): [g.event.steps, g.charges] for g in groups}
    problems = []
    for key in sorted(set(expected) | set(now), key=repr):
        if expected.get(key) != now.get(key):
            dataset, mechanism, sigma, _ = key
            want, have = expected.get(key, [0, 0]), now.get(key, [0, 0])
            problems.append(
                f"dataset '{dataset}', {mechanism} noise {sigma!r}: the checkpoint recorded and the charges since add up "
                f"to {want[0]} step(s) of {want[1]} charge(s), the running composition holds {have[0]} step(s) of {have[1]}"
            )
    return problems


def _attachment(state: GovernanceState, ledger: PrivacyLedger) -> dict[str, Any]:
    return {"version": CHECKPOINT_VERSION, "governance": state.to_snapshot(), "ledger": ledger_floor(ledger)}


def full_check(home: NodeHome) -> tuple[AuditEntry, ...]:
    """The node's whole state verified, and a checkpoint recorded at its end; returns every entry.

    The audit log in full (:meth:`~privacy.audit.AuditLog.verify`), every release it
    records against the ledger (:func:`check_ledger`), and the ledger's running
    composition recomputed from every charge. On success the checkpoint moves to the
    verified end, carrying the governance state and the ledger's composition; on any
    failure the checkpoint is removed (so no message is admitted on the strength of an
    older one) and the refusal raised. Run at node start, by ``medfed node audit verify``
    and by a message that finds no checkpoint.

    Raises
    ------
    Refusal
        REFUSED_INTEGRITY, with what failed.
    """
    log = home.audit_log()
    public_key = _audit_key(home)
    verification = log.verify(public_key)
    if not verification.ok:
        log.drop_checkpoint()
        raise _integrity(len(verification.problems))
    entries = verification.entries
    with PrivacyLedger.open(home.ledger_path) as ledger:
        missing = check_ledger(entries, ledger)
        composition = ledger.composition_problems()
        if missing or composition:
            log.drop_checkpoint()
            raise _ledger_refusal(missing) if missing else _composition_refusal(composition)
        if verification.position is not None:
            try:
                attachment = _attachment(GovernanceState.from_entries(entries), ledger)
            except (KeyError, TypeError, ValueError) as err:  # an entry the node's governance cannot read
                logger.warning("no audit checkpoint recorded: the governance state cannot be read from the log (%r)", err)
            else:
                log.advance_checkpoint(verification.position, attachment)
    return entries


def checked_state(home: NodeHome) -> GovernanceState:
    """Step 1 for one message: the node's state checked from its checkpoint on, and its governance state.

    What it catches and what only :func:`full_check` catches is written in
    :meth:`privacy.audit.AuditLog.verify_tail` (the log) and here (the ledger): every
    release recorded after the checkpoint must be charged; the running composition must
    be exactly the checkpoint's plus the charges recorded since (so charges deleted
    together with their composition, before or after the checkpoint, a composition
    edited, or a charge written around its trigger are refused); and the newest charge
    must be counted in it. A charge row deleted from before the checkpoint while the
    composition is left alone changes no epsilon (every epsilon is composed from the
    running composition) and is found by the full check, which recomputes the
    composition from every charge.

    Raises
    ------
    Refusal
        REFUSED_INTEGRITY, with what failed.
    """
    log = home.audit_log()
    public_key = _audit_key(home)
    tail = log.verify_tail(public_key)
    if tail.missing:
        return GovernanceState.from_entries(full_check(home))
    if not tail.ok or tail.checkpoint is None:
        raise _integrity(len(tail.problems))
    attachment = tail.checkpoint.attachment
    try:
        if attachment.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"layout {attachment.get('version')!r}")
        state = GovernanceState.from_snapshot(attachment["governance"])
        floor = attachment["ledger"]
    except (KeyError, ValueError) as err:
        raise Refusal(
            REFUSED_INTEGRITY, f"the node's audit checkpoint holds no state this node reads ({err}); run `medfed node audit verify`",
            record=False,
        ) from None
    state.extend(tail.entries)
    with PrivacyLedger.open(home.ledger_path) as ledger:
        missing = check_ledger(tail.entries, ledger)
        if missing:
            raise _ledger_refusal(missing)
        composition = floor_problems(ledger, floor)
        lag = ledger.composition_lag()
        if composition or lag:
            raise _composition_refusal([*composition, *([lag] if lag else [])])
        if tail.entries:
            assert tail.position is not None
            log.advance_checkpoint(tail.position, _attachment(state, ledger))
    return state


def check_ledger(entries: Sequence[AuditEntry], ledger: PrivacyLedger) -> list[str]:
    """Releases the audit log records that the ledger does not hold as charges: tampering.

    A training round's release is its charges (the DP-SGD update, and the incoming
    model's score histogram when the spec evaluates every round); a statistics answer's
    is one charge per release of its query, with the events its record lists; a
    once-per-run release a reply records as charged then (the training-set size, the
    final evaluation) is a charge at round 0 of its run. The other way round is
    legitimate: a node that crashed after charging and before recording the release has
    a charge without a release record (spend never hidden).
    """
    found: dict[tuple[str, str, int], list[DPEvent]] = {}

    def charged(key: tuple[str, str, int]) -> list[DPEvent]:
        # One index look-up per round the entries name: the cost follows the entries, not the ledger.
        if key not in found:
            found[key] = [c.event for c in ledger.round_charges(*key)]
        return found[key]

    missing = []
    for entry in entries:
        message = entry.payload.get("message")
        if entry.kind != "release":
            continue
        payload = entry.payload
        key = (str(payload.get("dataset")), str(payload.get("run")), int(payload.get("round", -1)))
        releases = payload.get("dp_releases") or {}
        once = (key[0], key[1], 0)
        for name, release in sorted(releases.items()):
            if isinstance(release, Mapping) and release.get("charged") == "now":
                wanted = (release.get("mechanism"), release.get("scale"), 1.0, 1)
                if wanted not in [(e.mechanism, e.noise_multiplier, e.sample_rate, e.steps) for e in charged(once)]:
                    missing.append(f"seq {entry.seq}: run {key[1]} once-per-run release {name} on dataset '{key[0]}'")
        if message not in ("train", STATISTICS_ACTION):
            continue
        charge = payload.get("charge", {})
        if message == "train":
            recorded = [(charge.get("noise_multiplier"), charge.get("sample_rate"), charge.get("steps"))]
            scores = releases.get("eval-scores")
            if isinstance(scores, Mapping):  # evaluated every round: the round's second release
                recorded.append((scores.get("scale"), 1.0, 1))
            held = [(e.noise_multiplier, e.sample_rate, e.steps) for e in charged(key)]
        else:
            recorded = [tuple(e.get(k) for k in _EVENT_KEYS) for e in charge.get("events", [])]
            held = [tuple(_event_mapping(e)[k] for k in _EVENT_KEYS) for e in charged(key)]
        if not held or held != recorded:
            missing.append(f"seq {entry.seq}: run {key[1]} round {key[2]} on dataset '{key[0]}'")
    return missing


_EVENT_KEYS = ("mechanism", "noise_multiplier", "sample_rate", "steps")


def ledger_disagreement(home: NodeHome, entries: Sequence[AuditEntry]) -> list[str]:
    """:func:`check_ledger` against the node's own ledger: the disagreement admission refuses
    all work on, which no officer view may hide either. Empty when they agree."""
    with PrivacyLedger.open(home.ledger_path) as ledger:
        return check_ledger(entries, ledger)


def governance_state(home: NodeHome) -> GovernanceState:
    """The node's budgets, requests and decisions, from its verified audit log."""
    return GovernanceState.from_entries(verified_entries(home))


@dataclass(frozen=True)
class _Ask:
    """What a run asks of a dataset, whatever its spec's kind: what admission checks and reserves.

    An experiment asks ``rounds`` rounds of one DP-SGD event; a statistics study one
    round of one event per release of its query.
    """

    dataset: str
    task: str
    events: tuple[DPEvent, ...]  # what one round releases
    rounds: int
    delta: float  # the spec's
    secure: bool
    target: float | None  # the spec's target_epsilon, if it has one
    cost: Callable[[], float]  # the run's own epsilon, every round and once-per-run release, at `delta` (the ledger's accountant)
    request: Callable[[str, str, float, str], dict[str, Any]]  # (signer, fingerprint, cost, run id): the officer's request
    once: tuple[DPEvent, ...] = ()  # what the run releases once, whatever its rounds (a training run's noisy size)
    target_cost: Callable[[], float] | None = None  # what a target_epsilon is met by (DP-SGD alone), if not `cost`
    # An experiment's: the spec's rounds and fraction_per_round (`rounds` is the share this
    # node trains), and the schedule the message carries (None: none).
    spec_rounds: int | None = None
    fraction: float = 1.0
    schedule: tuple[int, ...] | None = None


def _verify(home: NodeHome, signed: SignedSpec) -> tuple[Any, Submission, str, GovernanceState]:
    """Steps 1 and 2: the node's own state verifies, and the submission is signed by a trusted partner.

    Returns the partner, the verified submission, the spec's digest and the node's governance state.
    """
    state = checked_state(home)
    try:
        partner, submission = verify_submission(
            signed.spec_json, signed.submission, SpecSignature(signed.signature, signed.signer), home.trusted_partners()
        )
    except SignatureError as err:
        raise Refusal(REFUSED_SIGNATURE, str(err)) from None
    if partner.rehearsal and not home.rehearsal:
        raise Refusal(
            REFUSED_SIGNATURE,
            f"the submission is signed with partner {partner.name!r}'s rehearsal key; a real node never accepts "
            "a rehearsal key (its officer removes it with `medfed node partners remove`)",
        )
    return partner, submission, spec_digest(signed.spec_json), state


def admit(
    home: NodeHome,
    instruction: TrainInstruction,
    signed: SignedSpec,
    *,
    run_id: str,
    kind: str,
    schedule: tuple[int, ...] | None = None,
) -> Admission:
    """Decide whether this node takes part in `kind` ("query", "train", "evaluate", "release") of the run.

    `schedule` is the node's scheduled rounds as the message carries them (None: it
    carries none); see "Node sampling" in the module docstring.

    Query, train and evaluate are checked against every cap and the budget, and hold the
    run's reservation for the signed submission (reserved by the first of them, found by
    the others); an evaluate that is refused ends the run (the handler ends it after its
    answer); release (the run ended early) is checked only against the signature, and
    gives back what the run did not use.

    Raises
    ------
    Refusal
        With the code and the reason; a pending request is recorded on the way.
    """
    partner, submission, digest, state = _verify(home, signed)
    # 2. the instruction is the signed spec
    if digest != instruction.spec_digest:
        raise Refusal(REFUSED_SIGNATURE, "the instruction names another spec than the one that was signed")
    spec = signed.mapping()
    if is_statistics_spec(spec):
        raise Refusal(REFUSED_BAD_INSTRUCTION, "the signed spec is a statistics study, not an experiment; it trains nowhere")
    mismatches = spec_mismatches(instruction, spec)
    if mismatches:
        raise Refusal(REFUSED_SIGNATURE, "the instruction is not what the signed spec says: " + "; ".join(mismatches))
    target = spec.get("privacy", {}).get("target_epsilon")
    releases = training_releases_of(instruction, spec)
    fraction = spec_fraction(spec)
    problem = fraction_problem(fraction)
    if problem is not None:
        raise Refusal(REFUSED_BAD_INSTRUCTION, f"the signed spec's {problem}")
    k = rounds_per_node(instruction.rounds, float(fraction))  # type: ignore[arg-type]  # checked above
    ask = _Ask(
        dataset=instruction.dataset,
        task=instruction.task,
        events=releases.per_round,
        rounds=k,
        delta=instruction.delta,
        secure=bool(spec.get("federation", {}).get("secure_aggregation", False)),
        target=None if target is None else float(target),
        cost=lambda: epsilon(
            [_experiment_event(instruction, k), *releases.composed(k)[1:]],
            delta=instruction.delta,
            accountant=LEDGER_ACCOUNTANT,
        ),
        request=lambda signer, fingerprint, cost, run: _request(instruction, spec, releases, signer, fingerprint, cost, run, k),
        once=releases.once,
        target_cost=lambda: epsilon([_experiment_event(instruction, k)], delta=instruction.delta, accountant=LEDGER_ACCOUNTANT),
        spec_rounds=instruction.rounds,
        fraction=float(fraction),  # type: ignore[arg-type]
        schedule=schedule,
    )
    return _admit(home, ask, signed, partner, submission, digest, spec, run_id=run_id, kind=kind, state=state)


def admit_study(home: NodeHome, signed: SignedSpec, query: StatisticsQuery, *, run_id: str, kind: str) -> Admission:
    """Decide whether this node takes part in `kind` ("query", "statistics", "release") of a statistics study.

    The same path as :func:`admit`: the node's state verifies, the submission is signed
    by a trusted partner, and `query`, which the caller parsed from that signed spec
    itself, asks only for columns registered for research on a tabular dataset and no
    more cells than the policy's ``max_cells``; then the policy's task kinds, the
    officer's approval of this digest on this dataset, the replay rules and the caps, and
    the whole query (one event per release) is reserved in the ledger. A submission
    whose answer left already is refused as a replay: a study is answered once.

    Raises
    ------
    Refusal
        With the code and the reason; a pending request is recorded on the way.
    """
    partner, submission, digest, state = _verify(home, signed)
    spec = signed.mapping()
    if not is_statistics_spec(spec):
        raise Refusal(REFUSED_BAD_INSTRUCTION, "the signed spec is an experiment, not a statistics study")
    home.dataset(query.dataset)  # an unregistered dataset is refused, not requested
    if kind != "release":
        _check_study(home, query)
        if kind == "statistics":
            with PrivacyLedger.open(home.ledger_path) as ledger:
                run_state = _run_state(ledger, query.dataset, submission.submission_id, home.policy())
            if run_state in (RELEASED, USED_UP):
                raise Refusal(
                    REFUSED_REPLAY,
                    f"submission {submission.submission_id[:12]} has been answered (or ended) on this node; a study "
                    "is answered once (submit the spec again for a new answer)",
                )
    events = tuple(query.events())
    ask = _Ask(
        dataset=query.dataset,
        task=STATISTICS_TASK,
        events=events,
        rounds=1,
        delta=query.delta,
        secure=query.secure_aggregation,  # the signed spec's; the node then answers only through SecAgg+
        target=None,
        cost=lambda: epsilon(events, delta=query.delta, accountant=LEDGER_ACCOUNTANT),
        request=lambda signer, fingerprint, cost, run: _study_request(query, spec, digest, signer, fingerprint, cost, run),
    )
    return _admit(home, ask, signed, partner, submission, digest, spec, run_id=run_id, kind=kind, state=state)


def _check_study(home: NodeHome, query: StatisticsQuery) -> None:
    """What a query may ask of this node's dataset, checked against its registration and policy: no row is read."""
    entry = home.dataset(query.dataset)
    wanted = "omop" if query.cohort is not None else "tabular"
    if entry.kind != wanted:
        what = "a study with data.cohort needs an OMOP source" if query.cohort is not None else "a statistics study needs a tabular dataset"
        raise Refusal(REFUSED_DATASET, f"dataset '{query.dataset}' is of kind '{entry.kind}'; {what}")
    if query.cohort is not None:
        from clients.hospital_node.cohort_connector import study_cohort

        study_cohort(query)  # the cohort's columns are the task's covariates and label, checked here
    else:
        for problem in study_column_problems(entry, query):
            raise Refusal(REFUSED_DATASET, problem)
    policy = home.policy()
    if query.n_cells > policy.max_cells:
        raise Refusal(
            REFUSED_POLICY,
            f"the query's group-by has {query.n_cells} cells; this node's policy allows at most {policy.max_cells} (max_cells)",
        )


def study_column_problems(entry: DatasetEntry, query: StatisticsQuery) -> list[str]:
    """The query's columns that are not registered for research on `entry`.

    A study reads only the columns the hospital registered for research: the dataset's
    features and its label, never its patient id or site column.
    """
    registered = {*entry.feature_columns, entry.label_column}
    return [
        f"column '{name}' is not registered for research on dataset '{query.dataset}' on this node "
        "(a study may read the dataset's registered features and label)"
        for name in query.column_names
        if name not in registered
    ]


def _admit(  # noqa: PLR0913
    home: NodeHome,
    ask: _Ask,
    signed: SignedSpec,
    partner: Any,
    submission: Submission,
    digest: str,
    spec: dict[str, Any],
    *,
    run_id: str,
    kind: str,
    state: GovernanceState,
) -> Admission:
    """Steps 3 to 6 of admission (see the module docstring), for an experiment's or a study's ask."""
    home.dataset(ask.dataset)  # an unregistered dataset is refused, not requested
    if kind in ("evaluate", "release"):
        # The run completed, or ended early (signed, and the instruction is the spec).
        # Its final evaluation is answered once: a run's end is not a metric oracle.
        with PrivacyLedger.open(home.ledger_path) as ledger:
            run_state = _run_state(ledger, ask.dataset, submission.submission_id, home.policy())
            if kind == "evaluate" and run_state in (RELEASED, USED_UP):
                raise Refusal(
                    REFUSED_REPLAY,
                    f"the run of submission {submission.submission_id[:12]} has ended on this node; its final "
                    "evaluation is answered once",
                )
            if kind == "release":  # the rounds it did not use go back to the dataset
                ledger.release_run(ask.dataset, submission=submission.submission_id)
                return Admission(partner.name, digest, home.policy(), submission)
        # An evaluation is admitted like a round (it releases a charged histogram); refused,
        # it still ends the run: what the run did not use goes back to the dataset.
        try:
            return _admit_steps(home, ask, signed, partner, submission, digest, spec, run_id=run_id, kind=kind, state=state)
        except Refusal:
            end_run(home, ask.dataset, submission.submission_id)
            raise
    return _admit_steps(home, ask, signed, partner, submission, digest, spec, run_id=run_id, kind=kind, state=state)


def end_run(home: NodeHome, dataset: str, submission_id: str) -> None:
    """Close the submission's run on `dataset`: what it reserved and did not use goes back to the dataset."""
    with PrivacyLedger.open(home.ledger_path) as ledger:
        ledger.release_run(dataset, submission=submission_id)


def _admit_steps(  # noqa: PLR0913
    home: NodeHome,
    ask: _Ask,
    signed: SignedSpec,
    partner: Any,
    submission: Submission,
    digest: str,
    spec: dict[str, Any],
    *,
    run_id: str,
    kind: str,
    state: GovernanceState,
) -> Admission:
    """Steps 3 to 6 for a message that may release: policy, decision, submission, caps and budget."""

    # 3. policy
    policy = home.policy()
    if ask.task not in policy.allowed_tasks:
        raise Refusal(REFUSED_POLICY, f"this node's policy does not allow task {ask.task}")
    if policy.require_secure_aggregation and not ask.secure:
        what = "the study does not use it (federation.secure_aggregation)" if ask.task == STATISTICS_TASK else "the spec does not use it"
        raise Refusal(REFUSED_POLICY, f"this node's policy requires secure aggregation; {what}")

    # 4. the officer's decision
    status = state.status(digest, ask.dataset, datetime.now(UTC))
    if status == PENDING:
        if state.requests.get((digest, ask.dataset)) is None:
            # A target_epsilon spec leaves the noise to the coordinator, which could ask with
            # more noise than it will train with: the officer sees at least the signed target.
            shown_cost = max(ask.cost(), ask.target) if ask.target is not None else ask.cost()
            home.audit_log().append("request", ask.request(partner.name, signed.signer, shown_cost, run_id))
            logger.info("recorded a request for spec %s on dataset '%s' by %s", digest[:12], ask.dataset, partner.name)
        raise Refusal(
            AWAITING_APPROVAL,
            f"awaiting approval by this node's data-governance officer (spec {digest[:12]}, dataset '{ask.dataset}')",
            record=False,
        )
    decision = state.decision(digest, ask.dataset)
    assert decision is not None  # not PENDING
    if status == DENIED:
        raise Refusal(REFUSED_APPROVAL, f"denied by this node's officer: {decision.reason}")
    if status == REVOKED:
        raise Refusal(REFUSED_APPROVAL, f"approval revoked by this node's officer: {decision.reason}")
    if status == EXPIRED:
        assert decision.expires is not None
        raise Refusal(REFUSED_APPROVAL, f"the officer's approval expired at {decision.expires.isoformat()}")
    if decision.rehearsal and not home.rehearsal:
        raise Refusal(
            REFUSED_APPROVAL,
            f"the approval of spec {digest[:12]} on dataset '{ask.dataset}' is a rehearsal approval; a real node "
            "needs its officer's own approval",
        )

    # 5. the submission may spend the approval (or continues one that did)
    spent_by = state.submission(submission.submission_id, ask.dataset)
    if spent_by is None:
        _check_new_submission(state, decision, submission, kind, policy, ask.dataset)
    schedule = _schedule(ask, submission, spent_by)

    # 6. caps and budget
    cost = ask.cost()
    if ask.target is not None:
        # Judged, like the coordinator's search for the noise, by the ledger's accountant,
        # on the DP-SGD rounds the target sets the noise of (the count release is on top).
        trained = (ask.target_cost or ask.cost)()
        if trained > ask.target * (1 + _TARGET_SLACK):
            raise Refusal(
                REFUSED_SIGNATURE, f"the instruction would cost epsilon {trained:.3f}, over the signed target_epsilon {ask.target:g}"
            )
    caps = [(policy.max_epsilon_per_experiment, REFUSED_POLICY, "this node's policy limit per experiment")]
    if decision.max_epsilon is not None:
        caps.append((decision.max_epsilon, REFUSED_APPROVAL, "the officer's approval cap"))
    what_runs = "study" if ask.task == STATISTICS_TASK else "experiment"
    for cap, code, what in caps:
        if cost > cap:
            raise Refusal(code, f"the {what_runs} would cost epsilon {cost:.3f} on dataset '{ask.dataset}', over {what} of {cap:g}")
    setting = state.budgets.get(ask.dataset)
    if setting is None:
        raise Refusal(
            REFUSED_BUDGET,
            f"dataset '{ask.dataset}' has no lifetime privacy budget on this node; "
            "its officer sets one with `medfed node budget set`",
        )
    budget = Budget(setting.epsilon, setting.delta)
    # The node's own caps, in the ledger's epsilon. The signed target was checked above by
    # the spec's accountant; the reservation's fixed number of rounds keeps the run to it.
    cap = Budget(min(cap for cap, _, _ in caps), ask.delta)
    reservation = _reserve(home, ask, submission, budget, cap, policy, kind)
    if spent_by is None:
        home.audit_log().append(
            "submission",
            {
                "submission_id": submission.submission_id,
                "spec_digest": digest,
                "dataset": ask.dataset,
                "signer": partner.name,
                "signed_at": submission.signed_at.isoformat(),
                "run": run_id,
                # Node sampling: the rounds this node trains, all reserved now (and no other).
                **({"schedule": list(schedule), "rounds_reserved": ask.rounds} if ask.rounds != ask.spec_rounds and ask.spec_rounds else {}),
            },
        )
        logger.info("submission %s spends a run of the approval of spec %s", submission.submission_id[:12], digest[:12])
    return Admission(partner.name, digest, policy, submission, budget, cap, cost, reservation, schedule)


def _schedule(ask: _Ask, submission: Submission, spent_by: SubmissionUse | None) -> tuple[int, ...]:
    """The rounds this node trains in the submission: checked against the signed spec and the node's record.

    A schedule in the message must be ``ceil(f x rounds)`` distinct rounds of the signed
    spec and, once the submission was admitted, the one recorded then. Without one, the
    recorded schedule holds; a first admission without one is every round, which only a
    spec without sampling allows. Refused before anything is reserved or charged.
    """
    if ask.spec_rounds is None:  # a statistics study: one round, no sampling
        return ()
    every = tuple(range(1, ask.spec_rounds + 1))
    recorded = None if spent_by is None else (spent_by.schedule or every)
    if ask.schedule is not None:
        problems = schedule_problems(ask.schedule, rounds=ask.spec_rounds, fraction=ask.fraction)
        if problems:
            raise Refusal(
                REFUSED_BAD_INSTRUCTION,
                "the schedule this message gives the node does not fit the signed spec: " + "; ".join(problems)
                + "; nothing was reserved or charged",
            )
        given = tuple(sorted(ask.schedule))
        if recorded is not None and given != recorded:
            raise Refusal(
                REFUSED_BAD_INSTRUCTION,
                f"the schedule this message gives the node (rounds {_rounds_text(given)}) is not the one it recorded when it "
                f"admitted submission {submission.submission_id[:12]} (rounds {_rounds_text(recorded)}); nothing was charged",
            )
        return given
    if recorded is not None:
        return recorded
    if ask.rounds == ask.spec_rounds:
        return every
    raise Refusal(
        REFUSED_BAD_INSTRUCTION,
        f"the signed spec samples nodes (federation.fraction_per_round {ask.fraction:g}: {ask.rounds} of "
        f"{ask.spec_rounds} rounds per node), so the run's first message to a node must carry its scheduled rounds "
        f"('{SCHEDULE_KEY}'); this one carries none, and nothing was reserved or charged",
    )


def _rounds_text(rounds: Sequence[int]) -> str:
    return ", ".join(map(str, rounds))


def _reserve(
    home: NodeHome, ask: _Ask, submission: Submission, budget: Budget, cap: Budget, policy: NodePolicy, kind: str
) -> RunReservation:
    """The submission's reservation: made now, or the one it holds (renewed if it expired).

    A submission whose run ended at this node is refused as a replay. One whose rounds
    were all charged may still be asked whether it takes part (a continuation whose
    coordinator stopped before the final evaluation), but trains no further round.
    """
    with PrivacyLedger.open(home.ledger_path) as ledger:
        state = _run_state(ledger, ask.dataset, submission.submission_id, policy)
        if state is not None:
            if state == RELEASED:
                raise Refusal(
                    REFUSED_REPLAY,
                    f"submission {submission.submission_id[:12]} already ran on this node and its run ended; "
                    "a replay trains nowhere (submit the spec again for a new run)",
                )
            if state == USED_UP and kind == "query":
                held = ledger.run_reservation(ask.dataset, submission.submission_id)
                assert held is not None  # its state was just read
                return held
        try:
            reservation = ledger.reserve_run(
                ask.dataset,
                submission=submission.submission_id,
                events=ask.events,
                once=ask.once,
                rounds=ask.rounds,
                budget=budget,
                hold=policy.reservation_hold,
                run_cap=cap,
            )
        except (BudgetExhaustedError, LedgerError) as err:
            raise Refusal(REFUSED_BUDGET, str(err)) from None
    if kind == "train" and reservation.remaining < 1:  # every round charged; the final evaluation may be held still
        raise Refusal(
            REFUSED_BUDGET,
            f"submission '{submission.submission_id}' on dataset '{ask.dataset}' has been charged all "
            f"{reservation.rounds} round(s) it reserved; another round is refused (the rounds of a submission are "
            "capped, continuations included)",
        )
    return reservation


def _run_state(ledger: PrivacyLedger, dataset: str, submission_id: str, policy: NodePolicy) -> str | None:
    """The state of the submission's run reservation on `dataset` (live, expired, released, used up), or None."""
    reservation = ledger.run_reservation(dataset, submission_id)
    return None if reservation is None else reservation.state(hold=policy.reservation_hold, now=ledger.now())


def _check_new_submission(
    state: GovernanceState, decision: Decision, submission: Submission, kind: str, policy: NodePolicy, dataset: str
) -> None:
    """A submission this node has not admitted yet must be fresh, and the approval must have a run left."""
    if kind == "evaluate":
        raise Refusal(REFUSED_REPLAY, f"submission {submission.submission_id[:12]} never trained on this node; nothing to evaluate")
    problem = submission.age_problem(datetime.now(UTC), timedelta(hours=policy.max_submission_age_hours))
    if problem is not None:
        raise Refusal(REFUSED_REPLAY, problem)
    spent = state.spent_runs(submission.spec_digest, dataset)
    if len(spent) >= decision.runs:
        used = ", ".join(use.submission_id[:12] for use in spent)
        raise Refusal(
            REFUSED_REPLAY,
            f"the officer's approval of spec {submission.spec_digest[:12]} on dataset '{dataset}' allows "
            f"{decision.runs} run(s), spent by submission(s) {used}; ask the officer to approve it again",
        )


def _request(
    instruction: TrainInstruction,
    spec: dict[str, Any],
    releases: TrainingReleases,
    signer: str,
    fingerprint: str,
    cost: float,
    run_id: str,
    rounds_per_node: int | None = None,
) -> dict[str, Any]:
    sampled = rounds_per_node is not None and rounds_per_node != instruction.rounds
    return {
        "spec_digest": instruction.spec_digest,
        "dataset": instruction.dataset,
        "experiment": instruction.experiment,
        "description": str(spec.get("experiment", {}).get("description", "")),
        "signer": signer,
        "signer_fingerprint": fingerprint,
        "task": instruction.task,
        "model": instruction.model_kind,
        "rounds": instruction.rounds,
        "delta": instruction.delta,
        "noise_multiplier": instruction.noise_multiplier,
        "sample_rate": instruction.sample_rate,
        "steps_per_round": instruction.steps,
        # Besides the rounds: the once-per-run noisy training-set size and validation-score
        # histogram, and the histogram every round if the spec asks.
        "count_epsilon": 1.0 / releases.once[0].noise_multiplier,
        "evaluation_epsilon": 1.0 / releases.once[1].noise_multiplier,
        "evaluate_every_round": len(releases.per_round) > 1,
        "requested_epsilon": spec.get("privacy", {}).get("target_epsilon"),
        "cost_epsilon": cost,
        "first_run": run_id,
        "spec": spec,
        # Node sampling: the node trains, and is charged for, this many of the rounds.
        **({"rounds_per_node": rounds_per_node} if sampled else {}),
    }


def _study_request(
    query: StatisticsQuery, spec: dict[str, Any], digest: str, signer: str, fingerprint: str, cost: float, run_id: str
) -> dict[str, Any]:
    """A study's request for the officer: who asks, what it releases, each release's noise, and its cost."""
    study = spec.get("study", {}) if isinstance(spec.get("study"), dict) else {}
    return {
        "spec_digest": digest,
        "dataset": query.dataset,
        "experiment": str(study.get("name", "")),
        "description": str(study.get("description", "")),
        "signer": signer,
        "signer_fingerprint": fingerprint,
        "task": STATISTICS_TASK,
        "model": "",
        "rounds": 1,
        "delta": query.delta,
        "cells": query.n_cells,
        "secure_aggregation": query.secure_aggregation,
        "releases": [
            {"statistic": r.statistic, "name": r.name, "mechanism": r.mechanism, "scale": r.scale, "epsilon": r.epsilon}
            for r in query.releases()
        ],
        "events": [_event_mapping(event) for event in query.events()],
        "requested_epsilon": query.epsilon,
        "cost_epsilon": cost,
        "first_run": run_id,
        "spec": spec,
    }


def _event_mapping(event: DPEvent) -> dict[str, Any]:
    """A DP event as the audit log records it (and :func:`_event_of` reads it back)."""
    return {
        "mechanism": event.mechanism,
        "noise_multiplier": event.noise_multiplier,
        "sample_rate": event.sample_rate,
        "steps": event.steps,
    }


# ---------------------------------------------------------------- the officer's side


def _officer_log(home: NodeHome) -> tuple[AuditLog, GovernanceState]:
    """The log to append a decision to, and the state it holds; refuses a log that fails verification."""
    try:
        entries = verified_entries(home)
    except Refusal as err:
        raise GovernanceError(err.reason) from None
    return home.audit_log(), GovernanceState.from_entries(entries)


def _known_dataset(home: NodeHome, dataset: str) -> None:
    home.dataset(dataset)  # DatasetNotFoundError names the registered ones


def set_budget(home: NodeHome, dataset: str, *, epsilon_: float, delta: float, by: str) -> Budget:
    """Set `dataset`'s lifetime budget (it may be raised or lowered; both are audited)."""
    _known_dataset(home, dataset)
    try:
        budget = Budget(epsilon_, delta)
    except ValueError as err:
        raise GovernanceError(str(err)) from None
    log, _ = _officer_log(home)
    log.append("budget", {"dataset": dataset, "epsilon": budget.epsilon, "delta": budget.delta, "by": by})
    return budget


def set_policy(home: NodeHome, changes: Mapping[str, Any], *, by: str) -> tuple[NodePolicy, dict[str, Any]]:
    """Change the node policy: validated by field, audited as a ``policy`` entry, then written (0600, whole).

    Starts from the file's settings as written, so that a hand-broken file can be put
    right field by field. The audit entry comes first: a failed write leaves an audited
    intent that ``medfed node policy show`` reports as not in force, never an unaudited
    change. Returns the new policy and what changed (``{field: {"from", "to"}}``).

    Raises
    ------
    NodeHomeError
        An invalid value or unknown setting (every problem, by field), or an unwritable file.
    GovernanceError
        Nothing would change, or the audit log fails verification.
    """
    before = {**NodePolicy().to_mapping(), **NodePolicy.settings_in(home.policy_path)}
    updated = NodePolicy.from_mapping({"policy": {**before, **changes}}, source="the policy change")
    after = updated.to_mapping()
    changed = {key: {"from": before[key], "to": after[key]} for key in after if before[key] != after[key]}
    if not changed and home.policy_path.exists():
        raise GovernanceError(f"the node policy already says that; nothing changed ({home.policy_path})")
    log, _ = _officer_log(home)
    log.append("policy", {"changes": changed, "policy": after, "by": by})
    updated.write(home.policy_path)
    return updated, changed


def audited_policy(home: NodeHome) -> tuple[AuditEntry | None, bool]:
    """The last ``policy`` entry of the verified audit log (None if the policy was never set
    through it), and whether ``policy.toml`` still says what that entry recorded."""
    entries = [e for e in verified_entries(home) if e.kind == "policy"]
    if not entries:
        return None, False
    last = entries[-1]
    try:
        in_force = home.policy().to_mapping() == last.payload.get("policy")
    except NodeError:
        in_force = False
    return last, in_force


def approve(
    home: NodeHome,
    spec_hash: str,
    *,
    dataset: str,
    by: str,
    max_epsilon: float | None = None,
    expires: datetime | None = None,
    runs: int = 1,
    not_yet_requested: bool = False,
    rehearsal: bool = False,
) -> str:
    """Approve a spec digest (a recorded request's prefix, or a full digest) for `dataset`; returns the digest.

    The approval allows `runs` submissions of the spec; each that starts training spends one.
    A full digest that no request or earlier decision on `dataset` names is refused unless
    `not_yet_requested` says the officer means it: a mistyped or foreign hash must not
    become an approval. Approving an approved spec again allows its `runs` afresh.
    `rehearsal` marks a rehearsal's approval (``medfed simulate``): only a rehearsal
    home may record one, and only a rehearsal home's admission counts it.
    """
    _known_dataset(home, dataset)
    log, state = _officer_log(home)
    digest = _resolve(state, spec_hash)
    known = (digest, dataset) in state.requests or state.decision(digest, dataset) is not None
    if not known and not not_yet_requested:
        raise GovernanceError(
            f"nobody has requested spec {digest} on dataset '{dataset}' on this node; check the hash with the "
            "research partner, and pass --not-yet-requested to approve it before its request arrives"
        )
    if state.status(digest, dataset) == REVOKED:
        raise GovernanceError(
            f"the approval of spec {digest[:12]} on dataset '{dataset}' was revoked; a revocation is final "
            "(the partner submits a changed spec, which is a new request)"
        )
    if max_epsilon is not None and not max_epsilon > 0:
        raise GovernanceError(f"--max-epsilon must be > 0; found {max_epsilon}")
    if expires is not None and expires <= datetime.now(UTC):
        raise GovernanceError(f"--expires {expires.isoformat()} is in the past; give a future date")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise GovernanceError(f"--runs must be an integer >= 1; found {runs!r}")
    if rehearsal and not home.rehearsal:
        raise GovernanceError(f"node {home.name} is a real node: it records no rehearsal approval")
    payload: dict[str, Any] = {
        "spec_digest": digest,
        "dataset": dataset,
        "max_epsilon": max_epsilon,
        "expires": None if expires is None else expires.isoformat(),
        "runs": runs,
        "by": by,
    }
    if rehearsal:
        payload["rehearsal"] = True
    log.append("approval", payload)
    return digest


def parse_expiry(text: str | None) -> datetime | None:
    """An approval's expiry as the officer types it (``YYYY-MM-DD`` or an ISO date-time; UTC unless it says).

    The CLI's ``--expires`` and the console's expiry field read it here, so both record the same instant.
    """
    if text is None or not text.strip():
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise GovernanceError(f"--expires {text!r} is not a date; use YYYY-MM-DD or an ISO date-time") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def decision_dataset(home: NodeHome, spec_hash: str, dataset: str | None) -> str:
    """The dataset a denial or revocation of `spec_hash` concerns: `dataset` if given, else the only one it names.

    Raises
    ------
    GovernanceError
        The hash matches no spec or several, or the spec concerns several datasets.
    """
    if dataset is not None and dataset.strip():
        return dataset.strip()
    _, state = _officer_log(home)
    digest = _resolve(state, spec_hash)
    datasets = sorted({d for (h, d) in set(state.requests) | set(state.decisions) if h == digest})
    if len(datasets) != 1:
        raise GovernanceError(f"spec {digest[:16]} concerns datasets {', '.join(datasets)}; name one with --dataset")
    return datasets[0]


def deny(home: NodeHome, spec_hash: str, *, dataset: str, reason: str, by: str) -> str:
    """Deny a spec digest on `dataset`, with a reason the researcher will see."""
    return _decide(home, "denial", spec_hash, dataset=dataset, reason=reason, by=by)


def revoke(home: NodeHome, spec_hash: str, *, dataset: str, reason: str, by: str) -> str:
    """Revoke an approval: later messages of that spec on `dataset` are refused."""
    _known_dataset(home, dataset)
    _, state = _officer_log(home)
    digest = _resolve(state, spec_hash)
    if state.status(digest, dataset) not in (APPROVED, EXPIRED):
        raise GovernanceError(f"spec {digest[:12]} is not approved on dataset '{dataset}'; there is nothing to revoke")
    return _decide(home, "revocation", digest, dataset=dataset, reason=reason, by=by)


def _decide(home: NodeHome, kind: str, spec_hash: str, *, dataset: str, reason: str, by: str) -> str:
    _known_dataset(home, dataset)
    if not reason.strip() or "\n" in reason:
        raise GovernanceError("--reason must be one non-empty line; the researcher sees it")
    log, state = _officer_log(home)
    digest = _resolve(state, spec_hash)
    log.append(kind, {"spec_digest": digest, "dataset": dataset, "reason": reason.strip(), "by": by})
    return digest


def _resolve(state: GovernanceState, spec_hash: str) -> str:
    text = spec_hash.strip().lower()
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text  # a full digest may be approved before the node has seen the spec
    try:
        return state.resolve(text)
    except ValueError as err:
        raise GovernanceError(str(err)) from None


# ---------------------------------------------------------------- the officer's views


def foreseen_refusals(home: NodeHome, spec_digest: str, dataset: str, *, max_epsilon: float | None = None) -> list[str]:
    """Why this node's own checks would refuse the request for `spec_digest` on `dataset` when it runs.

    The checks admission and the query make that need no run: the policy's tasks, secure
    aggregation and per-experiment cap (and `max_epsilon`, an approval cap being set),
    and the minimum cohort, against the dataset's patient count, which is never shown
    (a small count is itself a disclosure risk). Empty when none would refuse, or when
    no request for it has been recorded (there is no signed spec to check yet).
    """
    request = GovernanceState.from_entries(verified_entries(home)).requests.get((spec_digest, dataset))
    if request is None:
        return []
    payload = request.payload
    spec = payload.get("spec", {})
    policy = home.policy()
    reasons = []
    task = str(payload.get("task", ""))
    if task not in policy.allowed_tasks:
        reasons.append(f"this node's policy does not allow task {task}")
    study = task == STATISTICS_TASK
    secure = spec.get("federation", {}).get("secure_aggregation", False) if isinstance(spec.get("federation"), dict) else False
    if policy.require_secure_aggregation and secure is not True:
        what = "the study does not use it (federation.secure_aggregation)" if study else "the spec does not use it"
        reasons.append(f"this node's policy requires secure aggregation; {what}")
    cost = float(payload.get("cost_epsilon", float("nan")))
    caps = [(policy.max_epsilon_per_experiment, "this node's policy limit per experiment")]
    if max_epsilon is not None:
        caps.append((max_epsilon, "the approval cap being set"))
    reasons += [
        f"the experiment would cost epsilon {cost:.3f} on dataset '{dataset}', over {what} of {cap:g}"
        for cap, what in caps
        if cost > cap
    ]
    if study:
        return reasons + _study_refusals(home, spec, policy)
    kind = home.dataset(dataset).kind
    data = spec.get("data") if isinstance(spec.get("data"), dict) else {}
    cohort = data.get("cohort")
    wanted = "imaging" if task == IMAGING_TASK else "omop" if cohort is not None else "tabular"
    if kind != wanted:
        reasons.append(f"dataset '{dataset}' is of kind '{kind}'; task {task} needs a dataset of kind '{wanted}'")
        return reasons
    minimum = max(policy.min_cohort_size, int(spec.get("privacy", {}).get("min_cohort_size") or 0))
    reasons += _cohort_refusals(home, dataset, minimum, cohort={**cohort, "covariates": data.get("features")} if cohort else None)
    return reasons


def _study_refusals(home: NodeHome, spec: Mapping[str, Any], policy: NodePolicy) -> list[str]:
    """A study's checks that need no row: the query parses here, reads registered columns, fits max_cells."""
    from privacy.errors import QueryError
    from privacy.query import StatisticsQuery

    try:
        query = StatisticsQuery.from_mapping(spec, source="the requested study")
    except QueryError as err:
        return [f"the query does not parse on this node: {'; '.join(err.problems)}"]
    try:
        _check_study(home, query)
    except Refusal as err:
        return [err.reason]
    except ProtocolError as err:
        return [str(err)]
    return _cohort_refusals(home, query.dataset, policy.min_cohort_size)


def _cohort_refusals(home: NodeHome, dataset: str, minimum: int, *, cohort: Mapping[str, Any] | None = None) -> list[str]:
    """The query's cohort check, run ahead: the count stays on the node and out of the message.

    For an OMOP source, ``cohort`` is the spec's cohort (its covariates included), built here
    from a fresh snapshot of the source.
    """
    entry = home.dataset(dataset)
    try:
        if cohort is not None:
            from clients.hospital_node.data.cohorts import build_cohort
            from clients.hospital_node.data.sources import open_snapshot
            from models.clinical_tasks import CohortDefinition

            assert entry.omop is not None
            with open_snapshot(entry.omop, scratch=entry.path) as snapshot:
                patients = build_cohort(snapshot.connection, CohortDefinition.from_mapping(cohort)).num_rows
        elif entry.kind == "imaging":
            from clients.hospital_node.imaging_connector import ImagingConnector

            patients = ImagingConnector(home, entry).labelled_patients()
            if patients is None:
                return [f"dataset '{dataset}' has not been de-identified yet; register it with "
                        "`medfed node dataset add-imaging`"]
        else:
            from clients.hospital_node.connectors import TabularConnector

            data = TabularConnector(entry).load()
            patients = data.n_train + data.n_val
    except NodeError as err:
        return [f"dataset '{dataset}' cannot be read: {err}"]
    if patients < minimum:
        return [f"dataset '{dataset}' has fewer patients than the minimum cohort of {minimum}"]
    return []


@dataclass(frozen=True)
class ReservationStatus:
    """One run reservation as the officer sees it: its state and when it stops counting."""

    reservation: RunReservation
    state: str  # one of privacy.ledger.RUN_STATES
    expires_at: datetime | None  # while it holds (live or expired); None once released or used up


@dataclass(frozen=True)
class DatasetBudget:
    """One dataset's budget position, composed from the ledger (PLD) at the budget's delta."""

    dataset: str
    budget: Budget | None
    spent: float  # charges only
    held: float  # charges and live run reservations: what a new run is checked against
    charges: int
    open_reservations: int  # live run reservations
    uncharged_releases: int  # charges with no release record: a node stopped before its reply left
    reservations: tuple[ReservationStatus, ...] = ()  # every run reservation, in every state

    @property
    def reserved(self) -> float:
        """What the live reservations add to the spend (composed, so spent + reserved = held)."""
        return self.held - self.spent

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else max(self.budget.epsilon - self.held, 0.0)


def budget_status(home: NodeHome, entries: Sequence[AuditEntry] | None = None) -> list[DatasetBudget]:
    """Every registered dataset's budget, spend, run reservations and remaining epsilon."""
    entries = verified_entries(home) if entries is None else entries
    state = GovernanceState.from_entries(entries)
    hold = home.policy().reservation_hold
    released = {
        (str(e.payload.get("dataset")), str(e.payload.get("run")), e.payload.get("round"))
        for e in entries
        if e.kind == "release"
    }
    rows = []
    with PrivacyLedger.open(home.ledger_path) as ledger:
        now = ledger.now()
        for dataset in sorted(set(home.datasets()) | set(ledger.datasets())):
            setting = state.budgets.get(dataset)
            budget = None if setting is None else Budget(setting.epsilon, setting.delta)
            delta = budget.delta if budget is not None else 1e-5
            charges = ledger.charges(dataset)
            reservations = tuple(
                ReservationStatus(r, r.state(hold=hold, now=now), r.expires_at(hold)) for r in ledger.run_reservations(dataset)
            )
            rows.append(
                DatasetBudget(
                    dataset=dataset,
                    budget=budget,
                    spent=ledger.spent(dataset, delta=delta),
                    held=epsilon(ledger.held(dataset, hold=hold), delta=delta, accountant=LEDGER_ACCOUNTANT),
                    charges=len(charges),
                    open_reservations=sum(r.state == LIVE for r in reservations),
                    uncharged_releases=sum((c.dataset, c.run_id, c.round) not in released for c in charges),
                    reservations=reservations,
                )
            )
    return rows


@dataclass(frozen=True)
class PendingRequest:
    """A request awaiting the officer, with what approving it would do to the budget."""

    request: Request
    cost: float  # the experiment's own epsilon at its delta, by the ledger's accountant (nan if beyond the limits)
    position: DatasetBudget | None
    projected: float | None  # the dataset's epsilon at its budget's delta if the experiment runs


def _requested_events(payload: Mapping[str, Any]) -> list[DPEvent] | None:
    """Everything a recorded request asks for, as events; None if it lies beyond what any node composes.

    An experiment's request is every round as one event; a study's, one event per
    release. Requests recorded before the limits existed may ask for anything; they are
    shown, not costed.
    """
    if payload.get("task") == STATISTICS_TASK:
        try:
            events = [DPEvent(**{k: e[k] for k in _EVENT_KEYS}) for e in payload.get("events", [])]
        except (AccountingError, KeyError, TypeError):
            return None
        return events or None
    values = {key: payload.get(key) for key in ("rounds", "steps_per_round", "sample_rate", "noise_multiplier", "delta")}
    if payload.get("rounds_per_node") is not None:  # node sampling: the node trains these rounds only
        values["rounds"] = payload.get("rounds_per_node")
    if limit_problems(
        rounds=values["rounds"],
        steps=values["steps_per_round"],
        sample_rate=values["sample_rate"],
        noise_multiplier=values["noise_multiplier"],
        delta=values["delta"],
    ):
        return None
    event = DPEvent(values["noise_multiplier"], values["sample_rate"], values["steps_per_round"]).times(values["rounds"])  # type: ignore[arg-type]
    if epsilon_bound([event], delta=values["delta"]) > MAX_EPSILON:  # type: ignore[arg-type]
        return None
    # Requests recorded before training's own releases were accounted have none of these.
    extra = []
    count, evaluation = payload.get("count_epsilon"), payload.get("evaluation_epsilon")
    if _is_epsilon(count, MAX_COUNT_EPSILON):
        extra.append(count_event(epsilon=float(count)))  # type: ignore[arg-type]
    if _is_epsilon(evaluation, MAX_EVALUATION_EPSILON):
        histogram = count_event(epsilon=float(evaluation))  # type: ignore[arg-type]
        extra.append(histogram.times(values["rounds"] + 1) if payload.get("evaluate_every_round") is True else histogram)  # type: ignore[operator]
    return [event, *extra]


def _is_epsilon(value: object, limit: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= limit


def pending_requests(home: NodeHome) -> list[PendingRequest]:
    """Requests the officer has not decided, with cost and budget position, oldest first."""
    entries = verified_entries(home)
    state = GovernanceState.from_entries(entries)
    positions = {row.dataset: row for row in budget_status(home, entries)}
    hold = home.policy().reservation_hold
    out = []
    for request in state.pending():
        payload = request.payload
        position = positions.get(request.dataset)
        events = _requested_events(payload)
        cost = float("nan") if events is None else epsilon(events, delta=float(payload["delta"]), accountant=LEDGER_ACCOUNTANT)
        target = payload.get("requested_epsilon")
        if target is not None and not math.isnan(cost) and payload.get("task") != STATISTICS_TASK:
            # The coordinator chose the noise it asked with; the run may cost up to the signed target.
            cost = max(cost, float(target))
        projected = None
        if events is not None and position is not None and position.budget is not None:
            with PrivacyLedger.open(home.ledger_path) as ledger:
                held = ledger.held(request.dataset, hold=hold)
            projected = epsilon([*held, *events], delta=position.budget.delta, accountant=LEDGER_ACCOUNTANT)
        out.append(PendingRequest(request, cost, position, projected))
    return out
