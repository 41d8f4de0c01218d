"""A node's governance state: budgets, requests and the officer's decisions, from its audit log.

The node's signed, hash-chained audit log (:mod:`privacy.audit`) is the only record of
what the officer decided. Nothing else holds approvals, so nothing else can be edited to
forge one: :class:`GovernanceState` is rebuilt from the entries of a log that has just
passed :meth:`~privacy.audit.AuditLog.verify`. The entry kinds it reads:

``budget``      ``{dataset, epsilon, delta, by}``: the dataset's lifetime budget from now on.
``request``     ``{spec_digest, experiment, signer, signer_fingerprint, task, dataset,
                rounds, delta, requested_epsilon, cost_epsilon, ...}``: a signed spec the
                node met for the first time.
``approval``    ``{spec_digest, dataset, max_epsilon, expires, runs, by}``: ``runs``
                submissions may spend it (1 when absent).
``denial``      ``{spec_digest, dataset, reason, by}``.
``revocation``  ``{spec_digest, dataset, reason, by}``.
``submission``  ``{submission_id, spec_digest, dataset, signer, signed_at, run}``: a
                submission spent one run of the approval in force.

An approval binds one spec digest and one dataset; a later denial or revocation of the
same pair replaces it, and a later approval replaces a denial (a revocation is final)
and allows its own ``runs`` afresh.

A research partner does not sign a spec but a :class:`Submission` of it: the spec's
digest, a random submission id and the signing time, signed over
:func:`submission_signing_message` (a context line, so the signature can never pass for
any other signature the same key makes). Each submission spends one run of an approval;
the node refuses it replayed once it finished, and refuses a stale one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.audit import AuditEntry
from privacy.errors import SignatureError
from privacy.keys import TrustedKey, TrustedKeys, fingerprint, sign

__all__ = [
    "APPROVED",
    "DENIED",
    "Decision",
    "EXPIRED",
    "GovernanceState",
    "PENDING",
    "Request",
    "REVOKED",
    "SpecSignature",
    "Submission",
    "SubmissionUse",
    "sign_submission",
    "spec_digest",
    "submission_signing_message",
    "verify_submission",
]

_SUBMISSION_CONTEXT = b"medfed submission v1\n"
# How far a submission's signing time may lie ahead of the node's clock (clock skew).
_FUTURE_SKEW = timedelta(minutes=10)

APPROVED = "approved"
DENIED = "denied"
REVOKED = "revoked"
EXPIRED = "expired"
PENDING = "pending"


def spec_digest(spec_json: str) -> str:
    """SHA-256 (hex) of the canonical JSON: the hash approvals bind."""
    return hashlib.sha256(spec_json.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Submission:
    """What a research partner signs to run a spec once: its digest, a unique id, and when.

    The id makes every submission distinct, so a node can spend an approval on exactly
    one of them and refuse it replayed; the signing time lets a node refuse a stale one.
    """

    spec_digest: str
    submission_id: str
    signed_at: datetime

    def __post_init__(self) -> None:
        problems = []
        if not re.fullmatch(r"[0-9a-f]{64}", self.spec_digest):
            problems.append(f"spec_digest must be 64 hex characters; found {self.spec_digest!r}")
        if not re.fullmatch(r"[0-9a-f]{32}", self.submission_id):
            problems.append(f"submission_id must be 32 hex characters; found {self.submission_id!r}")
        if self.signed_at.tzinfo is None:
            problems.append("signed_at must carry a time zone")
        if problems:
            raise SignatureError("malformed submission: " + "; ".join(problems))

    @classmethod
    def new(cls, spec_json: str, *, now: datetime | None = None) -> Submission:
        """A fresh submission of `spec_json`: a random id, signed now."""
        signed_at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        return cls(spec_digest(spec_json), uuid.uuid4().hex, signed_at)

    def to_json(self) -> str:
        """The canonical JSON a partner signs (sorted keys, no spaces)."""
        payload = {"signed_at": self.signed_at.isoformat(), "spec_digest": self.spec_digest, "submission_id": self.submission_id}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Submission:
        """Parse a submission's canonical JSON.

        Raises
        ------
        SignatureError
            It is not a submission (missing fields, malformed values).
        """
        try:
            payload = json.loads(text)
            if not isinstance(payload, dict) or set(payload) != {"signed_at", "spec_digest", "submission_id"}:
                raise ValueError("expected exactly signed_at, spec_digest and submission_id")
            return cls(str(payload["spec_digest"]), str(payload["submission_id"]), _parse_time(str(payload["signed_at"])))
        except (ValueError, TypeError) as err:
            raise SignatureError(f"the run carries no valid submission envelope ({err}); submit it again with `medfed experiment submit`") from None

    def age_problem(self, now: datetime, max_age: timedelta) -> str | None:
        """Why this submission may not start a run now (stale, or signed in the future), or None."""
        if self.signed_at > now + _FUTURE_SKEW:
            return f"submission {self.submission_id[:12]} is signed {self.signed_at.isoformat()}, in the future of this node's clock"
        if now - self.signed_at > max_age:
            hours = max_age.total_seconds() / 3600
            return (
                f"submission {self.submission_id[:12]} was signed {self.signed_at.isoformat()}, more than {hours:g} h ago; "
                "it is stale: submit the spec again"
            )
        return None


def submission_signing_message(submission_json: str) -> bytes:
    """The bytes a partner signs for a submission: a context line, then its canonical JSON."""
    return _SUBMISSION_CONTEXT + submission_json.encode("utf-8")


@dataclass(frozen=True)
class SpecSignature:
    """A partner's signature of a submission: base64 Ed25519 signature and the signer's key fingerprint."""

    signature: str
    signer: str


def sign_submission(submission: Submission, private_key: Ed25519PrivateKey) -> SpecSignature:
    """Sign a submission (and through its digest, the spec) with a research partner's key."""
    raw = sign(private_key, submission_signing_message(submission.to_json()))
    return SpecSignature(base64.b64encode(raw).decode("ascii"), fingerprint(private_key.public_key()))


