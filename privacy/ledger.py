"""The privacy ledger: every DP release a node made, per dataset, and the runs it holds budget for.

One ledger per node home. Each *charge* records one DP event (a training round's DP-SGD
steps, or one release of a statistics query) against a dataset, keyed by ``(dataset,
run_id, round, release)``, with the submission it belongs to. A training round releases
one event (release 0); a statistics query is a run of one round that releases several,
one per noisy vector (releases 0..k-1, in the query's release order), all charged at
once when its reply leaves. The dataset's spent epsilon is never
stored: it is recomputed by composing its events with dp-accounting's PLD accountant
(:func:`privacy.accountant.epsilon`, :data:`~privacy.accountant.LEDGER_ACCOUNTANT`), the
one accountant that composes every mechanism medfed releases, so a change of delta never
needs a migration, nothing is ever added up, and every epsilon a node shows is the same
number.

Budgets are enforced by *run reservations*. When a node admits a run it calls
:meth:`PrivacyLedger.reserve_run`: in one write transaction the ledger composes every
charge, every live reservation's remaining rounds and the new run's ``rounds`` rounds,
and refuses (:class:`~privacy.errors.BudgetExhaustedError`) if that would exceed the
dataset's :class:`Budget` or the run's cap; otherwise it records the reservation, one
per ``(dataset, submission)``. A reservation holds the events one round releases
(a training round's DP-SGD event, or a statistics query's releases) for each of its
rounds. Of two runs racing for a budget that fits one, the second
is refused there, before it trains. Each round's reply turns one reserved round into its
charges (:meth:`PrivacyLedger.charge_round`), atomically, which also caps the rounds of a
submission: a round re-run in a later Flower run of the same submission is a new charge
and takes one of the reserved rounds, and there are no more than were reserved. When
the run completes, :meth:`PrivacyLedger.release_run` gives back the rounds it did not
use. A reservation whose run vanished *expires* after a hold time (the node policy's,
passed in) counted from its last activity (its reservation or its last charge); it then
stops counting against the budget, and a late charge for it first reserves the remaining
rounds again under the same budget check. Reservations are never deleted: the officer
sees each one with its state (:data:`RUN_STATES`) before and after.

Memory never grows with the number of rounds: a reservation is a round's events and a
count, each event composed as one self-composed event (:meth:`~privacy.events.DPEvent.times`).
(The sentence at the top, "the dataset's spent epsilon is never stored", still holds: the
running composition stores events, never an epsilon.)

Storage is a seam with two implementations:

- :class:`SqliteLedgerStore`, a SQLite file in WAL mode. Each write is one
  ``BEGIN IMMEDIATE`` transaction, so writes from concurrent processes (Flower starts a
  fresh ClientApp process per message) serialise, and a crash leaves either the whole
  write or none of it. Charges are append-only and reservations are never deleted and
  only move forward (triggers refuse the rest).
- :class:`InMemoryLedgerStore`, for tests and simulations, with the same rules.

The rules themselves (budget checks, states, caps) live once, in :class:`PrivacyLedger`,
over a store's transaction (:class:`LedgerTransaction`).

What a budget check reads does not grow with the number of charges. Every accountant
merges equal events before composing, so the ledger keeps each dataset's *running
composition* (:class:`ChargeGroup`: one row per mechanism, noise and sample rate, with
the summed steps), updated by a trigger in the transaction of each charge (schema 6):
composing it gives every charge's epsilon to the last bit. A budget check reads it, the
submission's own charges and the reservations not yet released, each by an index.
:meth:`PrivacyLedger.composition_problems` recomputes it from every charge (the node's
full check); :meth:`PrivacyLedger.composition_lag` is the cheap look each message takes.
"""

from __future__ import annotations

import logging
import numbers
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Protocol

from privacy.accountant import LEDGER_ACCOUNTANT, epsilon
from privacy.errors import AccountingError, BudgetExhaustedError, LedgerError
from privacy.events import POISSON_GAUSSIAN, DPEvent

__all__ = [
    "Budget",
    "Charge",
    "ChargeGroup",
    "EXPIRED",
    "InMemoryLedgerStore",
    "LIVE",
    "LedgerStore",
    "LedgerTransaction",
    "PrivacyLedger",
    "RELEASED",
    "RUN_STATES",
    "RunReservation",
    "SCHEMA_VERSION",
    "SqliteLedgerStore",
    "USED_UP",
]

logger = logging.getLogger(__name__)

