"""A statistics study's run, as the partner's tools and the coordinator share it: its options, its report folder.

:class:`StudyOptions` are the coordinator's settings for one study: how many sites must
answer and how long to wait. They decide nothing about privacy (every node decides that
from the signed spec and its own state), so they are not signed: ``medfed study submit``
puts them in the run config (``study-options``), where the ServerApp reads them.

A finished study leaves its report in ``<output-dir>/<submission id>/``: the table, CSV
and plots of :mod:`experiments.study_report`, every valid reply as it arrived, each number in it
(:data:`ANSWERS_FILE`: the admission replies, then the answers) and a summary with each site's status and epsilon
(:data:`SUMMARY_FILE`), whose presence marks the submission finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from experiments.errors import SubmissionError

__all__ = ["ANSWERS_FILE", "SUMMARY_FILE", "StudyOptions"]

ANSWERS_FILE = "answers.json"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class StudyOptions:
    """The coordinator's settings for one study (not signed: they decide nothing about privacy)."""

    min_sites: int = 1
    node_wait_seconds: float = 60.0
    approval_wait_seconds: float = 3600.0
    timeout_seconds: float = 600.0

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.min_sites, bool) or not isinstance(self.min_sites, int) or self.min_sites < 1:
            problems.append(f"min_sites must be an integer >= 1; found {self.min_sites!r}")
        for name in ("node_wait_seconds", "approval_wait_seconds", "timeout_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                problems.append(f"{name} must be a number of seconds >= 0; found {value!r}")
        if problems:
            raise SubmissionError("invalid study options: " + "; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StudyOptions:
        """The options `to_json` wrote; empty text means the defaults.

        Raises
        ------
        SubmissionError
            The text is not the JSON of valid options.
        """
        if not text:
            return cls()
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as err:
            raise SubmissionError(f"the run config's study-options are not valid: {err}") from None
