"""Validation of an OMOP snapshot: the rules that make its views clean, and the report that counts them.

:func:`validate` reads the raw relations a source staged (``raw_<table>`` in a DuckDB
connection), casts them to the types of :mod:`~clients.hospital_node.data.omop_tables`,
applies the rules below, and creates one clean VIEW per OMOP table under the table's own
name. It returns a :class:`ValidationReport`: rows read and kept per table, and per table,
column and problem how many rows the rule touched. Every dropped row is counted under
exactly one problem (the first that applies, in this order), so ``read - kept`` of a table
is the sum of its drop counts. Nothing here loads a table into memory: the views are
queries over the source's files, and only the small sets the rules need (duplicated keys,
the kept persons with their earliest possible birth date) are materialised.

==================  ==========================================================  ===========================
problem             what                                                         rule
==================  ==========================================================  ===========================
missing_column      an optional column is absent from the source                 keep: it reads as NULL
missing_value       a required column is empty                                   drop the row
wrong_type          a required column holds a value that cannot be cast          drop the row
wrong_type          an optional column holds a value that cannot be cast         keep the row, value NULL
                    (or a number that is not finite)
duplicate_key       two or more rows share a primary key                         drop every one of them
unknown_person      the row's person is not in ``person`` (or was dropped)       drop the row
future              the row's date (or datetime) is after the snapshot's date    drop the row
before_birth        the row's date is before its person's earliest possible      drop the row
                    birth (1 January of year_of_birth, or birth_datetime)
wrong_unit          a measurement medfed reads, with a value, whose unit is      drop the row
                    not the concept's unit (``CONCEPTS[...].unit``)
implausible         a measurement medfed reads whose value is outside the        drop the row
                    concept's ``plausible`` range; a year of birth before 1850
unused_concept      a concept id medfed does not read in that column             keep: not used by medfed
                    (counted over the kept rows)
==================  ==========================================================  ===========================

In ``person`` a dropped row drops the patient: every row of theirs in the other tables
is then dropped as ``unknown_person``. A missing required table or column is no rule: it
raises :class:`~clients.hospital_node.errors.OmopSourceError` naming table and column.

How the clean views read. Where the raw relation carries the Parquet reader's row number
(``file_row_number``: a folder of Parquet files, and the Parquet files SQLite and PostgreSQL
are staged to), validation labels every row in one pass and keeps only the numbers of the
dropped rows, in a temporary table. The clean view is then the file read as it is (columns
that already have their OMOP type are not cast) less those rows, so a cohort's filters go
into the Parquet reader and a query reads what a plain query over the file would, plus
one anti-join with the dropped rows after the filters. Without a row number (CSV files),
the clean view re-applies the rules on every read.

Reports hold counts, table and column names, problem kinds and rules; never a value read
from patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from clients.hospital_node.data.omop_tables import TABLES, OmopTable
from clients.hospital_node.errors import OmopSourceError
from models.clinical_tasks import CONCEPTS

if TYPE_CHECKING:
    import duckdb

__all__ = ["PROBLEM_KINDS", "ROW_NUMBER", "Problem", "TableCount", "ValidationReport", "validate"]

logger = logging.getLogger(__name__)

# kind -> (what, rule); the order is the order in which the drop rules apply.
PROBLEM_KINDS: Mapping[str, tuple[str, str]] = {
    "missing_column": ("an optional column is absent from the source", "keep: the column reads as NULL"),
    "missing_value": ("a required column is empty", "drop the row"),
    "wrong_type": ("a value cannot be cast to the column's type", "drop the row (required column); "
                                                                   "keep the row with NULL (optional column)"),
    "duplicate_key": ("two or more rows share a primary key", "drop every row that shares it"),
    "unknown_person": ("the row's person is not in person, or was dropped from it", "drop the row"),
    "future": ("the row's date is after the snapshot's date", "drop the row"),
    "before_birth": ("the row's date is before its person's earliest possible birth", "drop the row"),
    "wrong_unit": ("a measurement medfed reads carries another unit than the concept's", "drop the row"),
    "implausible": ("a value outside the physiologically possible range", "drop the row"),
    "unused_concept": ("a concept id medfed does not read", "keep: not used by medfed"),
}

#: The row number DuckDB's Parquet reader adds when asked (``file_row_number = true``). A raw
#: relation that has it gets clean views that read the file as it is, less the dropped rows.
ROW_NUMBER = "file_row_number"

_EARLIEST_BIRTH_YEAR = 1850
_INTEGER_TYPES = ("BIGINT", "INTEGER")


@dataclass(frozen=True)
class Problem:
    """How many rows of ``table`` one problem touched in ``column``, and what was done with them."""

    table: str
    column: str
    kind: str
    rows: int
    rule: str

    @property
    def dropped(self) -> bool:
        return self.rule.startswith("drop")


@dataclass(frozen=True)
class TableCount:
    """Rows read from a source table and rows its clean view keeps."""

    table: str
    read: int
    kept: int

    @property
    def dropped(self) -> int:
        return self.read - self.kept


@dataclass(frozen=True)
class ValidationReport:
    """What validation found in one snapshot: counts only, never a value read from patient data."""

    snapshot_date: date
    tables: tuple[TableCount, ...]
    problems: tuple[Problem, ...]

    def table(self, name: str) -> TableCount:
        """The counts of table ``name``."""
        for count in self.tables:
            if count.table == name:
                return count
        raise KeyError(name)

    def rows(self, table: str, kind: str, column: str | None = None) -> int:
        """Rows of ``table`` with problem ``kind`` (in ``column``, if given)."""
        return sum(p.rows for p in self.problems
                   if p.table == table and p.kind == kind and (column is None or p.column == column))

    def dropped_by_problem(self, table: str) -> int:
        """Rows of ``table`` dropped, summed over the problems: equals ``table(table).dropped``."""
        return sum(p.rows for p in self.problems if p.table == table and p.dropped)

    @property
    def rows_dropped(self) -> int:
        return sum(t.dropped for t in self.tables)

    def render(self) -> str:
        """The report for people: per table, then per problem with its rule, then the rules."""
        read = sum(t.read for t in self.tables)
        kept = sum(t.kept for t in self.tables)
        lines = [
            f"OMOP snapshot of {self.snapshot_date.isoformat()}: {read} rows read, {kept} kept, "
            f"{read - kept} dropped",
            f"  {'table':<22} {'read':>10} {'kept':>10} {'dropped':>10}",
        ]
        lines += [f"  {t.table:<22} {t.read:>10} {t.kept:>10} {t.dropped:>10}" for t in self.tables]
        if self.problems:
            lines.append("problems (rows, rule):")
            lines += [
                f"  {p.table}.{p.column}: {p.kind}, {p.rows} row{'s' if p.rows != 1 else ''}: {p.rule}"
                for p in self.problems
            ]
        else:
            lines.append("problems: none")
        lines.append("rules: " + "; ".join(f"{kind}: {rule}" for kind, (_, rule) in PROBLEM_KINDS.items()))
        return "\n".join(lines)

    def to_mapping(self) -> dict[str, Any]:
        """A JSON-ready mapping of the report."""
        return {
            "snapshot_date": self.snapshot_date.isoformat(),
            "tables": [{"table": t.table, "read": t.read, "kept": t.kept} for t in self.tables],
            "problems": [
                {"table": p.table, "column": p.column, "kind": p.kind, "rows": p.rows, "rule": p.rule}
                for p in self.problems
            ],
        }


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _raw_columns(connection: duckdb.DuckDBPyConnection, relation: str) -> dict[str, tuple[str, str]]:
    """The relation's columns by lower-case name -> (the name as the source spells it, its type)."""
    rows = connection.execute(f"DESCRIBE {_q(relation)}").fetchall()
    found: dict[str, tuple[str, str]] = {}
    for row in rows:
        found.setdefault(str(row[0]).lower(), (str(row[0]), str(row[1])))
    return found


