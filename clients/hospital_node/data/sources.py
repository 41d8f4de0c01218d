"""OMOP sources: a hospital's OMOP CDM v5.4 tables, opened as one consistent, validated snapshot.

A source is a folder (one ``<table>.parquet`` or ``<table>.csv`` per table), a SQLite file
or a PostgreSQL database (:class:`OmopSource`). :func:`open_snapshot` gives a DuckDB
connection that holds one clean VIEW per table of
:mod:`~clients.hospital_node.data.omop_tables`, named after it, and the
:class:`~clients.hospital_node.data.validation.ValidationReport` of the rules that cleaned
them. How each source is read:

- **folder**: DuckDB queries the files where they lie (views over ``read_parquet`` /
  ``read_csv``), so a hundred million readings stay on disk; CSV cells are read as text and
  cast to the column types in one place, by validation. Parquet is read with its row
  numbers, by which validation drops rows; a table file rewritten while the snapshot is
  open (replaced, or its size or modification time changed) fails the snapshot when it
  closes.
- **SQLite**: one read transaction (a consistent snapshot) streams the columns medfed reads
  with the stdlib ``sqlite3``, in batches of :data:`BATCH_ROWS`, into Parquet files in the
  scratch folder; DuckDB views read those. (DuckDB's sqlite extension would need a download.)
- **PostgreSQL**: psycopg 3, a URL without password and a password file only its owner can
  read; every table is read in ONE ``REPEATABLE READ READ ONLY`` transaction (one snapshot
  per run) through a server-side cursor, in batches, into Parquet in scratch. The password
  appears in no message, log or exception.

The scratch folder of a snapshot is created owner-only (0700) under ``scratch`` and removed
when the context exits, on error too. Errors are :class:`~clients.hospital_node.errors.OmopSourceError`
with a one-line message naming the field, file, table or column and what to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from clients.hospital_node.data.omop_tables import TABLES
from clients.hospital_node.errors import OmopSourceError

if TYPE_CHECKING:
    import duckdb

    from clients.hospital_node.data.validation import ValidationReport

__all__ = ["BATCH_ROWS", "SOURCE_KINDS", "OmopSnapshot", "OmopSource", "check_source", "open_snapshot"]

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("folder", "sqlite", "postgres")
BATCH_ROWS = 100_000  # rows per batch streamed from SQLite or PostgreSQL
_CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class OmopSource:
    """Where a hospital's OMOP tables are.

    Attributes
    ----------
    kind
        ``"folder"``, ``"sqlite"`` or ``"postgres"``.
    location
        The folder, the SQLite file, or a ``postgresql://user@host:port/database`` URL
        WITHOUT password.
    credentials_file
        PostgreSQL only: a file holding the password, readable by its owner alone (0600).
    schema
        PostgreSQL only: the schema that holds the OMOP tables.
    """

    kind: str
    location: str
    credentials_file: Path | None = None
    schema: str = "public"

    def __post_init__(self) -> None:
        if isinstance(self.credentials_file, str):
            object.__setattr__(self, "credentials_file", Path(self.credentials_file))
        if self.kind not in SOURCE_KINDS:
            raise OmopSourceError(f"OMOP source kind must be one of {', '.join(SOURCE_KINDS)}; found {self.kind!r}")

    def describe(self) -> str:
        """The source in words, for messages: never a password."""
        if self.kind == "postgres":
            return f"PostgreSQL {_safe_url(self.location)} schema {self.schema}"
        return f"{self.kind} {self.location}"


class OmopSnapshot:
    """One consistent, validated snapshot of an OMOP source.

    ``connection`` holds one clean VIEW per OMOP table (``person``, ``observation_period``,
    ``visit_occurrence``, ``condition_occurrence``, ``measurement``, ``observation``,
    ``drug_exposure``); ``report`` says what validation found and did.
    """

    def __init__(self, source: OmopSource, connection: duckdb.DuckDBPyConnection, report: ValidationReport) -> None:
        self.source = source
        self.connection = connection
        self.report = report


@contextmanager
def open_snapshot(source: OmopSource, *, scratch: Path, today: date | None = None) -> Iterator[OmopSnapshot]:
    """Open ``source`` as one consistent snapshot, validated, as DuckDB views.

    Parameters
    ----------
    source
        Where the tables are.
    scratch
        A folder for this snapshot's staged files (a private sub-folder is created in it
        and removed on exit).
    today
        The snapshot's date, after which a row is in the future; default: today (UTC).

    Raises
    ------
    OmopSourceError
        If the source cannot be read or lacks a required table or column; on leaving, if a
        folder's table file was rewritten while the snapshot was open.
    """
    import duckdb

    from clients.hospital_node.data.validation import validate

    check_source(source)
    snapshot_date = today or datetime.now(timezone.utc).date()
    work = _private_scratch(Path(scratch))
    connection: duckdb.DuckDBPyConnection | None = None
    try:
        connection = duckdb.connect(config={"temp_directory": str(work / "duckdb.tmp")})
        files: dict[Path, tuple[int, int, int]] = {}
        numbered: set[str] = set(TABLES)  # staged copies hold only OMOP columns: always numbered
        if source.kind == "folder":
            files, numbered = _stage_folder(connection, Path(source.location))
        elif source.kind == "sqlite":
            _stage_sqlite(connection, Path(source.location), work)
        else:
            _stage_postgres(connection, source, work)
        report = validate(connection, snapshot_date=snapshot_date, numbered=numbered)
        yield OmopSnapshot(source, connection, report)
        # A folder is read where it lies, and the clean views drop rows by their number in
        # the file: whatever was read from a file rewritten meanwhile is not this snapshot.
        for path, seen in files.items():
            if _identity(path) != seen:
                raise OmopSourceError(
                    f"OMOP table file {path} changed while the node read it; "
                    "run again once the hospital's export has finished writing"
                )
    finally:
        if connection is not None:
            connection.close()
        shutil.rmtree(work, ignore_errors=True)


def check_source(source: OmopSource) -> None:
    """The checks that need no connection: the folder or file is there, the URL and password file are safe.

    Raises
    ------
    OmopSourceError
        Naming the field or file and what to do.
    """
    if source.kind == "folder":
        folder = Path(source.location)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise OmopSourceError(
                f"OMOP folder {folder} {what}; give the folder that holds <table>.parquet or <table>.csv files"
            )
    elif source.kind == "sqlite":
        path = Path(source.location)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise OmopSourceError(f"SQLite file {path} {what}; give the OMOP database file")
        if not os.access(path, os.R_OK):
            raise OmopSourceError(f"SQLite file {path} is not readable by this user; grant it read access")
    else:
        _check_url(source.location)
        _read_password(source.credentials_file)


def _private_scratch(scratch: Path) -> Path:
    try:
        scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="omop-", dir=scratch))  # mode 0700
    except OSError as err:
        raise OmopSourceError(
            f"cannot create the scratch folder in {scratch}: {err.strerror or err}; "
            "free disk space or fix the folder's permissions"
        ) from None


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------- folder


def _identity(path: Path) -> tuple[int, int, int]:
    """Inode, size and modification time: what changes when a file is rewritten or replaced."""
    try:
        status = path.stat()
    except OSError:
        return (-1, -1, -1)
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _stage_folder(
    connection: duckdb.DuckDBPyConnection, folder: Path
) -> tuple[dict[Path, tuple[int, int, int]], set[str]]:
    """Raw views over the folder's table files.

    Returns each file's identity as staged, and the tables whose raw view carries the
    Parquet reader's row number (a Parquet file without a column of that name).
    """
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OmopSourceError(
            f"OMOP folder {folder} {what}; give the folder that holds <table>.parquet or <table>.csv files"
        )
    missing = []
    files: dict[Path, tuple[int, int, int]] = {}
    numbered: set[str] = set()
    for name in TABLES:
        parquet, csv = folder / f"{name}.parquet", folder / f"{name}.csv"
        if parquet.is_file():
            reader, has_row_numbers = _parquet_reader(connection, parquet)
            if has_row_numbers:
                numbered.add(name)
        elif csv.is_file():
            # Text first: validation casts every column in one place and counts what does not cast.
            reader = f"read_csv({_sql_string(str(csv))}, header = true, all_varchar = true)"
        else:
            missing.append(name)
            continue
        path = parquet if parquet.is_file() else csv
        files[path] = _identity(path)
        try:
            with open(path, "rb"):
                pass
            connection.execute(f"CREATE OR REPLACE TEMP VIEW {_q('raw_' + name)} AS SELECT * FROM {reader}")
        except OSError as err:
            raise OmopSourceError(f"cannot read OMOP table file {err.filename}: {err.strerror or err}") from None
        except Exception as err:  # noqa: BLE001 - duckdb.Error: a damaged or foreign file
            raise OmopSourceError(
                f"cannot read OMOP table {name} in {folder}: {type(err).__name__}; "
                "write it as Parquet or as CSV with a header row"
            ) from None
    if missing:
        raise OmopSourceError(
            f"OMOP folder {folder} lacks table{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
            "add <table>.parquet or <table>.csv for each (a header without rows is fine)"
        )
    return files, numbered


# ---------------------------------------------------------------- staged copies (SQLite, PostgreSQL)


def _text(value: object) -> str | None:
    """A cell as text: validation casts it to the column's type, and counts what does not cast."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return "\x00binary"  # never a valid value of any column medfed reads
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_batches(path: Path, columns: Sequence[str], batches: Iterable[Sequence[Sequence[Any]]]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in columns])
    rows = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
        for batch in batches:
            arrays = [pa.array([_text(row[i]) for row in batch], pa.string()) for i in range(len(columns))]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            rows += len(batch)
        if rows == 0:
            writer.write_table(schema.empty_table())
    return rows


