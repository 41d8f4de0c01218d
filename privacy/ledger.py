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

Budgets are enforced by *reservations*. Before a node reads any data for a release it
calls :meth:`PrivacyLedger.reserve`: in one write transaction the ledger composes every
charge and every open reservation on the dataset with the new event and refuses
(:class:`~privacy.errors.BudgetExhaustedError`) if that would exceed the dataset's
:class:`Budget` or the run's cap; otherwise it records the reservation. Two processes
reserving on one dataset serialise on that transaction, so together they can never
overspend. :meth:`PrivacyLedger.commit` turns the reservation into a charge, atomically,
when the reply is about to leave; :meth:`PrivacyLedger.release` drops it when nothing
left. A reservation still open after a crash keeps counting against the budget (nothing
is hidden) and is listed by :meth:`PrivacyLedger.reservations` so the officer sees it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Protocol

from privacy.accountant import epsilon
from privacy.errors import AccountingError, BudgetExhaustedError, LedgerError
from privacy.events import DPEvent

__all__ = [
    "Budget",
    "Charge",
    "InMemoryLedgerStore",
    "LedgerStore",
    "PrivacyLedger",
    "Reservation",
    "SCHEMA_VERSION",
    "SqliteLedgerStore",
]

logger = logging.getLogger(__name__)

# Bumped whenever the table layout changes; stored in PRAGMA user_version and in the
# ledger_schema table, and checked on every open.
SCHEMA_VERSION = 2

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
# Schema 2 adds reservations; a schema-1 ledger is upgraded in place when opened.
_SCHEMA_2 = """
CREATE TABLE reservations (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset          TEXT    NOT NULL CHECK (dataset <> ''),
    run_id           TEXT    NOT NULL CHECK (run_id <> ''),
    round            INTEGER NOT NULL CHECK (round >= 0),
    mechanism        TEXT    NOT NULL,
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
    sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 1),
    reserved_at      TEXT    NOT NULL,
    UNIQUE (dataset, run_id, round)
);
"""
_TABLES = {"charges", "ledger_schema", "reservations"}


@dataclass(frozen=True)
class Charge:
    """One DP event charged to a dataset by one round of one run."""

    dataset: str
    run_id: str
    round: int
    event: DPEvent
    charged_at: datetime  # timezone-aware, UTC


@dataclass(frozen=True)
class Reservation:
    """Budget held for one round of one run until its reply leaves (commit) or not (release)."""

    dataset: str
    run_id: str
    round: int
    event: DPEvent
    reserved_at: datetime  # timezone-aware, UTC


