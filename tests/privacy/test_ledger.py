"""The privacy ledger: one contract for both stores, then what only the SQLite file does."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.accountant import epsilon
from privacy.errors import AccountingError, BudgetExhaustedError, LedgerError
from privacy.events import DISCRETE_LAPLACE, LAPLACE, DPEvent
from privacy.ledger import (
    _SCHEMA,
    _SCHEMA_2,
    _SCHEMA_3,
    EXPIRED,
    LIVE,
    RELEASED,
    SCHEMA_VERSION,
    USED_UP,
    Budget,
    Charge,
    PrivacyLedger,
    RunReservation,
)

DELTA = 1e-5
ROUND = {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 20}

LedgerFactory = Callable[[], PrivacyLedger]


class Clock:
    """A clock the test moves, instead of waiting for a reservation to expire."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "memory"])
def new_ledger(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[LedgerFactory]:
    """A factory of ledgers on `clock`; for SQLite every ledger it makes opens the same file."""
    opened: list[PrivacyLedger] = []

    if request.param == "sqlite":
        def make() -> PrivacyLedger:
            opened.append(PrivacyLedger.open(tmp_path / "ledger.db", clock=clock))
            return opened[-1]
    else:
        memory = PrivacyLedger.in_memory(clock=clock)
        opened.append(memory)

        def make() -> PrivacyLedger:
            return memory

    yield make
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(new_ledger: LedgerFactory) -> PrivacyLedger:
    return new_ledger()


# ---------------------------------------------------------------- contract (both stores)


def test_a_new_ledger_is_empty(ledger: PrivacyLedger) -> None:
    assert ledger.datasets() == []
    assert ledger.charges("htn_cohort") == []
    assert ledger.events("htn_cohort") == []
    assert ledger.spent("htn_cohort", delta=DELTA) == 0.0


def test_charge_records_the_event_with_a_utc_timestamp(ledger: PrivacyLedger, clock: Clock) -> None:
    charge = ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)

    assert (charge.dataset, charge.run_id, charge.round, charge.submission) == ("htn_cohort", "42", 1, None)
    assert charge.event == DPEvent(noise_multiplier=1.0, sample_rate=0.05, steps=20)
    assert charge.charged_at == clock.now
    assert charge.charged_at.tzinfo is not None and charge.charged_at.utcoffset().total_seconds() == 0
    assert ledger.charges("htn_cohort") == [charge]


def test_charge_is_a_frozen_record(ledger: PrivacyLedger) -> None:
    charge = ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
    assert isinstance(charge, Charge)
    with pytest.raises(AttributeError):
        charge.round = 2  # type: ignore[misc]


def test_events_keep_the_order_they_were_charged_in(ledger: PrivacyLedger) -> None:
    for round_, sigma in enumerate([1.0, 2.0, 1.5], start=1):
        ledger.charge("htn_cohort", run_id="7", round=round_, noise_multiplier=sigma, sample_rate=0.05, steps=20)
    assert [e.noise_multiplier for e in ledger.events("htn_cohort")] == [1.0, 2.0, 1.5]
    assert [c.round for c in ledger.charges("htn_cohort")] == [1, 2, 3]


def test_charges_are_kept_per_dataset(ledger: PrivacyLedger) -> None:
    ledger.charge("wearables", run_id="1", round=1, **ROUND)
    ledger.charge("htn_cohort", run_id="1", round=1, **ROUND)
    ledger.charge("htn_cohort", run_id="1", round=2, **ROUND)
    assert ledger.datasets() == ["htn_cohort", "wearables"]
    assert len(ledger.events("htn_cohort")) == 2
    assert len(ledger.events("wearables")) == 1
    assert ledger.events("imaging") == []


def test_charging_the_same_round_again_returns_the_recorded_charge(ledger: PrivacyLedger) -> None:
    first = ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
    again = ledger.charge("htn_cohort", run_id="42", round=1, noise_multiplier=1, sample_rate=0.05, steps=20)
    assert again == first
    assert len(ledger.events("htn_cohort")) == 1


def test_charging_the_same_round_with_other_parameters_is_refused(ledger: PrivacyLedger) -> None:
    ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
    with pytest.raises(LedgerError) as info:
        ledger.charge("htn_cohort", run_id="42", round=1, noise_multiplier=1.0, sample_rate=0.05, steps=40)
    assert str(info.value) == (
        "round 1 of run '42' was already charged to dataset 'htn_cohort' with noise_multiplier=1.0, "
        "sample_rate=0.05, steps=20; a second charge with noise_multiplier=1.0, sample_rate=0.05, "
        "steps=40 is refused"
    )
    assert [e.steps for e in ledger.events("htn_cohort")] == [20]


def test_the_same_round_of_another_run_is_another_charge(ledger: PrivacyLedger) -> None:
    ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
    ledger.charge("htn_cohort", run_id="43", round=1, **ROUND)
    assert [c.run_id for c in ledger.charges("htn_cohort")] == ["42", "43"]


def test_spent_composes_all_events_with_pld(ledger: PrivacyLedger) -> None:
    for round_ in (1, 2, 3):
        ledger.charge("htn_cohort", run_id="42", round=round_, **ROUND)
    events = [DPEvent(1.0, 0.05, 20)] * 3
    assert ledger.spent("htn_cohort", delta=DELTA) == epsilon(events, delta=DELTA, accountant="pld")
    # Composed, not added: three rounds cost less than three times one round.
    assert ledger.spent("htn_cohort", delta=DELTA) < 3 * epsilon(events[:1], delta=DELTA, accountant="pld")


def test_preview_is_spent_after_the_charge_and_writes_nothing(ledger: PrivacyLedger) -> None:
    ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
    preview = ledger.preview("htn_cohort", delta=DELTA, **ROUND)
    assert len(ledger.events("htn_cohort")) == 1
    ledger.charge("htn_cohort", run_id="42", round=2, **ROUND)
    assert ledger.spent("htn_cohort", delta=DELTA) == preview


def test_preview_on_an_uncharged_dataset_is_the_cost_of_the_event_alone(ledger: PrivacyLedger) -> None:
    preview = ledger.preview("htn_cohort", delta=DELTA, **ROUND)
    assert preview == epsilon([DPEvent(1.0, 0.05, 20)], delta=DELTA, accountant="pld")
    assert ledger.datasets() == []


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ({"dataset": ""}, "dataset must be a non-empty string; found ''"),
        ({"run_id": ""}, "run_id must be a non-empty string; found ''"),
        ({"round": -1}, "round must be an integer >= 0; found -1"),
        ({"round": True}, "round must be an integer >= 0; found True"),
        ({"noise_multiplier": -1}, "noise_multiplier must be > 0; found -1"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]; found 0.0"),
        ({"steps": 0}, "steps must be >= 1; found 0"),
    ],
)
def test_a_bad_charge_names_the_parameter_and_writes_nothing(
    ledger: PrivacyLedger, key: dict[str, object], message: str
) -> None:
    params: dict[str, object] = {"dataset": "htn_cohort", "run_id": "42", "round": 1, **ROUND, **key}
    dataset = params.pop("dataset")
    with pytest.raises(AccountingError, match=message):
        ledger.charge(dataset, **params)  # type: ignore[arg-type]
    assert ledger.datasets() == []


def test_a_closed_ledger_refuses_to_work(new_ledger: LedgerFactory) -> None:
    ledger = new_ledger()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.charges("htn_cohort")
    with pytest.raises(LedgerError, match="closed"):
        ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)


