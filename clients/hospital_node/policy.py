"""The node policy: the officer's standing limits, in ``policy.toml`` in the node home.

::

    [policy]
    allowed_tasks = ["tabular-classification", "imaging-classification", "statistics"]
    min_cohort_size = 100              # patients a dataset must have to take part
    min_cell_size = 10                 # a statistics cell whose noisy count is below is suppressed
    max_cells = 1000                   # cells one statistics query's group-by may have
    max_epsilon_per_experiment = 10.0  # one experiment's own epsilon on a dataset
    require_secure_aggregation = false
    max_submission_age_hours = 72.0    # a submission signed longer ago cannot start a run
    reservation_hold_hours = 24.0      # how long a run's reservation outlives its last activity

Every key is optional; a missing file or key means the default above. A spec may
tighten these limits (``privacy.min_cohort_size``, ``privacy.target_epsilon``,
``federation.secure_aggregation``), never loosen them: the node applies the stricter of
the two. ``medfed node init`` writes this file with the defaults; the officer changes it with
``medfed node policy set``, which validates each field and records the change in the
node's signed audit log (a hand edit is not audited, and ``policy show`` says so).

Statistics studies (task ``statistics``) are allowed by default, like the training tasks:
each study still needs its officer's approval of its exact digest, and its whole cost is
reserved and charged to the same dataset budget. A policy file written before studies
existed lists its tasks without it, so such a node refuses studies until the officer
adds the task (``medfed node policy set allowed_tasks=...``): a standing limit never
widens by itself. ``min_cell_size`` applies to the *noisy* count of a cell (suppression
is post-processing of a DP release; the true count is never consulted; 0 suppresses
nothing); ``max_cells``
bounds a query's group-by before anything is read.

A run reserves its whole privacy cost when the node admits it
(:meth:`privacy.ledger.PrivacyLedger.reserve_run`); if the run vanishes, its
reservation stops counting ``reservation_hold_hours`` after its last activity.

The ledger composes with PLD only (every epsilon the node shows is that one number), so
``accountant``, a setting of earlier releases, is no longer one: a file that still names
``"pld"``, ``"prv"`` or ``"rdp"`` is read, the value is ignored, and ``medfed node doctor``
says so (:attr:`NodePolicy.ignored_accountant`).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from clients.hospital_node.errors import NodeHomeError
from federation.protocol import POLICY_TASKS
from privacy.private_files import publish
from privacy.query import MAX_CELLS

__all__ = ["POLICY_FIELDS", "POLICY_FILE", "NodePolicy", "parse_settings"]

POLICY_FILE = "policy.toml"

_KEYS = POLICY_FIELDS = (
    "allowed_tasks",
    "min_cohort_size",
    "min_cell_size",
    "max_cells",
    "max_epsilon_per_experiment",
    "require_secure_aggregation",
    "max_submission_age_hours",
    "reservation_hold_hours",
)
# Accepted in files written by earlier releases, and ignored: the ledger composes with PLD.
_RETIRED_ACCOUNTANTS = ("pld", "prv", "rdp")
_MAX_HOLD_HOURS = 24 * 365
# The most cells any statistics query may have; a policy may only lower it.
_MAX_CELLS = MAX_CELLS


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _typed(name: str, text: str) -> Any:
    """`text` as the type of setting `name`; left as text when it does not parse, so that
    validation names the field and what it found."""
    default = getattr(NodePolicy(), name)
    if isinstance(default, tuple):
        return [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(default, bool):
        lowered = text.strip().lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else text
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                return text
    return text.strip()


def parse_settings(assignments: Sequence[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs (``min_cohort_size=50``, ``allowed_tasks=a,b``) as typed settings.

    Raises
    ------
    NodeHomeError
        Every pair that is not ``FIELD=VALUE`` or names no setting, at once, with a hint.
    """
    problems: list[str] = []
    settings: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            problems.append(f"{assignment!r} is not FIELD=VALUE; fields: {', '.join(_KEYS)}")
        elif name not in _KEYS:
            close = difflib.get_close_matches(name, _KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"fields: {', '.join(_KEYS)}"
            problems.append(f"policy.{name} is not a policy setting; {hint}")
        elif name in settings:
            problems.append(f"policy.{name} is given twice")
        else:
            settings[name] = _typed(name, text)
    if problems:
        raise NodeHomeError("the policy change is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    return settings


@dataclass(frozen=True)
class NodePolicy:
    """The officer's standing limits for every experiment on this node."""

    allowed_tasks: tuple[str, ...] = POLICY_TASKS
    min_cohort_size: int = 100
    min_cell_size: int = 10
    max_cells: int = _MAX_CELLS
    max_epsilon_per_experiment: float = 10.0
    require_secure_aggregation: bool = False
    max_submission_age_hours: float = 72.0
    reservation_hold_hours: float = 24.0
    source: str = field(default="defaults", compare=False)
    # What an older policy file named as its accountant (ignored; `doctor` warns), or None.
    ignored_accountant: str | None = field(default=None, compare=False)

    @property
    def reservation_hold(self) -> timedelta:
        """How long a run reservation outlives its last activity before it stops counting."""
        return timedelta(hours=self.reservation_hold_hours)

    @classmethod
    def read(cls, path: Path) -> NodePolicy:
        """The policy in `path`, or the defaults if there is no such file.

        Raises
        ------
        NodeHomeError
            The file is unreadable, not TOML, or has invalid values (every problem at once).
        """
        if not path.exists():
            return cls()
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise NodeHomeError(f"cannot read the node policy {path}: {err.strerror or type(err).__name__}") from err
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise NodeHomeError(f"the node policy {path} is not valid TOML: {err}") from err
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, source: str) -> NodePolicy:
        problems = [f"unknown table [{key}]; the policy lives in [policy]" for key in raw if key != "policy"]
        table = raw.get("policy", {})
        if not isinstance(table, Mapping):
            raise NodeHomeError(f"the node policy {source} is invalid: [policy] must be a table")
        problems += [
            f"policy.{key} is not a policy setting; known: {', '.join(_KEYS)}" for key in table if key not in (*_KEYS, "accountant")
        ]
        values: dict[str, Any] = {}
        tasks = table.get("allowed_tasks", POLICY_TASKS)
        if not isinstance(tasks, list | tuple) or not all(isinstance(t, str) and t in POLICY_TASKS for t in tasks):
            problems.append(f"policy.allowed_tasks must be a list of {', '.join(POLICY_TASKS)}; found {tasks!r}")
        else:
            values["allowed_tasks"] = tuple(tasks)
        cohort = table.get("min_cohort_size", 100)
        if isinstance(cohort, bool) or not isinstance(cohort, int) or cohort < 1:
            problems.append(f"policy.min_cohort_size must be an integer >= 1; found {cohort!r}")
        else:
            values["min_cohort_size"] = cohort
        cell = table.get("min_cell_size", 10)
        if isinstance(cell, bool) or not isinstance(cell, int) or cell < 0:
            problems.append(f"policy.min_cell_size must be an integer >= 0; found {cell!r}")
        else:
            values["min_cell_size"] = cell
        cells = table.get("max_cells", _MAX_CELLS)
        if isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= _MAX_CELLS:
            problems.append(f"policy.max_cells must be an integer in 1..{_MAX_CELLS}; found {cells!r}")
        else:
            values["max_cells"] = cells
        cap = table.get("max_epsilon_per_experiment", 10.0)
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not (math.isfinite(cap) and cap > 0):
            problems.append(f"policy.max_epsilon_per_experiment must be a number > 0; found {cap!r}")
        else:
            values["max_epsilon_per_experiment"] = float(cap)
        secagg = table.get("require_secure_aggregation", False)
        if not isinstance(secagg, bool):
            problems.append(f"policy.require_secure_aggregation must be true or false; found {secagg!r}")
        else:
            values["require_secure_aggregation"] = secagg
        hold = table.get("reservation_hold_hours", 24.0)
        if isinstance(hold, bool) or not isinstance(hold, int | float) or not (math.isfinite(hold) and 0 < hold <= _MAX_HOLD_HOURS):
            problems.append(f"policy.reservation_hold_hours must be a number of hours in (0, {_MAX_HOLD_HOURS}]; found {hold!r}")
        else:
            values["reservation_hold_hours"] = float(hold)
        if "accountant" in table:
            accountant = table["accountant"]
            if accountant not in _RETIRED_ACCOUNTANTS:
                problems.append(
                    f"policy.accountant is no longer a setting (the ledger composes with PLD); remove it; found {accountant!r}"
                )
            else:
                values["ignored_accountant"] = accountant
        age = table.get("max_submission_age_hours", 72.0)
        if isinstance(age, bool) or not isinstance(age, int | float) or not (math.isfinite(age) and age > 0):
            problems.append(f"policy.max_submission_age_hours must be a number of hours > 0; found {age!r}")
        else:
            values["max_submission_age_hours"] = float(age)
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise NodeHomeError(f"the node policy {source} is invalid:\n{listing}")
        return cls(**values, source=source)

    @staticmethod
    def settings_in(path: Path) -> dict[str, Any]:
        """The known settings `path` holds as written, valid or not ({} if it is missing or not TOML):
        what a change starts from, so that a broken file can be put right field by field."""
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8")).get("policy", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return {}
        return {key: table[key] for key in _KEYS if isinstance(table, Mapping) and key in table}

    def to_mapping(self) -> dict[str, Any]:
        """The settings as plain values (what ``[policy]`` holds and the audit log records)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in
                ((key, getattr(self, key)) for key in _KEYS)}

    def write(self, path: Path) -> None:
        """Replace the policy file with this policy: whole, owner only (0600).

        Raises
        ------
        NodeHomeError
            If the file cannot be written (a read-only or full disk).
        """
        try:
            publish(path, self.render())
        except OSError as err:
            raise NodeHomeError(f"cannot write the node policy {path}: {err.strerror or err}") from err

    def render(self) -> str:
        """The policy as the TOML file ``medfed node init`` writes."""
        tasks = ", ".join(f'"{t}"' for t in self.allowed_tasks)
        return (
            "# The data-governance officer's standing limits for every experiment on this node.\n"
            "# A spec may tighten them, never loosen them. See `medfed node --help`.\n"
            "[policy]\n"
            f"allowed_tasks = [{tasks}]\n"
            f"min_cohort_size = {self.min_cohort_size}  # patients a dataset needs to take part\n"
            f"min_cell_size = {self.min_cell_size}  # a statistics cell whose noisy count is below is suppressed\n"
            f"max_cells = {self.max_cells}  # cells one statistics query may have\n"
            f"max_epsilon_per_experiment = {self.max_epsilon_per_experiment!r}  # one experiment's own epsilon\n"
            f"require_secure_aggregation = {'true' if self.require_secure_aggregation else 'false'}\n"
            f"max_submission_age_hours = {self.max_submission_age_hours!r}  # older submissions cannot start a run\n"
            f"reservation_hold_hours = {self.reservation_hold_hours!r}  # a vanished run's reservation stops counting after this\n"
        )
