"""The statistics spec (a study): a statistics query as a file, signed and approved like an experiment.

A study is a TOML file whose tables are a :class:`~privacy.query.StatisticsQuery`
(``[data]``, ``[columns.<name>]``, ``[[statistics]]``, ``[privacy]``, and optionally
``[federation] secure_aggregation = true`` for answers that reach the coordinator only as
SecAgg+ totals; see :mod:`privacy.query`) plus::

    kind = "statistics"      optional in the file (before any table); always in the canonical JSON
    [study]                  name, description, mlflow_experiment (defaults to name)

:meth:`StudySpec.from_toml` and :meth:`StudySpec.from_mapping` are the only ways in: every
problem at once, by field, as one :class:`~experiments.errors.SpecError`. The query is
parsed by :mod:`privacy.query`, the very code each node runs on the spec it receives.

:meth:`StudySpec.canonical_json` is the spec as the system understands it (every default
filled, the filter in its canonical text), written by the one canonical form every spec
uses (:func:`experiments.spec.canonical_json`), and :meth:`StudySpec.digest` is its
SHA-256 (:func:`privacy.governance.spec_digest`), what an officer approves and a partner's
submission signs. The canonical JSON carries ``"kind": "statistics"`` and the
``[study]`` table, which no experiment spec has, and an experiment's ``[experiment]``
table is refused here: a signed spec of one kind can never be read, or approved, as the
other.

:func:`study_cost` is what a study costs each site: the PLD composition, at the spec's
delta, of one DP event per release (:meth:`~privacy.query.StatisticsQuery.events`), as
every node's ledger composes them. The spec's epsilon calibrates the noise; the charge
is that composition: pure epsilon-DP releases compose to at most the sum of their
epsilons, the spec's epsilon, plus what PLD's pessimistic grid adds (up to 1e-3 per
release; 1.002 for the prevalence example's 1.0).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.errors import SpecError
from experiments.spec import canonical_json, read_toml
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon
from privacy.errors import QueryError
from privacy.governance import spec_digest
from privacy.query import MAX_CELLS, STUDY_KIND, Release, StatisticsQuery

__all__ = ["KIND", "StudyCost", "StudySection", "StudySpec", "study_cost"]

#: The ``kind`` of every statistics spec.
KIND = STUDY_KIND

_STUDY_KEYS = ("name", "description", "mlflow_experiment")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class StudySection:
    """``[study]``: what the study is called and where its results are recorded."""

    name: str
    description: str = ""
    mlflow_experiment: str = ""  # the name when not given

    def to_mapping(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "mlflow_experiment": self.mlflow_experiment}


@dataclass(frozen=True)
class StudySpec:
    """A validated, frozen statistics spec. Build it with :meth:`from_toml` or :meth:`from_mapping`."""

    study: StudySection
    query: StatisticsQuery

    @property
    def kind(self) -> str:
        return KIND

    @classmethod
    def from_toml(cls, path: Path | str, *, max_cells: int = MAX_CELLS) -> StudySpec:
        """Read and validate the study in the TOML file at `path`.

        Raises
        ------
        SpecError
            The file cannot be read, is not TOML (the message gives the line), or has
            problems; every problem is listed.
        """
        return cls.from_mapping(read_toml(path), source=str(path), max_cells=max_cells)

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any], *, source: str = "<mapping>", max_cells: int = MAX_CELLS
    ) -> StudySpec:
        """Validate a study given as nested mappings (TOML tables, parsed JSON).

        Raises
        ------
        SpecError
            Listing every problem: ``[study]``'s, then the query's (``data.filter: ...``,
            ``statistics[2].column ...``).
        """
        if not isinstance(mapping, Mapping):
            raise SpecError(source, [f"a study spec must be a table of tables; found {type(mapping).__name__}"])
        if "experiment" in mapping and "study" not in mapping:
            raise SpecError(
                source, ["this is an experiment spec (it has an [experiment] table); use `medfed experiment` for it"]
            )
        problems: list[str] = []
        study = _study_section(mapping.get("study"), problems)
        query: StatisticsQuery | None = None
        try:
            query = StatisticsQuery.from_mapping(mapping, source=source, max_cells=max_cells)
        except QueryError as err:
            problems.extend(err.problems)
        if query is not None and query.cohort is not None:
            problems.extend(study_cohort_problems(query))
        if problems or study is None or query is None:
            raise SpecError(source, problems)
        return cls(study=study, query=query)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<json>", max_cells: int = MAX_CELLS) -> StudySpec:
        """Validate a study given as JSON, such as :meth:`canonical_json` wrote."""
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(source, [f"not valid JSON: {err}"]) from None
        return cls.from_mapping(mapping, source=source, max_cells=max_cells)

    def to_mapping(self) -> dict[str, Any]:
        """The study as plain JSON-compatible tables, every default filled, with its ``kind``."""
        return {"kind": KIND, "study": self.study.to_mapping(), **self.query.to_mapping()}

    def canonical_json(self) -> str:
        """The study as the system understands it: sorted keys, no whitespace, all defaults."""
        return canonical_json(self.to_mapping())

    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_json`; what approvals and signatures refer to."""
        return spec_digest(self.canonical_json())


