"""Errors of the coordinator side.

    FederationError
    ├── NotEnoughNodesError    fewer nodes than the spec's minimum answered in time
    ├── CoordinatorError       the coordinator's home, its SuperLink or an enrolment is unusable
    └── StatisticsError        site answers to a statistics query cannot be combined (also a ValueError)

(``federation.protocol.ProtocolError`` lives with the wire contract, which a node imports
on its own.)
"""

__all__ = ["CoordinatorError", "FederationError", "NotEnoughNodesError", "StatisticsError"]


class FederationError(Exception):
    """Root of the coordinator's errors."""


class NotEnoughNodesError(FederationError, RuntimeError):
    """Fewer hospitals than the spec's minimum are connected or accepted the run."""



class CoordinatorError(FederationError):
    """The coordinator home, its SuperLink process or an enrolment request cannot be used.

    A missing or invalid ``coordinator.toml``, a SuperLink that is not running (or runs
    already), a control address off loopback without the explicit opt-in, or a bad
    enrolment request. The message says what to do next.
    """


class StatisticsError(FederationError, ValueError):
    """The sites' noisy releases cannot be combined as asked.

    Vectors whose cell counts or widths disagree, an unknown noise mechanism, a negative
    scale, bounds or bin edges out of order, or a site answer without the release the
    query's plan names. The message names the argument (and site) at fault.
    """