def test_concurrent_charges_from_threads_land_exactly_once(ledger: PrivacyLedger) -> None:
    # Eight threads charge rounds 1..10 of the same run (all colliding) and 5 of their own.
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for round_ in range(1, 11):
                ledger.charge("htn_cohort", run_id="shared", round=round_, **ROUND)
            for round_ in range(1, 6):
                ledger.charge("htn_cohort", run_id=f"own-{worker}", round=round_, **ROUND)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    charges = ledger.charges("htn_cohort")
    assert len(charges) == 10 + 8 * 5
    assert len({(c.run_id, c.round) for c in charges}) == len(charges)


charges_st = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),  # run id
        st.integers(min_value=1, max_value=3),  # round
        st.sampled_from([0.8, 1.0, 2.0]),  # noise multiplier of that run
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=10, deadline=None)
@given(requests=charges_st)
def test_spent_never_decreases_and_counts_each_round_once(requests: list[tuple[str, int, float]]) -> None:
    ledger = PrivacyLedger.in_memory()
    first_seen: dict[tuple[str, int], float] = {}
    previous = 0.0
    for run_id, round_, sigma in requests:
        sigma = first_seen.setdefault((run_id, round_), sigma)  # a retry repeats its parameters
        ledger.charge("htn_cohort", run_id=run_id, round=round_, noise_multiplier=sigma, sample_rate=0.05, steps=10)
        spent = ledger.spent("htn_cohort", delta=DELTA)
        assert spent >= previous
        previous = spent
    assert len(ledger.events("htn_cohort")) == len(first_seen)
    expected = [DPEvent(sigma, 0.05, 10) for sigma in first_seen.values()]
    assert previous == epsilon(expected, delta=DELTA, accountant="pld")


# ---------------------------------------------------------------- the SQLite file


def test_charges_survive_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        first = ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
        spent = ledger.spent("htn_cohort", delta=DELTA)
    with PrivacyLedger.open(path) as ledger:
        assert ledger.charges("htn_cohort") == [first]
        assert ledger.spent("htn_cohort", delta=DELTA) == spent
        # The key is still taken after a restart: a retried round is not charged twice.
        assert ledger.charge("htn_cohort", run_id="42", round=1, **ROUND) == first
        assert len(ledger.events("htn_cohort")) == 1


def test_the_file_is_a_versioned_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    PrivacyLedger.open(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert [row[0] for row in conn.execute("SELECT version FROM ledger_schema")] == [6]
    finally:
        conn.close()


def test_recorded_charges_cannot_be_edited_or_deleted(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE charges SET steps = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM charges")
    finally:
        conn.close()


def test_a_file_that_is_not_a_database_is_a_ledger_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not the ledgers you are looking for\n" * 50)
    with pytest.raises(LedgerError, match=f"^{re.escape(str(path))} is not a medfed privacy ledger"):
        PrivacyLedger.open(path)


def test_another_sqlite_database_is_a_ledger_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE patients (id INTEGER)")
    conn.commit()
    conn.close()
    expected = f"{path} is not a medfed privacy ledger (user_version 0, tables ['patients'])"
    with pytest.raises(LedgerError, match=f"^{re.escape(expected)}"):
        PrivacyLedger.open(path)


def test_a_ledger_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    PrivacyLedger.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match=re.escape(f"privacy ledger {path} has schema 7, newer than this medfed reads")):
        PrivacyLedger.open(path)


def test_a_missing_folder_is_a_ledger_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "no-such-home" / "ledger.db"
    with pytest.raises(LedgerError, match=re.escape(f"folder {path.parent} does not exist")):
        PrivacyLedger.open(path)


def test_threads_with_their_own_connections_charge_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    PrivacyLedger.open(path).close()
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with PrivacyLedger.open(path) as ledger:
                barrier.wait()
                for round_ in range(1, 11):
                    ledger.charge("htn_cohort", run_id="shared", round=round_, **ROUND)
                    ledger.charge("htn_cohort", run_id=f"own-{worker}", round=round_, **ROUND)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with PrivacyLedger.open(path) as ledger:
        assert len(ledger.charges("htn_cohort")) == 10 + 6 * 10


def _charge_from_another_process(path: str, worker: int, start: multiprocessing.synchronize.Event) -> None:
    # Runs in a spawned process, as a Flower ClientApp does: open, charge, close.
    start.wait(timeout=60)
    for round_ in range(1, 11):
        with PrivacyLedger.open(Path(path)) as ledger:
            ledger.charge("htn_cohort", run_id="shared", round=round_, **ROUND)
            ledger.charge("htn_cohort", run_id=f"own-{worker}", round=round_, **ROUND)


def test_concurrent_charges_from_processes_land_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"  # created by the racing processes themselves
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_charge_from_another_process, args=(str(path), i, start)) for i in range(4)]
    try:
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(timeout=120)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    with PrivacyLedger.open(path) as ledger:
        charges = ledger.charges("htn_cohort")
    assert len(charges) == 10 + 4 * 10
    assert sorted(c.round for c in charges if c.run_id == "shared") == list(range(1, 11))


# ---------------------------------------------------------------- run reservations (both stores)

EVENT = DPEvent(**ROUND)
HOLD = timedelta(hours=24)
ROUNDS = 3
# One run of ROUNDS rounds fits; a second one beside it does not.
FITS_ONE = Budget(epsilon([EVENT.times(ROUNDS)], delta=DELTA, accountant="pld") * 1.2, DELTA)


def _reserve(ledger: PrivacyLedger, submission: str, budget: Budget = FITS_ONE, **kwargs: object) -> RunReservation:
    params: dict[str, object] = {"event": EVENT, "rounds": ROUNDS, "budget": budget, "hold": HOLD, **kwargs}
    return ledger.reserve_run("htn_cohort", submission=submission, **params)  # type: ignore[arg-type]


def _charge(ledger: PrivacyLedger, submission: str, round_: int, run_id: str | None = None, budget: Budget = FITS_ONE) -> list[Charge]:
    return ledger.charge_round(
        "htn_cohort", submission=submission, run_id=run_id or submission, round=round_, budget=budget, hold=HOLD
    )


def _held_epsilon(ledger: PrivacyLedger) -> float:
    return epsilon(ledger.held("htn_cohort", hold=HOLD), delta=DELTA, accountant="pld")


def test_a_run_reservation_holds_every_round_of_the_run(ledger: PrivacyLedger, clock: Clock) -> None:
    held = _reserve(ledger, "s1")
    assert held == RunReservation("htn_cohort", "s1", (EVENT,), ROUNDS, 0, clock.now, clock.now)
    assert (held.remaining, held.state(hold=HOLD, now=clock.now), held.expires_at(HOLD)) == (3, LIVE, clock.now + HOLD)
    assert ledger.run_reservations() == [held]
    assert ledger.held("htn_cohort", hold=HOLD) == [EVENT.times(3)]
    assert ledger.charges("htn_cohort") == [] and ledger.datasets() == ["htn_cohort"]


def test_charging_a_round_turns_one_reserved_round_into_a_charge(ledger: PrivacyLedger, clock: Clock) -> None:
    _reserve(ledger, "s1")
    before = _held_epsilon(ledger)
    clock.advance(minutes=5)
    charges = _charge(ledger, "s1", 1, run_id="41")
    assert charges == [Charge("htn_cohort", "41", 1, EVENT, clock.now, "s1")]
    [held] = ledger.run_reservations("htn_cohort")
    assert (held.charged, held.remaining, held.active_at) == (1, 2, clock.now)
    # What counts against the budget is the same events, composed to the same number.
    assert _held_epsilon(ledger) == before