# Bumped whenever the table layout changes; stored in PRAGMA user_version and in the
# ledger_schema table, and checked on every open.
SCHEMA_VERSION = 6

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
# Schema 2 added per-round reservations. Kept to recognise and upgrade schema-2 files.
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
# Schema 3: charges name their submission (NULL for charges written before), and whole-run
# reservations replace the per-round ones (open schema-2 reservations move over, see
# SqliteLedgerStore._upgrade).
_SCHEMA_3 = """
ALTER TABLE charges ADD COLUMN submission TEXT CHECK (submission IS NULL OR submission <> '');
CREATE TABLE run_reservations (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset          TEXT    NOT NULL CHECK (dataset <> ''),
    submission       TEXT    NOT NULL CHECK (submission <> ''),
    mechanism        TEXT    NOT NULL,
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
    sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 1),
    rounds           INTEGER NOT NULL CHECK (rounds >= 1),
    charged          INTEGER NOT NULL CHECK (charged >= 0 AND charged <= rounds),
    reserved_at      TEXT    NOT NULL,
    active_at        TEXT    NOT NULL,
    released_at      TEXT,
    UNIQUE (dataset, submission)
);
CREATE TRIGGER run_reservations_keep_their_terms
BEFORE UPDATE OF dataset, submission, mechanism, noise_multiplier, sample_rate, steps, rounds, reserved_at
ON run_reservations
BEGIN SELECT RAISE(ABORT, 'a run reservation keeps its terms'); END;
CREATE TRIGGER run_reservations_only_move_forward BEFORE UPDATE ON run_reservations
WHEN NEW.charged < OLD.charged OR OLD.released_at IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'a run reservation only moves forward (more rounds charged, then released)'); END;
CREATE TRIGGER run_reservations_are_never_deleted BEFORE DELETE ON run_reservations
BEGIN SELECT RAISE(ABORT, 'run reservations are kept for the officer'); END;
"""
# Schema 4: a round may release several events (a statistics query's releases). Charges
# are keyed by (dataset, run_id, round, release), earlier charges being release 0, and a
# run reservation holds the events of one round in run_reservation_events, by release
# (an earlier reservation's one event becomes its release 0). SQLite cannot change a
# table's UNIQUE constraint or drop a column used by a trigger, so both tables are
# rebuilt: copied row by row, ids kept, in the upgrade's one transaction.
_SCHEMA_4 = """
CREATE TABLE charges_4 (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset          TEXT    NOT NULL CHECK (dataset <> ''),
    run_id           TEXT    NOT NULL CHECK (run_id <> ''),
    round            INTEGER NOT NULL CHECK (round >= 0),
    release          INTEGER NOT NULL CHECK (release >= 0),
    mechanism        TEXT    NOT NULL,
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
    sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 1),
    charged_at       TEXT    NOT NULL,
    submission       TEXT    CHECK (submission IS NULL OR submission <> ''),
    UNIQUE (dataset, run_id, round, release)
);
INSERT INTO charges_4 (id, dataset, run_id, round, release, mechanism, noise_multiplier, sample_rate, steps, charged_at, submission)
SELECT id, dataset, run_id, round, 0, mechanism, noise_multiplier, sample_rate, steps, charged_at, submission
FROM charges ORDER BY id;
DROP TABLE charges;
ALTER TABLE charges_4 RENAME TO charges;
CREATE TRIGGER charges_are_never_updated BEFORE UPDATE ON charges
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER charges_are_never_deleted BEFORE DELETE ON charges
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TABLE run_reservations_4 (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset          TEXT    NOT NULL CHECK (dataset <> ''),
    submission       TEXT    NOT NULL CHECK (submission <> ''),
    rounds           INTEGER NOT NULL CHECK (rounds >= 1),
    charged          INTEGER NOT NULL CHECK (charged >= 0 AND charged <= rounds),
    reserved_at      TEXT    NOT NULL,
    active_at        TEXT    NOT NULL,
    released_at      TEXT,
    UNIQUE (dataset, submission)
);
INSERT INTO run_reservations_4 (id, dataset, submission, rounds, charged, reserved_at, active_at, released_at)
SELECT id, dataset, submission, rounds, charged, reserved_at, active_at, released_at FROM run_reservations ORDER BY id;
CREATE TABLE run_reservation_events (
    reservation      INTEGER NOT NULL REFERENCES run_reservations_4 (id),
    release          INTEGER NOT NULL CHECK (release >= 0),
    mechanism        TEXT    NOT NULL,
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
    sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 1),
    PRIMARY KEY (reservation, release)
);
INSERT INTO run_reservation_events (reservation, release, mechanism, noise_multiplier, sample_rate, steps)
SELECT id, 0, mechanism, noise_multiplier, sample_rate, steps FROM run_reservations ORDER BY id;
DROP TABLE run_reservations;
ALTER TABLE run_reservations_4 RENAME TO run_reservations;
CREATE TRIGGER run_reservations_keep_their_terms
BEFORE UPDATE OF id, dataset, submission, rounds, reserved_at ON run_reservations
BEGIN SELECT RAISE(ABORT, 'a run reservation keeps its terms'); END;
CREATE TRIGGER run_reservations_only_move_forward BEFORE UPDATE ON run_reservations
WHEN NEW.charged < OLD.charged OR OLD.released_at IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'a run reservation only moves forward (more rounds charged, then released)'); END;
CREATE TRIGGER run_reservations_are_never_deleted BEFORE DELETE ON run_reservations
BEGIN SELECT RAISE(ABORT, 'run reservations are kept for the officer'); END;
CREATE TRIGGER run_reservation_events_keep_their_terms BEFORE UPDATE ON run_reservation_events
BEGIN SELECT RAISE(ABORT, 'a run reservation keeps its terms'); END;
CREATE TRIGGER run_reservation_events_are_never_deleted BEFORE DELETE ON run_reservation_events
BEGIN SELECT RAISE(ABORT, 'run reservations are kept for the officer'); END;
"""
# Schema 5: a run may release events once per run besides its rounds' (a training run's
# noisy training-set size, used for weighting every round, and its final evaluation):
# they are run_reservation_events marked once = 1, numbered after the round's releases,
# each charged as round 0 of the run by :meth:`PrivacyLedger.charge_once`;
# run_reservations.once_charged says which were (bit k: the k-th once-per-run event).
_SCHEMA_5 = """
ALTER TABLE run_reservation_events ADD COLUMN once INTEGER NOT NULL DEFAULT 0 CHECK (once IN (0, 1));
ALTER TABLE run_reservations ADD COLUMN once_charged INTEGER NOT NULL DEFAULT 0 CHECK (once_charged >= 0);
CREATE TRIGGER run_reservations_once_charges_are_kept BEFORE UPDATE OF once_charged ON run_reservations
WHEN (NEW.once_charged & OLD.once_charged) != OLD.once_charged
BEGIN SELECT RAISE(ABORT, 'a run reservation only moves forward (more rounds charged, then released)'); END;
"""
# Schema 6: the running composition. Composition is commutative and every accountant
# medfed uses first merges equal events (:func:`privacy.accountant.grouped_history`), so
# a dataset's charges compose exactly as their groups do: one row per (dataset,
# mechanism, noise_multiplier, sample_rate) holding the summed steps. A trigger keeps it
# in the same transaction as each charge, whoever inserts the charge, so it can never
# lag the charges after a crash; it only grows (triggers refuse the rest). The upgrade
# derives it from the charges already there. Two indexes let the per-message path read a
# submission's charges and the open reservations without scanning the history.
_SCHEMA_6 = """
CREATE TABLE charge_groups (
    dataset          TEXT    NOT NULL,
    mechanism        TEXT    NOT NULL,
    noise_multiplier REAL    NOT NULL,
    sample_rate      REAL    NOT NULL,
    steps            INTEGER NOT NULL CHECK (steps >= 1),
    charges          INTEGER NOT NULL CHECK (charges >= 1),
    last_charge      INTEGER NOT NULL,
    PRIMARY KEY (dataset, mechanism, noise_multiplier, sample_rate)
);
INSERT INTO charge_groups (dataset, mechanism, noise_multiplier, sample_rate, steps, charges, last_charge)
SELECT dataset, mechanism, noise_multiplier, sample_rate, SUM(steps), COUNT(*), MAX(id)
FROM charges GROUP BY dataset, mechanism, noise_multiplier, sample_rate;
CREATE TRIGGER charges_compose AFTER INSERT ON charges
BEGIN
    INSERT INTO charge_groups (dataset, mechanism, noise_multiplier, sample_rate, steps, charges, last_charge)
    VALUES (NEW.dataset, NEW.mechanism, NEW.noise_multiplier, NEW.sample_rate, NEW.steps, 1, NEW.id)
    ON CONFLICT (dataset, mechanism, noise_multiplier, sample_rate) DO UPDATE SET
        steps = steps + excluded.steps, charges = charges + 1, last_charge = excluded.last_charge;
END;
CREATE TRIGGER charge_groups_only_grow BEFORE UPDATE ON charge_groups
WHEN NEW.steps <= OLD.steps OR NEW.charges <= OLD.charges OR NEW.dataset IS NOT OLD.dataset
    OR NEW.mechanism IS NOT OLD.mechanism OR NEW.noise_multiplier IS NOT OLD.noise_multiplier
    OR NEW.sample_rate IS NOT OLD.sample_rate
BEGIN SELECT RAISE(ABORT, 'the running composition only grows with the charges'); END;
CREATE TRIGGER charge_groups_are_never_deleted BEFORE DELETE ON charge_groups
BEGIN SELECT RAISE(ABORT, 'the running composition only grows with the charges'); END;
CREATE INDEX charges_by_submission ON charges (dataset, submission);
CREATE INDEX run_reservations_open ON run_reservations (dataset) WHERE released_at IS NULL;
"""
_TABLES = {"charge_groups", "charges", "ledger_schema", "run_reservation_events", "run_reservations"}

#: A run reservation's states, as the officer reads them.
LIVE = "live"  # counts against the budget; rounds may be charged
EXPIRED = "expired"  # its run went quiet for longer than the hold: counts no more
RELEASED = "released"  # the run ended with rounds unused: given back, no more charges
USED_UP = "used up"  # every reserved round (and once-per-run release) was charged
RUN_STATES = (LIVE, EXPIRED, RELEASED, USED_UP)


@dataclass(frozen=True)
class Charge:
    """One DP event charged to a dataset by one release of one round of one run (of one submission)."""

    dataset: str
    run_id: str
    round: int
    event: DPEvent
    charged_at: datetime  # timezone-aware, UTC
    submission: str | None = None  # None for charges recorded before schema 3, or outside a run
    release: int = 0  # which of the round's events: 0 for a training round, 0..k-1 for a query's releases


@dataclass(frozen=True)
class ChargeGroup:
    """Every charge to a dataset of one mechanism at one noise and sample rate, as one event.

    ``event`` holds the summed steps; ``charges`` counts the charges it stands for and
    ``last_charge`` is the newest one's row id (its place in the ledger's order). The
    groups of a dataset are its running composition: :func:`privacy.accountant.epsilon`
    of their events is, bit for bit, that of every charge.
    """

    dataset: str
    event: DPEvent
    charges: int
    last_charge: int


