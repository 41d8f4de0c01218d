"""The privacy ledger: one contract for both stores, then what only the SQLite file does."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.accountant import epsilon
from privacy.errors import AccountingError, BudgetExhaustedError, LedgerError
from privacy.events import DPEvent
from privacy.ledger import _SCHEMA, SCHEMA_VERSION, Budget, Charge, PrivacyLedger

DELTA = 1e-5
ROUND = {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 20}

LedgerFactory = Callable[[], PrivacyLedger]


@pytest.fixture(params=["sqlite", "memory"])
def new_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerFactory]:
    """A factory of ledgers; for SQLite every ledger it makes opens the same file."""
    opened: list[PrivacyLedger] = []

    if request.param == "sqlite":
        def make() -> PrivacyLedger:
            opened.append(PrivacyLedger.open(tmp_path / "ledger.db"))
            return opened[-1]
    else:
        memory = PrivacyLedger.in_memory()
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


def test_charge_records_the_event_with_a_utc_timestamp(ledger: PrivacyLedger) -> None:
    before = datetime.now(UTC)
    charge = ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
    after = datetime.now(UTC)

    assert (charge.dataset, charge.run_id, charge.round) == ("htn_cohort", "42", 1)
    assert charge.event == DPEvent(noise_multiplier=1.0, sample_rate=0.05, steps=20)
    assert before <= charge.charged_at <= after
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


def test_spent_composes_all_events_with_the_accountant(ledger: PrivacyLedger) -> None:
    for round_ in (1, 2, 3):
        ledger.charge("htn_cohort", run_id="42", round=round_, **ROUND)
    events = [DPEvent(1.0, 0.05, 20)] * 3
    assert ledger.spent("htn_cohort", delta=DELTA) == epsilon(events, delta=DELTA, accountant="prv")
    assert ledger.spent("htn_cohort", delta=DELTA, accountant="rdp") == epsilon(events, delta=DELTA, accountant="rdp")
    # Composed, not added: three rounds cost less than three times one round.
    one = epsilon(events[:1], delta=DELTA, accountant="rdp")
    assert ledger.spent("htn_cohort", delta=DELTA, accountant="rdp") < 3 * one


def test_preview_is_spent_after_the_charge_and_writes_nothing(ledger: PrivacyLedger) -> None:
    ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
    preview = ledger.preview("htn_cohort", delta=DELTA, accountant="rdp", **ROUND)
    assert len(ledger.events("htn_cohort")) == 1
    ledger.charge("htn_cohort", run_id="42", round=2, **ROUND)
    assert ledger.spent("htn_cohort", delta=DELTA, accountant="rdp") == preview


def test_preview_on_an_uncharged_dataset_is_the_cost_of_the_event_alone(ledger: PrivacyLedger) -> None:
    preview = ledger.preview("htn_cohort", delta=DELTA, accountant="rdp", **ROUND)
    assert preview == epsilon([DPEvent(1.0, 0.05, 20)], delta=DELTA, accountant="rdp")
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
        spent = ledger.spent("htn_cohort", delta=DELTA, accountant="rdp")
        assert spent >= previous
        previous = spent
    assert len(ledger.events("htn_cohort")) == len(first_seen)
    expected = [DPEvent(sigma, 0.05, 10) for sigma in first_seen.values()]
    assert previous == epsilon(expected, delta=DELTA, accountant="rdp")


# ---------------------------------------------------------------- the SQLite file


def test_charges_survive_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path) as ledger:
        first = ledger.charge("htn_cohort", run_id="42", round=1, **ROUND)
        spent = ledger.spent("htn_cohort", delta=DELTA, accountant="rdp")
    with PrivacyLedger.open(path) as ledger:
        assert ledger.charges("htn_cohort") == [first]
        assert ledger.spent("htn_cohort", delta=DELTA, accountant="rdp") == spent
        # The key is still taken after a restart: a retried round is not charged twice.
        assert ledger.charge("htn_cohort", run_id="42", round=1, **ROUND) == first
        assert len(ledger.events("htn_cohort")) == 1


def test_the_file_is_a_versioned_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    PrivacyLedger.open(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert [row[0] for row in conn.execute("SELECT version FROM ledger_schema")] == [2]
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
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match=re.escape(f"privacy ledger {path} has schema 3, newer than this medfed reads")):
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


# ---------------------------------------------------------------- budgets and reservations

EVENT = DPEvent(**ROUND)


def _admissible(budget: Budget, event: DPEvent = EVENT) -> int:
    """How many copies of `event` fit in `budget` (composed with RDP, as the tests reserve)."""
    count = 0
    while epsilon([event] * (count + 1), delta=budget.delta, accountant="rdp") <= budget.epsilon:
        count += 1
    return count


def test_a_reservation_is_held_until_committed_as_a_charge(ledger: PrivacyLedger) -> None:
    budget = Budget(epsilon=5.0, delta=DELTA)
    held = ledger.reserve("htn_cohort", run_id="7", round=1, event=EVENT, budget=budget)
    assert ledger.reservations("htn_cohort") == [held]
    assert ledger.held("htn_cohort") == [EVENT]
    assert ledger.charges("htn_cohort") == []
    charge = ledger.commit(held)
    assert (charge.dataset, charge.run_id, charge.round, charge.event) == ("htn_cohort", "7", 1, EVENT)
    assert ledger.reservations() == []
    assert ledger.charges("htn_cohort") == [charge]
    with pytest.raises(LedgerError, match="no open reservation for round 1 of run '7'"):
        ledger.commit(held)
    with pytest.raises(LedgerError, match="round 1 of run '7' was already charged to dataset 'htn_cohort'"):
        ledger.reserve("htn_cohort", run_id="7", round=1, event=EVENT, budget=budget)


def test_a_released_reservation_spends_nothing(ledger: PrivacyLedger) -> None:
    held = ledger.reserve("htn_cohort", run_id="7", round=1, event=EVENT, budget=Budget(5.0, DELTA))
    assert ledger.release(held) is True
    assert ledger.release(held) is False
    assert ledger.held("htn_cohort") == []
    assert ledger.spent("htn_cohort", delta=DELTA) == 0.0


def test_reserving_the_same_round_again_returns_the_open_reservation(ledger: PrivacyLedger) -> None:
    budget = Budget(5.0, DELTA)
    first = ledger.reserve("htn_cohort", run_id="7", round=1, event=EVENT, budget=budget)
    assert ledger.reserve("htn_cohort", run_id="7", round=1, event=EVENT, budget=budget) == first
    assert len(ledger.reservations()) == 1


def test_a_reservation_over_the_budget_is_refused_and_records_nothing(ledger: PrivacyLedger) -> None:
    budget = Budget(epsilon=6.0, delta=DELTA)
    fits = _admissible(budget)
    assert fits >= 2
    for round_ in range(1, fits + 1):
        ledger.commit(ledger.reserve("htn_cohort", run_id="7", round=round_, event=EVENT, budget=budget, accountant="rdp"))
    with pytest.raises(BudgetExhaustedError, match=r"dataset 'htn_cohort' would reach epsilon \d+\.\d+ at delta 1e-05, over its lifetime budget of 6 \(\d\.\d+ spent or reserved\)"):
        ledger.reserve("htn_cohort", run_id="7", round=fits + 1, event=EVENT, budget=budget, accountant="rdp")
    assert ledger.reservations() == []
    assert len(ledger.charges("htn_cohort")) == fits
    assert ledger.spent("htn_cohort", delta=DELTA, accountant="rdp") <= 6.0


def test_open_reservations_count_against_the_budget(ledger: PrivacyLedger) -> None:
    # Two runs each fit alone; while the first holds its reservation the second must not.
    budget = Budget(epsilon=epsilon([EVENT], delta=DELTA, accountant="rdp") * 1.1, delta=DELTA)
    ledger.reserve("htn_cohort", run_id="a", round=1, event=EVENT, budget=budget, accountant="rdp")
    with pytest.raises(BudgetExhaustedError, match="spent or reserved"):
        ledger.reserve("htn_cohort", run_id="b", round=1, event=EVENT, budget=budget, accountant="rdp")


def test_a_run_cap_limits_the_run_but_not_the_others(ledger: PrivacyLedger) -> None:
    budget = Budget(epsilon=50.0, delta=DELTA)
    cap = Budget(epsilon([EVENT], delta=DELTA, accountant="rdp") * 1.1, DELTA)
    ledger.commit(ledger.reserve("htn_cohort", run_id="a", round=1, event=EVENT, budget=budget, run_cap=cap, accountant="rdp"))
    with pytest.raises(BudgetExhaustedError, match=r"run a would reach epsilon \d\.\d+ on dataset 'htn_cohort', over its cap"):
        ledger.reserve("htn_cohort", run_id="a", round=2, event=EVENT, budget=budget, run_cap=cap, accountant="rdp")
    ledger.reserve("htn_cohort", run_id="b", round=1, event=EVENT, budget=budget, run_cap=cap, accountant="rdp")


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


steps_st = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),  # run
        st.floats(min_value=0.6, max_value=3.0),  # noise multiplier
        st.integers(min_value=1, max_value=60),  # steps
        st.sampled_from(["commit", "release", "leave"]),  # what happens to the reply
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(steps=steps_st, budget_epsilon=st.floats(min_value=0.2, max_value=4.0))
def test_the_ledger_never_admits_a_charge_over_the_budget(steps: list[tuple[str, float, int, str]], budget_epsilon: float) -> None:
    budget = Budget(budget_epsilon, DELTA)
    with PrivacyLedger.in_memory() as ledger:
        for round_, (run, noise, n_steps, outcome) in enumerate(steps, start=1):
            event = DPEvent(noise, 0.05, n_steps)
            try:
                held = ledger.reserve("d", run_id=run, round=round_, event=event, budget=budget, accountant="rdp")
            except BudgetExhaustedError:
                continue
            if outcome == "commit":
                ledger.commit(held)
            elif outcome == "release":
                ledger.release(held)
            assert epsilon(ledger.held("d"), delta=DELTA, accountant="rdp") <= budget_epsilon
        assert ledger.spent("d", delta=DELTA, accountant="rdp") <= budget_epsilon


def test_threads_racing_for_one_budget_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    budget = Budget(epsilon=4.5, delta=DELTA)
    PrivacyLedger.open(path).close()
    barrier = threading.Barrier(6)
    admitted: list[int] = []
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with PrivacyLedger.open(path) as ledger:
                barrier.wait()
                for round_ in range(1, 9):
                    try:
                        held = ledger.reserve("htn_cohort", run_id=f"run-{worker}", round=round_, event=EVENT, budget=budget, accountant="rdp")
                    except BudgetExhaustedError:
                        continue
                    ledger.commit(held)
                    admitted.append(worker)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    with PrivacyLedger.open(path) as ledger:
        assert len(ledger.charges("htn_cohort")) == len(admitted) == _admissible(budget)
        assert ledger.spent("htn_cohort", delta=DELTA, accountant="rdp") <= budget.epsilon


def _reserve_from_another_process(path: str, worker: int, start: multiprocessing.synchronize.Event) -> None:
    # Each message a node answers is its own process: open, reserve, commit, close.
    start.wait(timeout=60)
    budget = Budget(epsilon=4.5, delta=DELTA)
    for round_ in range(1, 5):
        with PrivacyLedger.open(Path(path)) as ledger:
            try:
                held = ledger.reserve("htn_cohort", run_id=f"run-{worker}", round=round_, event=EVENT, budget=budget, accountant="rdp")
            except BudgetExhaustedError:
                continue
            ledger.commit(held)


def test_processes_racing_for_one_budget_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_reserve_from_another_process, args=(str(path), i, start)) for i in range(3)]
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
        assert len(ledger.charges("htn_cohort")) == _admissible(Budget(4.5, DELTA))
        assert ledger.reservations() == []


def test_a_reservation_left_open_by_a_crash_survives_and_still_counts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    budget = Budget(epsilon=epsilon([EVENT], delta=DELTA, accountant="rdp") * 1.1, delta=DELTA)
    with PrivacyLedger.open(path) as ledger:
        held = ledger.reserve("htn_cohort", run_id="7", round=1, event=EVENT, budget=budget, accountant="rdp")
    # The process died between training and reply: nothing was charged, nothing is hidden.
    with PrivacyLedger.open(path) as ledger:
        assert ledger.reservations() == [held]
        assert ledger.charges("htn_cohort") == []
        with pytest.raises(BudgetExhaustedError):
            ledger.reserve("htn_cohort", run_id="8", round=1, event=EVENT, budget=budget, accountant="rdp")


def test_a_schema_1_ledger_is_upgraded_in_place_and_keeps_its_charges(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        _SCHEMA
        + "INSERT INTO ledger_schema VALUES (1, '2026-01-01T00:00:00+00:00');"
        + "INSERT INTO charges (dataset, run_id, round, mechanism, noise_multiplier, sample_rate, steps, charged_at) "
        + "VALUES ('htn_cohort', '1', 1, 'poisson-gaussian', 1.0, 0.05, 20, '2026-01-01T00:00:00+00:00');"
        + "PRAGMA user_version = 1;"
    )
    conn.close()
    with PrivacyLedger.open(path) as ledger:
        assert ledger.events("htn_cohort") == [EVENT]
        ledger.reserve("htn_cohort", run_id="2", round=1, event=EVENT, budget=Budget(5.0, DELTA))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert sorted(row[0] for row in conn.execute("SELECT version FROM ledger_schema")) == [1, 2]
    finally:
        conn.close()


@settings(max_examples=10, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(st.floats(min_value=0.8, max_value=3.0), st.floats(min_value=0.01, max_value=0.1), st.integers(min_value=1, max_value=50)),
        min_size=1,
        max_size=5,
    )
)
def test_the_ledgers_composed_epsilon_agrees_with_dp_accounting(rounds: list[tuple[float, float, int]]) -> None:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants import RDPAccountant

    reference = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    with PrivacyLedger.in_memory() as ledger:
        for round_, (noise, rate, steps) in enumerate(rounds, start=1):
            ledger.commit(ledger.reserve("d", run_id="r", round=round_, event=DPEvent(noise, rate, steps), budget=Budget(1e6, DELTA)))
            reference.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
        theirs = reference.get_epsilon(DELTA)
        ours = ledger.spent("d", delta=DELTA, accountant="rdp")
    # Two independent RDP implementations (their orders and numerics differ slightly).
    assert ours == pytest.approx(theirs, rel=2e-2)