def _cast(connection: duckdb.DuckDBPyConnection, relation: str, source: str, source_type: str,
          type_: str) -> tuple[str, str]:
    """The cast expression of one column and the expression that flags a value it could not cast.

    A column that already has the type is read as it is (a DOUBLE still loses NaN and
    infinities), so that DuckDB can push the cohort's filters into the file reader.
    """
    ref = f"r.{_q(source)}"
    if source_type == type_ and type_ != "DOUBLE":
        return ref, "FALSE"
    for raw in (ref, f"CAST({ref} AS VARCHAR)"):
        value = f"TRY_CAST({raw} AS {type_})"
        if type_ in _INTEGER_TYPES:
            # TRY_CAST rounds 3.5 to 4: an id or a concept id must be a whole number as read.
            value = f"CASE WHEN TRY_CAST({raw} AS DOUBLE) = {value} THEN {value} END"
        elif type_ == "DOUBLE":
            value = f"CASE WHEN isfinite({value}) THEN {value} END"
        try:
            connection.execute(f"SELECT {value} FROM {_q(relation)} AS r LIMIT 0").fetchall()
        except Exception:  # noqa: BLE001 - duckdb refuses some casts at bind time; go through text
            continue
        return value, f"({ref} IS NOT NULL AND {value} IS NULL)"
    raise AssertionError("a cast through VARCHAR always binds")  # pragma: no cover


