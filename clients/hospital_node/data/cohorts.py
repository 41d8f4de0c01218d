"""Cohort building: one row per unit of privacy from a hospital's OMOP views, as a task defines it.

:func:`build_cohort` turns a :class:`~models.clinical_tasks.CohortDefinition` into one DuckDB
query over the seven OMOP views of a connection (``person``, ``observation_period``,
``condition_occurrence``, ``measurement``, ``observation``, ``drug_exposure``,
``visit_occurrence``) and returns its result as a :class:`pyarrow.Table`:
``person_id`` (int64), ``index_date`` (date32), the task's label (int8 0/1, absent when
scoring) and the named covariates in order (float64, null when missing).

The semantics are the module docstring of :mod:`models.clinical_tasks`; where it leaves a
choice open, this module takes it as follows.

- Look-back ``[index + start, index + end)`` and reading window ``[index + start,
  index + end)`` never reach the index day (the definition checks ``end <= 0``); a record
  is in a window by its (start) date, a reading by its ``measurement_date``: the column
  OMOP requires (``measurement_datetime`` is optional), as OHDSI FeatureExtraction
  windows every covariate. Time-at-risk is ``[index + start, index + end]`` inclusive.
- Onset tasks: target = aged 18 or more at index, an observation period with start <=
  index + look-back start and end >= index, no exclusion condition or drug starting on or
  before the index day. Label = any outcome condition starting in the time-at-risk (the
  exclusion leaves only first diagnoses when the time-at-risk starts the day after index).
  A patient without the outcome is left out when no observation period covering the index
  day reaches the end of the time-at-risk.
- Pregnancy tasks: a pregnancy is a ``pregnancy`` condition row of a woman (start =
  conception, end = delivery); index = start + ``index_gestation_days``; each mother's
  pregnancy with the earliest index inside ``period`` (ties: earliest end, lowest row id).
  Twins are one pregnancy row, so they never add a row. The docstring sets no
  observation-period or follow-up rule for these tasks and none is applied. Maternal
  label: gestational diabetes or pre-eclampsia starting in the time-at-risk; infant label:
  a birth weight < ``LOW_BIRTH_WEIGHT_G`` or a gestational age < ``PRETERM_WEEKS``
  measured on the mother in the time-at-risk (either twin positive makes the row positive).
- Covariates: ``age`` in whole years at index (missing birth month or day read as 1);
  ``sex_male`` 1.0 for the male gender concept, 0.0 for female, null otherwise;
  ``history_*``, ``current_smoker``, ``family_history_hypertension``: 1.0 when a condition
  (observation for the last two) of that concept starts in the look-back, else 0.0;
  ``*_last``: the last EHR-typed value of that measurement in the look-back (latest
  ``measurement_date``, as FeatureExtraction takes it, then the highest value: a tie-break
  that, unlike time or row id, holds when clinics leave the time at midnight or the
  hospital's ETL renumbers its rows; null values skipped); ``prior_pregnancies``: distinct
  pregnancies (by conception date) ending in the look-back and, for pregnancy tasks,
  before this pregnancy's start. Signal summaries read device- and self-reported readings
  with a value in the reading window: mean, sample sd (null below 2 readings), slope of
  value on the reading's day (days from index, by ``measurement_date``) in units per 30
  days (null unless there are at least ``SLOPE_MIN_READINGS`` (3) readings whose dates span
  at least ``SLOPE_MIN_SPAN_DAYS`` (7) days: fewer or closer readings give slopes of
  hundreds of units per 30 days),
  night_mean of readings whose datetime is from 00:00 to 05:59 (a reading with only a
  date has no hour and never counts as night), frac_above = share at or above the
  signal's threshold, days = distinct reading dates / window length in days (0.0 without
  readings; every other summary is null then). Only night_mean reads
  ``measurement_datetime``, the widest column of the table: a cohort without it never
  decodes that column (BENCHMARKS.md, cohort building).

Only what the definition names is computed: a history, last value or signal that is not
asked for adds no join and no aggregate, and the measurement view is filtered by concept,
record type and window before anything is grouped. Readings are grouped per person and
signal with the summary kinds some named covariate asks for (``sbp_sd`` and
``glucose_mean`` compute both kinds for both signals) and then pivoted to the named
columns: one group-by with a filtered aggregate per named column measured slower. All work stays inside DuckDB, which
streams the views and spills to its ``temp_directory`` under its ``memory_limit``; the
caller owns the connection and its settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

import duckdb
import pyarrow as pa

from models.clinical_tasks import (
    CONCEPTS,
    COVARIATE_KINDS,
    LOW_BIRTH_WEIGHT_G,
    PRETERM_WEEKS,
    SIGNAL_SUMMARIES,
    SIGNALS,
    SLOPE_MIN_READINGS,
    SLOPE_MIN_SPAN_DAYS,
    TASKS,
    TYPE_DEVICE,
    TYPE_EHR,
    TYPE_SELF_REPORT,
    CohortDefinition,
)

__all__ = ["build_cohort", "cohort_sql"]

ADULT_AGE = 18


def build_cohort(
    connection: duckdb.DuckDBPyConnection, definition: CohortDefinition, *, scoring: bool = False
) -> pa.Table:
    """The cohort ``definition`` asks for, from the OMOP views of ``connection``.

    Parameters
    ----------
    connection
        A DuckDB connection holding the seven OMOP views (see the module docstring).
    definition
        A validated cohort definition (:meth:`CohortDefinition.from_mapping`).
    scoring
        Build the target cohort at the index date only: no time-at-risk, outcome or
        follow-up requirement and no label column (for scoring current patients).

    Returns
    -------
    pyarrow.Table
        ``person_id``, ``index_date``, the label (unless scoring), then
        ``definition.covariates`` in order; one row per unit of privacy, by ``person_id``.
    """
    table = connection.sql(cohort_sql(definition, scoring=scoring)).to_arrow_table()
    return table.cast(_schema(definition, scoring=scoring))


def _schema(definition: CohortDefinition, *, scoring: bool) -> pa.Schema:
    fields = [pa.field("person_id", pa.int64()), pa.field("index_date", pa.date32())]
    if not scoring:
        fields.append(pa.field(definition.label, pa.int8()))
    fields += [pa.field(name, pa.float64()) for name in definition.covariates]
    return pa.schema(fields)


# ---------------------------------------------------------------------------------- SQL
# Every literal spliced into the SQL below is an int, a float or an ISO date taken from the
# validated definition or from models.clinical_tasks: no text from a spec reaches the query.


def _date(value: date) -> str:
    return f"DATE '{value.isoformat()}'"


def _ids(names: Iterable[str]) -> str:
    return ", ".join(str(CONCEPTS[n].concept_id) for n in names)


def _shift(column: str, days: int) -> str:
    return f"({column} + {int(days)})"


def _index(definition: CohortDefinition, alias: str = "u") -> str:
    """The index date in SQL: a constant for calendar tasks, so that DuckDB can prune the
    scans by date; each mother's own ``<alias>.index_date`` for pregnancy tasks."""
    if TASKS[definition.task].index == "calendar":
        assert definition.index_date is not None
        return _date(definition.index_date)
    return f"{alias}.index_date"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def cohort_sql(definition: CohortDefinition, *, scoring: bool = False) -> str:
    """The DuckDB query :func:`build_cohort` runs for ``definition`` (for inspection and tests)."""
    task = TASKS[definition.task]
    ctes: list[str] = []
    if task.index == "calendar":
        ctes.append(_calendar_units(definition, scoring=scoring))
    else:
        ctes.append(_pregnancy_units(definition))
    selects = ["u.person_id", "u.index_date"]
    joins: list[str] = []
    if not scoring:
        ctes.append(_labels(definition))
        selects.append(f"CAST(l.label AS TINYINT) AS {_quote(definition.label)}")
        joins.append("JOIN labelled AS l USING (person_id)")
    # The rows that will be in the result: measurement scans keep only their readings.
    members = "units" if scoring else "labelled"
    covariate_ctes, covariate_joins, columns = _covariates(definition, members)
    ctes += covariate_ctes
    joins += covariate_joins
    selects += [f"CAST({expr} AS DOUBLE) AS {_quote(name)}" for name, expr in columns]
    return (
        "WITH " + ",\n".join(ctes)
        + "\nSELECT " + ",\n       ".join(selects)
        + "\nFROM units AS u\n" + "\n".join(joins)
        + "\nORDER BY u.person_id"
    )