@dataclass(frozen=True)
class RunReservation:
    """Budget held for every round of one submission's run on one dataset.

    Attributes
    ----------
    events
        The DP events one round releases, by release: a training round's one DP-SGD
        event, or a statistics query's releases. The reservation holds ``rounds`` of each.
    rounds, charged
        Rounds reserved for the submission, and how many have become charges.
    reserved_at, active_at
        When it was first reserved, and its last activity (a reservation, again after
        expiring, or a charge): expiry counts from there.
    released_at
        When the run gave back what it did not use; None while it holds.
    once, once_charged
        Events the run releases once, whatever its rounds (a training run's noisy
        training-set size and its final evaluation), each charged as round 0 by
        :meth:`PrivacyLedger.charge_once`; and which were (a flag per event, in order).
    """

    dataset: str
    submission: str
    events: tuple[DPEvent, ...]
    rounds: int
    charged: int
    reserved_at: datetime
    active_at: datetime
    released_at: datetime | None = None
    once: tuple[DPEvent, ...] = ()
    once_charged: tuple[bool, ...] = ()  # () or one flag per `once` event

    def __post_init__(self) -> None:
        flags = tuple(bool(flag) for flag in self.once_charged) or (False,) * len(self.once)
        if len(flags) != len(self.once):
            raise ValueError(f"once_charged has {len(flags)} flag(s) for {len(self.once)} once-per-run event(s)")
        object.__setattr__(self, "once_charged", flags)

    @property
    def remaining(self) -> int:
        """Rounds reserved and not charged yet."""
        return self.rounds - self.charged

    @property
    def used_up(self) -> bool:
        """Every reserved round and every once-per-run event was charged."""
        return self.charged >= self.rounds and all(self.once_charged)

    def state(self, *, hold: timedelta, now: datetime) -> str:
        """One of :data:`RUN_STATES` at `now`, for a hold time of `hold`."""
        if self.used_up:
            return USED_UP
        if self.released_at is not None:
            return RELEASED
        return EXPIRED if now >= self.active_at + hold else LIVE

    def expires_at(self, hold: timedelta) -> datetime | None:
        """When it stops counting unless a round is charged first; None once released or used up."""
        if self.released_at is not None or self.used_up:
            return None
        return self.active_at + hold

    def held(self) -> list[DPEvent]:
        """The rounds not charged yet, one event per release (their composition), and the once-per-run events not charged yet."""
        rounds = [event.times(self.remaining) for event in self.events] if self.remaining >= 1 else []
        return rounds + [event for event, charged in zip(self.once, self.once_charged, strict=True) if not charged]


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


class LedgerTransaction(Protocol):
    """One atomic write to a store: what :class:`PrivacyLedger`'s rules read and write."""

    def charges(self, dataset: str) -> list[Charge]:
        """All charges to `dataset`, oldest first."""
        ...

    def round_charges(self, dataset: str, run_id: str, round: int) -> list[Charge]:
        """The charges of this round of this run, by release (empty if none)."""
        ...

    def groups(self, dataset: str) -> list[ChargeGroup]:
        """`dataset`'s running composition: its charges grouped (see :class:`ChargeGroup`)."""
        ...

    def all_groups(self) -> list[ChargeGroup]:
        """Every dataset's running composition, by dataset."""
        ...

    def charges_after(self, row: int) -> list[tuple[int, Charge]]:
        """The charges recorded after row id `row`, with their row ids, oldest first."""
        ...

    def submission_charges(self, dataset: str, submission: str) -> list[Charge]:
        """The charges of `submission` to `dataset`, oldest first."""
        ...

    def run_reservation(self, dataset: str, submission: str) -> RunReservation | None:
        """`submission`'s run reservation on `dataset`, if it made one."""
        ...

    def open_reservations(self, dataset: str) -> list[RunReservation]:
        """The run reservations on `dataset` not released yet (live, expired or used up), oldest first."""
        ...

    def run_reservations(self, dataset: str) -> list[RunReservation]:
        """Every run reservation on `dataset`, whatever its state, oldest first."""
        ...

    def add_charge(self, charge: Charge) -> None:
        """Append `charge`; its key (dataset, run_id, round, release) must be free."""
        ...

    def put_run_reservation(self, reservation: RunReservation) -> None:
        """Record `reservation`: a new one, or the next state of the one of its (dataset, submission)."""
        ...


class LedgerStore(Protocol):
    """Where a :class:`PrivacyLedger` keeps its charges and run reservations."""

    location: str

    def write(self) -> AbstractContextManager[LedgerTransaction]:
        """A transaction: serialised with every other write, all of it kept or none (on an exception)."""
        ...

    def charges(self, dataset: str) -> list[Charge]:
        """All charges to `dataset`, oldest first."""
        ...

    def datasets(self) -> list[str]:
        """Names of the datasets with at least one charge or run reservation, sorted."""
        ...

    def run_reservations(self, dataset: str | None) -> list[RunReservation]:
        """Run reservations (of `dataset`, or all), oldest first, in every state."""
        ...

    def read(self) -> AbstractContextManager[LedgerTransaction]:
        """A consistent view to read from (one snapshot; nothing written through it)."""
        ...

    def composition_problems(self) -> list[str]:
        """Where the running composition disagrees with the charges, read in full (empty: they agree)."""
        ...

    def composition_lag(self) -> str | None:
        """Why the running composition cannot be up to date with the newest charge, by a cheap look; or None."""
        ...

    def close(self) -> None:
        """Release the storage; later calls raise :class:`LedgerError`."""
        ...


def _moves_forward(old: RunReservation, new: RunReservation) -> str | None:
    """Why `new` may not follow `old` (the rules SQLite's triggers keep), or None."""
    terms = ("dataset", "submission", "events", "rounds", "reserved_at", "once")
    if any(getattr(old, name) != getattr(new, name) for name in terms):
        return "a run reservation keeps its terms"
    if any(was and not now for was, now in zip(old.once_charged, new.once_charged, strict=True)):
        return "a run reservation only moves forward (more rounds charged, then released)"
    if new.charged < old.charged or old.released_at is not None:
        return "a run reservation only moves forward (more rounds charged, then released)"
    return None


def _group_charges(charges: Sequence[tuple[int, Charge]]) -> list[ChargeGroup]:
    """`(row id, charge)` pairs as their running composition, groups in accountant order."""
    found: dict[tuple[str, str, float, float], tuple[int, int, int]] = {}
    for row_id, charge in charges:
        event = charge.event
        key = (charge.dataset, event.mechanism, event.noise_multiplier, event.sample_rate)
        steps, count, last = found.get(key, (0, 0, 0))
        found[key] = (steps + event.steps, count + 1, max(last, row_id))
    return [
        ChargeGroup(dataset, DPEvent(sigma, q, steps, mechanism), count, last)
        for (dataset, mechanism, sigma, q), (steps, count, last) in sorted(found.items())
    ]


class InMemoryLedgerStore:
    """Charges and reservations in lists, guarded by a lock; gone when the process ends.

    Its running composition is derived from the charges on every read (a simulation's
    ledgers are short), so it never disagrees with them.
    """

    location = ":memory:"

    def __init__(self) -> None:
        self._charges: list[Charge] = []
        self._reservations: list[RunReservation] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def write(self) -> Iterator[LedgerTransaction]:
        with self._lock:
            self._check_open()
            # Work on copies and keep them only if the whole transaction succeeds.
            transaction = _InMemoryTransaction(list(self._charges), list(self._reservations))
            yield transaction
            self._charges, self._reservations = transaction.charges_list, transaction.reservations_list

    def charges(self, dataset: str) -> list[Charge]:
        with self._lock:
            self._check_open()
            return [c for c in self._charges if c.dataset == dataset]

    def datasets(self) -> list[str]:
        with self._lock:
            self._check_open()
            return sorted({c.dataset for c in self._charges} | {r.dataset for r in self._reservations})

    def run_reservations(self, dataset: str | None) -> list[RunReservation]:
        with self._lock:
            self._check_open()
            return [r for r in self._reservations if dataset is None or r.dataset == dataset]

    @contextmanager
    def read(self) -> Iterator[LedgerTransaction]:
        with self._lock:
            self._check_open()
            yield _InMemoryTransaction(list(self._charges), list(self._reservations))

    def composition_problems(self) -> list[str]:
        return []

    def composition_lag(self) -> str | None:
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("the in-memory privacy ledger is closed")