@dataclass(frozen=True)
class StudyCost:
    """What a study costs each site, and the releases that make it up.

    Attributes
    ----------
    epsilon, delta
        The spec's epsilon (which calibrates the noise) and delta.
    epsilon_charged_per_site
        The releases' DP events composed by PLD at ``delta``, as every node's ledger
        composes them: what each site is charged, ``epsilon`` up to PLD's grid.
    releases
        The release plan, in order: each one's mechanism, scale and share of epsilon.
    """

    epsilon: float
    delta: float
    epsilon_charged_per_site: float
    releases: tuple[Release, ...]


def study_cost(spec: StudySpec) -> StudyCost:
    """The per-site charge of `spec`: PLD over its releases' events, at the spec's delta."""
    query = spec.query
    return StudyCost(
        epsilon=query.epsilon,
        delta=query.delta,
        epsilon_charged_per_site=epsilon(query.events(), delta=query.delta, accountant=LEDGER_ACCOUNTANT),
        releases=tuple(query.releases()),
    )


def _study_section(raw: Any, problems: list[str]) -> StudySection | None:
    if raw is None:
        problems.append("the [study] table is required (name, description, mlflow_experiment)")
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"study must be a table; found {type(raw).__name__}")
        return None
    for key in raw:
        if key not in _STUDY_KEYS:
            matches = difflib.get_close_matches(str(key), _STUDY_KEYS, n=1)
            hint = f"; did you mean '{matches[0]}'?" if matches else f"; the keys of [study] are {', '.join(_STUDY_KEYS)}"
            problems.append(f"study.{key} is not a known key{hint}")
    before = len(problems)
    name = raw.get("name")
    if name is None:
        problems.append("study.name is required")
    elif not isinstance(name, str) or not _NAME.fullmatch(name):
        problems.append(f"study.name must contain only letters, digits, '_', '.' and '-'; found {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.append(f"study.description must be a string; found {description!r}")
    mlflow_experiment = raw.get("mlflow_experiment", name)
    if mlflow_experiment is not None and (not isinstance(mlflow_experiment, str) or not mlflow_experiment):
        problems.append(f"study.mlflow_experiment must be a non-empty string; found {mlflow_experiment!r}")
    if len(problems) > before or not isinstance(name, str):
        return None
    assert isinstance(description, str) and isinstance(mlflow_experiment, str)
    return StudySection(name=name, description=description, mlflow_experiment=mlflow_experiment)


def study_cohort_problems(query: StatisticsQuery) -> list[str]:
    """A study's ``data.cohort`` against the clinical tasks: its covariates are the declared columns but the label."""
    from models.clinical_tasks import TASKS as CLINICAL_TASKS
    from models.clinical_tasks import cohort_problems

    assert query.cohort is not None
    task = CLINICAL_TASKS.get(query.cohort.get("task")) if isinstance(query.cohort.get("task"), str) else None
    if "covariates" in query.cohort:
        return ["data.cohort.covariates is not a key: a study cohort's covariates are its declared [columns]"]
    covariates = [name for name in query.column_names if task is None or name != task.label]
    problems = []
    for field, message in cohort_problems({**query.cohort, "covariates": covariates}):
        problems.append(f"{'columns' if field == 'data.cohort.covariates' else field} {message}")
    return problems