def _calendar_units(definition: CohortDefinition, *, scoring: bool) -> str:
    task = TASKS[definition.task]
    assert definition.index_date is not None  # CohortDefinition requires it for calendar tasks
    index = _date(definition.index_date)
    lookback_start = _shift(index, definition.lookback_days[0])
    conditions = [n for n in task.exclusion if CONCEPTS[n].domain == "condition"]
    drugs = [n for n in task.exclusion if CONCEPTS[n].domain == "drug"]
    excluded = []
    if conditions:
        excluded.append(
            f"SELECT person_id FROM condition_occurrence WHERE condition_concept_id IN ({_ids(conditions)}) "
            f"AND condition_start_date <= {index} AND person_id IS NOT NULL"
        )
    if drugs:
        excluded.append(
            f"SELECT person_id FROM drug_exposure WHERE drug_concept_id IN ({_ids(drugs)}) "
            f"AND drug_exposure_start_date <= {index} AND person_id IS NOT NULL"
        )
    exclusion = (
        f"\n  AND p.person_id NOT IN ({' UNION ALL '.join(excluded)})" if excluded else ""
    )
    # The period covering the index day that reaches furthest: follow-up for the label.
    return f"""units AS (
SELECT p.person_id, {index} AS index_date, NULL::DATE AS pregnancy_start,
       p.gender_concept_id, p.year_of_birth, p.month_of_birth, p.day_of_birth, o.observed_until
FROM person AS p
JOIN (SELECT person_id, max(observation_period_end_date) AS observed_until
      FROM observation_period
      WHERE observation_period_start_date <= {lookback_start} AND observation_period_end_date >= {index}
      GROUP BY person_id) AS o USING (person_id)
WHERE {_age_sql('p', index)} >= {ADULT_AGE}{exclusion})"""


