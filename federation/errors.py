"""Errors of the coordinator side.

    FederationError
    └── NotEnoughNodesError    fewer nodes than the spec's minimum answered in time

(``federation.protocol.ProtocolError`` lives with the wire contract, which a node imports
on its own.)
"""

__all__ = ["FederationError", "NotEnoughNodesError"]


class FederationError(Exception):
    """Root of the coordinator's errors."""


class NotEnoughNodesError(FederationError, RuntimeError):
    """Fewer hospitals than the spec's minimum are connected or accepted the run."""

