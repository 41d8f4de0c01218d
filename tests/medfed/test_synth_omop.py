"""The synthetic alliance v2: OMOP tables that are reproducible, heterogeneous, plausible, and whose truth is known."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medfed.errors import SynthError
from medfed.synth_omop import (
    DEFAULT_INDEX_DATE,
    DEFAULT_PERIOD,
    DEFAULT_SCORING_DATE,
    SCHEMAS,
    TABLES,
    VISIT_CONCEPTS,
    OmopSite,
    write_omop_alliance,
)
from models.clinical_tasks import (
    CONCEPTS,
    INDEX_GESTATION_DAYS,
    SIGNALS,
    TASKS,
    TYPE_DEVICE,
    TYPE_EHR,
    TYPE_SELF_REPORT,
)

ROOT = Path(__file__).resolve().parents[2]
BY_ID = {c.concept_id: c for c in CONCEPTS.values()}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties share ranks)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory) -> list[OmopSite]:
    """The default alliance: three hospitals at scale 1 (about a second to write)."""
    return write_omop_alliance(tmp_path_factory.mktemp("alliance"), n_hospitals=3, seed=7)


@pytest.fixture(scope="module")
def database(alliance: list[OmopSite]) -> Iterator[duckdb.DuckDBPyConnection]:
    """One view per OMOP table over every hospital's Parquet file."""
    connection = duckdb.connect()
    for table in TABLES:
        files = ", ".join(f"'{site.folder / f'{table}.parquet'}'" for site in alliance)
        connection.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{files}])")
    yield connection
    connection.close()