def test_reserving_the_same_submission_again_returns_the_live_reservation(ledger: PrivacyLedger) -> None:
    first = _reserve(ledger, "s1")
    # No second budget check: the run holds its budget already (a lower budget later does not undo it).
    assert _reserve(ledger, "s1", budget=Budget(0.01, DELTA)) == first
    assert len(ledger.run_reservations()) == 1


def test_a_submission_cannot_reserve_a_run_of_other_terms(ledger: PrivacyLedger) -> None:
    _reserve(ledger, "s1")
    with pytest.raises(LedgerError, match="submission 's1' holds a reservation of 3 round\\(s\\) of noise_multiplier=1.0"):
        _reserve(ledger, "s1", rounds=5)


def test_a_run_over_the_budget_is_refused_and_records_nothing(ledger: PrivacyLedger) -> None:
    with pytest.raises(
        BudgetExhaustedError,
        match=r"^dataset 'htn_cohort' would reach epsilon \d+\.\d{3} at delta 1e-05, over its lifetime budget of 0\.5 "
        r"\(0\.000 spent or reserved\); the run is refused$",
    ):
        _reserve(ledger, "s1", budget=Budget(0.5, DELTA))
    assert ledger.run_reservations() == [] and ledger.datasets() == []


def test_of_two_runs_on_a_budget_that_fits_one_the_second_is_refused_before_any_charge(ledger: PrivacyLedger) -> None:
    _reserve(ledger, "s1")
    with pytest.raises(BudgetExhaustedError, match="spent or reserved"):
        _reserve(ledger, "s2")
    assert [r.submission for r in ledger.run_reservations()] == ["s1"]
    assert ledger.charges("htn_cohort") == []


def test_the_rounds_of_a_submission_are_capped_across_continuations(ledger: PrivacyLedger, clock: Clock) -> None:
    _reserve(ledger, "s1")
    _charge(ledger, "s1", 1, run_id="41")
    _charge(ledger, "s1", 2, run_id="41")
    # The coordinator restarted: a later Flower run of the same submission re-runs round 2.
    _charge(ledger, "s1", 2, run_id="57")
    with pytest.raises(BudgetExhaustedError, match="submission 's1' on dataset 'htn_cohort' has been charged all 3 round"):
        _charge(ledger, "s1", 3, run_id="57")
    [held] = ledger.run_reservations()
    assert held.state(hold=HOLD, now=clock.now) == USED_UP and held.expires_at(HOLD) is None
    assert [(c.run_id, c.round) for c in ledger.charges("htn_cohort")] == [("41", 1), ("41", 2), ("57", 2)]
    with pytest.raises(BudgetExhaustedError, match="has been charged all 3 round"):
        _reserve(ledger, "s1")


def test_a_round_of_a_run_is_charged_once(ledger: PrivacyLedger) -> None:
    _reserve(ledger, "s1")
    _charge(ledger, "s1", 1)
    with pytest.raises(LedgerError, match="round 1 of run 's1' was already charged to dataset 'htn_cohort'; a second release is refused"):
        _charge(ledger, "s1", 1)
    assert ledger.run_reservations()[0].charged == 1


def test_a_charge_without_a_reservation_is_refused(ledger: PrivacyLedger) -> None:
    with pytest.raises(LedgerError, match="no run reservation for submission 's1' on dataset 'htn_cohort'"):
        _charge(ledger, "s1", 1)
    assert ledger.charges("htn_cohort") == []


def test_a_run_that_ends_early_gives_back_the_rest(ledger: PrivacyLedger, clock: Clock) -> None:
    _reserve(ledger, "s1")
    _charge(ledger, "s1", 1)
    clock.advance(minutes=1)
    released = ledger.release_run("htn_cohort", submission="s1")
    assert released is not None and (released.charged, released.released_at) == (1, clock.now)
    assert released.state(hold=HOLD, now=clock.now) == RELEASED and released.expires_at(HOLD) is None
    assert ledger.held("htn_cohort", hold=HOLD) == [EVENT]
    assert ledger.release_run("htn_cohort", submission="s1") == released  # again: nothing changes
    with pytest.raises(BudgetExhaustedError, match="the run of submission 's1' on dataset 'htn_cohort' ended and gave back"):
        _charge(ledger, "s1", 2)
    with pytest.raises(BudgetExhaustedError, match="ended and gave back"):
        _reserve(ledger, "s1")
    # What it gave back is there for the next run (two rounds fit beside the one charged).
    _reserve(ledger, "s2", rounds=2)


def test_releasing_a_submission_that_never_reserved_changes_nothing(ledger: PrivacyLedger) -> None:
    assert ledger.release_run("htn_cohort", submission="s9") is None
    assert ledger.run_reservations() == []


def test_an_expired_reservation_stops_counting_but_stays_listed(ledger: PrivacyLedger, clock: Clock) -> None:
    held = _reserve(ledger, "s1")
    clock.advance(hours=23, minutes=59)
    with pytest.raises(BudgetExhaustedError):
        _reserve(ledger, "s2")
    clock.advance(minutes=1)
    assert held.state(hold=HOLD, now=clock.now) == EXPIRED and held.expires_at(HOLD) == clock.now
    assert ledger.held("htn_cohort", hold=HOLD) == []
    _reserve(ledger, "s2")
    assert [(r.submission, r.state(hold=HOLD, now=clock.now)) for r in ledger.run_reservations()] == [("s1", EXPIRED), ("s2", LIVE)]


def test_expiry_counts_from_the_last_charge(ledger: PrivacyLedger, clock: Clock) -> None:
    _reserve(ledger, "s1")
    clock.advance(hours=20)
    _charge(ledger, "s1", 1)
    clock.advance(hours=20)  # 40 hours after the reservation, 20 after its last charge
    [held] = ledger.run_reservations()
    assert held.state(hold=HOLD, now=clock.now) == LIVE
    with pytest.raises(BudgetExhaustedError):
        _reserve(ledger, "s2")


def test_a_late_charge_for_an_expired_reservation_reserves_again_first(ledger: PrivacyLedger, clock: Clock) -> None:
    _reserve(ledger, "s1")
    clock.advance(hours=30)
    _charge(ledger, "s1", 1)
    [held] = ledger.run_reservations()
    assert (held.charged, held.active_at, held.state(hold=HOLD, now=clock.now)) == (1, clock.now, LIVE)
    with pytest.raises(BudgetExhaustedError):
        _reserve(ledger, "s2")


def test_a_late_charge_that_no_longer_fits_is_refused_and_charges_nothing(ledger: PrivacyLedger, clock: Clock) -> None:
    _reserve(ledger, "s1")
    clock.advance(hours=30)
    _reserve(ledger, "s2")  # took the budget s1 no longer held
    with pytest.raises(BudgetExhaustedError, match="over its lifetime budget"):
        _charge(ledger, "s1", 1)
    assert ledger.charges("htn_cohort") == []
    assert ledger.run_reservations()[0].state(hold=HOLD, now=clock.now) == EXPIRED


