"""The privacy ledger: every DP release a node made, per dataset, composed on demand.

One ledger per node home. Each charge records one DP event (a training round's DP-SGD
steps, or an analytics release) against a dataset, keyed by ``(dataset, run_id,
round)``. The dataset's spent epsilon is never stored: it is recomputed by composing all
its events with the accountant (:func:`privacy.accountant.epsilon`), so a change of
accountant or delta never needs a migration and nothing is ever added up.

Storage is a seam with two implementations:

- :class:`SqliteLedgerStore`, a SQLite file in WAL mode. Each charge is one
  ``BEGIN IMMEDIATE`` transaction, so charges from concurrent processes (Flower starts a
  fresh ClientApp process per message) serialise, and a crash leaves either the whole
  charge or none of it. Rows are append-only (triggers refuse UPDATE and DELETE).
- :class:`InMemoryLedgerStore`, for tests and simulations.

Both give the same guarantees within one process, and :class:`PrivacyLedger` adds the
same rules on top of either.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Protocol

from privacy.accountant import epsilon
from privacy.errors import AccountingError, LedgerError
from privacy.events import DPEvent

__all__ = [
    "Charge",
    "InMemoryLedgerStore",
    "LedgerStore",
    "PrivacyLedger",
    "SCHEMA_VERSION",
    "SqliteLedgerStore",
]

logger = logging.getLogger(__name__)

# Bumped whenever the table layout changes; stored in PRAGMA user_version and in the
# ledger_schema table, and checked on every open.
SCHEMA_VERSION = 1

# How long a process waits for another one's transaction before giving up.
_BUSY_TIMEOUT_SECONDS = 30.0

_SCHEMA = """
CREATE TABLE ledger_schema (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);
CREATE TABLE charges (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset          TEXT    NOT NULL CHECK (dataset <> ''),
    run_id           TEXT    NOT NULL CHECK (run_id <> ''),
    round            INTEGER NOT NULL CHECK (round >= 0),
    mechanism        TEXT    NOT NULL,
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
    sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 1),
    charged_at       TEXT    NOT NULL,
    UNIQUE (dataset, run_id, round)
);
CREATE TRIGGER charges_are_never_updated BEFORE UPDATE ON charges
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER charges_are_never_deleted BEFORE DELETE ON charges
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""
_TABLES = {"charges", "ledger_schema"}


@dataclass(frozen=True)
class Charge:
    """One DP event charged to a dataset by one round of one run."""

    dataset: str
    run_id: str
    round: int
    event: DPEvent
    charged_at: datetime  # timezone-aware, UTC


class LedgerStore(Protocol):
    """Where a :class:`PrivacyLedger` keeps its charges."""

    location: str

    def add(self, charge: Charge) -> tuple[Charge, bool]:
        """Store `charge` unless its key is taken, atomically.

        Returns the stored charge under that key and whether it was added now.
        """
        ...

    def charges(self, dataset: str) -> list[Charge]:
        """All charges to `dataset`, oldest first."""
        ...

    def datasets(self) -> list[str]:
        """Names of the datasets with at least one charge, sorted."""
        ...

    def close(self) -> None:
        """Release the storage; later calls raise :class:`LedgerError`."""
        ...


class InMemoryLedgerStore:
    """Charges in a list, guarded by a lock; gone when the process ends."""

    location = ":memory:"

    def __init__(self) -> None:
        self._charges: list[Charge] = []
        self._by_key: dict[tuple[str, str, int], Charge] = {}
        self._lock = threading.Lock()
        self._closed = False

    def add(self, charge: Charge) -> tuple[Charge, bool]:
        key = (charge.dataset, charge.run_id, charge.round)
        with self._lock:
            self._check_open()
            existing = self._by_key.get(key)
            if existing is not None:
                return existing, False
            self._by_key[key] = charge
            self._charges.append(charge)
            return charge, True

    def charges(self, dataset: str) -> list[Charge]:
        with self._lock:
            self._check_open()
            return [c for c in self._charges if c.dataset == dataset]

    def datasets(self) -> list[str]:
        with self._lock:
            self._check_open()
            return sorted({c.dataset for c in self._charges})

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("the in-memory privacy ledger is closed")