def _pregnancy_units(definition: CohortDefinition) -> str:
    assert definition.period is not None  # CohortDefinition requires it for pregnancy tasks
    first, last = (_date(d) for d in definition.period)
    gestation = int(definition.index_gestation_days)
    return f"""pregnancies AS (
SELECT c.person_id, c.condition_occurrence_id, c.condition_start_date AS pregnancy_start,
       c.condition_end_date AS delivery, c.condition_start_date + {gestation} AS index_date
FROM condition_occurrence AS c
JOIN person AS p USING (person_id)
WHERE c.condition_concept_id = {CONCEPTS['pregnancy'].concept_id}
  AND p.gender_concept_id = {CONCEPTS['female'].concept_id}
  AND c.condition_start_date + {gestation} BETWEEN {first} AND {last}),
units AS (
SELECT f.person_id, f.index_date, f.pregnancy_start,
       p.gender_concept_id, p.year_of_birth, p.month_of_birth, p.day_of_birth, NULL::DATE AS observed_until
FROM (SELECT person_id,
             arg_min(index_date, (index_date, delivery, condition_occurrence_id)) AS index_date,
             arg_min(pregnancy_start, (index_date, delivery, condition_occurrence_id)) AS pregnancy_start
      FROM pregnancies GROUP BY person_id) AS f
JOIN person AS p USING (person_id))"""


def _age_sql(alias: str, index: str) -> str:
    birthday_passed = (
        f"(month({index}) > coalesce({alias}.month_of_birth, 1) OR "
        f"(month({index}) = coalesce({alias}.month_of_birth, 1) AND day({index}) >= coalesce({alias}.day_of_birth, 1)))"
    )
    return f"(year({index}) - {alias}.year_of_birth - CASE WHEN {birthday_passed} THEN 0 ELSE 1 END)"


