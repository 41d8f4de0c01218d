"""The OMOP CDM v5.4 subset medfed reads: its tables, their columns and DuckDB types.

Only these columns are read from a source, whatever else its tables hold. ``required``
columns are NOT NULL in OMOP CDM v5.4 and medfed cannot use a row without them; a
source that lacks one of them is refused, naming table and column. An optional column a
source lacks reads as NULL. Data only: no I/O, no heavy imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Column", "OmopTable", "TABLES", "TABLE_NAMES"]


@dataclass(frozen=True)
class Column:
    """One column: its OMOP name, its DuckDB type, and whether a row needs it."""

    name: str
    type: str  # a DuckDB type: BIGINT, INTEGER, DOUBLE, DATE, TIMESTAMP
    required: bool


@dataclass(frozen=True)
class OmopTable:
    """One OMOP table as medfed reads it.

    ``key`` is its primary key; ``date`` the column that dates a row (checked against the
    snapshot's date and the person's birth); ``concept`` the column whose concept ids medfed
    selects by, with ``domain`` the ``models.clinical_tasks.Concept.domain`` it reads there.
    """

    name: str
    columns: tuple[Column, ...]
    key: str
    date: str | None = None
    datetime: str | None = None
    concept: str | None = None
    domain: str | None = None

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)


def _c(name: str, type_: str, required: bool = True) -> Column:
    return Column(name, type_, required)


TABLES: Mapping[str, OmopTable] = {
    t.name: t
    for t in (
        OmopTable(
            "person",
            (
                _c("person_id", "BIGINT"),
                _c("gender_concept_id", "INTEGER"),
                _c("year_of_birth", "INTEGER"),
                _c("month_of_birth", "INTEGER", False),
                _c("day_of_birth", "INTEGER", False),
                _c("birth_datetime", "TIMESTAMP", False),
                _c("care_site_id", "BIGINT", False),
                _c("location_id", "BIGINT", False),
            ),
            key="person_id",
            concept="gender_concept_id",
            domain="gender",
        ),
        OmopTable(
            "observation_period",
            (
                _c("observation_period_id", "BIGINT"),
                _c("person_id", "BIGINT"),
                _c("observation_period_start_date", "DATE"),
                _c("observation_period_end_date", "DATE"),
                _c("period_type_concept_id", "INTEGER"),
            ),
            key="observation_period_id",
            date="observation_period_start_date",
        ),
        OmopTable(
            "visit_occurrence",
            (
                _c("visit_occurrence_id", "BIGINT"),
                _c("person_id", "BIGINT"),
                _c("visit_concept_id", "INTEGER"),
                _c("visit_start_date", "DATE"),
                _c("visit_end_date", "DATE"),
                _c("visit_type_concept_id", "INTEGER"),
            ),
            key="visit_occurrence_id",
            date="visit_start_date",
        ),
        OmopTable(
            "condition_occurrence",
            (
                _c("condition_occurrence_id", "BIGINT"),
                _c("person_id", "BIGINT"),
                _c("condition_concept_id", "INTEGER"),
                _c("condition_start_date", "DATE"),
                _c("condition_end_date", "DATE", False),
                _c("condition_type_concept_id", "INTEGER"),
            ),
            key="condition_occurrence_id",
            date="condition_start_date",
            concept="condition_concept_id",
            domain="condition",
        ),
        OmopTable(
            "measurement",
            (
                _c("measurement_id", "BIGINT"),
                _c("person_id", "BIGINT"),
                _c("measurement_concept_id", "INTEGER"),
                _c("measurement_date", "DATE"),
                _c("measurement_datetime", "TIMESTAMP", False),
                _c("measurement_type_concept_id", "INTEGER"),
                _c("value_as_number", "DOUBLE", False),
                _c("unit_concept_id", "INTEGER", False),
            ),
            key="measurement_id",
            date="measurement_date",
            datetime="measurement_datetime",
            concept="measurement_concept_id",
            domain="measurement",
        ),
        OmopTable(
            "observation",
            (
                _c("observation_id", "BIGINT"),
                _c("person_id", "BIGINT"),
                _c("observation_concept_id", "INTEGER"),
                _c("observation_date", "DATE"),
                _c("observation_type_concept_id", "INTEGER"),
                _c("value_as_number", "DOUBLE", False),
            ),
            key="observation_id",
            date="observation_date",
            concept="observation_concept_id",
            domain="observation",
        ),
        OmopTable(
            "drug_exposure",
            (
                _c("drug_exposure_id", "BIGINT"),
                _c("person_id", "BIGINT"),
                _c("drug_concept_id", "INTEGER"),
                _c("drug_exposure_start_date", "DATE"),
                _c("drug_exposure_end_date", "DATE"),
                _c("drug_type_concept_id", "INTEGER"),
            ),
            key="drug_exposure_id",
            date="drug_exposure_start_date",
            concept="drug_concept_id",
            domain="drug",
        ),
    )
}

TABLE_NAMES: tuple[str, ...] = tuple(TABLES)
