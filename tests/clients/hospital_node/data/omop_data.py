"""A small OMOP CDM dataset with one planted problem of each kind, and writers for every source kind."""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clients.hospital_node.data.omop_tables import TABLES
from models.clinical_tasks import CONCEPTS, TYPE_DEVICE, TYPE_EHR

SNAPSHOT = date(2025, 12, 31)
SENTINEL = "PHI-SENTINEL-123"
SENTINEL_NUMBER = 987654.125  # planted as a value: must never appear in a report

_ARROW = {"BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(),
          "DATE": pa.date32(), "TIMESTAMP": pa.timestamp("us")}

C = {name: c.concept_id for name, c in CONCEPTS.items()}


def _person(pid: int, year: int, gender: str = "female", born: datetime | None = None) -> dict[str, Any]:
    return {"person_id": pid, "gender_concept_id": C[gender], "year_of_birth": year, "month_of_birth": None,
            "day_of_birth": None, "birth_datetime": born, "care_site_id": None, "location_id": None}


def _meas(mid: int, pid: int, concept: str, day: date, value: float | None, unit: str | None,
          type_id: int = TYPE_EHR, at: datetime | None = None) -> dict[str, Any]:
    return {"measurement_id": mid, "person_id": pid, "measurement_concept_id": C[concept]
            if concept in C else int(concept), "measurement_date": day, "measurement_datetime": at,
            "measurement_type_concept_id": type_id, "value_as_number": value,
            "unit_concept_id": C[unit] if unit else None}


def rows() -> dict[str, list[dict[str, Any]]]:
    """Rows per table: persons 1-5 are clean; the comments name the problem each other row has."""
    persons = [_person(i, 1960 + i) for i in range(1, 6)]
    persons += [
        _person(6, 1800),  # implausible year of birth: patient dropped
        _person(7, 2030),  # born in the future: patient dropped
        _person(8, 1970), _person(8, 1971),  # duplicate person_id: both dropped
    ]
    periods = [
        {"observation_period_id": i, "person_id": i, "observation_period_start_date": date(2019, 1, 1),
         "observation_period_end_date": date(2025, 12, 31), "period_type_concept_id": TYPE_EHR}
        for i in range(1, 7)  # person 6 was dropped: unknown_person
    ]
    visits = [
        {"visit_occurrence_id": 1, "person_id": 1, "visit_concept_id": 9202, "visit_start_date": date(2023, 5, 1),
         "visit_end_date": date(2023, 5, 1), "visit_type_concept_id": TYPE_EHR},
    ]
    conditions = [
        {"condition_occurrence_id": 1, "person_id": 1, "condition_concept_id": C["hypertension"],
         "condition_start_date": date(2024, 3, 1), "condition_end_date": None, "condition_type_concept_id": TYPE_EHR},
        {"condition_occurrence_id": 2, "person_id": 2, "condition_concept_id": 4329847,  # unused concept: kept
         "condition_start_date": date(2024, 3, 1), "condition_end_date": None, "condition_type_concept_id": TYPE_EHR},
        {"condition_occurrence_id": 3, "person_id": 99, "condition_concept_id": C["obesity"],  # unknown person
         "condition_start_date": date(2024, 3, 1), "condition_end_date": None, "condition_type_concept_id": TYPE_EHR},
        {"condition_occurrence_id": 4, "person_id": 3, "condition_concept_id": C["obesity"],  # before birth (1963)
         "condition_start_date": date(1950, 3, 1), "condition_end_date": None, "condition_type_concept_id": TYPE_EHR},
        {"condition_occurrence_id": 5, "person_id": 3, "condition_concept_id": C["obesity"],  # future
         "condition_start_date": date(2026, 6, 1), "condition_end_date": None, "condition_type_concept_id": TYPE_EHR},
    ]
    measurements = [
        _meas(1, 1, "sbp", date(2024, 1, 5), 128.0, "mmHg"),
        _meas(2, 1, "sbp", date(2024, 1, 6), 1200.0, "mmHg"),  # implausible
        _meas(3, 1, "dbp", date(2024, 1, 6), 80.0, "kg/m2"),  # wrong unit
        _meas(4, 2, "glucose", date(2024, 2, 1), 5.5, "mmol/L", TYPE_DEVICE, datetime(2024, 2, 1, 3, 30)),
        _meas(5, 2, "glucose", date(2024, 2, 2), 6.1, "mmol/L", TYPE_DEVICE, datetime(2024, 2, 2, 7, 0)),
        _meas(5, 2, "glucose", date(2024, 2, 3), 6.2, "mmol/L", TYPE_DEVICE),  # duplicate key: both dropped
        _meas(6, 3, "3000963", date(2024, 2, 3), SENTINEL_NUMBER, None),  # unused concept: kept
        _meas(7, 4, "bmi", date(2024, 2, 3), None, None),  # no value: kept
        _meas(8, 5, "heart_rate", date(2024, 2, 3), 72.0, "/min", 44818701),  # unused type concept: kept
    ]
    observations = [
        {"observation_id": 1, "person_id": 1, "observation_concept_id": C["current_smoker"],
         "observation_date": date(2023, 1, 1), "observation_type_concept_id": TYPE_EHR, "value_as_number": None},
    ]
    drugs = [
        {"drug_exposure_id": 1, "person_id": 2, "drug_concept_id": C["metformin"],
         "drug_exposure_start_date": date(2023, 6, 1), "drug_exposure_end_date": date(2023, 12, 1),
         "drug_type_concept_id": TYPE_EHR},
    ]
    return {"person": persons, "observation_period": periods, "visit_occurrence": visits,
            "condition_occurrence": conditions, "measurement": measurements, "observation": observations,
            "drug_exposure": drugs}


