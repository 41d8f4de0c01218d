"""build_cohort: each task rule and covariate kind on hand-checked OMOP rows."""

from __future__ import annotations

import math
import random
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.hospital_node.data.cohorts import build_cohort, cohort_sql
from models.clinical_tasks import (
    CONCEPTS,
    INDEX_GESTATION_DAYS,
    TASKS,
    TYPE_DEVICE,
    TYPE_EHR,
    TYPE_SELF_REPORT,
    CohortDefinition,
    CohortDefinitionError,
)
from tests.clients.hospital_node.data.omop_folder import open_in_memory, open_omop, write_omop

MALE, FEMALE = CONCEPTS["male"].concept_id, CONCEPTS["female"].concept_id
INDEX = date(2024, 1, 1)
PERIOD = ["2021-01-01", "2024-06-30"]


def person(pid: int, *, born: date = date(1980, 6, 15), male: bool = True) -> dict[str, Any]:
    return {"person_id": pid, "gender_concept_id": MALE if male else FEMALE,
            "year_of_birth": born.year, "month_of_birth": born.month, "day_of_birth": born.day}


def observed(pid: int, start: date = date(2020, 1, 1), end: date = date(2025, 12, 31)) -> dict[str, Any]:
    return {"person_id": pid, "observation_period_start_date": start, "observation_period_end_date": end}


def condition(pid: int, name: str, start: date, end: date | None = None) -> dict[str, Any]:
    return {"person_id": pid, "condition_concept_id": CONCEPTS[name].concept_id,
            "condition_start_date": start, "condition_end_date": end or start}


def drug(pid: int, name: str, start: date) -> dict[str, Any]:
    return {"person_id": pid, "drug_concept_id": CONCEPTS[name].concept_id,
            "drug_exposure_start_date": start, "drug_exposure_end_date": start}


def observation(pid: int, name: str, when: date) -> dict[str, Any]:
    return {"person_id": pid, "observation_concept_id": CONCEPTS[name].concept_id, "observation_date": when}


def reading(pid: int, name: str, when: date | datetime, value: float, kind: int = TYPE_DEVICE,
            *, dated_only: bool = False) -> dict[str, Any]:
    moment = when if isinstance(when, datetime) else datetime(when.year, when.month, when.day, 12)
    return {"person_id": pid, "measurement_concept_id": CONCEPTS[name].concept_id,
            "measurement_date": moment.date(), "measurement_datetime": None if dated_only else moment,
            "measurement_type_concept_id": kind, "value_as_number": value}


def onset(covariates: list[str], **extra: Any) -> CohortDefinition:
    return CohortDefinition.from_mapping(
        {"task": "hypertension_onset", "index_date": INDEX.isoformat(), "covariates": covariates, **extra})


def pregnancy(task: str, covariates: list[str], **extra: Any) -> CohortDefinition:
    return CohortDefinition.from_mapping({"task": task, "period": PERIOD, "covariates": covariates, **extra})


def build(tmp_path: Path, tables: dict[str, list[dict[str, Any]]], definition: CohortDefinition,
          *, scoring: bool = False) -> pa.Table:
    return build_cohort(open_omop(write_omop(tmp_path / "omop", tables)), definition, scoring=scoring)


def rows_by_id(table: pa.Table) -> dict[int, dict[str, Any]]:
    return {row["person_id"]: row for row in table.to_pylist()}


# ------------------------------------------------------------------------- columns


def test_columns_are_ids_index_label_then_the_named_covariates_in_order(tmp_path: Path) -> None:
    covariates = ["sbp_days", "history_obesity", "age", "bmi_last", "sex_male", "sbp_mean"]
    table = build(tmp_path, {"person": [person(1)], "observation_period": [observed(1)]}, onset(covariates))
    assert table.schema == pa.schema(
        [("person_id", pa.int64()), ("index_date", pa.date32()), ("htn_onset_1y", pa.int8())]
        + [(name, pa.float64()) for name in covariates])


def test_scoring_has_no_label_column(tmp_path: Path) -> None:
    table = build(tmp_path, {"person": [person(1)], "observation_period": [observed(1)]},
                  onset(["age"]), scoring=True)
    assert table.column_names == ["person_id", "index_date", "age"]


def test_only_the_named_covariates_are_queried() -> None:
    sql = cohort_sql(onset(["age", "sbp_mean"]))
    assert str(CONCEPTS["sbp"].concept_id) in sql
    for absent in ("dbp", "glucose", "heart_rate", "bmi", "obesity", "current_smoker"):
        assert str(CONCEPTS[absent].concept_id) not in sql
    for aggregate in ("stddev_samp", "regr_slope", "FILTER (WHERE r.night)", "count(DISTINCT", "arg_max"):
        assert aggregate not in sql
    assert "measurement" not in cohort_sql(onset(["age", "sex_male"]))


