"""OMOP sources: every kind gives the same clean views and report; snapshots are consistent; secrets stay secret."""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from clients.hospital_node.data.omop_tables import TABLES
from clients.hospital_node.data.sources import BATCH_ROWS, OmopSource, open_snapshot
from clients.hospital_node.errors import OmopSourceError

from tests.postgres import PostgresServer, write_password_file
from .omop_data import SNAPSHOT, load_postgres, write_csv_folder, write_parquet_folder, write_sqlite


def contents(source: OmopSource, scratch: Path) -> tuple[dict[str, list[tuple[Any, ...]]], Any]:
    with open_snapshot(source, scratch=scratch, today=SNAPSHOT) as snapshot:
        views = {
            name: snapshot.connection.execute(f"SELECT * FROM {name} ORDER BY ALL").fetchall() for name in TABLES
        }
        types = {
            name: [row[1] for row in snapshot.connection.execute(f"DESCRIBE {name}").fetchall()] for name in TABLES
        }
        assert types == {name: [c.type for c in t.columns] for name, t in TABLES.items()}
        return views, snapshot.report


@pytest.fixture
def parquet_source(tmp_path: Path) -> OmopSource:
    return OmopSource("folder", str(write_parquet_folder(tmp_path / "omop")))


def test_csv_and_sqlite_give_the_views_and_report_of_parquet(parquet_source: OmopSource, tmp_path: Path) -> None:
    expected = contents(parquet_source, tmp_path / "s")
    assert contents(OmopSource("folder", str(write_csv_folder(tmp_path / "csv"))), tmp_path / "s") == expected
    assert contents(OmopSource("sqlite", str(write_sqlite(tmp_path / "omop.sqlite"))), tmp_path / "s") == expected


def test_postgres_gives_the_views_and_report_of_parquet(
    parquet_source: OmopSource, postgres_server: PostgresServer, fresh_database: str, tmp_path: Path
) -> None:
    with postgres_server.connect(fresh_database) as connection:
        load_postgres(connection, schema="cdm")
    password_file = write_password_file(tmp_path / "pw", postgres_server.password)
    source = OmopSource("postgres", postgres_server.url(fresh_database), password_file, schema="cdm")
    assert contents(source, tmp_path / "s") == contents(parquet_source, tmp_path / "s")


def test_the_views_hold_the_clean_rows(parquet_source: OmopSource, tmp_path: Path) -> None:
    views, report = contents(parquet_source, tmp_path / "s")
    assert [row[0] for row in views["person"]] == [1, 2, 3, 4, 5]
    assert [row[0] for row in views["measurement"]] == [1, 4, 6, 7, 8]
    assert [row[0] for row in views["condition_occurrence"]] == [1, 2]
    assert report.table("measurement").read == 9


def test_scratch_is_private_while_open_and_removed_after(tmp_path: Path) -> None:
    source = OmopSource("sqlite", str(write_sqlite(tmp_path / "omop.sqlite")))
    scratch = tmp_path / "scratch"
    with open_snapshot(source, scratch=scratch, today=SNAPSHOT):
        (work,) = scratch.iterdir()
        assert work.stat().st_mode & 0o777 == 0o700
        assert sorted(p.name for p in work.glob("*.parquet")) == sorted(f"{t}.parquet" for t in TABLES)
        assert all(p.stat().st_mode & 0o077 == 0 for p in work.glob("*.parquet"))
    assert list(scratch.iterdir()) == []


def test_scratch_is_removed_on_error(tmp_path: Path) -> None:
    source = OmopSource("sqlite", str(write_sqlite(tmp_path / "omop.sqlite")))
    with pytest.raises(RuntimeError, match="boom"):
        with open_snapshot(source, scratch=tmp_path / "scratch", today=SNAPSHOT):
            raise RuntimeError("boom")
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_missing_table_names_it_and_what_to_do(tmp_path: Path) -> None:
    folder = write_parquet_folder(tmp_path / "omop")
    (folder / "drug_exposure.parquet").unlink()
    with pytest.raises(OmopSourceError, match=r"lacks table drug_exposure; add <table>.parquet or <table>.csv"):
        with open_snapshot(OmopSource("folder", str(folder)), scratch=tmp_path / "s"):
            pass
    assert list((tmp_path / "s").iterdir()) == []


def test_a_missing_required_column_names_table_and_column(tmp_path: Path) -> None:
    path = write_sqlite(tmp_path / "omop.sqlite")
    with sqlite3.connect(path) as database:
        database.execute("ALTER TABLE measurement DROP COLUMN measurement_date")
    with pytest.raises(OmopSourceError, match=r"lacks required column measurement\.measurement_date"):
        with open_snapshot(OmopSource("sqlite", str(path)), scratch=tmp_path / "s"):
            pass


def test_a_missing_optional_column_reads_as_null_and_is_reported(tmp_path: Path) -> None:
    path = write_sqlite(tmp_path / "omop.sqlite")
    with sqlite3.connect(path) as database:
        database.execute("ALTER TABLE person DROP COLUMN location_id")
    with open_snapshot(OmopSource("sqlite", str(path)), scratch=tmp_path / "s", today=SNAPSHOT) as snapshot:
        assert snapshot.connection.execute("SELECT count(location_id) FROM person").fetchone() == (0,)
        assert snapshot.report.rows("person", "missing_column", "location_id") == 9