def _numbered_parquet(path: Path) -> str:
    """``read_parquet`` with the reader's row number, by which validation drops rows."""
    return f"read_parquet({_sql_string(str(path))}, file_row_number = true)"


def _parquet_reader(connection: duckdb.DuckDBPyConnection, path: Path) -> tuple[str, bool]:
    """The reader of a hospital's file and whether it adds row numbers: not when the file
    has a column of that name."""
    try:
        connection.execute(f"DESCRIBE SELECT * FROM {_numbered_parquet(path)}").fetchall()
    except Exception:  # noqa: BLE001 - duckdb.BinderException: the file has such a column
        return f"read_parquet({_sql_string(str(path))})", False
    return _numbered_parquet(path), True


def _view_over(connection: duckdb.DuckDBPyConnection, name: str, path: Path) -> None:
    """The raw view of a staged copy (only OMOP columns, so the row number never collides)."""
    connection.execute(f"CREATE OR REPLACE TEMP VIEW {_q('raw_' + name)} AS SELECT * FROM {_numbered_parquet(path)}")


def _wanted(table: str, available: Iterable[str]) -> dict[str, str]:
    """The columns medfed reads that the table has: OMOP name -> name in the source."""
    by_lower = {}
    for column in available:
        by_lower.setdefault(column.lower(), column)
    return {c: by_lower[c] for c in TABLES[table].column_names if c in by_lower}