def test_a_covariate_the_task_cannot_provide_is_refused_by_the_definition() -> None:
    with pytest.raises(CohortDefinitionError, match="history_hypertension"):
        onset(["age", "history_hypertension"])
    with pytest.raises(CohortDefinitionError, match="sex_male"):
        pregnancy("maternal_gdm_preeclampsia", ["sex_male"])


# ------------------------------------------------------------------- onset tasks


def test_age_is_whole_years_at_index_and_under_18_are_left_out(tmp_path: Path) -> None:
    people = [person(1, born=date(2006, 1, 1)), person(2, born=date(2006, 1, 2)),
              person(3, born=date(1980, 6, 15)), person(4, born=date(1980, 1, 1))]
    table = build(tmp_path, {"person": people, "observation_period": [observed(i) for i in range(1, 5)]},
                  onset(["age", "sex_male"]))
    rows = rows_by_id(table)
    assert sorted(rows) == [1, 3, 4]
    assert [rows[i]["age"] for i in (1, 3, 4)] == [18.0, 43.0, 44.0]
    assert all(row["index_date"] == INDEX for row in rows.values())


def test_sex_male_from_the_gender_concept(tmp_path: Path) -> None:
    table = build(tmp_path, {"person": [person(1), person(2, male=False)],
                             "observation_period": [observed(1), observed(2)]}, onset(["sex_male"]))
    assert table.column("sex_male").to_pylist() == [1.0, 0.0]


def test_a_condition_or_drug_up_to_and_including_the_index_day_excludes(tmp_path: Path) -> None:
    tables = {
        "person": [person(i) for i in range(1, 6)],
        "observation_period": [observed(i) for i in range(1, 6)],
        "condition_occurrence": [condition(1, "hypertension", INDEX), condition(2, "hypertension", INDEX + timedelta(1)),
                                 condition(3, "hypertension", date(2015, 3, 1))],
        "drug_exposure": [drug(4, "amlodipine", INDEX), drug(5, "metformin", INDEX)],
    }
    rows = rows_by_id(build(tmp_path, tables, onset(["age"])))
    assert sorted(rows) == [2, 5]
    assert rows[2]["htn_onset_1y"] == 1 and rows[5]["htn_onset_1y"] == 0


def test_observation_must_cover_the_whole_lookback_and_the_index_day(tmp_path: Path) -> None:
    tables = {
        "person": [person(i) for i in range(1, 5)],
        "observation_period": [observed(1, start=date(2023, 1, 1)), observed(2, start=date(2023, 1, 2)),
                               observed(3, end=INDEX - timedelta(1)),
                               observed(4, start=date(2019, 1, 1), end=date(2022, 12, 31)),
                               observed(4, start=date(2023, 6, 1))],
    }
    assert build(tmp_path, tables, onset(["age"]), scoring=True).column("person_id").to_pylist() == [1]


def test_lost_to_follow_up_negatives_are_left_out_but_cases_stay(tmp_path: Path) -> None:
    end_of_risk = INDEX + timedelta(365)  # 2024-12-31
    tables = {
        "person": [person(i) for i in range(1, 5)],
        "observation_period": [observed(1, end=end_of_risk), observed(2, end=end_of_risk - timedelta(1)),
                               observed(3, end=date(2024, 6, 30)), observed(4, end=date(2024, 6, 30))],
        "condition_occurrence": [condition(3, "hypertension", date(2024, 3, 1)),
                                 condition(1, "hypertension", end_of_risk + timedelta(1))],
    }
    rows = rows_by_id(build(tmp_path, tables, onset(["age"])))
    assert {pid: row["htn_onset_1y"] for pid, row in rows.items()} == {1: 0, 3: 1}
    # Scoring asks for no follow-up: everyone in the target cohort.
    assert build(tmp_path, tables, onset(["age"]), scoring=True).column("person_id").to_pylist() == [1, 2, 3, 4]


def test_the_outcome_counts_only_inside_the_time_at_risk(tmp_path: Path) -> None:
    tables = {
        "person": [person(i) for i in range(1, 4)],
        "observation_period": [observed(i) for i in range(1, 4)],
        "condition_occurrence": [condition(1, "hypertension", INDEX + timedelta(10)),
                                 condition(2, "hypertension", INDEX + timedelta(30)),
                                 condition(3, "hypertension", INDEX + timedelta(91))],
    }
    rows = rows_by_id(build(tmp_path, tables, onset(["age"], time_at_risk_days=[30, 90])))
    assert {pid: row["htn_onset_1y"] for pid, row in rows.items()} == {1: 0, 2: 1, 3: 0}


# ------------------------------------------------------------------ pregnancy tasks


