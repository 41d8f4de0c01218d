"""Errors of the privacy package: accounting, the ledger and the budget.

    PrivacyError
    ├── AccountingError        bad privacy parameters (also a ValueError)
    ├── BudgetExhaustedError   a release would take a dataset over its budget
    └── LedgerError            the ledger's storage is unreadable, corrupt or inconsistent
"""

from __future__ import annotations

__all__ = ["AccountingError", "BudgetExhaustedError", "LedgerError", "PrivacyError"]


class PrivacyError(Exception):
    """Root of the privacy package's errors."""


class AccountingError(PrivacyError, ValueError):
    """A privacy parameter is out of range (noise, sample rate, steps, delta, accountant).

    The message names the parameter, the rule and the value found, e.g.
    ``noise_multiplier must be > 0; found -1``.
    """


class BudgetExhaustedError(PrivacyError):
    """A release would take a dataset's composed epsilon over the budget set for it."""


class LedgerError(PrivacyError):
    """The privacy ledger cannot be read or written, or a charge contradicts a recorded one.

    Storage problems name the ledger file, so the operator knows which node home to look at.
    """