class _InMemoryTransaction:
    def __init__(self, charges: list[Charge], reservations: list[RunReservation]) -> None:
        self.charges_list = charges
        self.reservations_list = reservations

    def charges(self, dataset: str) -> list[Charge]:
        return [c for c in self.charges_list if c.dataset == dataset]

    def round_charges(self, dataset: str, run_id: str, round: int) -> list[Charge]:
        found = [c for c in self.charges_list if (c.dataset, c.run_id, c.round) == (dataset, run_id, round)]
        return sorted(found, key=lambda c: c.release)

    def run_reservations(self, dataset: str) -> list[RunReservation]:
        return [r for r in self.reservations_list if r.dataset == dataset]

    def groups(self, dataset: str) -> list[ChargeGroup]:
        return _group_charges([(row, c) for row, c in enumerate(self.charges_list, start=1) if c.dataset == dataset])

    def all_groups(self) -> list[ChargeGroup]:
        return _group_charges(list(enumerate(self.charges_list, start=1)))

    def charges_after(self, row: int) -> list[tuple[int, Charge]]:
        return [(index, c) for index, c in enumerate(self.charges_list, start=1) if index > row]

    def submission_charges(self, dataset: str, submission: str) -> list[Charge]:
        return [c for c in self.charges_list if c.dataset == dataset and c.submission == submission]

    def run_reservation(self, dataset: str, submission: str) -> RunReservation | None:
        return next((r for r in self.reservations_list if (r.dataset, r.submission) == (dataset, submission)), None)

    def open_reservations(self, dataset: str) -> list[RunReservation]:
        return [r for r in self.reservations_list if r.dataset == dataset and r.released_at is None]

    def add_charge(self, charge: Charge) -> None:
        if any(c.release == charge.release for c in self.round_charges(charge.dataset, charge.run_id, charge.round)):
            raise LedgerError(
                f"the in-memory privacy ledger already holds release {charge.release} of round {charge.round} "
                f"of run '{charge.run_id}'"
            )
        self.charges_list.append(charge)

    def put_run_reservation(self, reservation: RunReservation) -> None:
        for index, old in enumerate(self.reservations_list):
            if (old.dataset, old.submission) == (reservation.dataset, reservation.submission):
                refused = _moves_forward(old, reservation)
                if refused:
                    raise LedgerError(f"the in-memory privacy ledger refuses the change: {refused}")
                self.reservations_list[index] = reservation
                return
        self.reservations_list.append(reservation)