def test_a_run_cap_limits_the_submission_but_not_the_others(ledger: PrivacyLedger) -> None:
    budget = Budget(50.0, DELTA)
    cap = Budget(epsilon([EVENT.times(2)], delta=DELTA, accountant="pld") * 1.01, DELTA)
    with pytest.raises(BudgetExhaustedError, match=r"^submission 's1' would reach epsilon \d\.\d{3} on dataset 'htn_cohort', over its cap"):
        _reserve(ledger, "s1", budget=budget, run_cap=cap)
    _reserve(ledger, "s2", budget=budget, run_cap=cap, rounds=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"submission": ""}, "submission must be a non-empty string; found ''"),
        ({"rounds": 0}, "rounds must be an integer >= 1; found 0"),
        ({"rounds": 2.0}, "rounds must be an integer >= 1; found 2.0"),
        ({"hold": timedelta(0)}, r"hold must be a positive timedelta; found datetime.timedelta\(0\)"),
        ({"hold": 24}, "hold must be a positive timedelta; found 24"),
    ],
)
def test_a_bad_reservation_names_the_parameter(ledger: PrivacyLedger, kwargs: dict[str, object], message: str) -> None:
    params: dict[str, object] = {"submission": "s1", "event": EVENT, "rounds": 3, "budget": FITS_ONE, "hold": HOLD, **kwargs}
    with pytest.raises(AccountingError, match=message):
        ledger.reserve_run("htn_cohort", **params)  # type: ignore[arg-type]
    assert ledger.run_reservations() == []


@pytest.mark.parametrize(
    ("epsilon_", "delta", "message"),
    [
        (0.0, DELTA, "budget epsilon must be a finite number > 0; found 0.0"),
        (float("inf"), DELTA, "budget epsilon must be a finite number > 0; found inf"),
        (1.0, 1.0, r"budget delta must be in \(0, 1\); found 1.0"),
    ],
)
def test_a_bad_budget_names_the_value(epsilon_: float, delta: float, message: str) -> None:
    with pytest.raises(AccountingError, match=message):
        Budget(epsilon_, delta)


# ---------------------------------------------------------------- statistics queries (both stores)

# A query's releases, in its release order: a count vector (discrete Laplace, scale 4), a
# centred sum (Laplace, scale 6 on sensitivity 3) and another count vector.
QUERY = (
    DPEvent(4.0, 1.0, 1, DISCRETE_LAPLACE),
    DPEvent(2.0, 1.0, 1, LAPLACE),
    DPEvent(4.0, 1.0, 1, DISCRETE_LAPLACE),
)
ROOMY = Budget(20.0, DELTA)


def _reserve_query(ledger: PrivacyLedger, submission: str = "query-1", budget: Budget = ROOMY, **kwargs: object) -> RunReservation:
    params: dict[str, object] = {"events": QUERY, "rounds": 1, "budget": budget, "hold": HOLD, **kwargs}
    return ledger.reserve_run("htn_cohort", submission=submission, **params)  # type: ignore[arg-type]


def _charge_query(ledger: PrivacyLedger, submission: str = "query-1", run_id: str = "query-1", round_: int = 0) -> list[Charge]:
    return ledger.charge_round("htn_cohort", submission=submission, run_id=run_id, round=round_, budget=ROOMY, hold=HOLD)


def test_a_statistics_query_reserves_all_its_releases_at_admission(ledger: PrivacyLedger, clock: Clock) -> None:
    held = _reserve_query(ledger, events=list(QUERY))  # any sequence; kept as a tuple
    assert held == RunReservation("htn_cohort", "query-1", QUERY, 1, 0, clock.now, clock.now)
    assert ledger.held("htn_cohort", hold=HOLD) == list(QUERY)
    assert ledger.charges("htn_cohort") == []
    assert epsilon(ledger.held("htn_cohort", hold=HOLD), delta=DELTA, accountant="pld") == epsilon(QUERY, delta=DELTA, accountant="pld")


def test_a_query_reply_charges_every_release_at_once_as_releases_of_one_round(ledger: PrivacyLedger, clock: Clock) -> None:
    _reserve_query(ledger)
    before = _held_epsilon(ledger)
    clock.advance(minutes=1)
    charges = _charge_query(ledger)
    assert charges == [Charge("htn_cohort", "query-1", 0, event, clock.now, "query-1", release) for release, event in enumerate(QUERY)]
    assert ledger.charges("htn_cohort") == charges
    [held] = ledger.run_reservations()
    assert (held.charged, held.state(hold=HOLD, now=clock.now)) == (1, USED_UP)
    assert ledger.spent("htn_cohort", delta=DELTA) == before == epsilon(QUERY, delta=DELTA, accountant="pld")


def test_a_query_is_charged_once(ledger: PrivacyLedger) -> None:
    _reserve_query(ledger)
    _charge_query(ledger)
    with pytest.raises(LedgerError, match="round 0 of run 'query-1' was already charged to dataset 'htn_cohort'; a second release is refused"):
        _charge_query(ledger)
    # Another run id of the same submission (a retried query) finds its one round used up.
    with pytest.raises(BudgetExhaustedError, match="has been charged all 1 round"):
        _charge_query(ledger, run_id="query-1-retry")
    assert len(ledger.charges("htn_cohort")) == len(QUERY)


def test_a_query_that_does_not_fit_is_refused_and_records_nothing(ledger: PrivacyLedger) -> None:
    # Each release fits on its own; the three composed do not.
    tight = Budget(epsilon(QUERY[:2], delta=DELTA, accountant="pld") * 1.01, DELTA)
    with pytest.raises(BudgetExhaustedError, match="over its lifetime budget"):
        _reserve_query(ledger, budget=tight)
    assert ledger.run_reservations() == [] and ledger.datasets() == []


def test_a_query_composes_with_the_live_training_runs_beside_it(ledger: PrivacyLedger) -> None:
    budget = Budget(epsilon([EVENT.times(ROUNDS), *QUERY], delta=DELTA, accountant="pld") * 0.99, DELTA)
    _reserve(ledger, "train-1", budget=budget)
    with pytest.raises(BudgetExhaustedError, match="spent or reserved"):
        _reserve_query(ledger, budget=budget)
    ledger.release_run("htn_cohort", submission="train-1")  # it trained no round: all of it comes back
    _reserve_query(ledger, budget=budget)


def test_a_query_released_before_its_reply_gives_back_every_release(ledger: PrivacyLedger) -> None:
    _reserve_query(ledger)
    released = ledger.release_run("htn_cohort", submission="query-1")
    assert released is not None and released.remaining == 1
    assert ledger.held("htn_cohort", hold=HOLD) == []
    with pytest.raises(BudgetExhaustedError, match="ended and gave back"):
        _charge_query(ledger)


def test_an_expired_query_reservation_is_reserved_again_when_its_reply_leaves(ledger: PrivacyLedger, clock: Clock) -> None:
    _reserve_query(ledger)
    clock.advance(hours=25)
    assert ledger.held("htn_cohort", hold=HOLD) == []
    assert len(_charge_query(ledger)) == len(QUERY)
    assert ledger.run_reservations()[0].active_at == clock.now