@pytest.fixture
def db(database: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor of its own per test (a result one test leaves open never blocks the next)."""
    cursor = database.cursor()
    yield cursor
    cursor.close()


def truth(alliance: list[OmopSite], name: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(site.truth / f"{name}.parquet") for site in alliance], ignore_index=True)


def test_default_dates_are_the_briefs() -> None:
    assert DEFAULT_INDEX_DATE == date(2024, 1, 1)
    assert DEFAULT_PERIOD == (date(2021, 1, 1), date(2024, 6, 30))
    assert DEFAULT_SCORING_DATE == date(2025, 12, 1)


def test_each_site_has_seven_tables_and_its_truth(alliance: list[OmopSite]) -> None:
    assert [s.site for s in alliance] == ["hospital_1", "hospital_2", "hospital_3"]
    assert [s.tier for s in alliance] == ["tier3", "tier2", "tier2"]
    for site in alliance:
        assert site.folder == site.folder.parent.parent / site.site / "omop"
        assert site.truth == site.folder.parent / "truth"
        assert sorted(p.name for p in site.folder.iterdir()) == sorted(f"{t}.parquet" for t in TABLES)
        assert sorted(p.name for p in site.truth.iterdir()) == sorted(
            [f"{t}.parquet" for t in TASKS] + ["planted_alerts.parquet"])
        assert pq.read_metadata(site.folder / "person.parquet").num_rows == site.n_patients


def test_columns_have_the_briefs_types(alliance: list[OmopSite]) -> None:
    measurement = pq.read_schema(alliance[0].folder / "measurement.parquet")
    assert measurement.field("person_id").type == pa.int64()
    assert measurement.field("measurement_concept_id").type == pa.int32()
    assert measurement.field("measurement_date").type == pa.date32()
    assert measurement.field("measurement_datetime").type == pa.timestamp("us")
    for site in alliance:
        for table in TABLES:
            assert pq.read_schema(site.folder / f"{table}.parquet").remove_metadata() == SCHEMAS[table], table
        for task in TASKS:
            schema = pq.read_schema(site.truth / f"{task}.parquet")
            assert [(f.name, f.type) for f in schema] == [
                ("person_id", pa.int64()), ("index_date", pa.date32()), ("label", pa.int8()),
                ("true_risk", pa.float64())]


def test_same_seed_writes_byte_identical_files(tmp_path: Path) -> None:
    first = write_omop_alliance(tmp_path / "a", n_hospitals=2, seed=3, patients_scale=0.1)
    second = write_omop_alliance(tmp_path / "b", n_hospitals=2, seed=3, patients_scale=0.1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert len(files) == 2 * (len(TABLES) + len(TASKS) + 1)
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.parquet"))
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path
    assert [s.n_patients for s in first] == [s.n_patients for s in second]


def test_another_seed_writes_another_alliance(tmp_path: Path) -> None:
    write_omop_alliance(tmp_path / "a", n_hospitals=1, seed=3, patients_scale=0.1)
    write_omop_alliance(tmp_path / "b", n_hospitals=1, seed=4, patients_scale=0.1)
    table = Path("hospital_1/omop/measurement.parquet")
    assert (tmp_path / "a" / table).read_bytes() != (tmp_path / "b" / table).read_bytes()


def test_hospitals_differ_and_a_small_one_cannot_go_it_alone(
    alliance: list[OmopSite], db: duckdb.DuckDBPyConnection
) -> None:
    sizes = [s.n_patients for s in alliance]
    assert 2000 <= sizes[0] <= 3000
    assert min(sizes) < 300
    assert len(set(sizes)) == 3
    mix = db.execute(f"""
        SELECT care_site_id, avg(date_diff('day', birth_datetime::DATE, DATE '{DEFAULT_INDEX_DATE}') / 365.25) AS age,
               avg((gender_concept_id = {CONCEPTS['male'].concept_id})::INT) AS male,
               avg((location_id % 10 = 1)::INT) AS urban
        FROM person GROUP BY 1 ORDER BY 1""").df()
    assert mix["age"][0] > mix["age"][1:].max() + 4  # the tier-3 hospital is older
    assert mix["male"].max() - mix["male"].min() > 0.01
    assert mix["urban"].max() - mix["urban"].min() > 0.15


def test_comorbidity_is_heavier_at_the_tier_3_hospital(db: duckdb.DuckDBPyConnection) -> None:
    share = db.execute(f"""
        SELECT p.care_site_id, count(DISTINCT c.person_id) / any_value(n) AS share
        FROM condition_occurrence c JOIN person p USING (person_id)
        JOIN (SELECT care_site_id, count(*) AS n FROM person GROUP BY 1) USING (care_site_id)
        WHERE c.condition_concept_id IN ({CONCEPTS['hyperlipidemia'].concept_id},
                                         {CONCEPTS['chronic_kidney_disease'].concept_id})
        GROUP BY 1 ORDER BY 1""").df()["share"]
    assert share[0] > share[1:].max()


def test_every_concept_and_unit_is_in_the_catalogue(db: duckdb.DuckDBPyConnection) -> None:
    def ids(sql: str) -> set[int]:
        return {int(row[0]) for row in db.execute(sql).fetchall()}

    def domain(name: str) -> set[int]:
        return {c.concept_id for c in CONCEPTS.values() if c.domain == name}

    assert ids("SELECT DISTINCT gender_concept_id FROM person") == domain("gender")
    assert ids("SELECT DISTINCT condition_concept_id FROM condition_occurrence") == domain("condition")
    assert ids("SELECT DISTINCT drug_concept_id FROM drug_exposure") == domain("drug")
    assert ids("SELECT DISTINCT observation_concept_id FROM observation") == domain("observation")
    assert ids("SELECT DISTINCT measurement_concept_id FROM measurement") == domain("measurement")
    assert ids("SELECT DISTINCT visit_concept_id FROM visit_occurrence") == set(VISIT_CONCEPTS.values())
    types = {TYPE_EHR, TYPE_SELF_REPORT, TYPE_DEVICE}
    for table, column in (("measurement", "measurement_type_concept_id"), ("observation", "observation_type_concept_id"),
                          ("condition_occurrence", "condition_type_concept_id"),
                          ("drug_exposure", "drug_type_concept_id"), ("visit_occurrence", "visit_type_concept_id"),
                          ("observation_period", "period_type_concept_id")):
        assert ids(f"SELECT DISTINCT {column} FROM {table}") <= types, table
    pairs = db.execute("SELECT DISTINCT measurement_concept_id, unit_concept_id FROM measurement").fetchall()
    for concept_id, unit_id in pairs:
        assert unit_id == CONCEPTS[BY_ID[concept_id].unit].concept_id, BY_ID[concept_id].name


def test_every_value_is_plausible(db: duckdb.DuckDBPyConnection) -> None:
    ranges = db.execute("""SELECT measurement_concept_id, min(value_as_number), max(value_as_number),
                              count(*) - count(value_as_number)
                       FROM measurement GROUP BY 1""").fetchall()
    assert len(ranges) == sum(c.domain == "measurement" for c in CONCEPTS.values())
    for concept_id, low, high, missing in ranges:
        plausible = BY_ID[concept_id].plausible
        assert plausible is not None and missing == 0
        assert plausible[0] <= low and high <= plausible[1], (BY_ID[concept_id].name, low, high)


def test_dates_lie_in_each_patients_observation(db: duckdb.DuckDBPyConnection) -> None:
    for table, column in (("measurement", "measurement_date"), ("condition_occurrence", "condition_start_date"),
                          ("drug_exposure", "drug_exposure_start_date"), ("observation", "observation_date"),
                          ("visit_occurrence", "visit_start_date")):
        outside = db.execute(f"""SELECT count(*) FROM {table} t JOIN observation_period o USING (person_id)
                             WHERE t.{column} < o.observation_period_start_date
                                OR t.{column} > o.observation_period_end_date""").fetchone()[0]
        assert outside == 0, table
    calendar = db.execute("""SELECT min(observation_period_start_date), max(observation_period_end_date),
                                avg((observation_period_end_date < DATE '2025-12-31')::INT) FROM observation_period""")
    start, end, lost = calendar.fetchone()
    assert (start, end) == (date(2019, 1, 1), date(2025, 12, 31))
    assert 0.05 < lost < 0.25  # some patients lost to follow-up


def test_device_readings_are_irregular_with_gaps(db: duckdb.DuckDBPyConnection) -> None:
    device = f"measurement_type_concept_id IN ({TYPE_DEVICE}, {TYPE_SELF_REPORT})"
    minutes, night = db.execute(f"""SELECT count(DISTINCT strftime(measurement_datetime, '%H:%M')),
                                       avg((hour(measurement_datetime) < 6)::INT)
                                FROM measurement WHERE {device}""").fetchone()
    assert minutes > 1000  # not on a fixed clock
    assert 0.03 < night < 0.4  # some readings at night
    spans = db.execute(f"""
        WITH days AS (SELECT DISTINCT person_id, measurement_date AS d FROM measurement
                      WHERE {device} AND measurement_concept_id = {CONCEPTS['sbp'].concept_id}),
             gaps AS (SELECT person_id, d - lag(d) OVER (PARTITION BY person_id ORDER BY d) AS gap FROM days)
        SELECT count(DISTINCT gap), max(gap), avg((gap > 1)::INT) FROM gaps WHERE gap IS NOT NULL""").fetchone()
    distinct_gaps, longest, missing = spans
    assert distinct_gaps > 20 and longest >= 21 and missing > 0.5  # uneven spacing, missing days, drop-outs


def test_some_patients_have_no_device_and_owners_have_a_sane_number_of_readings(
    db: duckdb.DuckDBPyConnection,
) -> None:
    owners, median, p95 = db.execute(f"""
        SELECT count(*), median(n), quantile_cont(n, 0.95) FROM (
            SELECT person_id, count(*) AS n FROM measurement
            WHERE measurement_type_concept_id IN ({TYPE_DEVICE}, {TYPE_SELF_REPORT}) GROUP BY 1)""").fetchone()
    patients = db.execute("SELECT count(*) FROM person").fetchone()[0]
    assert 0.3 < owners / patients < 0.9
    assert 50 <= median <= 400 and p95 <= 450


def test_total_size_is_modest(alliance: list[OmopSite]) -> None:
    size = sum(p.stat().st_size for site in alliance for p in site.folder.parent.rglob("*.parquet"))
    assert size < 100e6


@pytest.mark.parametrize("task", list(TASKS))
def test_truth_prevalence_and_oracle_auc_are_in_band(alliance: list[OmopSite], task: str) -> None:
    rows = truth(alliance, task)
    assert len(rows) > 150 and rows["person_id"].is_unique
    assert rows["true_risk"].between(0, 1).all()
    assert 0.05 <= rows["label"].mean() <= 0.20, rows["label"].mean()
    assert 0.75 <= auc(rows["true_risk"].to_numpy(), rows["label"].to_numpy()) <= 0.90
    # the stored probability is the one the outcome was drawn from: calibrated on the whole
    assert abs(rows["true_risk"].mean() - rows["label"].mean()) < 0.04


@pytest.mark.parametrize(
    ("task", "signal", "floor"),
    [("hypertension_onset", "sbp", 0.7), ("diabetes_onset", "glucose", 0.65),
     ("maternal_gdm_preeclampsia", "glucose", 0.65)],
)
def test_home_readings_before_the_index_carry_the_risk(
    alliance: list[OmopSite], db: duckdb.DuckDBPyConnection, task: str, signal: str, floor: float
) -> None:
    """The latent factors behind the outcome show in the readings a model will see (reading window only)."""
    db.register("truth_rows", truth(alliance, task))
    start = TASKS[task].reading_window_days[0]
    try:
        seen = db.execute(f"""
            SELECT t.label, avg(m.value_as_number) AS mean FROM truth_rows t JOIN measurement m
              ON m.person_id = t.person_id AND m.measurement_concept_id = {CONCEPTS[signal].concept_id}
             AND m.measurement_type_concept_id IN ({TYPE_DEVICE}, {TYPE_SELF_REPORT})
             AND m.measurement_date >= t.index_date + {start} AND m.measurement_date < t.index_date
            GROUP BY t.person_id, t.label""").df()
    finally:
        db.unregister("truth_rows")
    assert len(seen) > 100 and seen["label"].sum() > 10
    assert auc(seen["mean"].to_numpy(), seen["label"].to_numpy()) > floor


@pytest.mark.parametrize("task", ["hypertension_onset", "diabetes_onset"])
def test_onset_truth_is_what_the_task_rules_give_on_the_tables(
    alliance: list[OmopSite], db: duckdb.DuckDBPyConnection, task: str
) -> None:
    """The task semantics written as SQL over the tables agree with the generator's truth, row by row."""
    definition = TASKS[task]
    index = DEFAULT_INDEX_DATE
    conditions = ", ".join(str(CONCEPTS[c].concept_id) for c in definition.exclusion if CONCEPTS[c].domain == "condition")
    drugs = ", ".join(str(CONCEPTS[c].concept_id) for c in definition.exclusion if CONCEPTS[c].domain == "drug")
    outcome = CONCEPTS[definition.outcome[0]].concept_id
    start, end = definition.time_at_risk_days
    expected = db.execute(f"""
        WITH records AS (
            SELECT person_id, condition_start_date AS d FROM condition_occurrence WHERE condition_concept_id IN ({conditions})
            UNION ALL
            SELECT person_id, drug_exposure_start_date FROM drug_exposure WHERE drug_concept_id IN ({drugs})),
        target AS (
            SELECT p.person_id, o.observation_period_end_date AS obs_end FROM person p JOIN observation_period o USING (person_id)
            WHERE date_diff('year', p.birth_datetime::DATE, DATE '{index}')
                  - (strftime(p.birth_datetime, '%m%d') > '{index:%m%d}')::INT >= 18
              AND o.observation_period_start_date <= DATE '{index}' + {definition.lookback_days[0]}
              AND o.observation_period_end_date >= DATE '{index}'
              AND p.person_id NOT IN (SELECT person_id FROM records WHERE d <= DATE '{index}')),
        first_dx AS (SELECT person_id, min(condition_start_date) AS d FROM condition_occurrence
                     WHERE condition_concept_id = {outcome} GROUP BY 1)
        SELECT t.person_id, coalesce(f.d BETWEEN DATE '{index}' + {start} AND DATE '{index}' + {end}, FALSE)::INT AS label
        FROM target t LEFT JOIN first_dx f USING (person_id)
        WHERE f.d <= DATE '{index}' + {end} OR t.obs_end >= DATE '{index}' + {end}
        ORDER BY 1""").df()
    got = truth(alliance, task).sort_values("person_id", ignore_index=True)
    assert (got["index_date"] == index).all()
    assert got["person_id"].tolist() == expected["person_id"].tolist()
    assert got["label"].tolist() == expected["label"].tolist()


@pytest.mark.parametrize("task", ["maternal_gdm_preeclampsia", "infant_lbw_preterm"])
def test_pregnancy_truth_is_what_the_task_rules_give_on_the_tables(
    alliance: list[OmopSite], db: duckdb.DuckDBPyConnection, task: str
) -> None:
    definition = TASKS[task]
    start, end = definition.time_at_risk_days
    if task == "maternal_gdm_preeclampsia":
        outcomes = ", ".join(str(CONCEPTS[c].concept_id) for c in definition.outcome)
        label = f"""EXISTS (SELECT 1 FROM condition_occurrence c WHERE c.person_id = f.person_id
                            AND c.condition_concept_id IN ({outcomes})
                            AND c.condition_start_date BETWEEN f.index_date + {start} AND f.index_date + {end})"""
    else:
        label = f"""EXISTS (SELECT 1 FROM measurement m WHERE m.person_id = f.person_id AND m.measurement_date = f.delivery
                            AND m.measurement_date BETWEEN f.index_date + {start} AND f.index_date + {end}
                            AND ((m.measurement_concept_id = {CONCEPTS['birth_weight'].concept_id}
                                  AND m.value_as_number < 2500)
                              OR (m.measurement_concept_id = {CONCEPTS['gestational_age_at_birth'].concept_id}
                                  AND m.value_as_number < 37)))"""
    expected = db.execute(f"""
        WITH pregnancies AS (
            SELECT person_id, condition_start_date + {INDEX_GESTATION_DAYS} AS index_date, condition_end_date AS delivery
            FROM condition_occurrence WHERE condition_concept_id = {CONCEPTS['pregnancy'].concept_id}),
        first AS (
            SELECT * FROM pregnancies
            WHERE index_date BETWEEN DATE '{DEFAULT_PERIOD[0]}' AND DATE '{DEFAULT_PERIOD[1]}'
            QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY index_date) = 1)
        SELECT person_id, index_date, ({label})::INT AS label FROM first f ORDER BY 1""").df()
    got = truth(alliance, task).sort_values("person_id", ignore_index=True)
    assert got["person_id"].tolist() == expected["person_id"].tolist()
    assert pd.to_datetime(got["index_date"]).tolist() == pd.to_datetime(expected["index_date"]).tolist()
    assert got["label"].tolist() == expected["label"].tolist()


def test_pregnancies_have_twins_repeats_and_deliveries_on_the_mother(db: duckdb.DuckDBPyConnection) -> None:
    pregnancy = CONCEPTS["pregnancy"].concept_id
    weight, age = CONCEPTS["birth_weight"].concept_id, CONCEPTS["gestational_age_at_birth"].concept_id
    per_delivery = db.execute(f"""
        SELECT c.person_id, c.condition_end_date,
               count(*) FILTER (WHERE m.measurement_concept_id = {weight}) AS weights,
               count(*) FILTER (WHERE m.measurement_concept_id = {age}) AS ages
        FROM condition_occurrence c LEFT JOIN measurement m
          ON m.person_id = c.person_id AND m.measurement_date = c.condition_end_date
         AND m.measurement_concept_id IN ({weight}, {age})
        WHERE c.condition_concept_id = {pregnancy} GROUP BY 1, 2""").df()
    assert (per_delivery["weights"] == per_delivery["ages"]).all()
    assert set(per_delivery["weights"]) == {1, 2}
    twins = (per_delivery["weights"] == 2).mean()
    assert 0.003 < twins < 0.05
    assert per_delivery.groupby("person_id").size().max() >= 2  # repeat pregnancies
    mothers = db.execute(f"""SELECT DISTINCT gender_concept_id FROM person WHERE person_id IN
                         (SELECT person_id FROM condition_occurrence WHERE condition_concept_id = {pregnancy})""")
    assert mothers.fetchall() == [(CONCEPTS["female"].concept_id,)]
    late = db.execute(f"""
        SELECT count(*) FROM condition_occurrence c JOIN condition_occurrence p
          ON p.person_id = c.person_id AND p.condition_concept_id = {pregnancy}
         AND c.condition_start_date BETWEEN p.condition_start_date AND p.condition_end_date
        WHERE c.condition_concept_id IN ({CONCEPTS['gestational_diabetes'].concept_id},
                                         {CONCEPTS['preeclampsia'].concept_id})
          AND c.condition_start_date <= p.condition_start_date + {INDEX_GESTATION_DAYS}""").fetchone()[0]
    assert late == 0  # diagnosed after 20 weeks


def test_early_pregnancy_readings_exist_for_most_mothers(db: duckdb.DuckDBPyConnection) -> None:
    share = db.execute(f"""
        SELECT avg(((SELECT count(*) FROM measurement m WHERE m.person_id = c.person_id
                    AND m.measurement_type_concept_id IN ({TYPE_DEVICE}, {TYPE_SELF_REPORT})
                    AND m.measurement_concept_id IN ({CONCEPTS['sbp'].concept_id}, {CONCEPTS['glucose'].concept_id})
                    AND m.measurement_date >= c.condition_start_date
                    AND m.measurement_date < c.condition_start_date + {INDEX_GESTATION_DAYS}) > 0)::INT)
        FROM condition_occurrence c WHERE condition_concept_id = {CONCEPTS['pregnancy'].concept_id}""").fetchone()[0]
    assert 0.6 < share < 1.0


def test_alerts_fire_exactly_on_the_planted_readings(alliance: list[OmopSite], db: duckdb.DuckDBPyConnection) -> None:
    planted = truth(alliance, "planted_alerts")
    assert set(planted["concept"]) == {"sbp", "glucose"}
    for site in alliance:
        counts = pd.read_parquet(site.truth / "planted_alerts.parquet")["concept"].value_counts()
        assert counts["sbp"] >= 2 and counts["glucose"] >= 2
    window = datetime.combine(DEFAULT_SCORING_DATE, datetime.min.time()) - timedelta(days=14)
    rules = " OR ".join(
        f"(measurement_concept_id = {CONCEPTS[name].concept_id} "
        f"AND (value_as_number < {s.alert[0]} OR value_as_number > {s.alert[1]}))"
        for name, s in SIGNALS.items())
    # The systolic rule as the brief states it, >= 180, fires too.
    rules += f" OR (measurement_concept_id = {CONCEPTS['sbp'].concept_id} AND value_as_number >= 180)"
    firing = db.execute(f"""
        SELECT person_id, measurement_concept_id, measurement_datetime, value_as_number FROM measurement
        WHERE measurement_datetime >= TIMESTAMP '{window}' AND measurement_datetime < TIMESTAMP '{DEFAULT_SCORING_DATE}'
          AND measurement_type_concept_id IN ({TYPE_DEVICE}, {TYPE_SELF_REPORT}) AND ({rules})
        ORDER BY 1, 3""").df()
    expected = planted.assign(
        measurement_concept_id=planted["concept"].map(lambda n: CONCEPTS[n].concept_id)
    ).sort_values(["person_id", "measurement_datetime"], ignore_index=True)
    assert firing["person_id"].tolist() == expected["person_id"].tolist()
    assert firing["measurement_concept_id"].tolist() == expected["measurement_concept_id"].tolist()
    assert firing["measurement_datetime"].tolist() == expected["measurement_datetime"].tolist()
    assert firing["value_as_number"].tolist() == expected["value_as_number"].tolist()
    # and no EHR value of a signal concept in the window crosses a threshold either
    clinic = db.execute(f"""SELECT count(*) FROM measurement WHERE measurement_datetime >= TIMESTAMP '{window}'
                        AND measurement_type_concept_id = {TYPE_EHR} AND ({rules})""").fetchone()[0]
    assert clinic == 0


def test_no_reading_comes_after_the_scoring_date_from_a_device(db: duckdb.DuckDBPyConnection) -> None:
    latest = db.execute(f"""SELECT max(measurement_datetime) FROM measurement
                        WHERE measurement_type_concept_id IN ({TYPE_DEVICE}, {TYPE_SELF_REPORT})""").fetchone()[0]
    assert latest < datetime.combine(DEFAULT_SCORING_DATE, datetime.min.time())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_hospitals": 0}, "--hospitals must be at least 1; found 0"),
     ({"patients_scale": 0.0}, "--scale must be > 0")],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(SynthError, match=message):
        write_omop_alliance(tmp_path, **{"n_hospitals": 1, "seed": 1, **kwargs})  # type: ignore[arg-type]