class SqliteLedgerStore:
    """Charges and run reservations in a SQLite file (WAL mode), safe across threads and processes.

    Opening creates the file and its schema if it is new or empty, upgrades a schema-1
    to -5 ledger in place (one transaction), and otherwise checks that it is a medfed
    privacy ledger of a schema this code reads.

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
        if found == (0, set(), set()) or found[0] in _UPGRADABLE:
            with self._transaction() as conn:
                found = _inspect(conn)  # another process may have created or upgraded it meanwhile
                if found == (0, set(), set()):
                    self._apply(conn, _SCHEMA + _SCHEMA_3 + _SCHEMA_4 + _SCHEMA_5 + _SCHEMA_6)
                    logger.info("created privacy ledger %s (schema %d)", self.path, SCHEMA_VERSION)
                    return
                version, tables, recorded = found
                if version in _UPGRADABLE and tables == _UPGRADABLE[version] and version in recorded:
                    self._upgrade(conn, version)
                    logger.info("upgraded privacy ledger %s from schema %d to %d", self.path, version, SCHEMA_VERSION)
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

    def _upgrade(self, conn: sqlite3.Connection, version: int) -> None:
        """Schema 1 to 5 to 6, in the caller's transaction; charges keep their events (and compose as before).

        Every charge and run reservation from before schema 4 released one event per
        round: it becomes release 0 of its round.

        A schema-2 round reservation still open is a release that was in progress or cut
        off by a crash. Its run's open rounds become one run reservation of that many
        rounds, keyed by the run id, active since the latest of them: it counts until it
        expires, as before it counted until the officer saw it.
        """
        self._apply(
            conn,
            (_SCHEMA_3 if version < 3 else "") + (_SCHEMA_4 if version < 4 else "") + (_SCHEMA_5 if version < 5 else "") + _SCHEMA_6,
        )
        if version != 2:
            return
        rows = conn.execute(
            "SELECT dataset, run_id, mechanism, noise_multiplier, sample_rate, steps, reserved_at "
            "FROM reservations ORDER BY id"
        ).fetchall()
        runs: dict[tuple[str, str], list[tuple[DPEvent, datetime]]] = {}
        for dataset, run_id, *event, reserved_at in rows:
            held = self._event(event, f"schema-2 reservation of run {run_id}")
            runs.setdefault((str(dataset), str(run_id)), []).append((held, _read_time(reserved_at, self.path)))
        for (dataset, run_id), held in runs.items():
            events = {event for event, _ in held}
            if len(events) > 1:
                raise LedgerError(
                    f"cannot upgrade the privacy ledger {self.path}: run '{run_id}' holds open reservations of "
                    f"{len(events)} different events on dataset '{dataset}'; a run has one"
                )
            times = [at for _, at in held]
            self._insert_run(conn, RunReservation(dataset, run_id, (events.pop(),), len(held), 0, min(times), max(times)))
        conn.execute("DROP TABLE reservations")

    def _apply(self, conn: sqlite3.Connection, script: str) -> None:
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

    @contextmanager
    def write(self) -> Iterator[LedgerTransaction]:
        with self._transaction() as conn:
            yield _SqliteTransaction(self, conn)

    def charges(self, dataset: str) -> list[Charge]:
        with self._read() as conn:
            return self._charges(conn, dataset)

    def datasets(self) -> list[str]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT dataset FROM charges UNION SELECT dataset FROM run_reservations ORDER BY dataset"
            ).fetchall()
        return [row[0] for row in rows]

    def run_reservations(self, dataset: str | None) -> list[RunReservation]:
        with self._read() as conn:
            return self._runs(conn, dataset)

    @contextmanager
    def read(self) -> Iterator[LedgerTransaction]:
        """One read transaction (a WAL snapshot): every read through it sees the same ledger."""
        with self._read() as conn:
            conn.execute("BEGIN")
            try:
                yield _SqliteTransaction(self, conn)
            finally:
                conn.execute("COMMIT")

    def composition_problems(self) -> list[str]:
        """The running composition recomputed from every charge, group by group (reads the whole ledger)."""
        with self.read() as transaction:
            assert isinstance(transaction, _SqliteTransaction)
            conn = transaction._conn
            recomputed = {
                tuple(row[:4]): tuple(row[4:])
                for row in conn.execute(
                    "SELECT dataset, mechanism, noise_multiplier, sample_rate, SUM(steps), COUNT(*), MAX(id) FROM charges "
                    "GROUP BY dataset, mechanism, noise_multiplier, sample_rate"
                )
            }
            stored = {
                tuple(row[:4]): tuple(row[4:])
                for row in conn.execute(
                    "SELECT dataset, mechanism, noise_multiplier, sample_rate, steps, charges, last_charge FROM charge_groups"
                )
            }
        problems = []
        for key in sorted(set(recomputed) | set(stored), key=repr):
            dataset, mechanism, sigma, q = key
            have, want = stored.get(key), recomputed.get(key)
            if have != want:
                what = f"dataset '{dataset}', {mechanism} noise {sigma!r} sample rate {q!r}"
                held = "nothing" if have is None else f"{have[0]} step(s) of {have[1]} charge(s)"
                found = "none" if want is None else f"{want[0]} step(s) of {want[1]} charge(s)"
                problems.append(f"{what}: the running composition holds {held}, the charges hold {found}")
        return problems

    def composition_lag(self) -> str | None:
        """Compares the newest charge's row id with the newest one the running composition counted: two index look-ups."""
        with self._read() as conn:
            (newest,) = conn.execute("SELECT MAX(id) FROM charges").fetchone()
            (counted,) = conn.execute("SELECT MAX(last_charge) FROM charge_groups").fetchone()
        if newest == counted:
            return None
        return (
            f"the newest charge is row {newest} but the running composition counts up to row {counted}: "
            "charges were written around its trigger, or deleted"
        )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -------------------------------------------------------- rows (used by _SqliteTransaction)

    def _charges(self, conn: sqlite3.Connection, dataset: str) -> list[Charge]:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM charges WHERE dataset = ? ORDER BY id", (dataset,)).fetchall()
        return [self._charge(row) for row in rows]

    def _round_charges(self, conn: sqlite3.Connection, dataset: str, run_id: str, round: int) -> list[Charge]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM charges WHERE dataset = ? AND run_id = ? AND round = ? ORDER BY release",
            (dataset, run_id, round),
        ).fetchall()
        return [self._charge(row) for row in rows]

    def _groups(self, conn: sqlite3.Connection, dataset: str | None) -> list[ChargeGroup]:
        where, parameters = ("", ()) if dataset is None else ("WHERE dataset = ? ", (dataset,))
        rows = conn.execute(
            "SELECT dataset, mechanism, noise_multiplier, sample_rate, steps, charges, last_charge FROM charge_groups "
            f"{where}ORDER BY dataset, mechanism, noise_multiplier, sample_rate",
            parameters,
        ).fetchall()
        return [
            ChargeGroup(str(row[0]), self._event(row[1:5], "running composition"), int(row[5]), int(row[6])) for row in rows
        ]

    def _submission_charges(self, conn: sqlite3.Connection, dataset: str, submission: str) -> list[Charge]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM charges WHERE dataset = ? AND submission = ? ORDER BY id", (dataset, submission)
        ).fetchall()
        return [self._charge(row) for row in rows]

    def _runs(
        self, conn: sqlite3.Connection, dataset: str | None, *, submission: str | None = None, open_only: bool = False
    ) -> list[RunReservation]:
        clauses, values = [], []
        if dataset is not None:
            clauses.append("r.dataset = ?")
            values.append(dataset)
        if submission is not None:
            clauses.append("r.submission = ?")
            values.append(submission)
        if open_only:
            clauses.append("r.released_at IS NULL")
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        parameters = tuple(values)
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM run_reservations r{where} ORDER BY r.id", parameters).fetchall()
        events: dict[int, list[Sequence[object]]] = {}
        for row in conn.execute(
            "SELECT e.reservation, e.release, e.mechanism, e.noise_multiplier, e.sample_rate, e.steps, e.once "
            f"FROM run_reservation_events e JOIN run_reservations r ON r.id = e.reservation{where} "
            "ORDER BY e.reservation, e.release",
            parameters,
        ):
            events.setdefault(int(row[0]), []).append(row[1:])
        return [self._run(row, events.get(int(row[0]), [])) for row in rows]

    @staticmethod
    def _insert_charge(conn: sqlite3.Connection, charge: Charge) -> None:
        event = charge.event
        conn.execute(
            "INSERT INTO charges (dataset, run_id, round, release, mechanism, noise_multiplier, sample_rate, steps, "
            "charged_at, submission) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                charge.dataset, charge.run_id, charge.round, charge.release, event.mechanism, event.noise_multiplier,
                event.sample_rate, event.steps, charge.charged_at.isoformat(), charge.submission,
            ),
        )

    @staticmethod
    def _insert_run(conn: sqlite3.Connection, run: RunReservation) -> None:
        cursor = conn.execute(
            "INSERT INTO run_reservations (dataset, submission, rounds, charged, reserved_at, active_at, released_at, "
            "once_charged) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.dataset, run.submission, run.rounds, run.charged, run.reserved_at.isoformat(),
                run.active_at.isoformat(), None if run.released_at is None else run.released_at.isoformat(),
                _mask(run.once_charged),
            ),
        )
        conn.executemany(
            "INSERT INTO run_reservation_events (reservation, release, mechanism, noise_multiplier, sample_rate, steps, once) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (cursor.lastrowid, release, event.mechanism, event.noise_multiplier, event.sample_rate, event.steps, int(once))
                for release, (event, once) in enumerate([*((e, False) for e in run.events), *((e, True) for e in run.once)])
            ],
        )

    def _put_run(self, conn: sqlite3.Connection, run: RunReservation) -> None:
        found = self._runs(conn, run.dataset, submission=run.submission)
        old = found[0] if found else None
        if old is None:
            self._insert_run(conn, run)
            return
        refused = _moves_forward(old, run)
        if refused:
            raise LedgerError(f"the privacy ledger {self.path} refuses the change: {refused}")
        conn.execute(
            "UPDATE run_reservations SET charged = ?, active_at = ?, released_at = ?, once_charged = ? "
            "WHERE dataset = ? AND submission = ?",
            (
                run.charged, run.active_at.isoformat(), None if run.released_at is None else run.released_at.isoformat(),
                _mask(run.once_charged), run.dataset, run.submission,
            ),
        )

    # -------------------------------------------------------- connection and transactions

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

    # -------------------------------------------------------- decoding rows

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
        row_id, dataset, run_id, round_, release, mechanism, noise, rate, steps, charged_at, submission = row
        what = f"charge (row {row_id})"
        event = self._event((mechanism, noise, rate, steps), what)
        try:
            return Charge(
                str(dataset), str(run_id), int(round_), event, _read_time(charged_at, self.path),  # type: ignore[call-overload]
                None if submission is None else str(submission), int(release),  # type: ignore[call-overload]
            )
        except (TypeError, ValueError) as err:
            raise LedgerError(f"privacy ledger {self.path} holds an unreadable {what}: {err}") from err

    def _run(self, row: Sequence[object], event_rows: Sequence[Sequence[object]]) -> RunReservation:
        row_id, dataset, submission, rounds, charged, reserved_at, active_at, released_at, once_charged = row
        what = f"run reservation (row {row_id})"
        if [release for release, *_ in event_rows] != list(range(len(event_rows))) or not event_rows:
            raise LedgerError(
                f"privacy ledger {self.path} holds an unreadable {what}: its events are not releases 0..k-1 "
                f"(found {[release for release, *_ in event_rows]})"
            )
        events = tuple(self._event(columns, what) for _, *columns, once in event_rows if not once)
        once_events = tuple(self._event(columns, what) for _, *columns, once in event_rows if once)
        try:
            return RunReservation(
                str(dataset), str(submission), events, int(rounds), int(charged),  # type: ignore[call-overload]
                _read_time(reserved_at, self.path), _read_time(active_at, self.path),
                None if released_at is None else _read_time(released_at, self.path),
                once_events, tuple(bool(int(once_charged) >> k & 1) for k in range(len(once_events))),  # type: ignore[call-overload]
            )
        except (TypeError, ValueError) as err:
            raise LedgerError(f"privacy ledger {self.path} holds an unreadable {what}: {err}") from err