def arrow_tables(data: Mapping[str, list[dict[str, Any]]] | None = None) -> dict[str, pa.Table]:
    data = data if data is not None else rows()
    out = {}
    for name, table in TABLES.items():
        schema = pa.schema([(c.name, _ARROW[c.type]) for c in table.columns])
        out[name] = pa.Table.from_pylist(data[name], schema=schema)
    return out


def write_parquet_folder(folder: Path, data: Mapping[str, list[dict[str, Any]]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in arrow_tables(data).items():
        pq.write_table(table, folder / f"{name}.parquet")
    return folder


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    return value


def write_csv_folder(folder: Path, data: Mapping[str, list[dict[str, Any]]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else rows()
    for name, table in TABLES.items():
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(table.column_names)
            for row in data[name]:
                writer.writerow(["" if row[c] is None else _cell(row[c]) for c in table.column_names])
    return folder


_SQL_TYPES = {"BIGINT": "BIGINT", "INTEGER": "INTEGER", "DOUBLE": "DOUBLE PRECISION", "DATE": "DATE",
              "TIMESTAMP": "TIMESTAMP"}


def create_statements(*, extra_column: bool = True) -> list[str]:
    """CREATE TABLE statements in OMOP shape (with one column medfed does not read, as real CDMs have)."""
    out = []
    for name, table in TABLES.items():
        columns = [f"{c.name} {_SQL_TYPES[c.type]}" for c in table.columns]
        if extra_column:
            columns.append(f"{name}_source_value VARCHAR(50)")
        out.append(f"CREATE TABLE {name} ({', '.join(columns)})")
    return out


def write_sqlite(path: Path, data: Mapping[str, list[dict[str, Any]]] | None = None) -> Path:
    data = data if data is not None else rows()
    database = sqlite3.connect(path)
    with database:
        for statement in create_statements():
            database.execute(statement)
        for name, table in TABLES.items():
            marks = ", ".join("?" for _ in table.columns)
            database.executemany(
                f"INSERT INTO {name} ({', '.join(table.column_names)}) VALUES ({marks})",
                [[_cell(row[c]) for c in table.column_names] for row in data[name]],
            )
    database.close()
    return path


def load_postgres(connection: Any, data: Mapping[str, list[dict[str, Any]]] | None = None,
                  *, schema: str = "public") -> None:
    """Create and fill the tables through a psycopg connection (committed)."""
    data = data if data is not None else rows()
    with connection.transaction():
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        connection.execute(f"SET search_path TO {schema}")
        for statement in create_statements():
            connection.execute(statement)
        for name, table in TABLES.items():
            marks = ", ".join("%s" for _ in table.columns)
            with connection.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {name} ({', '.join(table.column_names)}) VALUES ({marks})",
                    [[row[c] for c in table.column_names] for row in data[name]],
                )