def test_pregnancy_index_is_start_plus_gestation_and_the_first_in_the_period_per_mother(tmp_path: Path) -> None:
    tables = {
        "person": [person(1, male=False), person(2, male=False), person(3)],
        "condition_occurrence": [
            # mother 1: one pregnancy indexed before the period, then two inside it
            condition(1, "pregnancy", date(2020, 3, 1), date(2020, 11, 25)),
            condition(1, "pregnancy", date(2022, 5, 1), date(2023, 1, 25)),
            condition(1, "pregnancy", date(2021, 2, 1), date(2021, 10, 28)),
            # mother 2: indexed after the period's last day
            condition(2, "pregnancy", date(2024, 2, 15), date(2024, 11, 10)),
            # a man's "pregnancy" row is no pregnancy
            condition(3, "pregnancy", date(2022, 1, 1), date(2022, 9, 28)),
        ],
    }
    table = build(tmp_path, tables, pregnancy("maternal_gdm_preeclampsia", ["age", "prior_pregnancies"]))
    rows = rows_by_id(table)
    assert list(rows) == [1]
    assert rows[1]["index_date"] == date(2021, 2, 1) + timedelta(140)
    # 2020-11-25 ends before 2021-02-01 and inside [index - 365, index)
    assert rows[1]["prior_pregnancies"] == 1.0
    assert rows[1]["age"] == 41.0  # index 2021-06-21, born 1980-06-15


def test_prior_pregnancies_count_those_ending_in_the_lookback_before_this_start(tmp_path: Path) -> None:
    start = date(2023, 1, 1)
    index = start + timedelta(140)
    tables = {
        "person": [person(1, male=False)],
        "condition_occurrence": [
            condition(1, "pregnancy", start, start + timedelta(270)),
            condition(1, "pregnancy", date(2022, 1, 1), index - timedelta(365)),  # ends on the look-back's first day
            condition(1, "pregnancy", date(2021, 1, 1), index - timedelta(366)),  # ends before the look-back
        ],
    }
    definition = CohortDefinition.from_mapping({"task": "infant_lbw_preterm", "period": ["2023-01-01", "2024-06-30"],
                                                "covariates": ["prior_pregnancies"]})
    assert build(tmp_path, tables, definition).column("prior_pregnancies").to_pylist() == [1.0]


def test_twins_are_one_row_positive_if_either_infant_is(tmp_path: Path) -> None:
    delivery = date(2022, 10, 1)
    tables = {
        "person": [person(1, male=False), person(2, male=False), person(3, male=False)],
        "condition_occurrence": [condition(pid, "pregnancy", date(2022, 1, 1), delivery) for pid in (1, 2, 3)],
        "measurement": [
            reading(1, "birth_weight", delivery, 3100.0, TYPE_EHR), reading(1, "birth_weight", delivery, 2400.0, TYPE_EHR),
            reading(1, "gestational_age_at_birth", delivery, 38.0, TYPE_EHR),
            reading(2, "birth_weight", delivery, 2600.0, TYPE_EHR), reading(2, "birth_weight", delivery, 2500.0, TYPE_EHR),
            reading(2, "gestational_age_at_birth", delivery, 37.0, TYPE_EHR),
            reading(3, "birth_weight", delivery, 2900.0, TYPE_EHR),
            reading(3, "gestational_age_at_birth", delivery, 36.0, TYPE_EHR),
        ],
    }
    table = build(tmp_path, tables, pregnancy("infant_lbw_preterm", ["age"]))
    assert table.column("person_id").to_pylist() == [1, 2, 3]
    assert table.column("lbw_or_preterm").to_pylist() == [1, 0, 1]


def test_maternal_outcome_is_a_diagnosis_in_the_time_at_risk(tmp_path: Path) -> None:
    start = date(2022, 1, 1)
    index = start + timedelta(140)
    tables = {
        "person": [person(i, male=False) for i in range(1, 5)],
        "condition_occurrence": [condition(i, "pregnancy", start, start + timedelta(270)) for i in range(1, 5)] + [
            condition(1, "gestational_diabetes", index),  # on the index day: a covariate's business, not the label's
            condition(2, "preeclampsia", index + timedelta(1)),
            condition(3, "gestational_diabetes", index + timedelta(182)),
            condition(4, "preeclampsia", index + timedelta(183)),
        ],
    }
    table = build(tmp_path, tables, pregnancy("maternal_gdm_preeclampsia", ["history_gestational_diabetes"]))
    assert table.column("gdm_or_preeclampsia").to_pylist() == [0, 1, 1, 0]
    assert table.column("history_gestational_diabetes").to_pylist() == [0.0, 0.0, 0.0, 0.0]


# -------------------------------------------------------------------- covariates