def _labels(definition: CohortDefinition) -> str:
    task = TASKS[definition.task]
    start, end = definition.time_at_risk_days
    index = _index(definition)
    in_risk = lambda column: f"{column} BETWEEN {_shift(index, start)} AND {_shift(index, end)}"  # noqa: E731
    if task.name == "infant_lbw_preterm":
        outcome = f"""SELECT DISTINCT u.person_id FROM units AS u JOIN measurement AS m USING (person_id)
  WHERE ((m.measurement_concept_id = {CONCEPTS['birth_weight'].concept_id} AND m.value_as_number < {float(LOW_BIRTH_WEIGHT_G)!r})
      OR (m.measurement_concept_id = {CONCEPTS['gestational_age_at_birth'].concept_id} AND m.value_as_number < {float(PRETERM_WEEKS)!r}))
    AND {in_risk('m.measurement_date')}"""
    else:
        outcome = f"""SELECT DISTINCT u.person_id FROM units AS u JOIN condition_occurrence AS c USING (person_id)
  WHERE c.condition_concept_id IN ({_ids(task.outcome)}) AND {in_risk('c.condition_start_date')}"""
    followed = "TRUE" if task.index != "calendar" else f"u.observed_until >= {_shift(index, end)}"
    # Without the outcome and without follow-up to the window's end the label is unknown: left out.
    return f"""outcomes AS ({outcome}),
labelled AS (
SELECT u.person_id, (o.person_id IS NOT NULL) AS label
FROM units AS u LEFT JOIN outcomes AS o USING (person_id)
WHERE o.person_id IS NOT NULL OR {followed})"""