def test_a_query_cannot_reserve_again_with_other_releases(ledger: PrivacyLedger) -> None:
    _reserve_query(ledger)
    assert _reserve_query(ledger) == ledger.run_reservations()[0]  # the same terms: the live reservation
    with pytest.raises(LedgerError) as info:
        _reserve_query(ledger, events=QUERY[:2])
    assert str(info.value).startswith(
        "submission 'query-1' holds a reservation of 1 round(s) of 3 releases (mechanism=discrete-laplace, "
        "noise_multiplier=4.0, sample_rate=1.0, steps=1; mechanism=laplace, noise_multiplier=2.0"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"event": EVENT, "events": QUERY}, r"^give event \(a training round's DP event\) or events \(a statistics query's releases\), not both$"),
        ({}, "not neither$"),
        ({"events": ()}, r"^events must be a non-empty sequence of DPEvent; found \(\)$"),
        ({"events": "laplace"}, "^events must be a non-empty sequence of DPEvent; found 'laplace'$"),
        ({"events": [QUERY[0], 2.0]}, r"^events must be a non-empty sequence of DPEvent; items \[1\] are not$"),
        ({"event": 2.0}, "^event must be a DPEvent; found 2.0$"),
    ],
)
def test_a_reservation_takes_one_event_or_a_querys_events(ledger: PrivacyLedger, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(AccountingError, match=message):
        ledger.reserve_run("htn_cohort", submission="s1", rounds=1, budget=ROOMY, hold=HOLD, **kwargs)  # type: ignore[arg-type]
    assert ledger.run_reservations() == []


def test_charge_outside_a_run_keys_by_release_and_names_the_mechanism(ledger: PrivacyLedger) -> None:
    laplace = {"noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1, "mechanism": LAPLACE}
    first = ledger.charge("htn_cohort", run_id="q", round=0, release=1, **laplace)  # type: ignore[arg-type]
    assert (first.release, first.event) == (1, QUERY[1])
    assert ledger.charge("htn_cohort", run_id="q", round=0, release=1, **laplace) == first  # type: ignore[arg-type]
    other = ledger.charge("htn_cohort", run_id="q", round=0, release=0, noise_multiplier=4.0, sample_rate=1.0, steps=1, mechanism=DISCRETE_LAPLACE)
    assert [c.release for c in ledger.charges("htn_cohort")] == [1, 0] and other.event == QUERY[0]
    with pytest.raises(LedgerError) as info:
        ledger.charge("htn_cohort", run_id="q", round=0, release=1, **{**laplace, "noise_multiplier": 3.0})  # type: ignore[arg-type]
    assert str(info.value) == (
        "round 0 release 1 of run 'q' was already charged to dataset 'htn_cohort' with mechanism=laplace, "
        "noise_multiplier=2.0, sample_rate=1.0, steps=1; a second charge with mechanism=laplace, noise_multiplier=3.0, "
        "sample_rate=1.0, steps=1 is refused"
    )
    with pytest.raises(AccountingError, match="^release must be an integer >= 0; found -1$"):
        ledger.charge("htn_cohort", run_id="q", round=0, release=-1, **laplace)  # type: ignore[arg-type]
    with pytest.raises(AccountingError, match="sample_rate must be 1 for the laplace mechanism"):
        ledger.charge("htn_cohort", run_id="q", round=0, release=2, **{**laplace, "sample_rate": 0.5})  # type: ignore[arg-type]


def test_a_dataset_of_training_rounds_and_query_releases_spends_their_pld_composition(ledger: PrivacyLedger) -> None:
    _reserve(ledger, "train-1", budget=ROOMY)
    _reserve_query(ledger)
    for round_ in (1, 2, 3):
        _charge(ledger, "train-1", round_, budget=ROOMY)
    _charge_query(ledger)
    expected = [EVENT.times(3), *QUERY]
    assert ledger.spent("htn_cohort", delta=DELTA) == epsilon(expected, delta=DELTA, accountant="pld")
    assert ledger.spent("htn_cohort", delta=DELTA, submission="query-1") == epsilon(QUERY, delta=DELTA, accountant="pld")
    assert ledger.preview("htn_cohort", delta=DELTA, noise_multiplier=2.0, sample_rate=1.0, steps=1, mechanism=LAPLACE) == epsilon(
        [*expected, QUERY[1]], delta=DELTA, accountant="pld"
    )


# ---------------------------------------------------------------- properties of reservations

operations_st = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "charge", "release", "expire"]),
        st.sampled_from(["a", "b", "c", "q"]),  # submission ("q" is a statistics query: one round of QUERY)
        st.integers(min_value=1, max_value=4),  # rounds (reserve) or round (charge)
        st.sampled_from([0.8, 1.5]),  # noise multiplier of the submission's run
    ),
    min_size=1,
    max_size=10,
)


def _apply(ledger: PrivacyLedger, clock: Clock, budget: Budget, operation: tuple[str, str, int, float], runs: dict[str, tuple[float, int]]) -> str:
    """Do one operation; what it gave (a kind of result or of refusal), to compare stores by."""
    kind, submission, number, noise = operation
    noise, rounds = runs.setdefault(submission, (noise, number))  # a submission keeps its terms
    try:
        if kind == "reserve" and submission == "q":
            ledger.reserve_run("d", submission=submission, events=QUERY, rounds=1, budget=budget, hold=HOLD)
        elif kind == "reserve":
            ledger.reserve_run("d", submission=submission, event=DPEvent(noise, 0.05, 10), rounds=rounds, budget=budget, hold=HOLD)
        elif kind == "charge":
            ledger.charge_round("d", submission=submission, run_id=f"{submission}-{number}", round=number, budget=budget, hold=HOLD)
        elif kind == "release":
            ledger.release_run("d", submission=submission)
        else:
            clock.advance(hours=25)
    except BudgetExhaustedError:
        return "over budget"
    except LedgerError as err:
        return "refused: " + str(err).split(";")[0]
    return "done"


@settings(max_examples=20, deadline=None)
@given(operations=operations_st, budget_epsilon=st.floats(min_value=0.5, max_value=4.0))
def test_no_sequence_of_reserve_charge_release_and_expire_exceeds_the_budget(
    operations: list[tuple[str, str, int, float]], budget_epsilon: float
) -> None:
    budget, clock, runs = Budget(budget_epsilon, DELTA), Clock(), {}
    with PrivacyLedger.in_memory(clock=clock) as ledger:
        for operation in operations:
            _apply(ledger, clock, budget, operation, runs)
            assert epsilon(ledger.held("d", hold=HOLD), delta=DELTA, accountant="pld") <= budget_epsilon
            assert ledger.spent("d", delta=DELTA) <= budget_epsilon
            for reservation in ledger.run_reservations("d"):
                assert 0 <= reservation.charged <= reservation.rounds
                charged = sum(c.submission == reservation.submission for c in ledger.charges("d"))
                assert charged == reservation.charged * len(reservation.events)


@settings(max_examples=8, deadline=None)
@given(operations=operations_st)
def test_the_sqlite_and_in_memory_stores_behave_alike(operations: list[tuple[str, str, int, float]]) -> None:
    import tempfile

    budget = Budget(2.0, DELTA)
    with tempfile.TemporaryDirectory() as folder:
        memory_clock, sqlite_clock = Clock(), Clock()
        with PrivacyLedger.in_memory(clock=memory_clock) as memory, PrivacyLedger.open(Path(folder) / "l.db", clock=sqlite_clock) as sqlite:
            memory_runs: dict[str, tuple[float, int]] = {}
            sqlite_runs: dict[str, tuple[float, int]] = {}
            for operation in operations:
                assert _apply(memory, memory_clock, budget, operation, memory_runs) == _apply(sqlite, sqlite_clock, budget, operation, sqlite_runs)
                assert memory.run_reservations() == sqlite.run_reservations()
                assert memory.charges("d") == sqlite.charges("d")


# ---------------------------------------------------------------- races (real threads and processes)


