"""Errors of the privacy package: accounting, the ledger, the budget, keys and the audit log.

    PrivacyError
    ├── AccountingError        bad privacy parameters (also a ValueError)
    ├── QueryError             a statistics query has problems (also a ValueError); lists every one
    ├── BudgetExhaustedError   a release would take a dataset over its budget
    ├── LedgerError            the ledger's storage is unreadable, corrupt or inconsistent
    ├── KeyFileError           a key file (or key text) is missing, malformed, too open or taken
    ├── CertificateError       a TLS certificate is missing, malformed, expired or from another CA
    ├── EnrolmentError         an enrolment request or bundle file is missing or invalid
    ├── TrustedKeysError       the trusted-partner registry is malformed or refuses a change
    ├── SignatureError         a signature does not verify, or its signer is not trusted
    └── AuditError             the audit log cannot be read, locked or extended
        └── AuditEntryError    an audit entry's kind or payload is invalid (also a ValueError)
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AccountingError",
    "AuditEntryError",
    "AuditError",
    "BudgetExhaustedError",
    "CertificateError",
    "EnrolmentError",
    "KeyFileError",
    "LedgerError",
    "PrivacyError",
    "QueryError",
    "SignatureError",
    "TrustedKeysError",
]


class PrivacyError(Exception):
    """Root of the privacy package's errors."""


class AccountingError(PrivacyError, ValueError):
    """A privacy parameter is out of range (noise, sample rate, steps, delta, accountant).

    The message names the parameter, the rule and the value found, e.g.
    ``noise_multiplier must be > 0; found -1``.
    """


class QueryError(PrivacyError, ValueError):
    """A statistics query has one or more problems, all of which are listed.

    Raised before any data is read: by the research partner's tools when a study spec is
    validated, and by each node on the query it receives.

    Attributes
    ----------
    source
        Where the query came from: a file path, or a name given by the caller.
    problems
        One message per problem, each naming its field, e.g.
        ``statistics[2].column 'bmi' is not declared in [columns]``.
    """

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems: tuple[str, ...] = tuple(problems)
        count = len(self.problems)
        header = f"{source} has {count} problem{'' if count == 1 else 's'}:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[type[QueryError], tuple[str, tuple[str, ...]]]:
        # Exceptions pickle their args; ours are (source, problems).
        return (type(self), (self.source, self.problems))


class BudgetExhaustedError(PrivacyError):
    """A release would take a dataset's composed epsilon over the budget set for it."""


class LedgerError(PrivacyError):
    """The privacy ledger cannot be read or written, or a charge contradicts a recorded one.

    Storage problems name the ledger file, so the operator knows which node home to look at.
    """


class KeyFileError(PrivacyError):
    """A key file or key text cannot be used.

    Missing, unreadable or malformed files, keys of another algorithm, private keys that
    other users may read (fix with ``chmod 600 <path>``), and files that already exist
    when a new key pair would overwrite them. The message names the path.
    """


class TrustedKeysError(PrivacyError):
    """The registry of trusted research-partner keys is malformed or refuses a change.

    A duplicate partner name or key, an unknown partner, or a registry file that is not
    valid TOML (every problem at once, by field).
    """


class SignatureError(PrivacyError):
    """A signature does not verify with the key it claims, or its signer is not trusted."""


class AuditError(PrivacyError):
    """The audit log or its signed head cannot be read, locked or extended.

    Appending is refused, rather than hiding a gap, when the log no longer matches its
    signed head; ``medfed node audit verify`` then says which entry is wrong.
    """


class AuditEntryError(AuditError, ValueError):
    """An audit entry's kind is unknown or its payload is not a JSON object."""


class CertificateError(PrivacyError):
    """A TLS certificate or certificate authority cannot be used.

    Missing, unreadable or malformed files (a key where a certificate belongs), a
    certificate that this alliance's CA did not sign, one that has expired or is not
    valid yet, bad host names or addresses, and files that would be overwritten. The
    message names the path and what to do next (often ``medfed coordinator renew``).
    """


class EnrolmentError(PrivacyError, ValueError):
    """An enrolment request (node to coordinator) or bundle (back) is missing or invalid.

    Every problem is reported at once, by field, as
    ``enrolment_request.auth_public_key is not an OpenSSH public key``.
    """