def test_history_is_any_record_in_the_lookback(tmp_path: Path) -> None:
    tables = {
        "person": [person(i) for i in range(1, 5)],
        "observation_period": [observed(i) for i in range(1, 5)],
        "condition_occurrence": [condition(1, "obesity", INDEX - timedelta(365)), condition(2, "obesity", INDEX),
                                 condition(3, "obesity", INDEX - timedelta(366)),
                                 condition(4, "hyperlipidemia", INDEX - timedelta(1))],
        "observation": [observation(1, "current_smoker", INDEX - timedelta(1)),
                        observation(2, "current_smoker", INDEX),
                        observation(4, "family_history_hypertension", INDEX - timedelta(100))],
    }
    table = build(tmp_path, tables, onset(["history_obesity", "history_hyperlipidemia", "current_smoker",
                                           "family_history_hypertension"]))
    assert table.select(["history_obesity", "history_hyperlipidemia", "current_smoker",
                         "family_history_hypertension"]).to_pylist() == [
        {"history_obesity": 1.0, "history_hyperlipidemia": 0.0, "current_smoker": 1.0, "family_history_hypertension": 0.0},
        {"history_obesity": 0.0, "history_hyperlipidemia": 0.0, "current_smoker": 0.0, "family_history_hypertension": 0.0},
        {"history_obesity": 0.0, "history_hyperlipidemia": 0.0, "current_smoker": 0.0, "family_history_hypertension": 0.0},
        {"history_obesity": 0.0, "history_hyperlipidemia": 1.0, "current_smoker": 0.0, "family_history_hypertension": 1.0},
    ]


def test_last_is_the_latest_ehr_value_in_the_lookback(tmp_path: Path) -> None:
    tables = {
        "person": [person(1), person(2), person(3)],
        "observation_period": [observed(1), observed(2), observed(3)],
        "measurement": [
            reading(1, "bmi", date(2023, 3, 1), 30.0, TYPE_EHR),
            reading(1, "bmi", date(2023, 11, 1), 32.0, TYPE_EHR),
            reading(1, "bmi", date(2023, 12, 1), 50.0, TYPE_DEVICE),  # a device reading is no EHR value
            reading(1, "bmi", INDEX, 99.0, TYPE_EHR),  # the index day is not in the look-back
            reading(1, "hba1c", INDEX - timedelta(366), 7.0, TYPE_EHR),  # before the look-back
            # The last value is that of the latest date, as OHDSI FeatureExtraction takes it;
            # two values on that date: the higher one, whatever their times or row ids.
            reading(2, "bmi", datetime(2023, 12, 30, 20), 31.0, TYPE_EHR),  # an earlier day
            reading(2, "bmi", datetime(2023, 12, 31, 8), 28.0, TYPE_EHR),
            reading(2, "bmi", datetime(2023, 12, 31, 17), 27.0, TYPE_EHR),  # later that day, lower
            reading(3, "bmi", datetime(2023, 12, 30, 9), 26.0, TYPE_EHR),
            reading(3, "bmi", datetime(2023, 12, 30, 9), 25.0, TYPE_EHR),  # the later row
            reading(3, "bmi", date(2023, 12, 29), 40.0, TYPE_EHR, dated_only=True),  # an earlier day, no time
        ],
    }
    table = build(tmp_path, tables, onset(["bmi_last", "hba1c_last"]))
    assert table.select(["bmi_last", "hba1c_last"]).to_pylist() == [
        {"bmi_last": 32.0, "hba1c_last": None}, {"bmi_last": 28.0, "hba1c_last": None},
        {"bmi_last": 26.0, "hba1c_last": None}]


SIGNAL_COLUMNS = [f"sbp_{s}" for s in ("mean", "sd", "slope", "night_mean", "frac_above", "days")]


def test_signal_summaries_on_a_planted_series(tmp_path: Path) -> None:
    series = [  # window [2023-10-03, 2024-01-01)
        (datetime(2023, 12, 1, 3), 150.0, TYPE_DEVICE),  # night
        (datetime(2023, 12, 1, 14), 130.0, TYPE_SELF_REPORT),
        (datetime(2023, 12, 11, 5, 59), 140.0, TYPE_DEVICE),  # night, exactly at the threshold
        (datetime(2023, 12, 31, 23, 59), 120.0, TYPE_DEVICE),
    ]
    ignored = [
        reading(1, "sbp", datetime(2024, 1, 1, 0, 0), 999.0),  # index day
        reading(1, "sbp", datetime(2023, 10, 2, 23, 0), 999.0),  # before the window
        reading(1, "sbp", datetime(2023, 12, 5, 12), 999.0, TYPE_EHR),  # clinic value
        reading(1, "dbp", datetime(2023, 12, 5, 12), 999.0),  # another signal
    ]
    tables = {
        "person": [person(1)], "observation_period": [observed(1)],
        "measurement": [reading(1, "sbp", when, value, kind) for when, value, kind in series] + ignored,
    }
    row = build(tmp_path, tables, onset(SIGNAL_COLUMNS)).to_pylist()[0]
    days = np.array([(when.date() - date(2024, 1, 1)).days for when, _, _ in series])  # by date
    values = np.array([v for _, v, _ in series])
    assert row["sbp_mean"] == 135.0
    assert row["sbp_sd"] == pytest.approx(math.sqrt(500 / 3))
    assert row["sbp_slope"] == pytest.approx(30 * np.polyfit(days, values, 1)[0])
    assert row["sbp_night_mean"] == 145.0
    assert row["sbp_frac_above"] == 0.5
    assert row["sbp_days"] == pytest.approx(3 / 90)


