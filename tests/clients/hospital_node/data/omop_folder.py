"""Tiny OMOP folders for tests: rows as dicts -> one Parquet file per table -> DuckDB views."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMAS: Mapping[str, pa.Schema] = {
    "person": pa.schema([
        ("person_id", pa.int64()), ("gender_concept_id", pa.int32()), ("year_of_birth", pa.int32()),
        ("month_of_birth", pa.int32()), ("day_of_birth", pa.int32()), ("birth_datetime", pa.timestamp("us")),
        ("care_site_id", pa.int64()), ("location_id", pa.int64()),
    ]),
    "observation_period": pa.schema([
        ("observation_period_id", pa.int64()), ("person_id", pa.int64()),
        ("observation_period_start_date", pa.date32()), ("observation_period_end_date", pa.date32()),
        ("period_type_concept_id", pa.int32()),
    ]),
    "visit_occurrence": pa.schema([
        ("visit_occurrence_id", pa.int64()), ("person_id", pa.int64()), ("visit_concept_id", pa.int32()),
        ("visit_start_date", pa.date32()), ("visit_end_date", pa.date32()), ("visit_type_concept_id", pa.int32()),
    ]),
    "condition_occurrence": pa.schema([
        ("condition_occurrence_id", pa.int64()), ("person_id", pa.int64()), ("condition_concept_id", pa.int32()),
        ("condition_start_date", pa.date32()), ("condition_end_date", pa.date32()),
        ("condition_type_concept_id", pa.int32()),
    ]),
    "measurement": pa.schema([
        ("measurement_id", pa.int64()), ("person_id", pa.int64()), ("measurement_concept_id", pa.int32()),
        ("measurement_date", pa.date32()), ("measurement_datetime", pa.timestamp("us")),
        ("measurement_type_concept_id", pa.int32()), ("value_as_number", pa.float64()),
        ("unit_concept_id", pa.int32()),
    ]),
    "observation": pa.schema([
        ("observation_id", pa.int64()), ("person_id", pa.int64()), ("observation_concept_id", pa.int32()),
        ("observation_date", pa.date32()), ("observation_type_concept_id", pa.int32()),
        ("value_as_number", pa.float64()),
    ]),
    "drug_exposure": pa.schema([
        ("drug_exposure_id", pa.int64()), ("person_id", pa.int64()), ("drug_concept_id", pa.int32()),
        ("drug_exposure_start_date", pa.date32()), ("drug_exposure_end_date", pa.date32()),
        ("drug_type_concept_id", pa.int32()),
    ]),
}

ID_COLUMNS = {name: schema.names[0] for name, schema in SCHEMAS.items()}


def arrow_tables(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, pa.Table]:
    """``tables`` (rows as dicts; missing columns null, missing ids numbered) as Arrow tables, all seven."""
    out = {}
    for name, schema in SCHEMAS.items():
        rows = list(tables.get(name, ()))
        if name != "person":
            rows = [{ID_COLUMNS[name]: i + 1, **row} for i, row in enumerate(rows)]
        out[name] = pa.table({field.name: [row.get(field.name) for row in rows] for field in schema}, schema=schema)
    return out


def write_omop(folder: Path, tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """Write ``tables`` as one ``<table>.parquet`` per OMOP table in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in arrow_tables(tables).items():
        pq.write_table(table, folder / f"{name}.parquet")
    return folder


def open_omop(folder: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per OMOP table of ``folder``."""
    connection = duckdb.connect()
    for name in SCHEMAS:
        path = str(folder / f"{name}.parquet").replace("'", "''")
        connection.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
    return connection


def open_in_memory(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> duckdb.DuckDBPyConnection:
    """The same views over Arrow tables in memory: for property tests that build many populations."""
    connection = duckdb.connect()
    for name, table in arrow_tables(tables).items():
        connection.register(f"{name}_arrow", table)
        connection.execute(f"CREATE VIEW {name} AS SELECT * FROM {name}_arrow")
    return connection