def test_threads_racing_run_reservations_on_a_budget_that_fits_one_admit_exactly_one(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    PrivacyLedger.open(path).close()
    barrier = threading.Barrier(6)
    won: list[int] = []
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with PrivacyLedger.open(path) as ledger:
                barrier.wait()
                try:
                    _reserve(ledger, f"run-{worker}")
                except BudgetExhaustedError:
                    return
                won.append(worker)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and len(won) == 1
    with PrivacyLedger.open(path) as ledger:
        assert [r.submission for r in ledger.run_reservations()] == [f"run-{won[0]}"]


def _run_from_another_process(path: str, worker: int, start: multiprocessing.synchronize.Event) -> None:
    # Each message a node answers is its own process: open, reserve (the query), then charge each round.
    start.wait(timeout=60)
    with PrivacyLedger.open(Path(path)) as ledger:
        try:
            _reserve(ledger, f"run-{worker}")
        except BudgetExhaustedError:
            return
    for round_ in range(1, ROUNDS + 1):
        with PrivacyLedger.open(Path(path)) as ledger:
            _charge(ledger, f"run-{worker}", round_)


def test_processes_racing_run_reservations_on_a_budget_that_fits_one_train_exactly_one(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"  # created by the racing processes themselves
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_run_from_another_process, args=(str(path), i, start)) for i in range(3)]
    try:
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(timeout=180)
        assert [w.exitcode for w in workers] == [0, 0, 0]
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    with PrivacyLedger.open(path) as ledger:
        [winner] = ledger.run_reservations()
        charges = ledger.charges("htn_cohort")
        assert winner.charged == ROUNDS and [c.submission for c in charges] == [winner.submission] * ROUNDS
        assert ledger.spent("htn_cohort", delta=DELTA) <= FITS_ONE.epsilon


# ---------------------------------------------------------------- reservations in the SQLite file


def test_a_reservation_survives_a_crash_and_keeps_counting_until_it_expires(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path, clock=clock) as ledger:
        held = _reserve(ledger, "s1")
    # The process died between the query and training: nothing was charged, nothing is hidden.
    with PrivacyLedger.open(path, clock=clock) as ledger:
        assert ledger.run_reservations() == [held]
        with pytest.raises(BudgetExhaustedError):
            _reserve(ledger, "s2")
        clock.advance(hours=24)
        _reserve(ledger, "s2")


def test_run_reservations_cannot_be_deleted_or_rewound_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        _reserve(ledger, "s1")
        _charge(ledger, "s1", 1)
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="kept for the officer"):
            conn.execute("DELETE FROM run_reservations")
        with pytest.raises(sqlite3.DatabaseError, match="only moves forward"):
            conn.execute("UPDATE run_reservations SET charged = 0")
        with pytest.raises(sqlite3.DatabaseError, match="keeps its terms"):
            conn.execute("UPDATE run_reservations SET rounds = 30")
    finally:
        conn.close()


def _old_ledger(path: Path, version: int, extra: str = "") -> None:
    conn = sqlite3.connect(path)
    conn.executescript(
        _SCHEMA
        + (_SCHEMA_2 if version == 2 else "")
        + "INSERT INTO ledger_schema VALUES (1, '2026-01-01T00:00:00+00:00');"
        + ("INSERT INTO ledger_schema VALUES (2, '2026-01-02T00:00:00+00:00');" if version == 2 else "")
        + "INSERT INTO charges (dataset, run_id, round, mechanism, noise_multiplier, sample_rate, steps, charged_at) "
        + "VALUES ('htn_cohort', '1', 1, 'poisson-gaussian', 1.0, 0.05, 20, '2026-01-01T00:00:00+00:00');"
        + extra
        + f"PRAGMA user_version = {version};"
    )
    conn.close()


def _versions(path: Path) -> tuple[int, list[int], list[str]]:
    conn = sqlite3.connect(path)
    try:
        tables = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'") if row[0] != "sqlite_sequence")
        return (
            conn.execute("PRAGMA user_version").fetchone()[0],
            sorted(row[0] for row in conn.execute("SELECT version FROM ledger_schema")),
            tables,
        )
    finally:
        conn.close()


def test_a_schema_1_ledger_is_upgraded_in_place_and_keeps_its_charges(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    _old_ledger(path, 1)
    with PrivacyLedger.open(path) as ledger:
        [charge] = ledger.charges("htn_cohort")
        assert (charge.event, charge.submission) == (EVENT, None)
        _reserve(ledger, "s2", budget=Budget(5.0, DELTA))
    assert _versions(path) == (6, [1, 6], ["charge_groups", "charges", "ledger_schema", "run_reservation_events", "run_reservations"])


def _open_round(run_id: str, round_: int, noise: float, at: str) -> str:
    return (
        "INSERT INTO reservations (dataset, run_id, round, mechanism, noise_multiplier, sample_rate, steps, reserved_at) "
        f"VALUES ('htn_cohort', '{run_id}', {round_}, 'poisson-gaussian', {noise}, 0.05, 20, '{at}');"
    )


def test_a_schema_2_ledger_is_upgraded_and_its_open_rounds_become_run_reservations(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    extra = _open_round("7", 2, 1.0, "2026-01-02T10:00:00+00:00") + _open_round("7", 3, 1.0, "2026-01-02T11:00:00+00:00")
    _old_ledger(path, 2, extra)
    with PrivacyLedger.open(path) as ledger:
        assert ledger.events("htn_cohort") == [EVENT]
        [moved] = ledger.run_reservations()
    assert moved == RunReservation(
        "htn_cohort", "7", (EVENT,), 2, 0,
        datetime(2026, 1, 2, 10, tzinfo=UTC), datetime(2026, 1, 2, 11, tzinfo=UTC),
    )
    assert _versions(path) == (6, [1, 2, 6], ["charge_groups", "charges", "ledger_schema", "run_reservation_events", "run_reservations"])


def test_a_schema_2_ledger_whose_run_held_two_events_is_not_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    _old_ledger(path, 2, _open_round("7", 2, 1.0, "2026-01-02T10:00:00+00:00") + _open_round("7", 3, 2.0, "2026-01-02T11:00:00+00:00"))
    with pytest.raises(LedgerError, match="run '7' holds open reservations of 2 different events on dataset 'htn_cohort'"):
        PrivacyLedger.open(path)
    assert _versions(path) == (2, [1, 2], ["charges", "ledger_schema", "reservations"])  # untouched


def test_a_schema_3_ledger_is_upgraded_and_its_charges_and_reservations_become_release_0(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        _SCHEMA + _SCHEMA_3
        + "INSERT INTO ledger_schema VALUES (3, '2026-01-03T00:00:00+00:00');"
        + "INSERT INTO charges (dataset, run_id, round, mechanism, noise_multiplier, sample_rate, steps, charged_at, submission) "
        + "VALUES ('htn_cohort', '41', 1, 'poisson-gaussian', 1.0, 0.05, 20, '2026-01-03T10:00:00+00:00', 's1');"
        + "INSERT INTO run_reservations (dataset, submission, mechanism, noise_multiplier, sample_rate, steps, rounds, charged, "
        + "reserved_at, active_at) VALUES ('htn_cohort', 's1', 'poisson-gaussian', 1.0, 0.05, 20, 3, 1, "
        + "'2026-01-03T09:00:00+00:00', '2026-01-03T10:00:00+00:00');"
        + "PRAGMA user_version = 3;"
    )
    conn.close()
    with PrivacyLedger.open(path) as ledger:
        [charge] = ledger.charges("htn_cohort")
        [held] = ledger.run_reservations()
        assert (charge.run_id, charge.round, charge.release, charge.event, charge.submission) == ("41", 1, 0, EVENT, "s1")
        assert held == RunReservation(
            "htn_cohort", "s1", (EVENT,), 3, 1, datetime(2026, 1, 3, 9, tzinfo=UTC), datetime(2026, 1, 3, 10, tzinfo=UTC)
        )
        # New rows carry on after the copied ones.
        ledger.charge("htn_cohort", run_id="41", round=2, **ROUND)
        _reserve_query(ledger)
    assert _versions(path) == (6, [3, 6], ["charge_groups", "charges", "ledger_schema", "run_reservation_events", "run_reservations"])
    conn = sqlite3.connect(path)
    try:
        assert [row[0] for row in conn.execute("SELECT id FROM charges ORDER BY id")] == [1, 2]
        assert [row[0] for row in conn.execute("SELECT DISTINCT reservation FROM run_reservation_events ORDER BY 1")] == [1, 2]
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM charges")
        with pytest.raises(sqlite3.DatabaseError, match="keeps its terms"):
            conn.execute("UPDATE run_reservations SET rounds = 30")
    finally:
        conn.close()


def test_a_querys_reserved_releases_cannot_be_edited_or_deleted_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        _reserve_query(ledger)
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="keeps its terms"):
            conn.execute("UPDATE run_reservation_events SET noise_multiplier = 100.0")
        with pytest.raises(sqlite3.DatabaseError, match="kept for the officer"):
            conn.execute("DELETE FROM run_reservation_events")
        with pytest.raises(sqlite3.DatabaseError, match="keeps its terms"):
            conn.execute("UPDATE run_reservations SET id = 7")
    finally:
        conn.close()
    with PrivacyLedger.open(path) as ledger:
        assert ledger.run_reservations()[0].events == QUERY  # in release order after a restart


def test_a_reservation_whose_releases_have_a_gap_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        _reserve_query(ledger)
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER run_reservation_events_are_never_deleted")  # what only tampering does
    conn.execute("DELETE FROM run_reservation_events WHERE release = 1")
    conn.commit()
    conn.close()
    with PrivacyLedger.open(path) as ledger, pytest.raises(LedgerError, match=r"its events are not releases 0..k-1 \(found \[0, 2\]\)"):
        ledger.run_reservations()


@settings(max_examples=10, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(st.floats(min_value=0.8, max_value=3.0), st.floats(min_value=0.01, max_value=0.1), st.integers(min_value=1, max_value=50)),
        min_size=1,
        max_size=5,
    )
)
def test_the_ledgers_composed_epsilon_is_dp_accountings_pld(rounds: list[tuple[float, float, int]]) -> None:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    reference = PLDAccountant(value_discretization_interval=1e-3)
    with PrivacyLedger.in_memory() as ledger:
        for round_, (noise, rate, steps) in enumerate(rounds, start=1):
            ledger.charge("d", run_id="r", round=round_, noise_multiplier=noise, sample_rate=rate, steps=steps)
            reference.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
        ours = ledger.spent("d", delta=DELTA)
    # The same accountant at the same discretisation; only the order of composition differs.
    assert ours == pytest.approx(reference.get_epsilon(DELTA), rel=1e-3)