def test_slope_is_units_per_30_days(tmp_path: Path) -> None:
    tables = {
        "person": [person(1)], "observation_period": [observed(1)],
        "measurement": [reading(1, "sbp", datetime(2023, 12, d, 12), 100.0 + d) for d in (1, 11, 21)],
    }
    assert build(tmp_path, tables, onset(["sbp_slope"])).column("sbp_slope").to_pylist() == [pytest.approx(30.0)]


def sbp_slopes(tmp_path: Path, series: dict[int, list[tuple[datetime, float]]]) -> list[float | None]:
    tables = {
        "person": [person(pid) for pid in series], "observation_period": [observed(pid) for pid in series],
        "measurement": [reading(pid, "sbp", when, value) for pid, readings in series.items() for when, value in readings],
    }
    return build(tmp_path, tables, onset(["sbp_slope"])).column("sbp_slope").to_pylist()


def test_two_readings_hours_apart_give_no_slope(tmp_path: Path) -> None:
    # Least squares would say (150 - 120) / (3 h) = 7200 mmHg per 30 days.
    assert sbp_slopes(tmp_path, {1: [(datetime(2023, 12, 1, 8), 120.0), (datetime(2023, 12, 1, 11), 150.0)]}) == [None]


def test_two_readings_weeks_apart_give_no_slope(tmp_path: Path) -> None:
    assert sbp_slopes(tmp_path, {1: [(datetime(2023, 11, 1, 8), 120.0), (datetime(2023, 12, 1, 8), 150.0)]}) == [None]


def test_three_readings_within_two_days_give_no_slope(tmp_path: Path) -> None:
    readings = [(datetime(2023, 12, 1, 8), 120.0), (datetime(2023, 12, 2, 8), 130.0), (datetime(2023, 12, 3, 8), 150.0)]
    assert sbp_slopes(tmp_path, {1: readings}) == [None]


def test_three_readings_over_ten_days_give_the_least_squares_slope(tmp_path: Path) -> None:
    # t = 0, 4, 10 days; v = 120, 126, 129: mean t 14/3, mean v 125;
    # sum (t - mean t)(v - mean v) = (-14/3)(-5) + (-2/3)(1) + (16/3)(4) = 44,
    # sum (t - mean t)^2 = (196 + 4 + 256) / 9 = 152/3: slope 132/152 = 33/38 per day.
    readings = [(datetime(2023, 12, 1, 8), 120.0), (datetime(2023, 12, 5, 8), 126.0), (datetime(2023, 12, 11, 8), 129.0)]
    assert sbp_slopes(tmp_path, {1: readings}) == [pytest.approx(30 * 33 / 38)]


def test_a_slope_needs_seven_days_between_first_and_last_reading(tmp_path: Path) -> None:
    start = datetime(2023, 12, 1, 8)
    series = {
        # Dates 7 days apart, though the last reading comes an hour earlier in its day.
        1: [(start, 120.0), (start + timedelta(days=3), 130.0), (start + timedelta(days=7, hours=-1), 134.0)],
        # Dates 6 days apart, though the readings span 6 days and 15 hours.
        2: [(start, 120.0), (start + timedelta(days=3), 130.0), (start + timedelta(days=6, hours=15), 134.0)],
    }
    # Person 1: t = 0, 3, 7, mean 10/3; v = 120, 130, 134, mean 128: sum of cross products
    # (-10/3)(-8) + (-1/3)(2) + (11/3)(6) = 48, of squares (100 + 1 + 121) / 9 = 74/3: 72/37 per day.
    assert sbp_slopes(tmp_path, series) == [pytest.approx(30 * 72 / 37), None]