# ---------------------------------------------------------------- the command


def _medfed(*args: str, preexec: object = None) -> subprocess.CompletedProcess[str]:
    """`medfed` in its own process, as people run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "medfed.cli", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT, env=env, timeout=120, preexec_fn=preexec)  # type: ignore[arg-type]


def _medfed_here(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> subprocess.CompletedProcess[str]:
    """`medfed` through its entry point in this process (a second faster than a child)."""
    from medfed import cli

    monkeypatch.setattr(sys, "argv", ["medfed", *args])
    monkeypatch.setattr(cli.signal, "signal", lambda *_: None)  # leave pytest's SIGTERM handler alone
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _one_line(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.stdout, done.stderr)
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, line


def test_synth_omop_writes_every_hospital(tmp_path: Path) -> None:
    done = _medfed("synth", "--omop", "--hospitals", "2", "--seed", "5", "--scale", "0.1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert [line.split(" ")[0] for line in done.stdout.splitlines()] == ["hospital_1", "hospital_2"]
    for site in ("hospital_1", "hospital_2"):
        assert sorted(p.name for p in (tmp_path / site / "omop").iterdir()) == sorted(f"{t}.parquet" for t in TABLES)
        assert (tmp_path / site / "truth" / "planted_alerts.parquet").is_file()


def test_synth_without_omop_still_writes_the_flat_cohorts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    done = _medfed_here(monkeypatch, capsys, "synth", "--hospitals", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "hospital_1").iterdir()) == ["cohort.csv", "cohort.parquet"]


def test_synth_with_no_hospitals_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for omop in (["--omop"], []):
        done = _medfed_here(monkeypatch, capsys, "synth", *omop, "--hospitals", "0", "--out", str(tmp_path))
        _one_line(done, "--hospitals must be at least 1; found 0")


def test_synth_into_a_file_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    for out in (target, target / "below"):
        done = _medfed_here(monkeypatch, capsys, "synth", "--omop", "--scale", "0.1", "--out", str(out))
        _one_line(done, str(target), "a file")


def _no_room() -> None:
    """In the child: no file may grow (RLIMIT_FSIZE 0), and the kernel says so with EFBIG, not a signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_synth_on_a_full_disk_says_so_in_one_line(tmp_path: Path) -> None:
    done = _medfed("synth", "--omop", "--scale", "0.1", "--out", str(tmp_path), preexec=_no_room)
    _one_line(done, str(tmp_path / "hospital_1" / "omop"), "free space")


_PR_CAPBSET_DROP = 24
# Root passes permission bits by these capabilities; without them a 0500 folder is read-only to root too.
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3


def _drop_root_overrides() -> None:
    """In the child, before exec: as root, give up the capabilities that ignore permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(97)


def test_synth_into_a_read_only_folder_says_so_in_one_line(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        done = _medfed("synth", "--omop", "--scale", "0.1", "--out", str(tmp_path / "out"),
                       preexec=_drop_root_overrides if os.geteuid() == 0 else None)
    finally:
        tmp_path.chmod(0o700)
    if done.returncode == 97:
        pytest.skip("cannot drop root's permission overrides here (no CAP_SETPCAP)")
    _one_line(done, str(tmp_path / "out"), "permission denied")