def _covariates(definition: CohortDefinition, members: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """CTEs, joins and ``(name, expression)`` per named covariate, for only what is named.

    ``members`` names the CTE of the people the result will hold (``units`` or ``labelled``).
    """
    index = _index(definition)
    lookback = (
        lambda column: f"{column} >= {_shift(index, definition.lookback_days[0])} "  # noqa: E731
        f"AND {column} < {_shift(index, definition.lookback_days[1])}"
    )
    ctes: list[str] = []
    joins: list[str] = []
    columns: list[tuple[str, str]] = []
    kinds = {name: COVARIATE_KINDS[name] for name in definition.covariates}
    history = {n: _history_concept(n) for n, k in kinds.items() if k == "history"}
    last = {n: n.removesuffix("_last") for n, k in kinds.items() if k == "last"}
    signals = {n: _split_signal(n) for n, k in kinds.items() if k == "signal"}

    history_conditions = {n: c for n, c in history.items() if CONCEPTS[c].domain == "condition"}
    history_observations = {n: c for n, c in history.items() if CONCEPTS[c].domain == "observation"}
    if history_conditions:
        flags = ", ".join(
            f"max(CASE WHEN c.condition_concept_id = {CONCEPTS[c].concept_id} THEN 1 ELSE 0 END) AS {_quote(n)}"
            for n, c in history_conditions.items()
        )
        ctes.append(f"""history_conditions AS (
SELECT u.person_id, {flags}
FROM units AS u JOIN condition_occurrence AS c USING (person_id)
WHERE c.condition_concept_id IN ({_ids(set(history_conditions.values()))}) AND {lookback('c.condition_start_date')}
GROUP BY u.person_id)""")
        joins.append("LEFT JOIN history_conditions AS hc USING (person_id)")
    if history_observations:
        flags = ", ".join(
            f"max(CASE WHEN o.observation_concept_id = {CONCEPTS[c].concept_id} THEN 1 ELSE 0 END) AS {_quote(n)}"
            for n, c in history_observations.items()
        )
        ctes.append(f"""history_observations AS (
SELECT u.person_id, {flags}
FROM units AS u JOIN observation AS o USING (person_id)
WHERE o.observation_concept_id IN ({_ids(set(history_observations.values()))}) AND {lookback('o.observation_date')}
GROUP BY u.person_id)""")
        joins.append("LEFT JOIN history_observations AS ho USING (person_id)")
    if last:
        values = ", ".join(
            f"(max({_LATEST}) FILTER (WHERE m.measurement_concept_id = {CONCEPTS[c].concept_id})).v AS {_quote(n)}"
            for n, c in last.items()
        )
        ctes.append(f"""last_values AS (
SELECT m.person_id, {values}
{_measurements(definition, _last_filter(definition, last), members)}
GROUP BY m.person_id)""")
        joins.append("LEFT JOIN last_values AS lv USING (person_id)")
    if "prior_pregnancies" in kinds:
        before_this = "" if TASKS[definition.task].index == "calendar" else "\n  AND c.condition_end_date < u.pregnancy_start"
        ctes.append(f"""prior AS (
SELECT u.person_id, count(DISTINCT c.condition_start_date) AS prior_pregnancies
FROM units AS u JOIN condition_occurrence AS c USING (person_id)
WHERE c.condition_concept_id = {CONCEPTS['pregnancy'].concept_id} AND {lookback('c.condition_end_date')}{before_this}
GROUP BY u.person_id)""")
        joins.append("LEFT JOIN prior AS pp USING (person_id)")
    if signals:
        ctes += _signal_ctes(definition, signals, members)
        joins.append("LEFT JOIN signal_summaries AS ss USING (person_id)")

    for name, kind in kinds.items():
        if name == "age":
            expr = _age_sql("u", "u.index_date")
        elif name == "sex_male":
            expr = (
                f"CASE u.gender_concept_id WHEN {CONCEPTS['male'].concept_id} THEN 1 "
                f"WHEN {CONCEPTS['female'].concept_id} THEN 0 END"
            )
        elif kind == "history":
            expr = f"coalesce({'hc' if name in history_conditions else 'ho'}.{_quote(name)}, 0)"
        elif kind == "last":
            expr = f"lv.{_quote(name)}"
        elif kind == "count":
            expr = f"coalesce(pp.{_quote(name)}, 0)"
        else:
            expr = f"ss.{_quote(name)}"
            if signals[name][1] == "days":
                expr = f"coalesce({expr}, 0)"
        columns.append((name, expr))
    return ctes, joins, columns


def _last_filter(definition: CohortDefinition, last: dict[str, str]) -> str:
    index = _index(definition)
    start, end = definition.lookback_days
    return (
        f"m.measurement_concept_id IN ({_ids(set(last.values()))}) AND m.measurement_type_concept_id = {TYPE_EHR} "
        f"AND m.measurement_date >= {_shift(index, start)} AND m.measurement_date < {_shift(index, end)}"
    )


# The row of the latest measurement_date, then the highest value: the ``v`` of the largest such
# struct. By date, as OHDSI FeatureExtraction's MeasurementValue covariates take the last value
# (ORDER BY measurement_date DESC), and as OMOP requires only the date (measurement_datetime is
# optional, and clinics often leave it at midnight); a same-day tie goes to the higher value,
# which FeatureExtraction leaves to chance.
_LATEST = "{'t': m.measurement_date, 'v': m.value_as_number}"


def _signal_filter(definition: CohortDefinition, signals: dict[str, tuple[str, str]]) -> str:
    index = _index(definition)
    start, end = definition.reading_window_days
    return (
        f"m.measurement_concept_id IN ({_ids({s for s, _ in signals.values()})}) "
        f"AND m.measurement_type_concept_id IN ({TYPE_DEVICE}, {TYPE_SELF_REPORT}) "
        f"AND m.measurement_date >= {_shift(index, start)} AND m.measurement_date < {_shift(index, end)}"
    )


def _measurements(definition: CohortDefinition, where: str, members: str) -> str:
    """``FROM ... WHERE ...`` for the measurement rows of ``members`` that ``where`` keeps, in alias ``m``.

    Calendar tasks share one window, so the rows are filtered with constant bounds DuckDB
    pushes into the scan, then a semi-join keeps only the readings of ``members`` before
    anything is grouped: at 1M patients, 36 % of them in the cohort, that halves the rows
    the group-bys hash (BENCHMARKS.md, cohort building). Pregnancy tasks join each mother's index date first. Each reader
    scans the view on its own: one scan under an ``OR`` of both filters measured slower, as
    DuckDB then pushes no filter into the Parquet reader; with the look-back's date range
    pushed, splitting a third of all rows by type, concept and time cost as much as the
    second scan it saved (BENCHMARKS.md, cohort building).
    """
    if TASKS[definition.task].index == "calendar":
        return f"FROM measurement AS m SEMI JOIN {members} USING (person_id)\nWHERE m.value_as_number IS NOT NULL AND {where}"
    return (
        "FROM units AS u JOIN measurement AS m USING (person_id)\n"
        f"WHERE m.value_as_number IS NOT NULL AND {where}"
    )


def _history_concept(name: str) -> str:
    return name.removeprefix("history_") if name.startswith("history_") else name


def _split_signal(name: str) -> tuple[str, str]:
    for summary in SIGNAL_SUMMARIES:
        if name.endswith("_" + summary) and name.removesuffix("_" + summary) in SIGNALS:
            return name.removesuffix("_" + summary), summary
    raise ValueError(f"{name!r} is not a signal summary")  # unreachable for a validated definition


def _signal_ctes(definition: CohortDefinition, signals: dict[str, tuple[str, str]], members: str) -> list[str]:
    """Readings of the named signals in the window, one group per (person, signal), pivoted."""
    start, end = definition.reading_window_days
    length = end - start
    wanted = {summary for _, summary in signals.values()}
    aggregates = []
    if "mean" in wanted:
        aggregates.append("avg(r.v) AS mean")
    if "sd" in wanted:
        aggregates.append("stddev_samp(r.v) AS sd")
    if "slope" in wanted:
        # Two readings hours apart give a slope of hundreds of units per 30 days: a slope needs
        # SLOPE_MIN_READINGS readings whose times span SLOPE_MIN_SPAN_DAYS days or more.
        aggregates.append(
            f"CASE WHEN count(*) >= {SLOPE_MIN_READINGS} AND max(r.t) - min(r.t) >= {float(SLOPE_MIN_SPAN_DAYS)!r} "
            "THEN regr_slope(r.v, r.t) * 30 END AS slope"
        )
    if "night_mean" in wanted:
        aggregates.append("avg(r.v) FILTER (WHERE r.night) AS night_mean")
    if "frac_above" in wanted:
        thresholds = " ".join(
            f"WHEN {CONCEPTS[s].concept_id} THEN {float(SIGNALS[s].threshold)!r}" for s in {s for s, _ in signals.values()}
        )
        aggregates.append(f"avg(CASE WHEN r.v >= (CASE r.concept {thresholds} END) THEN 1.0 ELSE 0.0 END) AS frac_above")
    if "days" in wanted:
        # Distinct days as set bits of the window's days: one pass, where count(DISTINCT ...)
        # made DuckDB group the readings a second time and join the two.
        aggregates.append(
            f"bit_count(bitstring_agg(r.day, 0, {length - 1})) / {float(length)!r} AS days" if length > 0 else "0.0 AS days"
        )
    index = _index(definition)
    needs_time = "slope" in wanted
    needs_night = "night_mean" in wanted
    reading_columns = ["m.person_id", "m.measurement_concept_id AS concept", "m.value_as_number AS v"]
    if "days" in wanted:
        reading_columns.append(f"CAST(m.measurement_date - {_shift(index, start)} AS INTEGER) AS day")
    if needs_time:
        # Days relative to the index day keep the least-squares sums well conditioned.
        reading_columns.append(f"CAST(m.measurement_date - {index} AS DOUBLE) AS t")
    if needs_night:
        reading_columns.append("m.measurement_datetime IS NOT NULL AND hour(m.measurement_datetime) < 6 AS night")
    pivot = ", ".join(
        f"any_value(g.{summary}) FILTER (WHERE g.concept = {CONCEPTS[signal].concept_id}) AS {_quote(name)}"
        for name, (signal, summary) in signals.items()
    )
    return [
        f"""readings AS (
SELECT {', '.join(reading_columns)}
{_measurements(definition, _signal_filter(definition, signals), members)})""",
        f"""signal_groups AS (
SELECT r.person_id, r.concept, {', '.join(aggregates)}
FROM readings AS r GROUP BY r.person_id, r.concept)""",
        f"""signal_summaries AS (
SELECT g.person_id, {pivot} FROM signal_groups AS g GROUP BY g.person_id)""",
    ]