def test_signal_edge_cases_without_readings_one_reading_one_instant_and_date_only(tmp_path: Path) -> None:
    noon = datetime(2023, 12, 1, 12)
    tables = {
        "person": [person(i) for i in range(1, 5)], "observation_period": [observed(i) for i in range(1, 5)],
        "measurement": [
            reading(2, "sbp", noon, 150.0),
            reading(3, "sbp", noon, 150.0), reading(3, "sbp", noon, 130.0),
            reading(4, "sbp", date(2023, 12, 5), 120.0, dated_only=True),  # midnight, but no hour: not night
        ],
    }
    rows = build(tmp_path, tables, onset(SIGNAL_COLUMNS)).to_pylist()
    assert [[row[c] for c in SIGNAL_COLUMNS] for row in rows] == [
        [None, None, None, None, None, 0.0],
        [150.0, None, None, None, 1.0, pytest.approx(1 / 90)],
        [140.0, pytest.approx(math.sqrt(200)), None, None, 0.5, pytest.approx(1 / 90)],
        [120.0, None, None, None, 0.0, pytest.approx(1 / 90)],
    ]


def test_each_signal_uses_its_own_threshold(tmp_path: Path) -> None:
    tables = {
        "person": [person(1)], "observation_period": [observed(1)],
        "measurement": [reading(1, "glucose", datetime(2023, 12, 1, 8), 7.8), reading(1, "glucose", datetime(2023, 12, 2, 8), 6.0),
                        reading(1, "heart_rate", datetime(2023, 12, 1, 8), 100.0)],
    }
    row = build(tmp_path, tables, onset(["heart_rate_frac_above", "glucose_frac_above", "glucose_mean"])).to_pylist()[0]
    assert (row["heart_rate_frac_above"], row["glucose_frac_above"], row["glucose_mean"]) == (1.0, 0.5, 6.9)


def test_pregnancy_signals_use_each_mothers_own_window(tmp_path: Path) -> None:
    starts = {1: date(2022, 1, 1), 2: date(2022, 6, 1)}
    tables = {
        "person": [person(1, male=False), person(2, male=False)],
        "condition_occurrence": [condition(pid, "pregnancy", s, s + timedelta(270)) for pid, s in starts.items()],
        # window [index - 140, index) = [start, start + 140)
        "measurement": [reading(pid, "glucose", datetime.combine(s, datetime.min.time()), 5.0 + pid)
                        for pid, s in starts.items()]
        + [reading(pid, "glucose", datetime.combine(s + timedelta(140), datetime.min.time()), 99.0)
           for pid, s in starts.items()],
    }
    table = build(tmp_path, tables, pregnancy("maternal_gdm_preeclampsia", ["glucose_mean", "glucose_days"]))
    assert table.select(["glucose_mean", "glucose_days"]).to_pylist() == [
        {"glucose_mean": 6.0, "glucose_days": pytest.approx(1 / 140)},
        {"glucose_mean": 7.0, "glucose_days": pytest.approx(1 / 140)},
    ]


# ------------------------------------------------------------ leakage (properties)
# Covariates come only from before the index day, labels only from the time-at-risk: for
# random small populations, rows on or after the index day never move a covariate, and rows
# before the time-at-risk never move a label.


CONDITIONS = ("obesity", "hyperlipidemia", "hypertension", "type2_diabetes", "gestational_diabetes", "preeclampsia")
MEASUREMENTS = ("sbp", "glucose", "bmi", "birth_weight", "gestational_age_at_birth")
KINDS = (TYPE_EHR, TYPE_DEVICE, TYPE_SELF_REPORT)
DATE_COLUMN = {"condition_occurrence": "condition_start_date", "measurement": "measurement_date",
               "observation": "observation_date", "drug_exposure": "drug_exposure_start_date"}
FIRST_DAY, LAST_DAY = date(2019, 1, 1), date(2025, 12, 31)

DEFINITIONS = {
    "diabetes_onset": CohortDefinition.from_mapping({
        "task": "diabetes_onset", "index_date": INDEX.isoformat(),
        "covariates": ["age", "sex_male", "history_obesity", "history_hypertension", "current_smoker", "bmi_last",
                       "glucose_last", *[f"glucose_{s}" for s in ("mean", "sd", "slope", "night_mean", "frac_above", "days")],
                       "sbp_mean"]}),
    "hypertension_onset": CohortDefinition.from_mapping({
        "task": "hypertension_onset", "index_date": INDEX.isoformat(), "lookback_days": [-200, -10],
        "reading_window_days": [-60, -1], "time_at_risk_days": [30, 365],
        "covariates": ["age", "history_obesity", "sbp_last", "sbp_mean", "sbp_slope", "sbp_days"]}),
    "maternal_gdm_preeclampsia": pregnancy(
        "maternal_gdm_preeclampsia", ["age", "prior_pregnancies", "history_gestational_diabetes", "history_preeclampsia",
                                      "bmi_last", "sbp_mean", "sbp_sd", "sbp_frac_above", "sbp_night_mean", "glucose_days"]),
    "infant_lbw_preterm": pregnancy(
        "infant_lbw_preterm", ["age", "prior_pregnancies", "glucose_mean", "glucose_slope", "current_smoker"]),
}