def _missing_tables_error(where: str, missing: Sequence[str]) -> OmopSourceError:
    return OmopSourceError(
        f"{where} lacks OMOP table{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
        "create them (OMOP CDM v5.4; an empty table is fine)"
    )


# ---------------------------------------------------------------- SQLite


def _stage_sqlite(connection: duckdb.DuckDBPyConnection, path: Path, work: Path) -> None:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise OmopSourceError(f"SQLite file {path} {what}; give the OMOP database file")
    if not os.access(path, os.R_OK):
        raise OmopSourceError(f"SQLite file {path} is not readable by this user; grant it read access")
    try:
        database = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as err:
        raise OmopSourceError(f"cannot open SQLite file {path}: {err}") from None
    try:
        # One read transaction: every table comes from the same state of the file.
        database.execute("BEGIN")
        tables = {
            str(row[0]).lower(): str(row[0])
            for row in database.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
        }
        missing = [name for name in TABLES if name not in tables]
        if missing:
            raise _missing_tables_error(f"SQLite file {path}", missing)
        for name in TABLES:
            source_table = tables[name]
            available = [str(row[1]) for row in database.execute(f"PRAGMA table_info({_q(source_table)})")]
            wanted = _wanted(name, available)
            select = ", ".join(_q(column) for column in wanted.values()) or "NULL"
            cursor = database.execute(f"SELECT {select} FROM {_q(source_table)}")

            def batches(cursor: sqlite3.Cursor = cursor) -> Iterator[list[Any]]:
                while batch := cursor.fetchmany(BATCH_ROWS):
                    yield batch

            staged = work / f"{name}.parquet"
            rows = _write_batches(staged, list(wanted) or ["_none"], batches())
            _view_over(connection, name, staged)
            logger.debug("staged %d rows of %s from SQLite", rows, name)
        database.execute("COMMIT")
    except sqlite3.Error as err:
        raise OmopSourceError(f"cannot read SQLite file {path}: {err}") from None
    finally:
        database.close()