def _typed_view(connection: duckdb.DuckDBPyConnection, table: OmopTable, relation: str,
                present: Mapping[str, tuple[str, str]], row_numbered: bool) -> list[str]:
    """Create ``_typed_<table>``: each column cast, with its ``_bad_`` flag (and ``_row``).

    Returns the value expressions over ``r`` (the raw relation), one per column, in order.
    """
    parts, values = [], []
    for column in table.columns:
        if column.name in present:
            value, bad = _cast(connection, relation, *present[column.name], column.type)
        else:
            value, bad = f"CAST(NULL AS {column.type})", "FALSE"
        values.append(f"{value} AS {_q(column.name)}")
        parts.append(values[-1])
        parts.append(f"{bad} AS {_q('_bad_' + column.name)}")
    if row_numbered:
        parts.append(f"r.{ROW_NUMBER} AS _row")
    connection.execute(
        f"CREATE OR REPLACE TEMP VIEW {_q('_typed_' + table.name)} AS "
        f"SELECT {', '.join(parts)} FROM {_q(relation)} AS r"
    )
    return values


def _checks(table: OmopTable, snapshot: str) -> list[tuple[str, str]]:
    """(condition, problem label) in the order the drop rules apply; ``t`` is the typed row."""
    checks: list[tuple[str, str]] = []
    for name in table.required:
        # An unparseable value is NULL once cast: flag it as a wrong type before calling it missing.
        checks.append((f"t.{_q('_bad_' + name)}", f"wrong_type:{name}"))
        checks.append((f"t.{_q(name)} IS NULL", f"missing_value:{name}"))
    checks.append(("d.k IS NOT NULL", f"duplicate_key:{table.key}"))
    if table.name == "person":
        checks.append((f"t.year_of_birth < {_EARLIEST_BIRTH_YEAR}", "implausible:year_of_birth"))
        checks.append((f"make_date(t.year_of_birth, 1, 1) > {snapshot}", "future:year_of_birth"))
        checks.append((f"CAST(t.birth_datetime AS DATE) > {snapshot}", "future:birth_datetime"))
        return checks
    checks.append(("p.person_id IS NULL", "unknown_person:person_id"))
    if table.date is not None:
        checks.append((f"t.{_q(table.date)} > {snapshot}", f"future:{table.date}"))
    if table.datetime is not None:
        checks.append((f"CAST(t.{_q(table.datetime)} AS DATE) > {snapshot}", f"future:{table.datetime}"))
    if table.date is not None:
        checks.append((f"t.{_q(table.date)} < p.birth_date", f"before_birth:{table.date}"))
    if table.name == "measurement":
        checks.append((
            "m.concept_id IS NOT NULL AND t.value_as_number IS NOT NULL "
            "AND t.unit_concept_id IS DISTINCT FROM m.unit_concept_id",
            "wrong_unit:unit_concept_id",
        ))
        checks.append((
            "m.concept_id IS NOT NULL AND NOT (t.value_as_number BETWEEN m.low AND m.high)",
            "implausible:value_as_number",
        ))
    return checks


#: Keys spread over at most this many values per key (and 2**20 values in any case) are checked
#: for repeats with one bit per value: OMOP exports number their rows, so ids are dense.
_DENSE_KEYS_SPAN = 8


def _duplicate_keys(connection: duckdb.DuckDBPyConnection, table: OmopTable) -> None:
    """Create ``_dup_<table>``: the keys that two or more rows share.

    Finding them takes a group-by over every key (8.5 s and 5 GiB at 100 M measurement rows,
    BENCHMARKS.md). Dense ids are first checked with one bit per possible value, a pass that
    holds (max - min) / 8 bytes: with as many distinct values as keys there is no repeat and
    no group-by. Sparse ids, or ids that do repeat, take the group-by.
    """
    name, key, typed = table.name, _q(table.key), _q("_typed_" + table.name)
    dup = _q("_dup_" + name)
    low, high, keys = connection.execute(f"SELECT min({key}), max({key}), count({key}) FROM {typed}").fetchall()[0]
    if keys == 0 or (high - low < max(_DENSE_KEYS_SPAN * keys, 1 << 20) and connection.execute(
        f"SELECT bit_count(bitstring_agg({key}, {int(low)}, {int(high)})) FROM {typed}"
    ).fetchall()[0][0] == keys):
        connection.execute(f"CREATE OR REPLACE TEMP TABLE {dup} AS SELECT {key} AS k FROM {typed} LIMIT 0")
        return
    connection.execute(
        f"CREATE OR REPLACE TEMP TABLE {dup} AS SELECT {key} AS k FROM {typed} "
        f"WHERE {key} IS NOT NULL GROUP BY {key} HAVING count(*) > 1"
    )