@dataclass(frozen=True)
class Budget:
    """A dataset's lifetime privacy budget: composed epsilon may not exceed `epsilon` at `delta`."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, int | float) or not 0 < self.epsilon < float("inf"):
            problems.append(f"budget epsilon must be a finite number > 0; found {self.epsilon!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, int | float) or not 0 < self.delta < 1:
            problems.append(f"budget delta must be in (0, 1); found {self.delta!r}")
        if problems:
            raise AccountingError("; ".join(problems))


# What a reservation check sees: every (run_id, event) already charged or reserved on the dataset.
Held = list[tuple[str, DPEvent]]


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

    def reserve(self, reservation: Reservation, check: Callable[[Held], None]) -> Reservation:
        """Atomically: call `check` with what the dataset holds, then record `reservation`.

        `check` raises to refuse. An open reservation under the same key is returned as it
        is (after the same check, without itself); a charge under the key raises
        :class:`LedgerError`.
        """
        ...

    def commit(self, reservation: Reservation, charged_at: datetime) -> Charge:
        """Atomically replace the open `reservation` by its charge."""
        ...

    def drop(self, reservation: Reservation) -> bool:
        """Remove the open `reservation`; False if there was none."""
        ...

    def reservations(self, dataset: str | None) -> list[Reservation]:
        """Open reservations (of `dataset`, or all), oldest first."""
        ...

    def close(self) -> None:
        """Release the storage; later calls raise :class:`LedgerError`."""
        ...


def _key(item: Charge | Reservation) -> tuple[str, str, int]:
    return (item.dataset, item.run_id, item.round)


def _already_charged(reservation: Reservation) -> LedgerError:
    return LedgerError(
        f"round {reservation.round} of run '{reservation.run_id}' was already charged to dataset "
        f"'{reservation.dataset}'; a second release is refused"
    )


def _not_reserved(reservation: Reservation) -> LedgerError:
    return LedgerError(
        f"no open reservation for round {reservation.round} of run '{reservation.run_id}' on dataset "
        f"'{reservation.dataset}'; it was committed or released already"
    )


class InMemoryLedgerStore:
    """Charges in a list, guarded by a lock; gone when the process ends."""

    location = ":memory:"

    def __init__(self) -> None:
        self._charges: list[Charge] = []
        self._by_key: dict[tuple[str, str, int], Charge] = {}
        self._reserved: dict[tuple[str, str, int], Reservation] = {}
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

    def reserve(self, reservation: Reservation, check: Callable[[Held], None]) -> Reservation:
        key = _key(reservation)
        with self._lock:
            self._check_open()
            if key in self._by_key:
                raise _already_charged(reservation)
            held = [(c.run_id, c.event) for c in self._charges if c.dataset == reservation.dataset]
            held += [(r.run_id, r.event) for k, r in self._reserved.items() if r.dataset == reservation.dataset and k != key]
            check(held)
            return self._reserved.setdefault(key, reservation)

    def commit(self, reservation: Reservation, charged_at: datetime) -> Charge:
        key = _key(reservation)
        with self._lock:
            self._check_open()
            held = self._reserved.pop(key, None)
            if held is None:
                raise _not_reserved(reservation)
            charge = Charge(held.dataset, held.run_id, held.round, held.event, charged_at)
            self._by_key[key] = charge
            self._charges.append(charge)
            return charge

    def drop(self, reservation: Reservation) -> bool:
        with self._lock:
            self._check_open()
            return self._reserved.pop(_key(reservation), None) is not None

    def reservations(self, dataset: str | None) -> list[Reservation]:
        with self._lock:
            self._check_open()
            return [r for r in self._reserved.values() if dataset is None or r.dataset == dataset]

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
        if found == (0, set(), set()) or found[0] == 1:
            with self._transaction() as conn:
                found = _inspect(conn)  # another process may have created or upgraded it meanwhile
                if found == (0, set(), set()):
                    self._apply(conn, _SCHEMA + _SCHEMA_2)
                    logger.info("created privacy ledger %s (schema %d)", self.path, SCHEMA_VERSION)
                    return
                if found[0] == 1 and found[1] == {"charges", "ledger_schema"} and 1 in found[2]:
                    self._apply(conn, _SCHEMA_2)
                    logger.info("upgraded privacy ledger %s from schema 1 to %d", self.path, SCHEMA_VERSION)
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
    def _apply(conn: sqlite3.Connection, script: str) -> None:
        for statement in _statements(script):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO ledger_schema (version, applied_at) VALUES (?, ?)", (SCHEMA_VERSION, _now().isoformat())
        )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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

    def reserve(self, reservation: Reservation, check: Callable[[Held], None]) -> Reservation:
        key = _key(reservation)
        with self._transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM charges WHERE dataset = ? AND run_id = ? AND round = ?", key
            ).fetchone():
                raise _already_charged(reservation)
            held: Held = [
                (run_id, self._event(rest, f"charge of run {run_id}"))
                for run_id, *rest in conn.execute(
                    "SELECT run_id, mechanism, noise_multiplier, sample_rate, steps FROM charges "
                    "WHERE dataset = ? ORDER BY id",
                    (reservation.dataset,),
                )
            ]
            existing = None
            for row in conn.execute(f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE dataset = ? ORDER BY id", (reservation.dataset,)):
                held_reservation = self._reservation(row)
                if _key(held_reservation) == key:
                    existing = held_reservation
                else:
                    held.append((held_reservation.run_id, held_reservation.event))
            check(held)
            if existing is not None:
                return existing
            event = reservation.event
            conn.execute(
                "INSERT INTO reservations (dataset, run_id, round, mechanism, noise_multiplier, "
                "sample_rate, steps, reserved_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, event.mechanism, event.noise_multiplier, event.sample_rate, event.steps, reservation.reserved_at.isoformat()),
            )
            return reservation

    def commit(self, reservation: Reservation, charged_at: datetime) -> Charge:
        key = _key(reservation)
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE dataset = ? AND run_id = ? AND round = ?", key
            ).fetchone()
            if row is None:
                raise _not_reserved(reservation)
            event = self._reservation(row).event
            conn.execute("DELETE FROM reservations WHERE dataset = ? AND run_id = ? AND round = ?", key)
            conn.execute(
                "INSERT INTO charges (dataset, run_id, round, mechanism, noise_multiplier, "
                "sample_rate, steps, charged_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, event.mechanism, event.noise_multiplier, event.sample_rate, event.steps, charged_at.isoformat()),
            )
        return Charge(*key, event=event, charged_at=charged_at)

    def drop(self, reservation: Reservation) -> bool:
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM reservations WHERE dataset = ? AND run_id = ? AND round = ?", _key(reservation)
            )
            return cursor.rowcount > 0

    def reservations(self, dataset: str | None) -> list[Reservation]:
        with self._read() as conn:
            if dataset is None:
                rows = conn.execute(f"SELECT {_RESERVATION_COLUMNS} FROM reservations ORDER BY id").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE dataset = ? ORDER BY id", (dataset,)
                ).fetchall()
        return [self._reservation(row) for row in rows]

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

    def _event(self, columns: Sequence[object], what: str) -> DPEvent:
        mechanism, noise, rate, steps = columns
        try:
            return DPEvent(
                noise_multiplier=noise,  # type: ignore[arg-type]
                sample_rate=rate,  # type: ignore[arg-type]
                steps=steps,  # type: ignore[arg-type]
                mechanism=str(mechanism),
            )
        except AccountingError as err:
            raise LedgerError(f"privacy ledger {self.path} holds an unreadable {what}: {err}") from err

    def _charge(self, row: Sequence[object]) -> Charge:
        row_id, dataset, run_id, round_, mechanism, noise, rate, steps, charged_at = row
        what = f"charge (row {row_id})"
        event = self._event((mechanism, noise, rate, steps), what)
        try:
            return Charge(str(dataset), str(run_id), int(round_), event, datetime.fromisoformat(str(charged_at)))  # type: ignore[call-overload]
        except (TypeError, ValueError) as err:
            raise LedgerError(f"privacy ledger {self.path} holds an unreadable {what}: {err}") from err

    def _reservation(self, row: Sequence[object]) -> Reservation:
        row_id, dataset, run_id, round_, mechanism, noise, rate, steps, reserved_at = row
        what = f"reservation (row {row_id})"
        event = self._event((mechanism, noise, rate, steps), what)
        try:
            return Reservation(str(dataset), str(run_id), int(round_), event, datetime.fromisoformat(str(reserved_at)))  # type: ignore[call-overload]
        except (TypeError, ValueError) as err:
            raise LedgerError(f"privacy ledger {self.path} holds an unreadable {what}: {err}") from err


_COLUMNS = "id, dataset, run_id, round, mechanism, noise_multiplier, sample_rate, steps, charged_at"
_RESERVATION_COLUMNS = "id, dataset, run_id, round, mechanism, noise_multiplier, sample_rate, steps, reserved_at"


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
        _check_key(dataset, run_id, round)
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

    def reserve(
        self,
        dataset: str,
        *,
        run_id: str,
        round: int,
        event: DPEvent,
        budget: Budget,
        run_cap: Budget | None = None,
        accountant: str = "prv",
    ) -> Reservation:
        """Hold `event` against `dataset` for round `round` of run `run_id`, or refuse.

        In one transaction: the composition (at ``budget.delta``) of every charge and open
        reservation on the dataset plus `event` must not exceed ``budget.epsilon``, and
        that of the run's own events plus `event` must not exceed `run_cap` (the
        approval's or the policy's per-experiment limit, at the experiment's delta).
        Reserving a key that is already reserved returns that reservation.

        Raises
        ------
        BudgetExhaustedError
            The release would exceed the budget or the cap; nothing is recorded.
        LedgerError
            The key was charged already (a second release), or storage failed.
        """
        _check_key(dataset, run_id, round)

        def check(held: Held) -> None:
            total = epsilon([e for _, e in held] + [event], delta=budget.delta, accountant=accountant)
            if total > budget.epsilon:
                before = epsilon([e for _, e in held], delta=budget.delta, accountant=accountant)
                raise BudgetExhaustedError(
                    f"dataset '{dataset}' would reach epsilon {total:.3f} at delta {budget.delta:g}, over its "
                    f"lifetime budget of {budget.epsilon:g} ({before:.3f} spent or reserved); the release is refused"
                )
            if run_cap is not None:
                mine = epsilon([e for r, e in held if r == run_id] + [event], delta=run_cap.delta, accountant=accountant)
                if mine > run_cap.epsilon:
                    raise BudgetExhaustedError(
                        f"run {run_id} would reach epsilon {mine:.3f} on dataset '{dataset}', over its cap "
                        f"of {run_cap.epsilon:g}; the release is refused"
                    )

        return self._store.reserve(Reservation(dataset, run_id, round, event, _now()), check)

    def commit(self, reservation: Reservation) -> Charge:
        """Charge a reserved release: call it when the reply is about to leave the node.

        Raises
        ------
        LedgerError
            There is no such open reservation (committed or released already).
        """
        charge = self._store.commit(reservation, _now())
        logger.info(
            "charged dataset '%s': run %s round %d, %s",
            charge.dataset, charge.run_id, charge.round, _describe(charge.event),
        )
        return charge

    def release(self, reservation: Reservation) -> bool:
        """Give back a reservation whose release never happened; False if it was not open."""
        return self._store.drop(reservation)

    def reservations(self, dataset: str | None = None) -> list[Reservation]:
        """Open reservations, oldest first: releases in progress, or interrupted by a crash."""
        return self._store.reservations(dataset)

    def held(self, dataset: str) -> list[DPEvent]:
        """The events charged or reserved on `dataset`: what a budget check composes."""
        return self.events(dataset) + [r.event for r in self._store.reservations(dataset)]

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


def _check_key(dataset: object, run_id: object, round: object) -> None:
    problems = []
    if not isinstance(dataset, str) or not dataset:
        problems.append(f"dataset must be a non-empty string; found {dataset!r}")
    if not isinstance(run_id, str) or not run_id:
        problems.append(f"run_id must be a non-empty string; found {run_id!r}")
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        problems.append(f"round must be an integer >= 0; found {round!r}")
    if problems:
        raise AccountingError("; ".join(problems))


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