class _SqliteTransaction:
    def __init__(self, store: SqliteLedgerStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn

    def charges(self, dataset: str) -> list[Charge]:
        return self._store._charges(self._conn, dataset)

    def round_charges(self, dataset: str, run_id: str, round: int) -> list[Charge]:
        return self._store._round_charges(self._conn, dataset, run_id, round)

    def run_reservations(self, dataset: str) -> list[RunReservation]:
        return self._store._runs(self._conn, dataset)

    def groups(self, dataset: str) -> list[ChargeGroup]:
        return self._store._groups(self._conn, dataset)

    def all_groups(self) -> list[ChargeGroup]:
        return self._store._groups(self._conn, None)

    def charges_after(self, row: int) -> list[tuple[int, Charge]]:
        rows = self._conn.execute(f"SELECT {_COLUMNS} FROM charges WHERE id > ? ORDER BY id", (row,)).fetchall()
        return [(int(r[0]), self._store._charge(r)) for r in rows]

    def submission_charges(self, dataset: str, submission: str) -> list[Charge]:
        return self._store._submission_charges(self._conn, dataset, submission)

    def run_reservation(self, dataset: str, submission: str) -> RunReservation | None:
        found = self._store._runs(self._conn, dataset, submission=submission)
        return found[0] if found else None

    def open_reservations(self, dataset: str) -> list[RunReservation]:
        return self._store._runs(self._conn, dataset, open_only=True)

    def add_charge(self, charge: Charge) -> None:
        self._store._insert_charge(self._conn, charge)

    def put_run_reservation(self, reservation: RunReservation) -> None:
        self._store._put_run(self._conn, reservation)


_COLUMNS = "id, dataset, run_id, round, release, mechanism, noise_multiplier, sample_rate, steps, charged_at, submission"
_RUN_COLUMNS = "r.id, r.dataset, r.submission, r.rounds, r.charged, r.reserved_at, r.active_at, r.released_at, r.once_charged"
# The schemas a file is upgraded from, with the tables each has.
_UPGRADABLE = {
    1: {"charges", "ledger_schema"},
    2: {"charges", "ledger_schema", "reservations"},
    3: {"charges", "ledger_schema", "run_reservations"},
    4: {"charges", "ledger_schema", "run_reservation_events", "run_reservations"},
    5: {"charges", "ledger_schema", "run_reservation_events", "run_reservations"},
}


class PrivacyLedger:
    """A node's privacy ledger: charges and run reservations per dataset, and the epsilon they compose to.

    Use :meth:`open` for the node's SQLite file and :meth:`in_memory` in tests; both
    are context managers. `clock` gives the time that charges, reservations and expiry
    use (UTC); tests pass their own instead of waiting.
    """

    def __init__(self, store: LedgerStore, *, clock: Callable[[], datetime] | None = None) -> None:
        self._store = store
        self._clock = clock or _now

    @classmethod
    def open(cls, path: Path, *, clock: Callable[[], datetime] | None = None) -> PrivacyLedger:
        """The ledger stored in the SQLite file at `path`, created (or upgraded) if need be."""
        return cls(SqliteLedgerStore(path), clock=clock)

    @classmethod
    def in_memory(cls, *, clock: Callable[[], datetime] | None = None) -> PrivacyLedger:
        """An empty ledger that lives as long as this object."""
        return cls(InMemoryLedgerStore(), clock=clock)

    @property
    def location(self) -> str:
        """Where the ledger is kept: the file path, or ``:memory:``."""
        return self._store.location

    def now(self) -> datetime:
        """The ledger's clock: what reservations, charges and expiry are timed by."""
        return self._clock()

    # -------------------------------------------------------- charges and epsilon

    def charge(
        self,
        dataset: str,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        submission: str | None = None,
        mechanism: str = POISSON_GAUSSIAN,
        release: int = 0,
    ) -> Charge:
        """Record a release outside any run reservation (no budget check; see :meth:`charge_round`).

        Idempotent on ``(dataset, run_id, round, release)``: charging the same key again
        with the same event returns the recorded charge and adds nothing.

        Raises
        ------
        AccountingError
            A parameter is invalid.
        LedgerError
            The key was already charged with different parameters, or storage failed.
        """
        _check_key(dataset, run_id, round)
        _check_release(release)
        if submission is not None:
            _check_submission(submission)
        event = DPEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, mechanism=mechanism)
        with self._store.write() as transaction:
            stored = next((c for c in transaction.round_charges(dataset, run_id, round) if c.release == release), None)
            if stored is None:
                stored = Charge(dataset, run_id, round, event, self._clock(), submission, release)
                transaction.add_charge(stored)
                logger.info(
                    "charged dataset '%s': run %s round %d%s, %s", dataset, run_id, round, _release_label(release), _describe(event)
                )
                return stored
        if stored.event != event:
            raise LedgerError(
                f"round {round}{_release_label(release)} of run '{run_id}' was already charged to dataset '{dataset}' with "
                f"{_describe(stored.event)}; a second charge with {_describe(event)} is refused"
            )
        return stored

    def charges(self, dataset: str) -> list[Charge]:
        """Every charge to `dataset`, oldest first."""
        return self._store.charges(dataset)

    def events(self, dataset: str) -> list[DPEvent]:
        """The DP events charged to `dataset`, oldest first (reads every charge; see :meth:`composed`)."""
        return [c.event for c in self._store.charges(dataset)]

    def groups(self, dataset: str) -> list[ChargeGroup]:
        """`dataset`'s running composition: its charges as groups of equal events (see :class:`ChargeGroup`)."""
        with self._store.read() as view:
            return view.groups(dataset)

    def composition_state(self) -> tuple[int, list[ChargeGroup]]:
        """One consistent read for a checkpoint: the newest charge's row id counted, and every running composition."""
        with self._store.read() as view:
            groups = view.all_groups()
            return max((g.last_charge for g in groups), default=0), groups

    def composition_since(self, row: int) -> tuple[list[ChargeGroup], list[tuple[int, Charge]]]:
        """Every running composition and the charges recorded after row id `row`, from one read.

        The running composition must equal the one at `row` plus those charges: what a
        node checks each message from its checkpoint, at a cost that follows the charges
        since, not the ledger's size.
        """
        with self._store.read() as view:
            return view.all_groups(), view.charges_after(row)

    def composed(self, dataset: str) -> list[DPEvent]:
        """The events that compose exactly as every charge to `dataset` does: one per group of equal events.

        What every epsilon of the dataset is computed from: its length is the number of
        distinct events charged (mechanism, noise, sample rate), not the number of
        charges, so a budget check costs the same after ten charges as after ten thousand
        of the same kinds. ``epsilon(composed(d))`` equals ``epsilon(events(d))`` to the
        last bit: the accountant merges equal events first either way.
        """
        return [group.event for group in self.groups(dataset)]

    def round_charges(self, dataset: str, run_id: str, round: int) -> list[Charge]:
        """The charges of one round of one run, by release (an index look-up)."""
        with self._store.read() as view:
            return view.round_charges(dataset, run_id, round)

    def submission_charges(self, dataset: str, submission: str) -> list[Charge]:
        """`submission`'s charges to `dataset`, oldest first (an index look-up: as many as the run made)."""
        with self._store.read() as view:
            return view.submission_charges(dataset, submission)

    def run_reservation(self, dataset: str, submission: str) -> RunReservation | None:
        """`submission`'s run reservation on `dataset`, whatever its state, or None."""
        with self._store.read() as view:
            return view.run_reservation(dataset, submission)

    def composition_problems(self) -> list[str]:
        """Where the stored running composition disagrees with the charges, recomputed from all of them.

        Empty when they agree. Reads the whole ledger: the check for node start and for
        the officer's verification, not for every message (:meth:`composition_lag` is that one).
        """
        return self._store.composition_problems()

    def composition_lag(self) -> str | None:
        """Why the running composition cannot hold the newest charge (written around its trigger, or the
        newest charges deleted), by comparing two row ids; None when it may. Costs the same at any size."""
        return self._store.composition_lag()

    def datasets(self) -> list[str]:
        """Names of the datasets that have been charged or reserved, sorted."""
        return self._store.datasets()

    def spent(self, dataset: str, *, delta: float, submission: str | None = None) -> float:
        """Composed epsilon of every charge to `dataset` at `delta` (0.0 if none), by PLD.

        With `submission`, only that submission's charges: what one run (continuations
        included) cost the dataset on its own.
        """
        if submission is None:
            events = self.composed(dataset)
        else:
            events = [c.event for c in self.submission_charges(dataset, submission)]
        return epsilon(events, delta=delta, accountant=LEDGER_ACCOUNTANT)

    def preview(
        self,
        dataset: str,
        *,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        mechanism: str = POISSON_GAUSSIAN,
    ) -> float:
        """What :meth:`spent` would return after such a charge; nothing is written."""
        event = DPEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, mechanism=mechanism)
        return epsilon([*self.composed(dataset), event], delta=delta, accountant=LEDGER_ACCOUNTANT)

    # -------------------------------------------------------- run reservations

    def reserve_run(
        self,
        dataset: str,
        *,
        submission: str,
        event: DPEvent | None = None,
        events: Sequence[DPEvent] | None = None,
        rounds: int,
        budget: Budget,
        hold: timedelta,
        run_cap: Budget | None = None,
        once: Sequence[DPEvent] = (),
    ) -> RunReservation:
        """Hold `rounds` rounds on `dataset` for `submission`, or refuse.

        A round releases `event` (a training round: its DP-SGD event) or `events` (a
        statistics query, a run of one round: its releases in order, charged as releases
        0..k-1); give one of the two. `once` are events the run releases once whatever
        its rounds (a training run's noisy training-set size), charged by
        :meth:`charge_once`. In one transaction: the composition (at
        ``budget.delta``) of every charge to the dataset, every other live reservation's
        remaining rounds and this run's rounds must not exceed ``budget.epsilon``; and
        the submission's charges plus its rounds must not exceed `run_cap` (the
        approval's or the policy's per-experiment limit, at the experiment's delta). A
        live reservation of the same submission is returned as it is; an expired one is
        reserved again (its remaining rounds, under the same checks) from now.

        Raises
        ------
        BudgetExhaustedError
            The run would exceed the budget or the cap, or the submission's reservation
            was released or used up (its rounds are capped); nothing is recorded.
        LedgerError
            The submission holds a reservation of other terms, or storage failed.
        AccountingError
            A parameter is invalid, or neither or both of `event` and `events` are given.
        """
        _check_dataset(dataset)
        _check_submission(submission)
        held = _round_events(event, events)
        once = tuple(once)
        if any(not isinstance(item, DPEvent) for item in once):
            raise AccountingError(f"once must be a sequence of DPEvent; found {once!r}")
        _check_count(rounds, "rounds")
        _check_hold(hold)
        with self._store.write() as transaction:
            now = self._clock()
            existing = _find(transaction, dataset, submission)
            if existing is None:
                wanted = [e.times(rounds) for e in held] + list(once)
                self._check_budget(transaction, dataset, submission, wanted, budget, run_cap, hold, now)
                reservation = RunReservation(dataset, submission, held, rounds, 0, now, now, once=once)
                transaction.put_run_reservation(reservation)
                logger.info(
                    "reserved %d round(s) of %s on dataset '%s' for submission %s", rounds, _describe_all(held), dataset, submission
                )
                return reservation
            if (existing.events, existing.rounds, existing.once) != (held, rounds, once):
                raise LedgerError(
                    f"submission '{submission}' holds a reservation of {existing.rounds} round(s) of "
                    f"{_describe_all(existing.events)} on dataset '{dataset}'; a run of {rounds} round(s) of "
                    f"{_describe_all(held)} under the same submission is refused"
                )
            return self._renew(transaction, existing, budget, run_cap, hold, now)

    def charge_round(
        self,
        dataset: str,
        *,
        submission: str,
        run_id: str,
        round: int,
        budget: Budget,
        hold: timedelta,
        run_cap: Budget | None = None,
    ) -> list[Charge]:
        """Turn one reserved round of `submission` into the charges of round `round` of run `run_id`.

        Call it when the reply is about to leave the node. The round's events are charged
        together, one charge per release (a training round: one; a statistics query: all
        its releases), in one transaction. A reservation that expired is first reserved
        again (its remaining rounds, under :meth:`reserve_run`'s checks). Returns the
        charges, by release.

        Raises
        ------
        BudgetExhaustedError
            Every reserved round was charged already (the submission's round cap), the
            reservation was released, or it expired and no longer fits the budget;
            nothing is charged.
        LedgerError
            No reservation for the submission, the round of that run was charged
            already (a second release), or storage failed.
        """
        _check_key(dataset, run_id, round)
        _check_submission(submission)
        _check_hold(hold)
        with self._store.write() as transaction:
            now = self._clock()
            reservation = _held_by(transaction, dataset, submission)
            if transaction.round_charges(dataset, run_id, round):
                raise LedgerError(
                    f"round {round} of run '{run_id}' was already charged to dataset '{dataset}'; a second release is refused"
                )
            if reservation.remaining < 1:
                raise BudgetExhaustedError(
                    f"submission '{submission}' on dataset '{dataset}' has been charged all {reservation.rounds} round(s) "
                    "it reserved; another round is refused (the rounds of a submission are capped, continuations included)"
                )
            reservation = self._renew(transaction, reservation, budget, run_cap, hold, now)
            charges = [
                Charge(dataset, run_id, round, event, now, submission, release)
                for release, event in enumerate(reservation.events)
            ]
            for charge in charges:
                transaction.add_charge(charge)
            transaction.put_run_reservation(replace(reservation, charged=reservation.charged + 1, active_at=now))
        logger.info(
            "charged dataset '%s': run %s round %d of submission %s (%d of %d reserved rounds), %s",
            dataset, run_id, round, submission, reservation.charged + 1, reservation.rounds, _describe_all(reservation.events),
        )
        return charges

    def charge_once(
        self,
        dataset: str,
        *,
        submission: str,
        run_id: str,
        index: int,
        budget: Budget,
        hold: timedelta,
        run_cap: Budget | None = None,
    ) -> list[Charge]:
        """Charge `submission`'s `index`-th once-per-run event (round 0 of run `run_id`), or nothing if it was charged.

        Call it when the reply carrying it is about to leave. Returns the charges made
        now: empty when it was charged already (by this run or an earlier run of the
        submission: the node then sends the value it released then, post-processing, and
        nothing new leaves). A reservation that expired is first reserved again, under
        :meth:`reserve_run`'s checks.

        Raises
        ------
        BudgetExhaustedError
            The reservation was released or used up, or it expired and no longer fits.
        LedgerError
            No reservation for the submission, it holds no such once-per-run event, or
            storage failed.
        """
        _check_key(dataset, run_id, 0)
        _check_submission(submission)
        _check_hold(hold)
        with self._store.write() as transaction:
            now = self._clock()
            reservation = _held_by(transaction, dataset, submission)
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(reservation.once):
                raise LedgerError(
                    f"submission '{submission}' reserved {len(reservation.once)} once-per-run event(s) on dataset "
                    f"'{dataset}'; there is no once-per-run event {index!r}"
                )
            if reservation.once_charged[index]:
                return []
            reservation = self._renew(transaction, reservation, budget, run_cap, hold, now)
            event = reservation.once[index]
            charge = Charge(dataset, run_id, 0, event, now, submission, len(reservation.events) + index)
            transaction.add_charge(charge)
            flags = tuple(flag or k == index for k, flag in enumerate(reservation.once_charged))
            transaction.put_run_reservation(replace(reservation, once_charged=flags, active_at=now))
        logger.info(
            "charged dataset '%s': run %s of submission %s, its once-per-run release %d (%s)",
            dataset, run_id, submission, index, _describe_all((event,)),
        )
        return [charge]

    def release_run(self, dataset: str, *, submission: str) -> RunReservation | None:
        """Close `submission`'s reservation on `dataset` and give back its unused rounds.

        Later charges for the submission are refused. Releasing again, or a reservation
        already used up, changes nothing; returns the reservation as it now stands, or
        None if the submission never reserved on the dataset.
        """
        _check_dataset(dataset)
        _check_submission(submission)
        with self._store.write() as transaction:
            reservation = _find(transaction, dataset, submission)
            if reservation is None or reservation.released_at is not None:
                return reservation
            released = replace(reservation, released_at=self._clock())
            transaction.put_run_reservation(released)
        logger.info(
            "released the run reservation of submission %s on dataset '%s': %d of %d round(s) unused",
            submission, dataset, released.remaining, released.rounds,
        )
        return released

    def run_reservations(self, dataset: str | None = None) -> list[RunReservation]:
        """Every run reservation (of `dataset`, or all), oldest first, whatever its state."""
        return self._store.run_reservations(dataset)

    def reserved(self, dataset: str, *, hold: timedelta) -> list[DPEvent]:
        """The live reservations' remaining rounds on `dataset`, one event per reservation and release."""
        now = self._clock()
        with self._store.read() as view:
            return [e for r in view.open_reservations(dataset) if r.state(hold=hold, now=now) == LIVE for e in r.held()]

    def held(self, dataset: str, *, hold: timedelta) -> list[DPEvent]:
        """What a budget check composes: the charges (as their running composition) and the live reservations' remaining rounds."""
        now = self._clock()
        with self._store.read() as view:
            live = [e for r in view.open_reservations(dataset) if r.state(hold=hold, now=now) == LIVE for e in r.held()]
            return [g.event for g in view.groups(dataset)] + live

    # -------------------------------------------------------- rules

    def _renew(
        self,
        transaction: LedgerTransaction,
        reservation: RunReservation,
        budget: Budget,
        run_cap: Budget | None,
        hold: timedelta,
        now: datetime,
    ) -> RunReservation:
        """`reservation` if it may take another round: live as it is, or expired and reserved again."""
        state = reservation.state(hold=hold, now=now)
        where = f"submission '{reservation.submission}' on dataset '{reservation.dataset}'"
        if state == USED_UP:
            raise BudgetExhaustedError(
                f"{where} has been charged all {reservation.rounds} round(s) it reserved; another round is refused "
                "(the rounds of a submission are capped, continuations included)"
            )
        if state == RELEASED:
            assert reservation.released_at is not None
            raise BudgetExhaustedError(
                f"the run of {where} ended and gave back its unused rounds at {reservation.released_at.isoformat()}; "
                "no more rounds are charged to it"
            )
        if state == LIVE:
            return reservation
        self._check_budget(
            transaction, reservation.dataset, reservation.submission, reservation.held(), budget, run_cap, hold, now
        )
        renewed = replace(reservation, active_at=now)
        transaction.put_run_reservation(renewed)
        logger.info("reserved the %d remaining round(s) of %s again after it expired", renewed.remaining, where)
        return renewed

    @staticmethod
    def _check_budget(
        transaction: LedgerTransaction,
        dataset: str,
        submission: str,
        wanted: list[DPEvent],
        budget: Budget,
        run_cap: Budget | None,
        hold: timedelta,
        now: datetime,
    ) -> None:
        """Refuse `wanted` (the rounds to hold, one event per release) if the dataset's budget or the run's cap cannot take it."""
        # The running composition and the open reservations: what the budget check reads
        # grows with the kinds of events charged and the runs in flight, not the history.
        held = [group.event for group in transaction.groups(dataset)] + [
            event
            for r in transaction.open_reservations(dataset)
            if r.submission != submission and r.state(hold=hold, now=now) == LIVE
            for event in r.held()
        ]
        total = epsilon([*held, *wanted], delta=budget.delta, accountant=LEDGER_ACCOUNTANT)
        if total > budget.epsilon:
            before = epsilon(held, delta=budget.delta, accountant=LEDGER_ACCOUNTANT)
            raise BudgetExhaustedError(
                f"dataset '{dataset}' would reach epsilon {total:.3f} at delta {budget.delta:g}, over its lifetime "
                f"budget of {budget.epsilon:g} ({before:.3f} spent or reserved); the run is refused"
            )
        if run_cap is not None:
            mine = [c.event for c in transaction.submission_charges(dataset, submission)]
            cost = epsilon([*mine, *wanted], delta=run_cap.delta, accountant=LEDGER_ACCOUNTANT)
            if cost > run_cap.epsilon:
                raise BudgetExhaustedError(
                    f"submission '{submission}' would reach epsilon {cost:.3f} on dataset '{dataset}', over its cap "
                    f"of {run_cap.epsilon:g}; the run is refused"
                )

    # -------------------------------------------------------- lifetime

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


