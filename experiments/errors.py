"""Errors of the research partner's side: specs, costing and submission.

    ExperimentError
    ├── SpecError          the spec has problems (also a ValueError); lists every one
    ├── SubmissionError    the SuperLink could not be reached or refused the run
    └── ReportError        a study report's record or file is malformed (also a ValueError)
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ExperimentError", "ReportError", "SpecError", "SubmissionError"]


class ExperimentError(Exception):
    """Root of the experiments package's errors."""


class SpecError(ExperimentError, ValueError):
    """An experiment spec has one or more problems, all of which are listed.

    Attributes
    ----------
    source
        Where the spec came from: a file path, or a name given by the caller.
    problems
        One message per problem, e.g. ``privacy.delta must be < 1; found 1.5``.
    """

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems: tuple[str, ...] = tuple(problems)
        count = len(self.problems)
        header = f"{source} has {count} problem{'' if count == 1 else 's'}:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[type[SpecError], tuple[str, tuple[str, ...]]]:
        # Exceptions pickle their args; ours are (source, problems).
        return (type(self), (self.source, self.problems))


class SubmissionError(ExperimentError, RuntimeError):
    """The experiment could not be submitted to, or followed on, the SuperLink."""


class ReportError(ExperimentError, ValueError):
    """A study report's row or CSV file is malformed; the message names the field (and line)."""