def verify_submission(
    spec_json: str, submission_json: str, signature: SpecSignature, trusted: TrustedKeys
) -> tuple[TrustedKey, Submission]:
    """The trusted partner who signed the submission of `spec_json`, and the submission.

    Raises
    ------
    SignatureError
        Unsigned, a malformed or non-verifying signature, a signer who is not one of the
        node's trusted partners, or a submission of another spec.
    """
    if not signature.signature or not signature.signer:
        raise SignatureError("the experiment spec is not signed; the research partner must submit it with their key")
    try:
        raw = base64.b64decode(signature.signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the spec signature is not base64; it was damaged on the way") from None
    partner = trusted.verify(submission_signing_message(submission_json), raw, signer=signature.signer)
    submission = Submission.from_json(submission_json)
    if submission.spec_digest != spec_digest(spec_json):
        raise SignatureError("the signed submission names another spec than the one the run carries")
    return partner, submission


@dataclass(frozen=True)
class Request:
    """A signed spec the node met and recorded for its officer."""

    spec_digest: str
    dataset: str
    at: datetime
    payload: Mapping[str, Any]

    @property
    def experiment(self) -> str:
        return str(self.payload.get("experiment", ""))

    @property
    def signer(self) -> str:
        return str(self.payload.get("signer", ""))


@dataclass(frozen=True)
class Decision:
    """The officer's latest word on one spec digest for one dataset."""

    status: str  # APPROVED, DENIED or REVOKED
    spec_digest: str
    dataset: str
    at: datetime
    by: str
    max_epsilon: float | None = None
    expires: datetime | None = None
    reason: str = ""
    runs: int = 1  # how many submissions an approval allows
    seq: int = 0  # its audit entry's place in the log
    rehearsal: bool = False  # given on a rehearsal's virtual hospital; a real node refuses it

    def status_at(self, now: datetime) -> str:
        """APPROVED, DENIED, REVOKED, or EXPIRED for an approval past its expiry."""
        if self.status == APPROVED and self.expires is not None and now >= self.expires:
            return EXPIRED
        return self.status


@dataclass(frozen=True)
class BudgetSetting:
    """The budget the officer set for a dataset, and when."""

    dataset: str
    epsilon: float
    delta: float
    at: datetime
    by: str


@dataclass(frozen=True)
class SubmissionUse:
    """A submission that spent a run of an approval on this node, and when."""

    submission_id: str
    spec_digest: str
    dataset: str
    at: datetime
    first_run: str
    seq: int
    # The rounds the node was scheduled for and reserved at admission (node sampling);
    # () when the submission trains every round (admitted without a schedule).
    schedule: tuple[int, ...] = ()


class GovernanceState:
    """Budgets, requests, decisions and spent submissions, replayed in order from verified audit entries."""

    def __init__(self) -> None:
        self.budgets: dict[str, BudgetSetting] = {}
        self.requests: dict[tuple[str, str], Request] = {}
        self.decisions: dict[tuple[str, str], Decision] = {}
        self.history: list[Decision] = []
        # A snapshot's submissions stay rows until asked for: a message looks at one or a few.
        self._submissions: dict[tuple[str, str], SubmissionUse | list[Any]] = {}

    @property
    def submissions(self) -> dict[tuple[str, str], SubmissionUse]:
        """Every submission that spent a run, by (submission id, dataset), in the order the log recorded them."""
        for key, value in self._submissions.items():
            if isinstance(value, list):
                self._submissions[key] = _use_of(value)
        return self._submissions  # type: ignore[return-value]  # every value is a SubmissionUse now

    @classmethod
    def from_entries(cls, entries: Iterable[AuditEntry]) -> GovernanceState:
        state = cls()
        state.extend(entries)
        return state

    def extend(self, entries: Iterable[AuditEntry]) -> None:
        """Replay `entries`, which follow the ones this state was built from, in order."""
        for entry in entries:
            self._apply(entry)

    def to_snapshot(self) -> dict[str, Any]:
        """This state as plain JSON: what a node signs into its audit checkpoint (see :meth:`from_snapshot`).

        Its size grows with the budgets, requests, decisions and submissions the log
        records, not with its other entries (releases, charges, refusals).
        """
        return {
            "budgets": [[b.dataset, b.epsilon, b.delta, b.at.isoformat(), b.by] for b in self.budgets.values()],
            "requests": [[r.spec_digest, r.dataset, r.at.isoformat(), dict(r.payload)] for r in self.requests.values()],
            "history": [_decision_row(d) for d in self.history],
            "submissions": [
                [u.submission_id, u.spec_digest, u.dataset, u.at.isoformat(), u.first_run, u.seq, list(u.schedule)]
                for u in self.submissions.values()
            ],
        }

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> GovernanceState:
        """The state :meth:`to_snapshot` wrote: equal, field by field, to the one replayed from the same entries.

        Raises
        ------
        ValueError
            The snapshot is not one :meth:`to_snapshot` writes.
        """
        state = cls()
        try:
            for dataset, eps, delta, at, by in snapshot["budgets"]:
                state.budgets[dataset] = BudgetSetting(dataset, float(eps), float(delta), _parse_time(at), by)
            for digest, dataset, at, payload in snapshot["requests"]:
                state.requests[(digest, dataset)] = Request(digest, dataset, _parse_time(at), payload)
            for row in snapshot["history"]:
                decision = _decision_of(row)
                state.history.append(decision)
                state.decisions[(decision.spec_digest, decision.dataset)] = decision
            for row in snapshot["submissions"]:
                # Six fields in checkpoints written before node sampling, seven since (the schedule).
                if not isinstance(row, list) or len(row) not in (6, 7) or not isinstance(row[0], str) or not isinstance(row[2], str):
                    raise ValueError(f"submission row {row!r}")
                state._submissions[(row[0], row[2])] = row
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a governance snapshot ({type(err).__name__}: {err})") from None
        return state

    def _apply(self, entry: AuditEntry) -> None:
        payload = entry.payload
        if entry.kind == "budget":
            dataset = str(payload["dataset"])
            self.budgets[dataset] = BudgetSetting(
                dataset, float(payload["epsilon"]), float(payload["delta"]), entry.time, str(payload.get("by", ""))
            )
            return
        if entry.kind == "submission":
            use = SubmissionUse(
                str(payload["submission_id"]), str(payload["spec_digest"]), str(payload["dataset"]), entry.time,
                str(payload.get("run", "")), entry.seq, tuple(int(r) for r in payload.get("schedule") or ()),
            )
            self._submissions.setdefault((use.submission_id, use.dataset), use)
            return
        if entry.kind not in ("request", "approval", "denial", "revocation"):
            return
        key = (str(payload["spec_digest"]), str(payload["dataset"]))
        if entry.kind == "request":
            self.requests.setdefault(key, Request(key[0], key[1], entry.time, payload))
            return
        if self.decisions.get(key) is not None and self.decisions[key].status == REVOKED:
            return  # a revocation is final: the partner submits a changed spec (a new digest)
        status = {"approval": APPROVED, "denial": DENIED, "revocation": REVOKED}[entry.kind]
        expires = payload.get("expires")
        cap = payload.get("max_epsilon")
        decision = Decision(
            status=status,
            spec_digest=key[0],
            dataset=key[1],
            at=entry.time,
            by=str(payload.get("by", "")),
            max_epsilon=None if cap is None else float(cap),
            expires=None if not expires else _parse_time(str(expires)),
            reason=str(payload.get("reason", "")),
            runs=int(payload.get("runs") or 1),
            seq=entry.seq,
            rehearsal=payload.get("rehearsal") is True,
        )
        self.decisions[key] = decision
        self.history.append(decision)

    def decision(self, spec_digest: str, dataset: str) -> Decision | None:
        return self.decisions.get((spec_digest, dataset))

    def status(self, spec_digest: str, dataset: str, now: datetime | None = None) -> str:
        """APPROVED, DENIED, REVOKED, EXPIRED, or PENDING when the officer has not decided."""
        decision = self.decision(spec_digest, dataset)
        if decision is None:
            return PENDING
        return decision.status_at(now or datetime.now(UTC))

    def submission(self, submission_id: str, dataset: str) -> SubmissionUse | None:
        """The record of `submission_id` having spent a run on `dataset`, if it did."""
        key = (submission_id, dataset)
        value = self._submissions.get(key)
        if isinstance(value, list):
            value = self._submissions[key] = _use_of(value)
        return value

    def spent_runs(self, spec_digest: str, dataset: str) -> list[SubmissionUse]:
        """Submissions that spent a run of the approval now in force for this spec and dataset."""
        decision = self.decision(spec_digest, dataset)
        if decision is None or decision.status != APPROVED:
            return []
        spent = []
        for key, value in self._submissions.items():
            digest, where, seq = (value[1], value[2], value[5]) if isinstance(value, list) else (value.spec_digest, value.dataset, value.seq)
            if digest == spec_digest and where == dataset and int(seq) > decision.seq:
                if isinstance(value, list):
                    value = self._submissions[key] = _use_of(value)
                spent.append(value)
        return spent

    def pending(self) -> list[Request]:
        """Requests the officer has not decided, oldest first."""
        return [r for key, r in self.requests.items() if key not in self.decisions]

    def resolve(self, prefix: str) -> str:
        """The one spec digest recorded (requested or decided) that starts with `prefix`.

        Raises
        ------
        ValueError
            No digest or several start with `prefix`; the message says which.
        """
        prefix = prefix.strip().lower()
        known = {d for d, _ in self.requests} | {d for d, _ in self.decisions}
        matches = sorted(d for d in known if d.startswith(prefix))
        if len(prefix) < 8:
            raise ValueError(f"spec hash {prefix!r} is too short; give at least 8 hex characters")
        if not matches:
            raise ValueError(f"no request or decision for a spec hash starting with {prefix!r}; see `medfed node requests`")
        if len(matches) > 1:
            raise ValueError(f"spec hash {prefix!r} is ambiguous: {', '.join(m[:16] for m in matches)}; give more characters")
        return matches[0]


def _use_of(row: list[Any]) -> SubmissionUse:
    submission_id, digest, dataset, at, first_run, seq, *rest = row
    schedule = tuple(int(r) for r in rest[0]) if rest else ()
    return SubmissionUse(str(submission_id), str(digest), str(dataset), _parse_time(str(at)), str(first_run), int(seq), schedule)


def _decision_row(decision: Decision) -> list[Any]:
    return [
        decision.status, decision.spec_digest, decision.dataset, decision.at.isoformat(), decision.by, decision.max_epsilon,
        None if decision.expires is None else decision.expires.isoformat(), decision.reason, decision.runs, decision.seq,
        decision.rehearsal,
    ]


def _decision_of(row: list[Any]) -> Decision:
    status, digest, dataset, at, by, cap, expires, reason, runs, seq, rehearsal = row
    if status not in (APPROVED, DENIED, REVOKED):
        raise ValueError(f"decision status {status!r}")
    return Decision(
        status=status, spec_digest=digest, dataset=dataset, at=_parse_time(at), by=by,
        max_epsilon=None if cap is None else float(cap), expires=None if expires is None else _parse_time(expires),
        reason=reason, runs=int(runs), seq=int(seq), rehearsal=rehearsal is True,
    )


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
