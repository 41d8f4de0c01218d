"""Privacy on the node: DP events and accounting, the ledger, keys and signatures, the audit log.

Import-light: Opacus (and torch) load only when an epsilon is first computed.

- ``errors``: the PrivacyError tree.
- ``events``: DPEvent, one composable release (DP-SGD, Gaussian, Laplace, discrete Laplace; repeated with ``times``).
- ``limits``: what one experiment may ask of an accountant (rounds, steps, epsilon...).
- ``query``: StatisticsQuery, a statistics query (filter language, group-by cells, release plan), checked by field.
- ``accountant``: epsilon of composed events (PLD for the ledger; PRV or RDP to plan), noise for a target.
- ``mechanisms``: OpenDP's noise samplers for statistics releases (imported on its own: NumPy, OpenDP).
- ``one_run_audit``: one-run auditing's empirical epsilon lower bound (imported on its own: NumPy, SciPy).
- ``ledger``: PrivacyLedger, the per-node record of every charge and run reservation, SQLite or in memory.
- ``keys``: Ed25519 key pairs, signatures, fingerprints, the trusted-partner registry.
- ``audit``: AuditLog, the node's append-only, hash-chained, signed audit log, and its signed checkpoint.
- ``private_files``: files and folders only their owner may use, created so and checked so.
- ``cli``: `medfed keys` (imported by the `medfed` command only).
"""

from privacy.accountant import ACCOUNTANTS, epsilon, noise_for_target, opacus_history, steps_per_epoch
from privacy.audit import (
    AUDIT_KINDS,
    GENESIS_HASH,
    PROBLEM_KINDS,
    AuditCheckpoint,
    AuditEntry,
    AuditLog,
    AuditPosition,
    AuditProblem,
    AuditVerification,
    TailVerification,
)
from privacy.errors import (
    AccountingError,
    AuditEntryError,
    AuditError,
    BudgetExhaustedError,
    KeyFileError,
    LedgerError,
    PrivacyError,
    QueryError,
    SignatureError,
    TrustedKeysError,
)
from privacy.events import MECHANISMS, DPEvent
from privacy.keys import (
    TRUSTED_KEYS_FILE,
    KeyPair,
    TrustedKey,
    TrustedKeys,
    fingerprint,
    format_public_key,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign,
    verify,
)
from privacy.ledger import (
    RUN_STATES,
    SCHEMA_VERSION,
    Budget,
    Charge,
    ChargeGroup,
    InMemoryLedgerStore,
    LedgerStore,
    PrivacyLedger,
    RunReservation,
    SqliteLedgerStore,
)
from privacy.query import Release, StatisticsQuery

__all__ = [
    "ACCOUNTANTS",
    "AUDIT_KINDS",
    "AccountingError",
    "AuditCheckpoint",
    "AuditEntry",
    "AuditEntryError",
    "AuditError",
    "AuditLog",
    "AuditPosition",
    "AuditProblem",
    "AuditVerification",
    "Budget",
    "BudgetExhaustedError",
    "Charge",
    "ChargeGroup",
    "DPEvent",
    "GENESIS_HASH",
    "InMemoryLedgerStore",
    "KeyFileError",
    "KeyPair",
    "LedgerError",
    "LedgerStore",
    "MECHANISMS",
    "PROBLEM_KINDS",
    "PrivacyError",
    "PrivacyLedger",
    "QueryError",
    "RUN_STATES",
    "Release",
    "RunReservation",
    "SCHEMA_VERSION",
    "SignatureError",
    "SqliteLedgerStore",
    "StatisticsQuery",
    "TRUSTED_KEYS_FILE",
    "TailVerification",
    "TrustedKey",
    "TrustedKeys",
    "TrustedKeysError",
    "epsilon",
    "fingerprint",
    "format_public_key",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "noise_for_target",
    "opacus_history",
    "sign",
    "steps_per_epoch",
    "verify",
]
