"""Errors of the hospital node.

    NodeError
    ├── NodeHomeError          the node home or its node.toml is missing or invalid
    ├── DatasetNotFoundError   a dataset name is not registered on this node (also a KeyError)
    └── ConnectorError         a dataset file cannot be read or fails validation (also a ValueError)

Messages name files, fields and columns, and give counts; they never hold a value read
from patient data.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConnectorError", "DatasetNotFoundError", "NodeError", "NodeHomeError"]


class NodeError(Exception):
    """Root of the hospital node's errors."""


class NodeHomeError(NodeError):
    """The node home folder or its ``node.toml`` is missing or invalid."""


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