uniform_days = st.integers(0, (LAST_DAY - FIRST_DAY).days).map(lambda n: FIRST_DAY + timedelta(n))


EDGES = (0, 0, 0, 0, -1, -1, 1, 29, 30, -10, -11, -60, -61, -90, -91, -140, -141, -200, -201, -365, -366, 182, 183, 365, 366)


def near(anchors: list[date]) -> st.SearchStrategy[date]:
    """Dates on an anchor's window edges (index day, look-back and window starts), where leaks hide, or near it."""
    return st.one_of(
        st.tuples(st.sampled_from(anchors), st.sampled_from(EDGES)).map(lambda t: t[0] + timedelta(t[1])),
        st.tuples(st.sampled_from(anchors), st.integers(-400, 400)).map(lambda t: t[0] + timedelta(t[1])),
    )


@st.composite
def populations(draw: st.DrawFn) -> dict[str, list[dict[str, Any]]]:
    n = draw(st.integers(1, 4))
    tables: dict[str, list[dict[str, Any]]] = {t: [] for t in ("person", "observation_period", *DATE_COLUMN)}
    for pid in range(1, n + 1):
        male = draw(st.booleans())
        tables["person"].append(person(pid, born=draw(st.dates(date(1950, 1, 1), date(2006, 12, 31))), male=male))
        anchors = [INDEX]
        for _ in range(draw(st.integers(0, 2))):
            conception = draw(st.dates(date(2020, 6, 1), date(2024, 2, 1)))
            anchors.append(conception + timedelta(INDEX_GESTATION_DAYS))
            tables["condition_occurrence"].append(condition(pid, "pregnancy", conception, conception + timedelta(270)))
        days = near(anchors)
        if draw(st.integers(0, 3)):  # mostly observed throughout, so that most people are in the cohort
            tables["observation_period"].append(observed(pid))
        else:
            start, end = sorted([draw(days), draw(days)])
            tables["observation_period"].append(observed(pid, start, end))
        for _ in range(draw(st.integers(0, 4))):
            tables["condition_occurrence"].append(condition(pid, draw(st.sampled_from(CONDITIONS)), draw(days)))
        for _ in range(draw(st.integers(0, 12))):
            when = datetime.combine(draw(days), datetime.min.time()) + timedelta(minutes=draw(st.integers(0, 1439)))
            tables["measurement"].append(reading(pid, draw(st.sampled_from(MEASUREMENTS)), when,
                                                 float(draw(st.integers(1, 4000))), draw(st.sampled_from(KINDS)),
                                                 dated_only=draw(st.booleans())))
        for _ in range(draw(st.integers(0, 2))):
            tables["observation"].append(observation(pid, "current_smoker", draw(days)))
        if draw(st.integers(0, 3)) == 0:
            tables["drug_exposure"].append(drug(pid, draw(st.sampled_from(["amlodipine", "metformin"])), draw(days)))
    return tables


def run(tables: dict[str, list[dict[str, Any]]], definition: CohortDefinition, *, scoring: bool = False) -> pa.Table:
    return build_cohort(open_in_memory(tables), definition, scoring=scoring)


def covariates(table: pa.Table, definition: CohortDefinition) -> dict[tuple[int, date], list[Any]]:
    return {(r["person_id"], r["index_date"]): [r[c] for c in definition.covariates] for r in table.to_pylist()}


def assert_same_covariates(before: pa.Table, after: pa.Table, definition: CohortDefinition, *, every_row: bool) -> None:
    old, new = covariates(before, definition), covariates(after, definition)
    if every_row:
        assert old.keys() == new.keys()
    for key in old.keys() & new.keys():
        for name, a, b in zip(definition.covariates, old[key], new[key]):
            assert (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)), (
                key, name, a, b)


def index_of(tables: dict[str, list[dict[str, Any]]], definition: CohortDefinition) -> dict[int, date]:
    return dict(zip(*run(tables, definition, scoring=True).select(["person_id", "index_date"]).to_pydict().values()))


def moved(row: dict[str, Any], table: str, when: date, rng: random.Random, concepts: tuple[str, ...] | None) -> dict[str, Any]:
    """``row`` with a new date, value and (from ``concepts``) concept; a measurement keeps its time of day."""
    row = dict(row)
    row[DATE_COLUMN[table]] = when
    if table == "measurement":
        if row["measurement_datetime"] is not None:
            row["measurement_datetime"] = datetime.combine(when, row["measurement_datetime"].time())
        row["value_as_number"] = float(rng.randint(1, 4000))
        if concepts:
            row["measurement_concept_id"] = CONCEPTS[rng.choice([c for c in concepts if c in MEASUREMENTS])].concept_id
    elif table == "condition_occurrence":
        row["condition_end_date"] = when
        if concepts:
            row["condition_concept_id"] = CONCEPTS[rng.choice([c for c in concepts if c in CONDITIONS])].concept_id
    return row