# -------------------------------------------------------- once-per-run events (schema 5)

COUNT = DPEvent(noise_multiplier=10.0, sample_rate=1.0, steps=1, mechanism=DISCRETE_LAPLACE)


def test_a_once_per_run_event_is_reserved_with_the_rounds_and_charged_once(new_ledger: LedgerFactory) -> None:
    ledger = new_ledger()
    ledger.reserve_run("htn_cohort", submission="s1", event=EVENT, rounds=ROUNDS, budget=ROOMY, hold=HOLD, once=(COUNT,))
    assert ledger.reserved("htn_cohort", hold=HOLD) == [EVENT.times(ROUNDS), COUNT]
    first = ledger.charge_once("htn_cohort", submission="s1", run_id="r1", index=0, budget=ROOMY, hold=HOLD)
    again = new_ledger().charge_once("htn_cohort", submission="s1", run_id="r2", index=0, budget=ROOMY, hold=HOLD)
    assert [(c.round, c.release, c.event) for c in first] == [(0, 1, COUNT)]
    assert again == []
    assert new_ledger().reserved("htn_cohort", hold=HOLD) == [EVENT.times(ROUNDS)]
    ledger.charge_round("htn_cohort", submission="s1", run_id="r1", round=1, budget=ROOMY, hold=HOLD)
    assert ledger.events("htn_cohort") == [COUNT, EVENT]
    assert ledger.spent("htn_cohort", delta=DELTA, submission="s1") == pytest.approx(
        epsilon([COUNT, EVENT], delta=DELTA, accountant="pld")
    )


EVALUATION = DPEvent(noise_multiplier=2.0, sample_rate=1.0, steps=1, mechanism=DISCRETE_LAPLACE)


def test_each_once_per_run_event_is_charged_on_its_own_and_the_run_is_used_up_after_the_last(
    new_ledger: LedgerFactory, clock: Clock
) -> None:
    ledger = new_ledger()
    ledger.reserve_run(
        "htn_cohort", submission="s1", event=EVENT, rounds=1, budget=ROOMY, hold=HOLD, once=(COUNT, EVALUATION)
    )
    [count] = ledger.charge_once("htn_cohort", submission="s1", run_id="r1", index=0, budget=ROOMY, hold=HOLD)
    ledger.charge_round("htn_cohort", submission="s1", run_id="r1", round=1, budget=ROOMY, hold=HOLD)
    # Every round charged, the final evaluation still held: live, and no further round.
    [run] = ledger.run_reservations()
    assert run.once_charged == (True, False) and run.state(hold=HOLD, now=clock()) == LIVE
    assert ledger.reserved("htn_cohort", hold=HOLD) == [EVALUATION]
    with pytest.raises(BudgetExhaustedError, match="all 1 round"):
        ledger.charge_round("htn_cohort", submission="s1", run_id="r1", round=2, budget=ROOMY, hold=HOLD)
    [evaluation] = new_ledger().charge_once("htn_cohort", submission="s1", run_id="r2", index=1, budget=ROOMY, hold=HOLD)
    assert [(c.run_id, c.round, c.release, c.event) for c in (count, evaluation)] == [
        ("r1", 0, 1, COUNT), ("r2", 0, 2, EVALUATION)
    ]
    [run] = new_ledger().run_reservations()
    assert run.once_charged == (True, True) and run.state(hold=HOLD, now=clock()) == USED_UP
    with pytest.raises(LedgerError, match="no once-per-run event 2"):
        ledger.charge_once("htn_cohort", submission="s1", run_id="r2", index=2, budget=ROOMY, hold=HOLD)


def test_the_file_refuses_to_uncharge_a_once_per_run_event(tmp_path: Path, clock: Clock) -> None:
    with PrivacyLedger.open(tmp_path / "ledger.db", clock=clock) as ledger:
        ledger.reserve_run("htn_cohort", submission="s1", event=EVENT, rounds=1, budget=ROOMY, hold=HOLD, once=(COUNT,))
        ledger.charge_once("htn_cohort", submission="s1", run_id="r1", index=0, budget=ROOMY, hold=HOLD)
    conn = sqlite3.connect(tmp_path / "ledger.db")
    with pytest.raises(sqlite3.IntegrityError, match="only moves forward"), conn:
        conn.execute("UPDATE run_reservations SET once_charged = 0")
    conn.close()


def test_the_budget_check_counts_the_once_per_run_event(new_ledger: LedgerFactory) -> None:
    ledger = new_ledger()
    tight = Budget(epsilon([EVENT.times(ROUNDS)], delta=DELTA, accountant="pld") * 1.001, DELTA)
    with pytest.raises(BudgetExhaustedError, match="dataset 'htn_cohort'"):
        ledger.reserve_run("htn_cohort", submission="s1", event=EVENT, rounds=ROUNDS, budget=tight, hold=HOLD, once=(COUNT,))
    assert ledger.run_reservations() == []


