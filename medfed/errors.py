"""Errors of the `medfed` command itself (demo, local cluster, synthetic data).

    MedfedError
    ├── ClusterError   a local Flower process failed to start or become ready
    ├── DemoError      the demo could not finish
    ├── SimulationError a rehearsal on the simulation engine cannot start or did not finish
    └── SynthError     a synthetic alliance cannot be written as asked
"""

__all__ = ["ClusterError", "DemoError", "MedfedError", "SimulationError", "SynthError"]


class MedfedError(Exception):
    """Root of the command's own errors."""


class ClusterError(MedfedError, RuntimeError):
    """A local SuperLink or SuperNode did not start or did not become ready."""


class DemoError(MedfedError, RuntimeError):
    """The demo could not finish."""


class SimulationError(MedfedError, RuntimeError):
    """A rehearsal on Flower's simulation engine cannot start as asked (memory, Ray cluster, spec) or did not finish."""


class SynthError(MedfedError, ValueError):
    """A synthetic alliance cannot be written as asked (bad size or scale, a file where a folder must be)."""