def _held_by(transaction: LedgerTransaction, dataset: str, submission: str) -> RunReservation:
    """`submission`'s reservation on `dataset`, which every charge of a run needs."""
    reservation = _find(transaction, dataset, submission)
    if reservation is None:
        raise LedgerError(
            f"no run reservation for submission '{submission}' on dataset '{dataset}'; "
            "a node reserves a run when it admits it, before it releases anything"
        )
    return reservation


def _mask(flags: Sequence[bool]) -> int:
    """Once-per-run charged flags as run_reservations.once_charged stores them (bit k: event k)."""
    return sum(1 << k for k, flag in enumerate(flags) if flag)


def _find(transaction: LedgerTransaction, dataset: str, submission: str) -> RunReservation | None:
    return transaction.run_reservation(dataset, submission)


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


def _check_dataset(dataset: object) -> None:
    if not isinstance(dataset, str) or not dataset:
        raise AccountingError(f"dataset must be a non-empty string; found {dataset!r}")


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


def _check_release(release: object) -> None:
    if not isinstance(release, int) or isinstance(release, bool) or release < 0:
        raise AccountingError(f"release must be an integer >= 0; found {release!r}")


def _round_events(event: object, events: object) -> tuple[DPEvent, ...]:
    """The events one round of a reservation releases: `event` alone, or `events` (exactly one given)."""
    if (event is None) == (events is None):
        raise AccountingError(
            "give event (a training round's DP event) or events (a statistics query's releases), not "
            + ("both" if event is not None else "neither")
        )
    if event is not None:
        if not isinstance(event, DPEvent):
            raise AccountingError(f"event must be a DPEvent; found {event!r}")
        return (event,)
    if isinstance(events, str | bytes) or not isinstance(events, Sequence) or not events:
        raise AccountingError(f"events must be a non-empty sequence of DPEvent; found {events!r}")
    wrong = [index for index, item in enumerate(events) if not isinstance(item, DPEvent)]
    if wrong:
        raise AccountingError(f"events must be a non-empty sequence of DPEvent; items {wrong} are not")
    return tuple(events)


