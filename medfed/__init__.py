"""medfed: the command that mounts each area's CLI."""

__all__ = ["__version__"]

__version__ = "0.1.0"