class SqliteLedgerStore:
    """Charges in a SQLite file (WAL mode), safe across threads and processes.

    Opening creates the file and its schema if it is new or empty, and otherwise
    checks that it is a medfed privacy ledger of a schema this code reads.

    Raises
    ------
    LedgerError
        The file cannot be opened, is not a SQLite database, is a database of something
        else, or was written by a newer schema. The message names the path.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        if not self.path.parent.is_dir():
            raise LedgerError(
                f"cannot open the privacy ledger {self.path}: folder {self.path.parent} does not "
                "exist; create or initialise the node home first"
            )
        self._lock = threading.Lock()
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT).
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise LedgerError(f"cannot open the privacy ledger {self.path}: {err}") from err
        try:
            self._prepare()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def _prepare(self) -> None:
        conn = self._connection()
        try:
            mode = self._enter_wal_mode(conn)
            conn.execute("PRAGMA synchronous = FULL")  # a charge survives power loss once committed
            # One read transaction, so that the version and the tables come from one snapshot.
            conn.execute("BEGIN")
            try:
                found = _inspect(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.OperationalError as err:
            raise LedgerError(f"cannot open the privacy ledger {self.path}: {err}") from err
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path} is not a medfed privacy ledger, or is corrupt ({err})") from err
        if str(mode).lower() != "wal":
            # Some network filesystems cannot hold WAL's shared memory; SQLite then keeps
            # its rollback journal, which is still atomic but makes readers wait for writers.
            logger.warning("privacy ledger %s runs in journal mode %s, not WAL", self.path, mode)
        if found == (0, set(), set()):
            with self._transaction() as conn:
                found = _inspect(conn)  # another process may have created it meanwhile
                if found == (0, set(), set()):
                    for statement in _statements(_SCHEMA):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO ledger_schema (version, applied_at) VALUES (?, ?)",
                        (SCHEMA_VERSION, _now().isoformat()),
                    )
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    logger.info("created privacy ledger %s (schema %d)", self.path, SCHEMA_VERSION)
                    return
        version, tables, recorded = found
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"privacy ledger {self.path} has schema {version}, newer than this medfed reads "
                f"({SCHEMA_VERSION}); upgrade medfed on this node"
            )
        if version != SCHEMA_VERSION or not _TABLES <= tables or SCHEMA_VERSION not in recorded:
            raise LedgerError(
                f"{self.path} is not a medfed privacy ledger (user_version {version}, tables "
                f"{sorted(tables) or 'none'}); point the node at its own ledger file"
            )

    @staticmethod
    def _enter_wal_mode(conn: sqlite3.Connection) -> str:
        """Switch a new file to WAL (persistent); returns the journal mode in force.

        SQLite answers "database is locked" at once, without waiting, when another
        connection holds the file while this one switches it; processes racing to create
        the ledger retry until the busy timeout instead of failing.
        """
        deadline = time.monotonic() + _BUSY_TIMEOUT_SECONDS
        while True:
            try:
                (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
                if str(mode).lower() != "wal":
                    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return str(mode)
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def add(self, charge: Charge) -> tuple[Charge, bool]:
        event = charge.event
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM charges WHERE dataset = ? AND run_id = ? AND round = ?",
                (charge.dataset, charge.run_id, charge.round),
            ).fetchone()
            if row is not None:
                return self._charge(row), False
            conn.execute(
                "INSERT INTO charges (dataset, run_id, round, mechanism, noise_multiplier, "
                "sample_rate, steps, charged_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    charge.dataset,
                    charge.run_id,
                    charge.round,
                    event.mechanism,
                    event.noise_multiplier,
                    event.sample_rate,
                    event.steps,
                    charge.charged_at.isoformat(),
                ),
            )
            return charge, True

    def charges(self, dataset: str) -> list[Charge]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM charges WHERE dataset = ? ORDER BY id", (dataset,)
            ).fetchall()
        return [self._charge(row) for row in rows]

    def datasets(self) -> list[str]:
        with self._read() as conn:
            rows = conn.execute("SELECT DISTINCT dataset FROM charges ORDER BY dataset").fetchall()
        return [row[0] for row in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"the privacy ledger {self.path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as err:
                raise LedgerError(f"cannot write to the privacy ledger {self.path}: {err}") from err
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as err:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(err, sqlite3.Error):
                    raise LedgerError(f"cannot write to the privacy ledger {self.path}: {err}") from err
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as err:
                raise LedgerError(f"cannot read the privacy ledger {self.path}: {err}") from err

    def _charge(self, row: Sequence[object]) -> Charge:
        row_id, dataset, run_id, round_, mechanism, noise, rate, steps, charged_at = row
        try:
            return Charge(
                dataset=str(dataset),
                run_id=str(run_id),
                round=int(round_),  # type: ignore[call-overload]
                event=DPEvent(
                    noise_multiplier=noise,  # type: ignore[arg-type]
                    sample_rate=rate,  # type: ignore[arg-type]
                    steps=steps,  # type: ignore[arg-type]
                    mechanism=str(mechanism),
                ),
                charged_at=datetime.fromisoformat(str(charged_at)),
            )
        except (AccountingError, TypeError, ValueError) as err:
            raise LedgerError(f"privacy ledger {self.path} holds an unreadable charge (row {row_id}): {err}") from err


_COLUMNS = "id, dataset, run_id, round, mechanism, noise_multiplier, sample_rate, steps, charged_at"


class PrivacyLedger:
    """A node's privacy ledger: charges per dataset and the epsilon they compose to.

    Use :meth:`open` for the node's SQLite file and :meth:`in_memory` in tests; both
    are context managers.
    """

    def __init__(self, store: LedgerStore) -> None:
        self._store = store

    @classmethod
    def open(cls, path: Path) -> PrivacyLedger:
        """The ledger stored in the SQLite file at `path`, created if new."""
        return cls(SqliteLedgerStore(path))

    @classmethod
    def in_memory(cls) -> PrivacyLedger:
        """An empty ledger that lives as long as this object."""
        return cls(InMemoryLedgerStore())

    @property
    def location(self) -> str:
        """Where the charges are kept: the file path, or ``:memory:``."""
        return self._store.location

    def charge(
        self,
        dataset: str,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> Charge:
        """Record that round `round` of run `run_id` released `steps` DP-SGD steps on `dataset`.

        Idempotent on ``(dataset, run_id, round)``: charging the same key again with the
        same parameters returns the recorded charge and adds nothing.

        Raises
        ------
        AccountingError
            A parameter is invalid.
        LedgerError
            The key was already charged with different parameters, or storage failed.
        """
        problems = []
        if not isinstance(dataset, str) or not dataset:
            problems.append(f"dataset must be a non-empty string; found {dataset!r}")
        if not isinstance(run_id, str) or not run_id:
            problems.append(f"run_id must be a non-empty string; found {run_id!r}")
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            problems.append(f"round must be an integer >= 0; found {round!r}")
        if problems:
            raise AccountingError("; ".join(problems))
        event = DPEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        stored, added = self._store.add(
            Charge(dataset=dataset, run_id=run_id, round=round, event=event, charged_at=_now())
        )
        if added:
            logger.info(
                "charged dataset '%s': run %s round %d, %d steps at noise_multiplier=%g, sample_rate=%g",
                dataset, run_id, round, steps, event.noise_multiplier, event.sample_rate,
            )
        elif stored.event != event:
            raise LedgerError(
                f"round {round} of run '{run_id}' was already charged to dataset '{dataset}' with "
                f"{_describe(stored.event)}; a second charge with {_describe(event)} is refused"
            )
        return stored

    def charges(self, dataset: str) -> list[Charge]:
        """Every charge to `dataset`, oldest first."""
        return self._store.charges(dataset)

    def events(self, dataset: str) -> list[DPEvent]:
        """The DP events charged to `dataset`, oldest first."""
        return [c.event for c in self._store.charges(dataset)]

    def datasets(self) -> list[str]:
        """Names of the datasets that have been charged, sorted."""
        return self._store.datasets()

    def spent(self, dataset: str, *, delta: float, accountant: str = "prv") -> float:
        """Composed epsilon of every charge to `dataset` at `delta` (0.0 if none)."""
        return epsilon(self.events(dataset), delta=delta, accountant=accountant)

    def preview(
        self,
        dataset: str,
        *,
        delta: float,
        accountant: str = "prv",
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> float:
        """What :meth:`spent` would return after such a charge; nothing is written."""
        event = DPEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return epsilon([*self.events(dataset), event], delta=delta, accountant=accountant)

    def close(self) -> None:
        """Release the storage; the ledger cannot be used afterwards."""
        self._store.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivacyLedger({self.location!r})"


def _inspect(conn: sqlite3.Connection) -> tuple[int, set[str], set[int]]:
    """The file's user_version, its tables, and the schema versions it records."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables.discard("sqlite_sequence")
    recorded = (
        {int(row[0]) for row in conn.execute("SELECT version FROM ledger_schema")}
        if "ledger_schema" in tables
        else set()
    )
    return version, tables, recorded


def _describe(event: DPEvent) -> str:
    return (
        f"noise_multiplier={event.noise_multiplier!r}, sample_rate={event.sample_rate!r}, "
        f"steps={event.steps}"
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _statements(script: str) -> Iterator[str]:
    """Split `script` into complete statements (executescript would commit our transaction)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
