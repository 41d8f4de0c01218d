"""A node's governance state: budgets, requests and the officer's decisions, from its audit log.

The node's signed, hash-chained audit log (:mod:`privacy.audit`) is the only record of
what the officer decided. Nothing else holds approvals, so nothing else can be edited to
forge one: :class:`GovernanceState` is rebuilt from the entries of a log that has just
passed :meth:`~privacy.audit.AuditLog.verify`. The entry kinds it reads:

``budget``      ``{dataset, epsilon, delta, by}``: the dataset's lifetime budget from now on.
``request``     ``{spec_digest, experiment, signer, signer_fingerprint, task, dataset,
                rounds, delta, requested_epsilon, cost_epsilon, ...}``: a signed spec the
                node met for the first time.
``approval``    ``{spec_digest, dataset, max_epsilon, expires, by}``.
``denial``      ``{spec_digest, dataset, reason, by}``.
``revocation``  ``{spec_digest, dataset, reason, by}``.

An approval binds one spec digest and one dataset; a later denial or revocation of the
same pair replaces it, and a later approval replaces a denial (a revocation is final).

Specs are signed by research partners over :func:`spec_signing_message`, which prefixes
the canonical JSON with a context string so a spec signature can never pass for any
other signature the same key makes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
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
    "sign_spec",
    "spec_digest",
    "spec_signing_message",
    "verify_spec",
]

_SPEC_CONTEXT = b"medfed experiment spec v1\n"

APPROVED = "approved"
DENIED = "denied"
REVOKED = "revoked"
EXPIRED = "expired"
PENDING = "pending"


def spec_signing_message(spec_json: str) -> bytes:
    """The bytes a partner signs for a spec: a context line, then its canonical JSON."""
    return _SPEC_CONTEXT + spec_json.encode("utf-8")


def spec_digest(spec_json: str) -> str:
    """SHA-256 (hex) of the canonical JSON: the hash approvals bind."""
    return hashlib.sha256(spec_json.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SpecSignature:
    """A partner's signature of a spec: base64 Ed25519 signature and the signer's key fingerprint."""

    signature: str
    signer: str


def sign_spec(spec_json: str, private_key: Ed25519PrivateKey) -> SpecSignature:
    """Sign the canonical JSON of a spec with a research partner's key."""
    raw = sign(private_key, spec_signing_message(spec_json))
    return SpecSignature(base64.b64encode(raw).decode("ascii"), fingerprint(private_key.public_key()))


def verify_spec(spec_json: str, signature: SpecSignature, trusted: TrustedKeys) -> TrustedKey:
    """The trusted partner who signed `spec_json`.

    Raises
    ------
    SignatureError
        The spec is unsigned, the signature is malformed or does not verify, or the
        signer is not one of the node's trusted partners.
    """
    if not signature.signature or not signature.signer:
        raise SignatureError("the experiment spec is not signed; the research partner must submit it with their key")
    try:
        raw = base64.b64decode(signature.signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the spec signature is not base64; it was damaged on the way") from None
    return trusted.verify(spec_signing_message(spec_json), raw, signer=signature.signer)


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


class GovernanceState:
    """Budgets, requests and decisions, replayed in order from verified audit entries."""

    def __init__(self) -> None:
        self.budgets: dict[str, BudgetSetting] = {}
        self.requests: dict[tuple[str, str], Request] = {}
        self.decisions: dict[tuple[str, str], Decision] = {}
        self.history: list[Decision] = []

    @classmethod
    def from_entries(cls, entries: Iterable[AuditEntry]) -> GovernanceState:
        state = cls()
        for entry in entries:
            state._apply(entry)
        return state

    def _apply(self, entry: AuditEntry) -> None:
        payload = entry.payload
        if entry.kind == "budget":
            dataset = str(payload["dataset"])
            self.budgets[dataset] = BudgetSetting(
                dataset, float(payload["epsilon"]), float(payload["delta"]), entry.time, str(payload.get("by", ""))
            )
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


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