@pytest.mark.parametrize(
    ("kind", "location", "message"),
    [
        ("folder", "nowhere", r"OMOP folder .*nowhere does not exist"),
        ("sqlite", "nowhere.sqlite", r"SQLite file .*nowhere.sqlite does not exist"),
    ],
)
def test_a_missing_location_is_named(kind: str, location: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(OmopSourceError, match=message):
        with open_snapshot(OmopSource(kind, str(tmp_path / location)), scratch=tmp_path / "s"):
            pass


def test_sqlite_streams_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clients.hospital_node.data.sources as sources

    monkeypatch.setattr(sources, "BATCH_ROWS", 2)
    assert BATCH_ROWS == 100_000
    source = OmopSource("sqlite", str(write_sqlite(tmp_path / "omop.sqlite")))
    parquet = contents(OmopSource("folder", str(write_parquet_folder(tmp_path / "pq"))), tmp_path / "s")
    assert contents(source, tmp_path / "s") == parquet


# ---------------------------------------------------------------- PostgreSQL: secrets and consistency


@pytest.fixture
def pg_source(postgres_server: PostgresServer, fresh_database: str, tmp_path: Path) -> OmopSource:
    with postgres_server.connect(fresh_database) as connection:
        load_postgres(connection)
    password_file = write_password_file(tmp_path / "pw", postgres_server.password)
    return OmopSource("postgres", postgres_server.url(fresh_database), password_file)


def test_a_group_readable_password_file_is_refused_with_the_chmod(pg_source: OmopSource, tmp_path: Path) -> None:
    assert pg_source.credentials_file is not None
    os.chmod(pg_source.credentials_file, 0o640)
    with pytest.raises(OmopSourceError, match=rf"password file {pg_source.credentials_file} is readable by other "
                                              rf"users \(mode 0640\); run `chmod 600 {pg_source.credentials_file}`"):
        with open_snapshot(pg_source, scratch=tmp_path / "s"):
            pass


def test_a_url_with_a_password_is_refused_without_echoing_it(tmp_path: Path) -> None:
    source = OmopSource("postgres", "postgresql://reader:SECRET-PW-42@localhost:5432/omop",
                        write_password_file(tmp_path / "pw", "x"))
    with pytest.raises(OmopSourceError, match="holds a password") as caught:
        with open_snapshot(source, scratch=tmp_path / "s"):
            pass
    assert "SECRET-PW-42" not in str(caught.value)


def test_a_wrong_password_never_appears_in_the_error(
    postgres_server: PostgresServer, fresh_database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sentinel = "PW-SENTINEL-" + "7" * 12
    source = OmopSource("postgres", postgres_server.url(fresh_database), write_password_file(tmp_path / "pw", sentinel))
    with caplog.at_level("DEBUG"):
        with pytest.raises(OmopSourceError, match="cannot connect to PostgreSQL .*password authentication failed") as caught:
            with open_snapshot(source, scratch=tmp_path / "s"):
                pass
    assert sentinel not in str(caught.value) and sentinel not in repr(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert sentinel not in caplog.text


def test_the_right_password_never_appears_in_a_read_error(
    pg_source: OmopSource, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    source = OmopSource(pg_source.kind, pg_source.location, pg_source.credentials_file, schema="nope")
    with pytest.raises(OmopSourceError, match=r"schema nope lacks OMOP tables person, ") as caught:
        with open_snapshot(source, scratch=tmp_path / "s"):
            pass
    assert postgres_server.password not in str(caught.value)


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    source = OmopSource("postgres", "postgresql://reader@127.0.0.1:1/omop", write_password_file(tmp_path / "pw", "x"))
    with pytest.raises(OmopSourceError, match=r"cannot connect to PostgreSQL postgresql://reader@127.0.0.1:1/omop") as caught:
        with open_snapshot(source, scratch=tmp_path / "s"):
            pass
    assert "\n" not in str(caught.value)


def test_postgres_reads_one_snapshot_despite_a_concurrent_insert(
    pg_source: OmopSource, postgres_server: PostgresServer, fresh_database: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows another connection commits while the snapshot is being read are not seen by any table."""
    import clients.hospital_node.data.sources as sources

    real_write = sources._write_batches
    inserted = threading.Event()

    def insert_after_person(path: Path, columns: Any, batches: Any) -> int:
        rows = real_write(path, columns, batches)
        if path.name == "person.parquet" and not inserted.is_set():
            # The reading transaction has started and read person; another connection commits new rows now.
            with postgres_server.connect(fresh_database) as other:
                other.execute("INSERT INTO person (person_id, gender_concept_id, year_of_birth) VALUES (500, 8532, 1980)")
                other.execute(
                    "INSERT INTO measurement (measurement_id, person_id, measurement_concept_id, measurement_date, "
                    "measurement_type_concept_id, value_as_number, unit_concept_id) "
                    "VALUES (500, 1, 3004249, '2024-01-01', 32817, 120, 8876)"
                )
            inserted.set()
        return rows

    monkeypatch.setattr(sources, "_write_batches", insert_after_person)
    with open_snapshot(pg_source, scratch=tmp_path / "s", today=SNAPSHOT) as snapshot:
        assert inserted.is_set()
        assert snapshot.connection.execute("SELECT count(*) FROM measurement WHERE measurement_id = 500").fetchone() == (0,)
        assert snapshot.report.table("measurement").read == 9
    monkeypatch.undo()
    with open_snapshot(pg_source, scratch=tmp_path / "s", today=SNAPSHOT) as later:
        assert later.connection.execute("SELECT count(*) FROM measurement WHERE measurement_id = 500").fetchone() == (1,)
        assert later.report.table("person").read == 10


def test_sqlite_reads_one_snapshot_despite_a_concurrent_insert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clients.hospital_node.data.sources as sources

    path = write_sqlite(tmp_path / "omop.sqlite")
    with sqlite3.connect(path) as database:
        database.execute("PRAGMA journal_mode=WAL")
    real_write = sources._write_batches

    def insert_after_person(file: Path, columns: Any, batches: Any) -> int:
        rows = real_write(file, columns, batches)
        if file.name == "person.parquet":
            with sqlite3.connect(path) as other:
                other.execute(
                    "INSERT INTO measurement (measurement_id, person_id, measurement_concept_id, measurement_date, "
                    "measurement_type_concept_id, value_as_number, unit_concept_id) "
                    "VALUES (500, 1, 3004249, '2024-01-01', 32817, 120, 8876)"
                )
        return rows

    monkeypatch.setattr(sources, "_write_batches", insert_after_person)
    with open_snapshot(OmopSource("sqlite", str(path)), scratch=tmp_path / "s", today=SNAPSHOT) as snapshot:
        assert snapshot.report.table("measurement").read == 9
    with sqlite3.connect(path) as database:
        assert database.execute("SELECT count(*) FROM measurement").fetchone() == (10,)


def test_default_snapshot_date_is_today(parquet_source: OmopSource, tmp_path: Path) -> None:
    with open_snapshot(parquet_source, scratch=tmp_path / "s") as snapshot:
        assert snapshot.report.snapshot_date == datetime.now(timezone.utc).date()


def _reader_filters(connection: Any, query: str) -> list[str]:
    """The filters DuckDB hands to the Parquet reader when it runs ``query``."""
    import json

    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        info = node.get("extra_info", {})
        if info.get("Function") == "READ_PARQUET":
            filters = info.get("Filters", [])
            found.extend([filters] if isinstance(filters, str) else filters)
        for child in node.get("children", []):
            walk(child)

    for node in json.loads(connection.execute("EXPLAIN (FORMAT JSON) " + query).fetchall()[0][1]):
        walk(node)
    return found


def test_parquet_views_hand_filters_to_the_file_reader(parquet_source: OmopSource, tmp_path: Path) -> None:
    # The clean view reads the file as it is, less the dropped rows: a cohort's filters reach
    # the Parquet reader instead of running over every row after the rules.
    with open_snapshot(parquet_source, scratch=tmp_path / "s", today=SNAPSHOT) as snapshot:
        query = "SELECT person_id FROM measurement WHERE measurement_concept_id = 3004249"
        assert _reader_filters(snapshot.connection, query) == ["(measurement_concept_id = 3004249)"]
        assert snapshot.connection.execute(query).fetchall() == [(1,)]  # row 2, sbp too, was dropped (implausible)


def test_a_file_with_its_own_file_row_number_column_still_validates(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = write_parquet_folder(tmp_path / "omop")
    table = pq.read_table(folder / "measurement.parquet")
    # A column of the hospital's own with the reader's name (all zeros): never taken for row numbers.
    zeros = pa.array([0] * table.num_rows, pa.int64())
    pq.write_table(table.append_column("file_row_number", zeros), folder / "measurement.parquet")
    views, report = contents(OmopSource("folder", str(folder)), tmp_path / "s")
    expected_views, expected_report = contents(OmopSource("folder", str(write_parquet_folder(tmp_path / "o2"))), tmp_path / "s")
    assert (views, report) == (expected_views, expected_report)


def test_a_file_rewritten_while_the_snapshot_is_open_fails_the_snapshot(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    folder = write_parquet_folder(tmp_path / "omop")
    with pytest.raises(OmopSourceError, match=r"measurement\.parquet changed while the node read it"):
        with open_snapshot(OmopSource("folder", str(folder)), scratch=tmp_path / "s", today=SNAPSHOT) as snapshot:
            snapshot.connection.execute("SELECT count(*) FROM measurement").fetchall()
            table = pq.read_table(folder / "measurement.parquet")
            pq.write_table(table.slice(1), folder / "measurement.parquet")  # the hospital's export, mid-run
    assert not list((tmp_path / "s").iterdir())  # scratch removed all the same