def test_a_submission_cannot_reserve_again_with_other_once_events(new_ledger: LedgerFactory) -> None:
    ledger = new_ledger()
    ledger.reserve_run("htn_cohort", submission="s1", event=EVENT, rounds=ROUNDS, budget=ROOMY, hold=HOLD, once=(COUNT,))
    with pytest.raises(LedgerError, match="holds a reservation"):
        ledger.reserve_run("htn_cohort", submission="s1", event=EVENT, rounds=ROUNDS, budget=ROOMY, hold=HOLD)


def test_a_schema_4_ledger_is_upgraded_to_5_with_no_once_events(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path, clock=clock) as ledger:
        ledger.reserve_run("htn_cohort", submission="s1", event=EVENT, rounds=ROUNDS, budget=ROOMY, hold=HOLD)
    conn = sqlite3.connect(path)
    with conn:  # back to schema 4's layout
        conn.execute("DROP TABLE charge_groups")
        conn.execute("DROP TRIGGER charges_compose")
        conn.execute("DROP INDEX charges_by_submission")
        conn.execute("DROP INDEX run_reservations_open")
        conn.execute("DROP TRIGGER run_reservation_events_keep_their_terms")
        conn.execute("ALTER TABLE run_reservation_events DROP COLUMN once")
        conn.execute("DROP TRIGGER run_reservations_keep_their_terms")
        conn.execute("DROP TRIGGER run_reservations_only_move_forward")
        conn.execute("DROP TRIGGER run_reservations_once_charges_are_kept")
        conn.execute("ALTER TABLE run_reservations DROP COLUMN once_charged")
        conn.execute("UPDATE ledger_schema SET version = 4")
        conn.execute("PRAGMA user_version = 4")
    conn.close()
    with PrivacyLedger.open(path, clock=clock) as ledger:
        [run] = ledger.run_reservations()
        assert (run.events, run.once, run.once_charged) == ((EVENT,), (), ())


# -------------------------------------------------------- the running composition (schema 6)

_KINDS = st.sampled_from(
    [
        {"noise_multiplier": 1.0, "sample_rate": 0.05, "mechanism": "poisson-gaussian"},
        {"noise_multiplier": 1.3, "sample_rate": 0.02, "mechanism": "poisson-gaussian"},
        {"noise_multiplier": 4.0, "sample_rate": 1.0, "mechanism": DISCRETE_LAPLACE},
        {"noise_multiplier": 2.0, "sample_rate": 1.0, "mechanism": LAPLACE},
    ]
)


@settings(max_examples=8, deadline=None)
@given(charges=st.lists(st.tuples(_KINDS, st.integers(1, 30)), min_size=1, max_size=12))
def test_the_running_composition_composes_exactly_as_every_charge(charges: list[tuple[dict, int]]) -> None:  # type: ignore[type-arg]
    ledger = PrivacyLedger.in_memory()
    for index, (kind, steps) in enumerate(charges):
        ledger.charge("htn_cohort", run_id=f"run-{index}", round=1, steps=steps, **kind)
    from_scratch = epsilon(ledger.events("htn_cohort"), delta=DELTA, accountant="pld")
    assert ledger.spent("htn_cohort", delta=DELTA) == from_scratch  # to the last bit
    assert len(ledger.composed("htn_cohort")) == len({tuple(sorted(kind.items())) for kind, _ in charges})


def test_the_sqlite_running_composition_is_the_in_memory_one_and_survives_a_reopen(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "ledger.db"
    memory = PrivacyLedger.in_memory(clock=clock)
    with PrivacyLedger.open(path, clock=clock) as sqlite:
        for ledger in (sqlite, memory):
            for round_ in range(1, 41):
                ledger.charge("htn_cohort", run_id="r1", round=round_, **ROUND)
            ledger.charge("htn_cohort", run_id="q1", round=0, noise_multiplier=4.0, sample_rate=1.0, steps=1, mechanism=DISCRETE_LAPLACE)
            ledger.charge("other", run_id="r2", round=1, **ROUND)
    with PrivacyLedger.open(path, clock=clock) as reopened:  # a restart reads it back, nothing to rebuild
        groups = reopened.groups("htn_cohort")
        assert [(g.event, g.charges) for g in groups] == [(g.event, g.charges) for g in memory.groups("htn_cohort")]
        assert [(g.event, g.charges) for g in groups] == [
            (DPEvent(4.0, 1.0, 1, DISCRETE_LAPLACE), 1),
            (DPEvent(1.0, 0.05, 40 * 20), 40),
        ]
        assert reopened.spent("htn_cohort", delta=DELTA) == epsilon(reopened.events("htn_cohort"), delta=DELTA, accountant="pld")
        assert reopened.composition_problems() == [] and reopened.composition_lag() is None


def test_a_charge_and_its_composition_commit_together(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path, clock=clock) as ledger:
        ledger.charge("htn_cohort", run_id="r1", round=1, **ROUND)
        with pytest.raises(RuntimeError, match="crash"), ledger._store.write() as transaction:
            transaction.add_charge(Charge("htn_cohort", "r1", 2, DPEvent(1.0, 0.05, 20), clock.now))
            raise RuntimeError("crash between the charge and the commit")
        assert [g.charges for g in ledger.groups("htn_cohort")] == [1]
        assert ledger.composition_problems() == [] and ledger.composition_lag() is None


def test_the_running_composition_only_grows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        ledger.charge("htn_cohort", run_id="r1", round=1, **ROUND)
    conn = sqlite3.connect(path)
    try:
        for statement in ("UPDATE charge_groups SET steps = 1", "DELETE FROM charge_groups"):
            with pytest.raises(sqlite3.DatabaseError, match="only grows with the charges"):
                conn.execute(statement)
    finally:
        conn.close()


def test_a_charge_written_around_the_trigger_or_a_composition_edited_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        ledger.charge("htn_cohort", run_id="r1", round=1, **ROUND)
        ledger.charge("htn_cohort", run_id="r1", round=2, **ROUND)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DROP TRIGGER charges_compose")
        conn.execute(
            "INSERT INTO charges (dataset, run_id, round, release, mechanism, noise_multiplier, sample_rate, steps, charged_at) "
            "VALUES ('htn_cohort', 'r1', 3, 0, 'poisson-gaussian', 1.0, 0.05, 20, '2026-03-01T09:00:00+00:00')"
        )
    conn.close()
    with PrivacyLedger.open(path) as ledger:
        assert ledger.composition_lag() == (
            "the newest charge is row 3 but the running composition counts up to row 2: "
            "charges were written around its trigger, or deleted"
        )
        assert ledger.composition_problems() == [
            "dataset 'htn_cohort', poisson-gaussian noise 1.0 sample rate 0.05: the running composition holds "
            "40 step(s) of 2 charge(s), the charges hold 60 step(s) of 3 charge(s)"
        ]


def test_a_schema_5_ledger_is_upgraded_with_its_running_composition_derived_from_its_charges(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        for round_ in range(1, 4):
            ledger.charge("htn_cohort", run_id="r1", round=round_, **ROUND)
    conn = sqlite3.connect(path)
    with conn:  # back to schema 5's layout
        conn.execute("DROP TABLE charge_groups")
        conn.execute("DROP TRIGGER charges_compose")
        conn.execute("DROP INDEX charges_by_submission")
        conn.execute("DROP INDEX run_reservations_open")
        conn.execute("UPDATE ledger_schema SET version = 5")
        conn.execute("PRAGMA user_version = 5")
    conn.close()
    with PrivacyLedger.open(path) as ledger:
        assert [(g.event, g.charges) for g in ledger.groups("htn_cohort")] == [(DPEvent(1.0, 0.05, 60), 3)]
        assert ledger.composition_problems() == []
