"""Differential privacy on the node: DP events, Opacus accounting and the privacy ledger.

Import-light: Opacus (and torch) load only when an epsilon is first computed.

- ``errors``: the PrivacyError tree.
- ``events``: DPEvent, one composable release.
- ``accountant``: epsilon of composed events, noise for a target epsilon (Opacus).
- ``ledger``: PrivacyLedger, the per-node record of every charge, SQLite or in memory.
"""

from privacy.accountant import ACCOUNTANTS, epsilon, noise_for_target, opacus_history, steps_per_epoch
from privacy.errors import AccountingError, BudgetExhaustedError, LedgerError, PrivacyError
from privacy.events import MECHANISMS, DPEvent
from privacy.ledger import (
    SCHEMA_VERSION,
    Charge,
    InMemoryLedgerStore,
    LedgerStore,
    PrivacyLedger,
    SqliteLedgerStore,
)

__all__ = [
    "ACCOUNTANTS",
    "AccountingError",
    "BudgetExhaustedError",
    "Charge",
    "DPEvent",
    "InMemoryLedgerStore",
    "LedgerError",
    "LedgerStore",
    "MECHANISMS",
    "PrivacyError",
    "PrivacyLedger",
    "SCHEMA_VERSION",
    "SqliteLedgerStore",
    "epsilon",
    "noise_for_target",
    "opacus_history",
    "steps_per_epoch",
]