def _annotated_view(connection: duckdb.DuckDBPyConnection, table: OmopTable, snapshot: str) -> None:
    name = table.name
    key = _q(table.key)
    _duplicate_keys(connection, table)
    whens = " ".join(f"WHEN {condition} THEN '{label}'" for condition, label in _checks(table, snapshot))
    joins = f"LEFT JOIN {_q('_dup_' + name)} AS d ON t.{key} = d.k"
    if name != "person":
        joins += " LEFT JOIN _person_birth AS p ON t.person_id = p.person_id"
    if name == "measurement":
        joins += " LEFT JOIN _medfed_measurements AS m ON t.measurement_concept_id = m.concept_id"
    connection.execute(
        f"CREATE OR REPLACE TEMP VIEW {_q('_checked_' + name)} AS "
        f"SELECT t.*, CASE {whens} END AS _problem FROM {_q('_typed_' + name)} AS t {joins}"
    )


def _measurement_table(connection: duckdb.DuckDBPyConnection) -> None:
    rows = [
        (c.concept_id, CONCEPTS[c.unit].concept_id, c.plausible[0], c.plausible[1])
        for c in CONCEPTS.values()
        if c.domain == "measurement" and c.unit and c.plausible is not None
    ]
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE _medfed_measurements "
        "(concept_id INTEGER, unit_concept_id INTEGER, low DOUBLE, high DOUBLE)"
    )
    connection.executemany("INSERT INTO _medfed_measurements VALUES (?, ?, ?, ?)", rows)


def _concepts_read(domain: str) -> tuple[int, ...]:
    return tuple(sorted(c.concept_id for c in CONCEPTS.values() if c.domain == domain))


# Concept columns whose other ids medfed does not use, beside each table's own concept column.
_EXTRA_CONCEPT_COLUMNS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "measurement": (("measurement_type_concept_id", "type"),),
}


def _rule(table: str, kind: str, required: bool) -> str:
    if kind in ("missing_column", "unused_concept"):
        return PROBLEM_KINDS[kind][1]
    if kind == "wrong_type" and not required:
        return "keep the row; the value reads as NULL"
    if table == "person":
        return "drop the patient (their rows in the other tables go with them)"
    if kind == "duplicate_key":
        return "drop every row that shares the key"
    return "drop the row"


