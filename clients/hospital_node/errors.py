"""Errors of the hospital node.

    NodeError
    ├── NodeHomeError          the node home or its node.toml is missing or invalid
    ├── DatasetNotFoundError   a dataset name is not registered on this node (also a KeyError)
    ├── ConnectorError         a dataset file cannot be read or fails validation (also a ValueError)
    │   └── OmopSourceError    an OMOP source cannot be opened: missing table or column, bad URL, unsafe password file
    ├── ScoringError           local scoring refused: bad or unapproved weights, inputs that differ (also a ValueError)
    ├── PrivacyCheckError      the empirical privacy check cannot audit this run: unknown, not DP-SGD, a home that does not verify
    ├── AuditVerificationError the audit log failed verification: edited, deleted, reordered ...
    ├── NodeServiceError       enrolment, the SuperNode process or the coordinator's TLS refused
    └── ConsoleError           the officer's console: no or bad officer accounts, an unsafe accounts file

Messages name files, fields and columns, and give counts; they never hold a value read
from patient data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "AuditVerificationError",
    "ConnectorError",
    "ConsoleError",
    "DatasetNotFoundError",
    "NodeError",
    "NodeHomeError",
    "NodeServiceError",
    "OmopSourceError",
    "PrivacyCheckError",
    "ScoringError",
]


class NodeError(Exception):
    """Root of the hospital node's errors."""


class NodeHomeError(NodeError):
    """The node home folder or its ``node.toml`` is missing or invalid."""


class GovernanceError(NodeError):
    """An officer's command cannot be carried out (unknown spec hash, bad reason, revoked approval...)."""


class DatasetNotFoundError(NodeError, KeyError):
    """A dataset name is not registered on this node."""

    def __init__(self, name: str, *, node: str, registered: Iterable[str]) -> None:
        self.name = name
        self.node = node
        self.registered = tuple(sorted(registered))
        listed = ", ".join(self.registered) if self.registered else "none"
        message = (
            f"dataset {name!r} is not registered on node {node!r}; registered: {listed}. "
            "Register it with `medfed node dataset add`"
        )
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0])

    def __reduce__(self) -> tuple[object, tuple[str, str, tuple[str, ...]]]:
        # The keyword-only constructor defeats the default pickling of exceptions.
        return (_dataset_not_found, (self.name, self.node, self.registered))


def _dataset_not_found(name: str, node: str, registered: tuple[str, ...]) -> DatasetNotFoundError:
    return DatasetNotFoundError(name, node=node, registered=registered)


class ConnectorError(NodeError, ValueError):
    """A dataset file cannot be read, or its content does not fit its registration."""


class OmopSourceError(ConnectorError):
    """An OMOP source cannot be opened as a snapshot.

    A folder, file or table that is missing, a required column that is absent, a URL that
    holds a password, a password file others can read, or a server that cannot be reached.
    The message names the table, column, field or file and says what to do; it never holds
    a password or a value read from patient data.
    """


class ScoringError(NodeError, ValueError):
    """Local scoring refused: weights that are not safetensors, not approved, or not the approved spec's model and inputs."""


class PrivacyCheckError(NodeError, ValueError):
    """The empirical privacy check cannot audit a run: an unknown run id, a run that trained
    no model with DP-SGD here, a home whose audit log or ledger does not verify, bad options.

    Raised before anything is trained or written.
    """


class AuditVerificationError(NodeError):
    """The node's audit log failed verification; the message lists every problem, one a line.

    ``problems`` holds one line per problem, such as
    ``line 7 (seq 6): edited — hash does not match its content: ...``.
    """

    def __init__(self, log: str, problems: Sequence[str]) -> None:
        self.log = log
        self.problems = tuple(problems)
        count = len(self.problems)
        listing = "\n".join(f"  {problem}" for problem in self.problems)
        message = (
            f"audit log {log} failed verification, {count} problem{'s' if count != 1 else ''}:\n{listing}\n"
            "Keep the files as they are (they are evidence) and tell the data-governance officer"
        )
        super().__init__(message)

    def __reduce__(self) -> tuple[object, tuple[str, tuple[str, ...]]]:
        return (type(self), (self.log, self.problems))


class NodeServiceError(NodeError):
    """The node cannot be enrolled or started, or the coordinator was refused.

    Not enrolled, a bundle for another node or key, a SuperNode that runs already or
    exits, or a coordinator whose TLS certificate does not verify against the alliance CA.
    """


class ConsoleError(NodeError):
    """The officer's console cannot start or an officer account cannot be made (no accounts, bad name or password)."""