def _check_submission(submission: object) -> None:
    if not isinstance(submission, str) or not submission:
        raise AccountingError(f"submission must be a non-empty string; found {submission!r}")


def _check_count(value: object, name: str) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise AccountingError(f"{name} must be an integer >= 1; found {value!r}")


def _check_hold(hold: object) -> None:
    if not isinstance(hold, timedelta) or hold <= timedelta(0):
        raise AccountingError(f"hold must be a positive timedelta; found {hold!r}")


def _describe(event: DPEvent) -> str:
    # DP-SGD's events read as they always have; the others name their mechanism.
    mechanism = "" if event.mechanism == POISSON_GAUSSIAN else f"mechanism={event.mechanism}, "
    return (
        f"{mechanism}noise_multiplier={event.noise_multiplier!r}, sample_rate={event.sample_rate!r}, "
        f"steps={event.steps}"
    )


def _describe_all(events: Sequence[DPEvent]) -> str:
    if len(events) == 1:
        return _describe(events[0])
    return f"{len(events)} releases ({'; '.join(_describe(event) for event in events)})"


def _release_label(release: int) -> str:
    return f" release {release}" if release else ""


def _now() -> datetime:
    return datetime.now(UTC)


def _read_time(value: object, path: Path) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError as err:
        raise LedgerError(f"privacy ledger {path} holds an unreadable time {value!r}") from err
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _statements(script: str) -> Iterator[str]:
    """Split `script` into complete statements (executescript would commit our transaction)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