def validate(
    connection: duckdb.DuckDBPyConnection,
    *,
    snapshot_date: date,
    raw: Mapping[str, str] | None = None,
    numbered: Collection[str] = (),
) -> ValidationReport:
    """Apply the rules to the raw relations and create the clean views; return what was found.

    Parameters
    ----------
    connection
        A DuckDB connection holding one raw relation per OMOP table.
    snapshot_date
        The day the snapshot was taken: a row dated after it is in the future.
    raw
        Table name -> raw relation name; default ``raw_<table>`` for every table.
    numbered
        The tables whose raw relation carries :data:`ROW_NUMBER` as the Parquet reader adds
        it (never a column of the hospital's own that happens to have the name): their
        clean views are the file less the dropped rows.

    Raises
    ------
    OmopSourceError
        Naming every missing required column, table by table.
    """
    relations = dict(raw) if raw is not None else {name: f"raw_{name}" for name in TABLES}
    missing_tables = [name for name in TABLES if name not in relations]
    if missing_tables:
        raise OmopSourceError(f"OMOP tables missing: {', '.join(missing_tables)}")
    present: dict[str, dict[str, tuple[str, str]]] = {}
    columns_of: dict[str, dict[str, tuple[str, str]]] = {}
    errors: list[str] = []
    for name, table in TABLES.items():
        columns = columns_of[name] = _raw_columns(connection, relations[name])
        present[name] = {c.name: columns[c.name] for c in table.columns if c.name in columns}
        errors += [
            f"{name}.{column} (required by OMOP CDM v5.4)"
            for column in table.required if column not in columns
        ]
    if errors:
        raise OmopSourceError(
            f"the OMOP source lacks required column{'s' if len(errors) > 1 else ''} {', '.join(errors)}; "
            "add them to the source's tables (OMOP CDM v5.4 names) and try again"
        )

    snapshot = f"DATE '{snapshot_date.isoformat()}'"
    _measurement_table(connection)
    problems: list[Problem] = []
    counts: list[TableCount] = []
    for name, table in TABLES.items():  # person first: the others join its kept rows
        relation = relations[name]
        row_numbered = name in numbered and ROW_NUMBER in columns_of[name]
        values = _typed_view(connection, table, relation, present[name], row_numbered)
        _annotated_view(connection, table, snapshot)
        checked = _q("_checked_" + name)
        if row_numbered:
            # One pass labels every row; the dropped ones (few, in a usable source) are kept
            # by row number, and the clean view is the file read as it is, less those rows.
            dropped = _q("_dropped_" + name)
            connection.execute(
                f"CREATE OR REPLACE TEMP TABLE {dropped} AS SELECT _row, _problem FROM {checked} "
                "WHERE _problem IS NOT NULL"
            )
            by_label = dict(connection.execute(
                f"SELECT _problem, count(*) FROM {dropped} GROUP BY _problem"
            ).fetchall())
            read = int(connection.execute(f"SELECT count(*) FROM {_q(relation)}").fetchall()[0][0])
            kept = read - int(sum(by_label.values()))
            without = f" ANTI JOIN {dropped} AS d ON r.{ROW_NUMBER} = d._row" if by_label else ""
            connection.execute(
                f"CREATE OR REPLACE VIEW {_q(name)} AS SELECT {', '.join(values)} FROM {_q(relation)} AS r{without}"
            )
        else:
            columns = ", ".join(_q(c) for c in table.column_names)
            connection.execute(
                f"CREATE OR REPLACE VIEW {_q(name)} AS SELECT {columns} FROM {checked} WHERE _problem IS NULL"
            )
            by_label = dict(connection.execute(f"SELECT _problem, count(*) FROM {checked} GROUP BY _problem").fetchall())
            read = int(sum(by_label.values()))
            kept = int(by_label.pop(None, 0))
        if name == "person":
            connection.execute(
                "CREATE OR REPLACE TEMP TABLE _person_birth AS SELECT person_id, "
                "least(make_date(year_of_birth, 1, 1), CAST(birth_datetime AS DATE)) AS birth_date "
                f"FROM {_q(name)}"
            )
        counts.append(TableCount(name, read, kept))
        table_problems: list[Problem] = []
        for column in table.columns:
            if column.name not in present[name]:
                table_problems.append(Problem(name, column.name, "missing_column", read,
                                              _rule(name, "missing_column", False)))
        for label, rows in by_label.items():
            kind, column = str(label).split(":", 1)
            table_problems.append(Problem(name, column, kind, int(rows), _rule(name, kind, True)))
        optional = [c.name for c in table.columns if not c.required and c.name in present[name]]
        if optional:
            sums = connection.execute(
                "SELECT " + ", ".join(f"count(*) FILTER (WHERE {_q('_bad_' + c)})" for c in optional)
                + f" FROM {_q('_typed_' + name)}"
            ).fetchall()[0]
            table_problems += [
                Problem(name, c, "wrong_type", int(n), _rule(name, "wrong_type", False))
                for c, n in zip(optional, sums) if n
            ]
        concept_columns = ((table.concept, table.domain),) if table.concept and table.domain else ()
        for column_name, domain in (*concept_columns, *_EXTRA_CONCEPT_COLUMNS.get(name, ())):
            ids = ", ".join(map(str, _concepts_read(domain)))
            unused = connection.execute(
                f"SELECT count(*) FROM {_q(name)} WHERE {_q(column_name)} NOT IN ({ids})"
            ).fetchall()[0]
            if unused[0]:
                table_problems.append(Problem(name, column_name, "unused_concept", int(unused[0]),
                                              _rule(name, "unused_concept", True)))
        order = list(PROBLEM_KINDS)
        column_order = list(table.column_names)
        table_problems.sort(key=lambda p: (order.index(p.kind), column_order.index(p.column)))
        problems += table_problems
    report = ValidationReport(snapshot_date=snapshot_date, tables=tuple(counts), problems=tuple(problems))
    logger.info("validated an OMOP snapshot of %s: %d rows dropped", snapshot_date, report.rows_dropped)
    return report