# ---------------------------------------------------------------- PostgreSQL


def _safe_url(url: str) -> str:
    """The URL without any password it might hold, for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"{parts.scheme}://{user}{host}{port}{parts.path}"
    except ValueError:
        return "(an unparsable URL)"


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise OmopSourceError(
            "--postgres must be a URL like postgresql://user@host:5432/database; this one does not parse"
        ) from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise OmopSourceError(
            f"--postgres must be a URL like postgresql://user@host:5432/database; found scheme {parts.scheme!r}"
        )
    if parts.password is not None or "password=" in parts.query.lower():
        raise OmopSourceError(
            "--postgres URL holds a password; remove it from the URL and put it in the --password-file "
            "(mode 0600) instead"
        )
    if not parts.hostname and "host=" not in parts.query.lower():
        raise OmopSourceError("--postgres URL names no host; e.g. postgresql://user@host:5432/database")
    if not parts.path.strip("/"):
        raise OmopSourceError("--postgres URL names no database; e.g. postgresql://user@host:5432/database")


def _read_password(path: Path | None) -> str:
    if path is None:
        raise OmopSourceError("a PostgreSQL source needs --password-file: a file holding the password, mode 0600")
    try:
        info = path.stat()
    except OSError as err:
        raise OmopSourceError(f"password file {path} cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise OmopSourceError(f"password file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise OmopSourceError(
            f"password file {path} is readable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run `chmod 600 {path}` and try again"
        )
    if info.st_uid != os.geteuid():
        raise OmopSourceError(f"password file {path} belongs to another user; it must be this user's, mode 0600")
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise OmopSourceError(f"password file {path} cannot be read: {reason}") from None
    if not password:
        raise OmopSourceError(f"password file {path} is empty; write the password on its first line")
    return password


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _stage_postgres(connection: duckdb.DuckDBPyConnection, source: OmopSource, work: Path) -> None:
    import psycopg
    from psycopg import sql

    _check_url(source.location)
    password = _read_password(source.credentials_file)
    where = _safe_url(source.location)
    try:
        database = psycopg.connect(source.location, password=password, connect_timeout=_CONNECT_TIMEOUT_S)
    except psycopg.Error as err:
        reason = _scrub(_one_line(err), password)
        raise OmopSourceError(
            f"cannot connect to PostgreSQL {where}: {reason}; check the URL, that the server is up "
            "and reachable, and the password file"
        ) from None
    try:
        database.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        database.read_only = True
        with database.transaction():
            # The first statement fixes the snapshot every later read of this transaction sees.
            columns_of: dict[str, dict[str, str]] = {}
            for table_name, column_name in database.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s "
                "ORDER BY table_name, ordinal_position",
                (source.schema,),
            ):
                columns_of.setdefault(str(table_name).lower(), {}).setdefault(str(column_name), str(table_name))
            missing = [name for name in TABLES if name not in columns_of]
            if missing:
                raise _missing_tables_error(f"PostgreSQL {where} schema {source.schema}", missing)
            for name in TABLES:
                source_table = next(iter(columns_of[name].values()))
                wanted = _wanted(name, columns_of[name])
                select = sql.SQL(", ").join(
                    sql.SQL("{}::text").format(sql.Identifier(column)) for column in wanted.values()
                ) if wanted else sql.SQL("NULL")
                query = sql.SQL("SELECT {} FROM {}.{}").format(
                    select, sql.Identifier(source.schema), sql.Identifier(source_table)
                )
                with database.cursor(name=f"medfed_{name}") as cursor:
                    cursor.itersize = BATCH_ROWS
                    cursor.execute(query)

                    def batches(cursor: Any = cursor) -> Iterator[list[Any]]:
                        while batch := cursor.fetchmany(BATCH_ROWS):
                            yield batch

                    staged = work / f"{name}.parquet"
                    rows = _write_batches(staged, list(wanted) or ["_none"], batches())
                _view_over(connection, name, staged)
                logger.debug("staged %d rows of %s from PostgreSQL", rows, name)
    except psycopg.Error as err:
        reason = _scrub(_one_line(err), password)
        raise OmopSourceError(f"cannot read PostgreSQL {where}: {reason}") from None
    finally:
        database.close()