LEAKAGE = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
every_task = pytest.mark.parametrize("task", sorted(DEFINITIONS))


@LEAKAGE
@every_task
@given(tables=populations(), start=st.integers(1, 200), length=st.integers(0, 400))
def test_moving_the_time_at_risk_moves_no_covariate(tables: dict[str, list[dict[str, Any]]], task: str,
                                                    start: int, length: int) -> None:
    definition = DEFINITIONS[task]
    other = CohortDefinition.from_mapping({**definition.to_mapping(), "time_at_risk_days": [start, start + length]})
    assert_same_covariates(run(tables, definition), run(tables, other), definition, every_row=False)


@LEAKAGE
@every_task
@given(tables=populations())
def test_deleting_every_row_after_the_index_day_moves_no_covariate(tables: dict[str, list[dict[str, Any]]], task: str) -> None:
    definition = DEFINITIONS[task]
    index = index_of(tables, definition)
    kept = {name: [row for row in rows if name not in DATE_COLUMN or row["person_id"] not in index
                   or row[DATE_COLUMN[name]] <= index[row["person_id"]]]
            for name, rows in tables.items()}
    assert_same_covariates(run(tables, definition, scoring=True), run(kept, definition, scoring=True), definition,
                           every_row=True)


@LEAKAGE
@every_task
@given(tables=populations(), rng=st.randoms(use_true_random=False))
def test_changing_rows_on_or_after_the_index_day_moves_no_covariate(tables: dict[str, list[dict[str, Any]]], task: str,
                                                                    rng: random.Random) -> None:
    definition = DEFINITIONS[task]
    index = index_of(tables, definition)
    changed = dict(tables)
    for name in ("measurement", "condition_occurrence"):
        changed[name] = [
            moved(row, name, index[row["person_id"]] + timedelta(rng.choice([0, 0, 1, rng.randint(0, 400)])), rng,
                  (*CONDITIONS, *MEASUREMENTS))
            if row["person_id"] in index and row[DATE_COLUMN[name]] >= index[row["person_id"]]
            and row.get("condition_concept_id") != CONCEPTS["pregnancy"].concept_id else row
            for row in tables[name]]
    assert_same_covariates(run(tables, definition, scoring=True), run(changed, definition, scoring=True), definition,
                           every_row=False)


@LEAKAGE
@every_task
@given(tables=populations(), rng=st.randoms(use_true_random=False))
def test_rows_before_the_time_at_risk_never_move_a_label(tables: dict[str, list[dict[str, Any]]], task: str,
                                                         rng: random.Random) -> None:
    definition = DEFINITIONS[task]
    index = index_of(tables, definition)
    # Rows that define the target stay: pregnancies, and exclusions up to the index day (those
    # after it, in a gap before the time-at-risk, only move inside the gap).
    exclusion = {CONCEPTS[c].concept_id for c in TASKS[task].exclusion}
    pregnancy_id = CONCEPTS["pregnancy"].concept_id
    outcomes = tuple(c for c in TASKS[task].outcome if CONCEPTS[c].concept_id not in exclusion)
    pool = tuple(c for c in (*CONDITIONS, *MEASUREMENTS) if CONCEPTS[c].concept_id not in exclusion | {pregnancy_id})
    pool += outcomes * 3  # the rows most likely to leak into a label
    changed = dict(tables)
    for name in ("measurement", "condition_occurrence"):
        rows = []
        for row in tables[name]:
            pid = row["person_id"]
            concept = row.get("condition_concept_id", row.get("measurement_concept_id"))
            if pid not in index or concept == pregnancy_id:
                rows.append(row)
                continue
            last = index[pid] + timedelta(definition.time_at_risk_days[0] - 1)  # the last day before the time-at-risk
            when = row[DATE_COLUMN[name]]
            new = last - timedelta(rng.choice([0, 0, 0, 1, rng.randint(0, 600)]))
            if concept in exclusion and index[pid] < when <= last:
                row = moved(row, name, max(new, index[pid] + timedelta(1)), rng, None)
            elif concept not in exclusion and when <= last:
                row = moved(row, name, new, rng, pool)
            rows.append(row)
        changed[name] = rows
    before_table, after_table = run(tables, definition), run(changed, definition)
    assert before_table.select(["person_id", "index_date", definition.label]).equals(
        after_table.select(["person_id", "index_date", definition.label]))
