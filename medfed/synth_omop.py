"""Synthetic alliance v2: N hospitals' OMOP CDM v5.4 tables, with the truth they were drawn from.

Each hospital gets ``<out>/<site>/omop/<table>.parquet`` for the seven tables the node
reads (person, observation_period, visit_occurrence, condition_occurrence, measurement,
observation, drug_exposure; the columns and types of the issue-11 brief), with the
concepts, units and record types of :mod:`models.clinical_tasks`, and
``<out>/<site>/truth/`` holding the answers: one ``<task>.parquet`` per task in
``TASKS`` (person_id, index_date, label, true_risk) and ``planted_alerts.parquet``.

How a hospital is drawn
-----------------------
Hospitals differ on purpose. Every third, from the first, is a large tier-3 hospital
(2000-3000 patients at scale 1, older, more comorbidity); the others are tier-2: the
second of each three small (150-300 patients, too few for a good local-only model), the
third mid-sized (400-1000). Each draws its own age, sex, urban/rural, smoking, BMI,
blood-pressure and glycaemia mixes and its wearable's bias.

Every patient carries latent factors: a blood-pressure level and yearly slope, a
fasting-glucose level and slope, BMI and its drift, activity, resting heart rate, sleep,
smoking and family history. They drive everything recorded about the patient:

- **Onsets** by a discrete-time hazard over "risk years" aligned on
  :data:`DEFAULT_INDEX_DATE` (year 0 is exactly the time-at-risk ``[index + 1, index +
  365]``): in each year an undiagnosed patient is diagnosed with probability
  ``sigmoid(logit)`` of the latent pressure (or glucose) at mid-year, age, BMI, family
  history and an unmeasured term. Year 0's probability is the stored ``true_risk``.
  Hypertension is followed by amlodipine, lisinopril or hydrochlorothiazide, diabetes by
  metformin (90-day prescriptions), which lower the latent value from then on.
- **Visits** (outpatient, at irregular dates; inpatient for deliveries) record clinic
  blood pressure, heart rate, BMI, glucose and HbA1c as EHR measurements, smoking and
  family history as observations, and chronic conditions again at later visits, as
  EHR extracts do. A diagnosis made before a patient's observation starts is recorded on
  its first day; one after it ends is never recorded.
- **Devices**: a home cuff (sbp/dbp; one reading in seven typed in by hand, recorded as
  self-report), a wristband (heart rate, steps, sleep hours, body temperature, and a
  cuffless sbp/dbp estimate now and then) and a glucose meter, each owned by some
  patients only, read at irregular hours (some at night), with missing days and weeks-long
  drop-outs, from late 2022 to :data:`DEFAULT_SCORING_DATE`.
- **Pregnancies** for women aged 18-45 (some repeat; 1.5% twins): a ``pregnancy``
  condition from conception to delivery, home readings and antenatal visits in the first
  20 weeks, gestational diabetes and pre-eclampsia after 20 weeks with risks from BMI,
  age, the pregnancy's glucose and pressure and earlier pregnancies, and at delivery a
  birth weight (g) and a gestational age at birth (wk) per infant, recorded on the
  mother. Whether the delivery is low-birth-weight or preterm is drawn from a known
  probability too. A mother has been in care for a year before she conceives and stays
  in care through delivery, so every pregnancy is fully observed.
- **Lost to follow-up**: a share of patients leave before the calendar ends.

Ground truth comes from these simulated facts (diagnosis, drug and birth dates,
observation periods, pregnancy records), never from reading the tables back, with the
semantics of :mod:`models.clinical_tasks` (age is completed years at the index date).
In the 14 days before :data:`DEFAULT_SCORING_DATE` a few patients per site get a planted
home reading that must raise a rule alert (systolic >= 180 mmHg, glucose outside the
alert range); every other reading of a signal concept from 15 days before that date on
is kept strictly inside the alert range, so alerts fire exactly on the planted rows.

Everything is drawn from ``numpy.random.default_rng([seed, site_index])``: the same seed
writes byte-identical files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medfed.errors import SynthError
from models.clinical_tasks import (
    CONCEPTS,
    INDEX_GESTATION_DAYS,
    LOW_BIRTH_WEIGHT_G,
    PRETERM_WEEKS,
    SIGNALS,
    TASKS,
    TYPE_DEVICE,
    TYPE_EHR,
    TYPE_SELF_REPORT,
)

__all__ = [
    "ALLIANCE_CITIES",
    "ALLIANCE_TIER_2",
    "ALLIANCE_TIER_3",
    "CALENDAR",
    "DEFAULT_INDEX_DATE",
    "DEFAULT_PERIOD",
    "DEFAULT_SCORING_DATE",
    "HospitalPlan",
    "OmopSite",
    "PROFILES",
    "SCHEMAS",
    "TABLES",
    "VISIT_CONCEPTS",
    "alliance_plan",
    "default_plan",
    "write_hospital",
    "write_omop_alliance",
]

logger = logging.getLogger(__name__)

CALENDAR: tuple[date, date] = (date(2019, 1, 1), date(2025, 12, 31))
DEFAULT_INDEX_DATE = date(2024, 1, 1)
DEFAULT_PERIOD: tuple[date, date] = (date(2021, 1, 1), date(2024, 6, 30))
DEFAULT_SCORING_DATE = date(2025, 12, 1)

# Standard OMOP visit concepts (models.clinical_tasks names none: the node reads no visit type).
VISIT_CONCEPTS: Mapping[str, int] = {"inpatient": 9201, "outpatient": 9202}

TIER_3 = "tier3"
TIER_2 = "tier2"

_INT64, _INT32, _DATE, _TS, _F64 = pa.int64(), pa.int32(), pa.date32(), pa.timestamp("us"), pa.float64()
SCHEMAS: Mapping[str, pa.Schema] = {
    "person": pa.schema([
        ("person_id", _INT64), ("gender_concept_id", _INT32), ("year_of_birth", _INT32),
        ("month_of_birth", _INT32), ("day_of_birth", _INT32), ("birth_datetime", _TS),
        ("care_site_id", _INT64), ("location_id", _INT64),
    ]),
    "observation_period": pa.schema([
        ("observation_period_id", _INT64), ("person_id", _INT64), ("observation_period_start_date", _DATE),
        ("observation_period_end_date", _DATE), ("period_type_concept_id", _INT32),
    ]),
    "visit_occurrence": pa.schema([
        ("visit_occurrence_id", _INT64), ("person_id", _INT64), ("visit_concept_id", _INT32),
        ("visit_start_date", _DATE), ("visit_end_date", _DATE), ("visit_type_concept_id", _INT32),
    ]),
    "condition_occurrence": pa.schema([
        ("condition_occurrence_id", _INT64), ("person_id", _INT64), ("condition_concept_id", _INT32),
        ("condition_start_date", _DATE), ("condition_end_date", _DATE), ("condition_type_concept_id", _INT32),
    ]),
    "measurement": pa.schema([
        ("measurement_id", _INT64), ("person_id", _INT64), ("measurement_concept_id", _INT32),
        ("measurement_date", _DATE), ("measurement_datetime", _TS), ("measurement_type_concept_id", _INT32),
        ("value_as_number", _F64), ("unit_concept_id", _INT32),
    ]),
    "observation": pa.schema([
        ("observation_id", _INT64), ("person_id", _INT64), ("observation_concept_id", _INT32),
        ("observation_date", _DATE), ("observation_type_concept_id", _INT32), ("value_as_number", _F64),
    ]),
    "drug_exposure": pa.schema([
        ("drug_exposure_id", _INT64), ("person_id", _INT64), ("drug_concept_id", _INT32),
        ("drug_exposure_start_date", _DATE), ("drug_exposure_end_date", _DATE), ("drug_type_concept_id", _INT32),
    ]),
}
TABLES: tuple[str, ...] = tuple(SCHEMAS)
TRUTH_SCHEMA = pa.schema([("person_id", _INT64), ("index_date", _DATE), ("label", pa.int8()), ("true_risk", _F64)])
ALERT_SCHEMA = pa.schema([
    ("person_id", _INT64), ("concept", pa.string()), ("measurement_datetime", _TS), ("value_as_number", _F64),
])

_US_PER_DAY = 86_400_000_000
_US_PER_MINUTE = 60_000_000


def _day(d: date) -> int:
    """Days since 1970-01-01 (what date32 stores)."""
    return (d - date(1970, 1, 1)).days


_START, _END = _day(CALENDAR[0]), _day(CALENDAR[1])
_INDEX = _day(DEFAULT_INDEX_DATE)
_SCORING = _day(DEFAULT_SCORING_DATE)
# Readings from this day on are kept inside every alert range unless planted (one day of margin
# over the 14-day window, whichever way a reader rounds its edges).
_QUIET_FROM = _SCORING - 15
_PLANT_DAYS = 13  # planted readings fall in [scoring - 13, scoring - 1]
# Inside-range margins (one display step) so that "outside [low, high]" and ">= high" readers agree.
_ALERT_MARGIN = {"sbp": 1.0, "dbp": 1.0, "glucose": 0.1, "heart_rate": 1.0, "sleep_hours": 0.1,
                 "steps": 1.0, "body_temperature": 0.1}
_DECIMALS = {"sbp": 0, "dbp": 0, "heart_rate": 0, "steps": 0, "glucose": 1, "hba1c": 1, "bmi": 1,
             "body_temperature": 1, "sleep_hours": 1, "birth_weight": 0, "gestational_age_at_birth": 1}
_HTN_DRUGS = ("amlodipine", "lisinopril", "hydrochlorothiazide")
_CHRONIC = ("hypertension", "type2_diabetes", "obesity", "hyperlipidemia", "chronic_kidney_disease")
_RISK_YEARS = range(-6, 2)  # risk year k covers [index + 1 + 365k, index + 365(k + 1)]
_DETECTION = {-6: -1.2, -5: -1.2, -4: -1.2, -3: -1.0, -2: -0.8, -1: -0.4}  # logit shift by risk year


@dataclass(frozen=True)
class OmopSite:
    """One generated hospital: where its OMOP tables and its ground truth were written."""

    site: str
    folder: Path
    truth: Path
    tier: str
    n_patients: int


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class _Mix:
    """Population mix of one hospital, drawn from its generator."""

    tier: str
    n_patients: int
    age_mean: float
    male_share: float
    urban_share: float
    bmi_shift: float
    smoker_share: float
    family_share: float
    bp_shift: float
    glucose_shift: float
    lost_share: float
    band_sbp_bias: float
    visit_rate: float


def _mix(rng: np.random.Generator, site_index: int, scale: float, tier: str | None = None) -> _Mix:
    # `tier` overrides the default pattern (a profile's plan); the draws are the same either way.
    tier = tier or (TIER_3 if site_index % 3 == 1 else TIER_2)
    # Draw order matters to reproducibility: keep it when adding a field (append new draws last).
    if tier == TIER_3:
        n = rng.integers(2000, 3001)
        age_mean, bmi_shift, bp_shift = rng.uniform(52, 57), rng.uniform(0.5, 1.5), rng.uniform(1.0, 3.0)
        visit_rate, urban = rng.uniform(2.2, 3.0), rng.uniform(0.7, 0.9)
    else:
        small = site_index % 3 == 2  # too few patients for a good local-only model
        n = rng.integers(150, 301) if small else rng.integers(400, 1001)
        age_mean, bmi_shift, bp_shift = rng.uniform(40, 47), rng.uniform(-0.6, 0.6), rng.uniform(-2.0, 1.0)
        visit_rate, urban = rng.uniform(1.4, 2.0), rng.uniform(0.2, 0.6)
    return _Mix(
        tier=tier,
        n_patients=max(20, int(round(int(n) * scale))),
        age_mean=float(age_mean),
        male_share=float(rng.uniform(0.42, 0.55)),
        urban_share=float(urban),
        bmi_shift=float(bmi_shift),
        smoker_share=float(rng.uniform(0.12, 0.28)),
        family_share=float(rng.uniform(0.22, 0.40)),
        bp_shift=float(bp_shift),
        glucose_shift=float(rng.normal(0.0, 0.12) + (0.15 if tier == TIER_3 else 0.0)),
        lost_share=float(rng.uniform(0.08, 0.18)),
        band_sbp_bias=float(rng.normal(0.0, 3.0)),
        visit_rate=float(visit_rate),
    )


class _Rows:
    """Columns of one table gathered in chunks; concatenated, sorted and numbered at the end."""

    def __init__(self, columns: tuple[str, ...]) -> None:
        self.columns = columns
        self.chunks: dict[str, list[np.ndarray]] = {c: [] for c in columns}

    def add(self, **values: np.ndarray | int | float) -> None:
        sizes = {np.size(v) for v in values.values() if np.ndim(v) > 0}
        n = sizes.pop() if sizes else 1
        assert not sizes, "columns of one chunk must have one length"
        for column in self.columns:
            self.chunks[column].append(np.broadcast_to(np.asarray(values[column]), (n,)).copy())

    def frame(self) -> dict[str, np.ndarray]:
        return {c: np.concatenate(self.chunks[c]) if self.chunks[c] else np.array([]) for c in self.columns}


@dataclass
class _People:
    """Per-patient latent factors and simulated facts of one hospital (arrays of length n)."""

    n: int
    person_id: np.ndarray
    male: np.ndarray
    birth: np.ndarray  # day number
    birth_hour: np.ndarray
    urban: np.ndarray
    obs_start: np.ndarray
    obs_end: np.ndarray
    bmi0: np.ndarray
    bmi_slope: np.ndarray
    smoker: np.ndarray
    family: np.ndarray
    bp0: np.ndarray
    bp_slope: np.ndarray
    dbp_offset: np.ndarray
    bp_var: np.ndarray
    glu0: np.ndarray
    glu_slope: np.ndarray
    steps: np.ndarray
    rest_hr: np.ndarray
    sleep: np.ndarray

    def age_at(self, day: np.ndarray | int) -> np.ndarray:
        return (np.asarray(day) - self.birth) / 365.25

    def bmi_at(self, day: np.ndarray, who: np.ndarray) -> np.ndarray:
        return self.bmi0[who] + self.bmi_slope[who] * (day - _START) / 365.25

    def bp_at(self, day: np.ndarray, who: np.ndarray) -> np.ndarray:
        return self.bp0[who] + self.bp_slope[who] * (day - _START) / 365.25

    def glu_at(self, day: np.ndarray, who: np.ndarray) -> np.ndarray:
        return self.glu0[who] + self.glu_slope[who] * (day - _START) / 365.25


def _completed_years(birth: np.ndarray, day: int) -> np.ndarray:
    """Age in completed years on ``day``: a birthday counts from its calendar day on."""
    b = np.asarray(birth).astype("datetime64[D]")
    d = np.datetime64(day, "D")
    years = d.astype("datetime64[Y]").astype(int) - b.astype("datetime64[Y]").astype(int)
    # The birthday of that year falls after ``day``: one year less.
    birthday = (b.astype("datetime64[Y]") + years).astype("datetime64[M]") + (
        b.astype("datetime64[M]").astype(int) % 12)
    birthday_day = birthday.astype("datetime64[D]") + (b - b.astype("datetime64[M]"))
    return years - (birthday_day > d).astype(int)


def _people(rng: np.random.Generator, mix: _Mix, site_index: int) -> _People:
    n = mix.n_patients
    male = rng.random(n) < mix.male_share
    age_index = np.clip(rng.normal(mix.age_mean, 16.0, n), 14.0, 95.0)
    birth = (_INDEX - np.floor(age_index * 365.25)).astype(np.int64)
    urban = rng.random(n) < mix.urban_share
    rural = ~urban
    age0 = (_START - birth) / 365.25
    # Observation: most records start when the extract does, the rest on registration; some leave early.
    registered = rng.random(n) < 0.35
    obs_start = np.where(registered, rng.integers(_START, _day(date(2025, 6, 1)), n), _START)
    lost = rng.random(n) < mix.lost_share
    obs_end = np.where(lost, obs_start + 90 + np.floor(rng.random(n) * (_END - obs_start - 90)), _END)
    obs_end = obs_end.astype(np.int64)

    bmi0 = np.clip(rng.lognormal(np.log(25.8 + mix.bmi_shift + 0.8 * rural), 0.17, n) + 0.03 * (age0 - 45), 16, 55)
    bmi_slope = rng.normal(0.12, 0.3, n)
    smoker = rng.random(n) < np.clip(mix.smoker_share * np.where(male, 1.3, 0.75) * np.where(rural, 1.2, 0.9), 0, 1)
    family = rng.random(n) < mix.family_share
    bp0 = (111.0 + mix.bp_shift + 0.45 * (age0 - 45) + 0.8 * (bmi0 - 26) + 4.0 * male + 3.0 * family
           + 2.5 * rural + rng.normal(0.0, 10.0, n))
    bp_slope = rng.normal(0.4 + 0.02 * (age0 - 45), 0.9, n)
    dbp_offset = rng.normal(0.0, 4.0, n)
    bp_var = rng.gamma(6.0, 1.3, n)
    dysglycaemia = rng.random(n) < (0.14 if mix.tier == TIER_3 else 0.09)
    glu0 = (5.0 + mix.glucose_shift + 0.012 * (age0 - 45) + 0.06 * (bmi0 - 26) + rng.normal(0.0, 0.4, n)
            + dysglycaemia * rng.gamma(2.0, 0.35, n))
    glu_slope = rng.normal(0.04 + 0.01 * np.maximum(bmi0 - 28, 0), 0.08, n)
    steps = np.exp(rng.normal(np.log(np.clip(7500 - 60 * (age0 - 45) - 150 * (bmi0 - 26) + 600 * urban, 1500, None)),
                              0.35, n))
    rest_hr = 72.0 - 0.0008 * (steps - 7000) + 4.0 * smoker - 2.0 * male + rng.normal(0.0, 6.0, n)
    sleep = np.clip(rng.normal(7.0, 0.7, n), 4.5, 9.5)
    return _People(
        n=n,
        person_id=site_index * 1_000_000 + np.arange(1, n + 1, dtype=np.int64),
        male=male, birth=birth, birth_hour=rng.integers(0, 24, n), urban=urban,
        obs_start=obs_start.astype(np.int64), obs_end=obs_end,
        bmi0=bmi0, bmi_slope=bmi_slope, smoker=smoker, family=family, bp0=bp0, bp_slope=bp_slope,
        dbp_offset=dbp_offset, bp_var=bp_var, glu0=glu0, glu_slope=glu_slope, steps=steps,
        rest_hr=rest_hr, sleep=sleep,
    )


_NEVER = np.iinfo(np.int64).max // 4


def _onsets(rng: np.random.Generator, p: _People, latent: str) -> tuple[np.ndarray, np.ndarray]:
    """True diagnosis day per patient (``_NEVER`` if none) and the risk-year-0 probability (true_risk).

    A discrete-time hazard over risk years aligned on the index date; patients already
    diagnosed before the first risk year are prevalent cases. Before the alliance's home
    monitoring began (late 2022) fewer cases were found: a lower detection intercept.
    """
    n = p.n
    everyone = np.arange(n)
    unmeasured = rng.normal(0.0, 0.35, n)
    first = _INDEX + 1 + 365 * _RISK_YEARS[0]
    if latent == "bp":
        prevalent = _sigmoid(-2.6 + 0.08 * (p.bp_at(np.full(n, first), everyone) - 140)
                             + 0.03 * (p.age_at(first) - 55))
    else:
        prevalent = _sigmoid(-3.2 + 1.6 * (p.glu_at(np.full(n, first), everyone) - 7.0)
                             + 0.02 * (p.age_at(first) - 55))
    dx = np.where(rng.random(n) < prevalent, first - rng.integers(30, 3000, n), _NEVER)
    risk0 = np.zeros(n)
    for k in _RISK_YEARS:
        start = _INDEX + 1 + 365 * k
        mid = np.full(n, start + 182)
        age = p.age_at(mid)
        bmi = p.bmi_at(mid, everyone)
        if latent == "bp":
            logit = (-1.0 + 0.11 * (p.bp_at(mid, everyone) - 130) + 0.025 * (age - 50)
                     + 0.35 * p.family + 0.03 * (bmi - 27) + 0.2 * p.smoker)
        else:
            logit = (-1.2 + 2.3 * (p.glu_at(mid, everyone) - 6.3) + 0.05 * (bmi - 28)
                     + 0.015 * (age - 50))
        prob = _sigmoid(logit + unmeasured + _DETECTION.get(k, 0.0)) * (age >= 14)
        if k == 0:
            risk0 = prob
        fresh = (dx == _NEVER) & (rng.random(n) < prob)
        dx = np.where(fresh, start + rng.integers(0, 365, n), dx)
    return dx, risk0


def _recorded(true_day: np.ndarray, p: _People) -> np.ndarray:
    """The day a diagnosis is first recorded: on the day, on registration if earlier, never if after leaving."""
    rec = np.maximum(true_day, p.obs_start)
    return np.where(true_day <= p.obs_end, rec, _NEVER)


def _ts(day: np.ndarray, hour: np.ndarray | float) -> np.ndarray:
    minutes = np.minimum(np.round(np.asarray(hour) * 60), 24 * 60 - 1).astype(np.int64)  # clocks show minutes
    return np.asarray(day, dtype=np.int64) * _US_PER_DAY + minutes * _US_PER_MINUTE


class _Site:
    """One hospital's generator: people, facts, rows, truth."""

    def __init__(self, site_index: int, seed: int, scale: float, tier: str | None = None) -> None:
        self.site_index = site_index
        self.rng = np.random.default_rng([seed, site_index])
        self.mix = _mix(self.rng, site_index, scale, tier)
        self.p = _people(self.rng, self.mix, site_index)
        self.conditions = _Rows(("person", "concept", "start", "end"))
        self.measurements = _Rows(("person", "concept", "ts", "type", "value", "planted"))
        self.observations = _Rows(("person", "concept", "day", "type"))
        self.drugs = _Rows(("person", "concept", "start", "end"))
        self.visits = _Rows(("person", "concept", "start", "end"))
        self.planted = _Rows(("person", "concept", "ts", "value"))

    # ---------------------------------------------------------------- facts
    def simulate(self) -> None:
        rng, p = self.rng, self.p
        self.htn_true, self.htn_risk = _onsets(rng, p, "bp")
        self.t2d_true, self.t2d_risk = _onsets(rng, p, "glucose")
        self.dx = {"hypertension": _recorded(self.htn_true, p), "type2_diabetes": _recorded(self.t2d_true, p)}
        age0 = p.age_at(_START)
        span = np.maximum(p.obs_end - p.obs_start, 1)
        obese = (p.bmi0 >= 30) & (rng.random(p.n) < 0.75)
        self.dx["obesity"] = np.where(obese, p.obs_start + np.floor(rng.random(p.n) * np.minimum(span, 400)), _NEVER)
        lipid = rng.random(p.n) < _sigmoid(-1.9 + 0.045 * (age0 - 50) + 0.07 * (p.bmi0 - 27)
                                          + 0.8 * (self.dx["type2_diabetes"] < _NEVER)
                                          + (0.4 if self.mix.tier == TIER_3 else 0.0))
        self.dx["hyperlipidemia"] = np.where(lipid, p.obs_start + np.floor(rng.random(p.n) * span), _NEVER)
        ckd = rng.random(p.n) < _sigmoid(-4.2 + 0.07 * (age0 - 60) + 0.04 * (p.bp0 - 130)
                                         + 0.9 * (self.dx["type2_diabetes"] < _NEVER)
                                         + (0.5 if self.mix.tier == TIER_3 else 0.0))
        self.dx["chronic_kidney_disease"] = np.where(ckd, p.obs_start + np.floor(rng.random(p.n) * span), _NEVER)
        for name in ("obesity", "hyperlipidemia", "chronic_kidney_disease"):
            self.dx[name] = self.dx[name].astype(np.int64)
        # Treatment starts within a month of the recorded diagnosis (or of registration).
        self.htn_drug_start = np.where(self.dx["hypertension"] < _NEVER,
                                       self.dx["hypertension"] + rng.integers(0, 31, p.n), _NEVER)
        self.htn_drug_start = np.where(self.htn_drug_start <= p.obs_end, self.htn_drug_start, _NEVER)
        self.t2d_drug_start = np.where(self.dx["type2_diabetes"] < _NEVER,
                                       self.dx["type2_diabetes"] + rng.integers(0, 31, p.n), _NEVER)
        self.t2d_drug_start = np.where(self.t2d_drug_start <= p.obs_end, self.t2d_drug_start, _NEVER)
        self.bp_drop = rng.normal(12.0, 4.0, p.n)
        self.glu_drop = rng.normal(1.0, 0.3, p.n)
        self._pregnancies()

    def sbp(self, day: np.ndarray, who: np.ndarray) -> np.ndarray:
        """Latent systolic pressure on ``day``, treated from the drug's start on."""
        return self.p.bp_at(day, who) - self.bp_drop[who] * (day >= self.htn_drug_start[who])

    def glucose(self, day: np.ndarray, who: np.ndarray) -> np.ndarray:
        return np.maximum(self.p.glu_at(day, who) - self.glu_drop[who] * (day >= self.t2d_drug_start[who]), 3.8)

    def _pregnancies(self) -> None:
        """Women 18-45 conceive now and then; one pregnancy at a time, six months apart at least."""
        rng, p = self.rng, self.p
        women = np.flatnonzero(~p.male)
        fertile = rng.random(women.size) < 0.85
        rate = np.where(fertile, rng.gamma(2.0, 0.35, women.size), 0.01)  # conceptions per year
        t = np.maximum.reduce([p.obs_start[women] + 365, p.birth[women] + int(18 * 365.25) + 1,
                               np.full(women.size, _START)])
        last = np.minimum(p.obs_end[women] - 300, _END - 300)
        records = []
        prior_gdm = np.zeros(women.size, bool)
        prior_pe = np.zeros(women.size, bool)
        prior_adverse = np.zeros(women.size, bool)
        parity = np.zeros(women.size, int)
        for _ in range(5):
            wait = np.ceil(rng.exponential(365.0 / rate))
            conception = (t + wait).astype(np.int64)
            age = (conception - p.birth[women]) / 365.25
            fertility_age = np.exp(-(((age - 30.0) / 9.0) ** 2) / 2.0)
            ok = (conception <= last) & (age <= 45.0) & (rng.random(women.size) < fertility_age + 0.15)
            # a conception that does not happen still moves the clock on
            w = women[ok]
            m = np.flatnonzero(ok)
            c = conception[ok]
            k = w.size
            twins = rng.random(k) < 0.015
            bmi = p.bmi_at(c, w)
            bp = self.sbp(c, w)
            glu = self.glucose(c, w) + rng.normal(0.25, 0.35, k)  # pregnancy's own insulin resistance
            a = age[ok]
            p_gdm = _sigmoid(-3.9 + 2.1 * (glu - 5.3) + 0.07 * (bmi - 25) + 0.05 * (a - 30)
                             + 1.6 * prior_gdm[m] + 0.3 * p.family[w])
            p_pe = _sigmoid(-4.5 + 0.1 * (bp - 115) + 0.07 * (bmi - 25) + 1.6 * prior_pe[m] + 1.0 * twins
                            + 0.5 * (parity[m] == 0) + 0.08 * np.maximum(a - 35, 0))
            gdm = rng.random(k) < p_gdm
            pe = rng.random(k) < p_pe
            base = (-2.8 + 0.1 * (bp - 115) + 1.3 * p.smoker[w] + 0.7 * (glu - 5.3) + 1.2 * prior_adverse[m]
                    + 3.2 * twins + 0.12 * np.maximum(a - 35, 0) + 0.25 * np.maximum(20 - a, 0) - 0.05 * (bmi - 25))
            p_adv_pe, p_adv_no = _sigmoid(base + 1.8), _sigmoid(base)
            p_adverse = p_pe * p_adv_pe + (1 - p_pe) * p_adv_no  # the index-time probability
            adverse = rng.random(k) < np.where(pe, p_adv_pe, p_adv_no)
            records.append({"who": w, "conception": c, "twins": twins, "gdm": gdm, "pe": pe,
                            "p_maternal": 1 - (1 - p_gdm) * (1 - p_pe), "p_infant": p_adverse, "adverse": adverse,
                            "glu": glu, "bp": bp, "bmi": bmi})
            prior_gdm[m] |= gdm
            prior_pe[m] |= pe
            prior_adverse[m] |= adverse
            parity[m] += 1
            # delivery is drawn below; the clock moves on by about a year (pregnancy plus six months at least)
            t = np.where(ok, conception + 280 + 183 + rng.integers(0, 120, women.size), conception)
        preg = {key: np.concatenate([r[key] for r in records]) for key in records[0]}
        k = preg["who"].size
        # Gestation: preterm births are adverse; term births are adverse when an infant is small (< 2500 g).
        preterm = preg["adverse"] & ((rng.random(k) < 0.7) | preg["twins"])
        days = np.where(preterm, rng.integers(23 * 7, 37 * 7, k),  # GA-days 161..258: < 37 weeks
                        np.clip(np.round(rng.normal(39.4 * 7, 8, k)), 37 * 7, 42 * 7 + 3)).astype(np.int64)
        days = np.where(preg["twins"] & ~preterm, np.minimum(days, 38 * 7 + 3), days)
        preg["delivery"] = preg["conception"] + days - 14  # gestational age counts from two weeks before conception
        preg["ga"] = np.round(days / 7.0, 1)
        preg["gdm_day"] = preg["conception"] + rng.integers(24 * 7, 28 * 7, k) - 14
        preg["pe_day"] = preg["conception"] + INDEX_GESTATION_DAYS + 1 + np.floor(
            rng.random(k) * (preg["delivery"] - preg["conception"] - INDEX_GESTATION_DAYS - 1)).astype(np.int64)
        # A delivery before the 24-28-week screen: diagnosed earlier, after the index day.
        preg["gdm_day"] = np.where(preg["gdm_day"] < preg["delivery"], preg["gdm_day"], preg["pe_day"])
        # Birth weights: one per infant; the second infant of twins in a second array.
        weeks = days / 7.0
        median = 3450.0 * np.exp(-0.5 * ((40.0 - np.minimum(weeks, 40.0)) / 7.5) ** 2 * 2.2) - 150 * preg["twins"]
        median += 40.0 * (preg["bmi"] - 25) + 150.0 * preg["gdm"] - 150.0 * p.smoker[preg["who"]]
        weights = []
        for infant in range(2):
            bw = median * np.exp(rng.normal(0.0, 0.11, k))
            small_term = preg["adverse"] & ~preterm & ((infant == 0) | (rng.random(k) < 0.5))
            bw = np.where(small_term, rng.uniform(1800, 2490, k), bw)
            healthy = ~preg["adverse"]
            bw = np.where(healthy & (bw < 2550), rng.uniform(2550, 3100, k), bw)
            weights.append(np.round(np.clip(bw, 300, 6500)))
        preg["bw"] = np.stack(weights, axis=1)
        self.preg = preg

    # ---------------------------------------------------------------- rows
    def rows(self) -> None:
        self._visit_rows()
        self._drug_rows()
        self._device_rows()
        self._pregnancy_rows()
        self._plant_alerts()

    def _measure(self, who: np.ndarray, name: str, ts: np.ndarray, kind: int | np.ndarray, value: np.ndarray) -> None:
        low, high = CONCEPTS[name].plausible  # type: ignore[misc]
        value = np.clip(np.round(value, _DECIMALS[name]), low, high)
        self.measurements.add(person=self.p.person_id[who], concept=CONCEPTS[name].concept_id, ts=ts, type=kind,
                              value=value, planted=False)

    def _visit_rows(self) -> None:
        rng, p = self.rng, self.p
        years = (p.obs_end - p.obs_start + 1) / 365.25
        sick = sum((self.dx[c] < _NEVER).astype(float) for c in _CHRONIC)
        rate = self.mix.visit_rate * (0.6 + 0.012 * np.clip(p.age_at(_INDEX) - 20, 0, None)) + 0.5 * sick
        count = rng.poisson(rate * years)
        who = np.repeat(np.arange(p.n), count)
        span = p.obs_end[who] - p.obs_start[who] + 1
        day = p.obs_start[who] + np.floor(rng.random(who.size) * span).astype(np.int64)
        # Every recorded diagnosis is made at a visit.
        extra_who, extra_day = [who], [day]
        for name in _CHRONIC:
            has = np.flatnonzero(self.dx[name] < _NEVER)
            extra_who.append(has)
            extra_day.append(self.dx[name][has])
        who, day = np.concatenate(extra_who), np.concatenate(extra_day).astype(np.int64)
        self.visits.add(person=p.person_id[who], concept=VISIT_CONCEPTS["outpatient"], start=day, end=day)
        n = who.size
        hour = rng.uniform(8.0, 17.5, n)
        ts = _ts(day, hour)
        sbp = self.sbp(day, who) + 5.0 + rng.normal(0, 7, n)  # a clinic's white coat
        bp_taken = rng.random(n) < 0.85
        self._measure(who[bp_taken], "sbp", ts[bp_taken], TYPE_EHR, sbp[bp_taken])
        dbp = 0.5 * sbp + 18 + p.dbp_offset[who] + rng.normal(0, 4, n)
        self._measure(who[bp_taken], "dbp", ts[bp_taken], TYPE_EHR, dbp[bp_taken])
        pulse = rng.random(n) < 0.6
        self._measure(who[pulse], "heart_rate", ts[pulse], TYPE_EHR,
                      p.rest_hr[who[pulse]] + 6 + rng.normal(0, 6, pulse.sum()))
        weighed = rng.random(n) < 0.5
        self._measure(who[weighed], "bmi", ts[weighed], TYPE_EHR,
                      p.bmi_at(day[weighed], who[weighed]) + rng.normal(0, 0.3, weighed.sum()))
        glu = self.glucose(day, who)
        diabetic = day >= self.dx["type2_diabetes"][who]
        lab = rng.random(n) < np.where(diabetic, 0.6, 0.2 + 0.2 * (glu > 6.0))
        self._measure(who[lab], "glucose", ts[lab], TYPE_EHR, glu[lab] + rng.normal(0, 0.35, lab.sum()))
        a1c = rng.random(n) < np.where(diabetic, 0.6, 0.15 + 0.25 * (glu > 6.0))
        # HbA1c from mean glucose (ADAG: mean = 1.59 * HbA1c - 2.59), a day's mean a little above fasting.
        self._measure(who[a1c], "hba1c", ts[a1c], TYPE_EHR,
                      (glu[a1c] + 1.0 + 2.59) / 1.59 + rng.normal(0, 0.2, a1c.sum()))
        for name, has in (("current_smoker", p.smoker), ("family_history_hypertension", p.family)):
            noted = has[who] & (rng.random(n) < (0.7 if name == "current_smoker" else 0.45))
            self.observations.add(person=p.person_id[who[noted]], concept=CONCEPTS[name].concept_id, day=day[noted],
                                  type=np.where(rng.random(noted.sum()) < 0.2, TYPE_SELF_REPORT, TYPE_EHR))
        for name in _CHRONIC:
            first = self.dx[name]
            has = np.flatnonzero(first < _NEVER)
            self.conditions.add(person=p.person_id[has], concept=CONCEPTS[name].concept_id, start=first[has],
                                end=first[has])
            again = (day > first[who]) & (rng.random(n) < 0.6)
            self.conditions.add(person=p.person_id[who[again]], concept=CONCEPTS[name].concept_id, start=day[again],
                                end=day[again])

    def _drug_rows(self) -> None:
        rng, p = self.rng, self.p
        choice = rng.choice(len(_HTN_DRUGS), p.n, p=[0.45, 0.35, 0.20])
        for start, concept in ((self.htn_drug_start, np.array([CONCEPTS[d].concept_id for d in _HTN_DRUGS])[choice]),
                               (self.t2d_drug_start, np.full(p.n, CONCEPTS["metformin"].concept_id))):
            treated = np.flatnonzero(start < _NEVER)
            fills = np.floor((p.obs_end[treated] - start[treated]) / 90).astype(np.int64) + 1
            # Some stop refilling after a while.
            fills = np.minimum(fills, np.where(rng.random(treated.size) < 0.2, rng.integers(1, 6, treated.size), fills))
            who = np.repeat(treated, fills)
            nth = np.arange(who.size) - np.repeat(np.cumsum(fills) - fills, fills)
            first = start[who] + 90 * nth + rng.integers(0, 8, who.size) * (nth > 0)
            keep = first <= p.obs_end[who]
            who, first = who[keep], first[keep]
            self.drugs.add(person=p.person_id[who], concept=concept[who], start=first,
                           end=np.minimum(first + 89, p.obs_end[who]))

    def _events(self, owners: np.ndarray, start: np.ndarray, end: np.ndarray, rate: np.ndarray,
                cap: int) -> tuple[np.ndarray, np.ndarray]:
        """Irregular reading days per owner in [start, end): Poisson counts, weeks-long drop-outs removed."""
        rng = self.rng
        span = np.maximum(end - start, 0)
        count = np.minimum(rng.poisson(rate * span), cap)
        who = np.repeat(owners, count)
        day = np.repeat(start, count) + np.floor(rng.random(who.size) * np.repeat(span, count)).astype(np.int64)
        # One or two drop-outs of 2-9 weeks for most owners: the device sits in a drawer.
        keep = np.ones(who.size, bool)
        for _ in range(2):
            gap = rng.random(owners.size) < 0.5
            gap_start = start + np.floor(rng.random(owners.size) * np.maximum(span, 1)).astype(np.int64)
            gap_end = gap_start + rng.integers(14, 64, owners.size)
            g_s, g_e, g_on = np.repeat(gap_start, count), np.repeat(gap_end, count), np.repeat(gap, count)
            keep &= ~(g_on & (day >= g_s) & (day < g_e))
        return who[keep], day[keep]

    def _device_rows(self) -> None:
        rng, p = self.rng, self.p
        age = p.age_at(_INDEX)
        everyone = np.arange(p.n)
        late = rng.random(p.n) < 0.2
        first_day = np.where(late, rng.integers(_day(date(2023, 9, 1)), _day(date(2025, 6, 1)), p.n),
                             rng.integers(_day(date(2022, 9, 1)), _day(date(2023, 9, 1)), p.n))
        start = np.maximum(first_day, p.obs_start)
        end = np.minimum(p.obs_end + 1, _SCORING)  # readings stop at the scoring date (exclusive)
        adult = age >= 18
        cuff = adult & (rng.random(p.n) < _sigmoid(-0.9 + 0.03 * (age - 50) + 0.6 * p.urban
                                                   + 0.04 * (p.bp_at(np.full(p.n, _INDEX), everyone) - 125)))
        band = adult & (rng.random(p.n) < _sigmoid(-0.2 - 0.045 * (age - 40) + 0.9 * p.urban))
        meter = adult & (rng.random(p.n) < _sigmoid(-2.2 + 1.6 * (p.glu_at(np.full(p.n, _INDEX), everyone) - 6.0)))
        self.has = {"cuff": cuff, "band": band, "meter": meter}
        adherence = rng.gamma(3.0, 1 / 3.0, p.n)
        # Home cuff: sbp/dbp pairs, mostly morning and evening.
        owners = np.flatnonzero(cuff)
        who, day = self._events(owners, start[owners], end[owners], 0.075 * adherence[owners], 90)
        self._cuff(who, day, rng.choice([7.0, 19.5, 3.0, 13.0], who.size, p=[0.45, 0.4, 0.07, 0.08]))
        # Glucose meter: fasting in the morning, after meals, a few at night.
        owners = np.flatnonzero(meter)
        who, day = self._events(owners, start[owners], end[owners], 0.06 * adherence[owners], 70)
        self._meter(who, day)
        # Wristband: a sync a few times a week sends a day's heart rate, steps, sleep and temperature.
        owners = np.flatnonzero(band)
        who, day = self._events(owners, start[owners], end[owners], 0.035 * adherence[owners], 34)
        n = who.size
        night = rng.random(n) < 0.3
        hr_hour = np.where(night, rng.uniform(0, 6, n), rng.uniform(6, 24, n))
        self._measure(who, "heart_rate", _ts(day, hr_hour), TYPE_DEVICE,
                      p.rest_hr[who] + np.where(night, -6.0, 8.0) + rng.normal(0, 6, n))
        self._measure(who, "steps", _ts(day, rng.uniform(20.5, 23.99, n)), TYPE_DEVICE,
                      p.steps[who] * np.exp(rng.normal(0, 0.35, n)))
        self._measure(who, "sleep_hours", _ts(day, rng.uniform(5.5, 10.0, n)), TYPE_DEVICE,
                      p.sleep[who] + rng.normal(0, 0.9, n))
        fever = rng.random(n) < 0.02
        self._measure(who, "body_temperature", _ts(day, rng.uniform(0, 24, n)), TYPE_DEVICE,
                      36.6 + rng.normal(0, 0.22, n) + fever * rng.uniform(0.8, 2.2, n))
        cuffless = rng.random(n) < 0.3
        w, d = who[cuffless], day[cuffless]
        ts = _ts(d, rng.uniform(0, 24, w.size))
        sbp = self.sbp(d, w) + self.mix.band_sbp_bias + rng.normal(0, 9, w.size)
        self._measure(w, "sbp", ts, TYPE_DEVICE, sbp)
        self._measure(w, "dbp", ts, TYPE_DEVICE, 0.5 * sbp + 18 + p.dbp_offset[w] + rng.normal(0, 6, w.size))

    def _cuff(self, who: np.ndarray, day: np.ndarray, around: np.ndarray) -> None:
        rng, p = self.rng, self.p
        n = who.size
        hour = np.clip(around + rng.normal(0, 1.2, n), 0, 23.99)
        hour = np.where(around == 3.0, rng.uniform(0, 6, n), hour)
        night = hour < 6
        # Pressure dips at night and surges in the morning; each patient has their own variability.
        circadian = np.where(night, -8.0, np.where(hour < 10, 3.0, 0.0))
        sbp = self.sbp(day, who) + circadian + p.bp_var[who] * rng.standard_normal(n)
        dbp = 0.5 * sbp + 18 + p.dbp_offset[who] + 0.5 * p.bp_var[who] * rng.standard_normal(n)
        typed = rng.random(n) < 1 / 7
        kind = np.where(typed, TYPE_SELF_REPORT, TYPE_DEVICE)
        ts = _ts(day, hour)
        self._measure(who, "sbp", ts, kind, sbp)
        self._measure(who, "dbp", ts, kind, dbp)

    def _meter(self, who: np.ndarray, day: np.ndarray, extra: np.ndarray | float = 0.0) -> None:
        rng = self.rng
        n = who.size
        slot = rng.choice(3, n, p=[0.5, 0.4, 0.1])
        fasting, after_meal, night = rng.uniform(6, 9, n), rng.choice([13.5, 20.0], n) + rng.uniform(0, 1.5, n), \
            rng.uniform(0, 6, n)
        hour = np.select([slot == 0, slot == 1], [fasting, after_meal], night)
        g = self.glucose(day, who) + extra
        g = g + (slot == 1) * rng.gamma(2.0, 0.6, n) * (1 + np.maximum(g - 5, 0) / 3) + rng.normal(0, 0.4, n)
        self._measure(who, "glucose", _ts(day, hour), TYPE_DEVICE, g)

    def _pregnancy_rows(self) -> None:
        rng, p, preg = self.rng, self.p, self.preg
        who_idx = preg["who"]
        pid = p.person_id[who_idx]
        k = who_idx.size
        c, delivery = preg["conception"], preg["delivery"]
        self.conditions.add(person=pid, concept=CONCEPTS["pregnancy"].concept_id, start=c, end=delivery)
        g = np.flatnonzero(preg["gdm"])
        self.conditions.add(person=pid[g], concept=CONCEPTS["gestational_diabetes"].concept_id,
                            start=preg["gdm_day"][g], end=delivery[g])
        e = np.flatnonzero(preg["pe"])
        self.conditions.add(person=pid[e], concept=CONCEPTS["preeclampsia"].concept_id, start=preg["pe_day"][e],
                            end=delivery[e])
        # Antenatal visits every four weeks to delivery, a clinic pressure at each.
        visits = (delivery - c) // 28
        vw = np.repeat(np.arange(k), visits)
        nth = np.arange(vw.size) - np.repeat(np.cumsum(visits) - visits, visits)
        vday = c[vw] + 28 * (nth + 1) + rng.integers(-3, 4, vw.size)
        vday = np.minimum(vday, delivery[vw] - 1)
        self.visits.add(person=pid[vw], concept=VISIT_CONCEPTS["outpatient"], start=vday, end=vday)
        after_pe = preg["pe"][vw] & (vday >= preg["pe_day"][vw])
        sbp = preg["bp"][vw] - 4 + 25.0 * after_pe + rng.normal(0, 7, vw.size)
        ts = _ts(vday, rng.uniform(8, 17, vw.size))
        self._measure(who_idx[vw], "sbp", ts, TYPE_EHR, sbp)
        self._measure(who_idx[vw], "dbp", ts, TYPE_EHR,
                      0.5 * sbp + 18 + p.dbp_offset[who_idx[vw]] + rng.normal(0, 4, vw.size))
        # Early-pregnancy home monitoring (antenatal programme) for most mothers.
        monitored = rng.random(k) < 0.75
        for device, rate, cap in (("cuff", 0.09, 14), ("meter", 0.06, 9)):
            owners = np.flatnonzero(monitored)
            who, day = self._events(owners, c[owners] + 14, c[owners] + INDEX_GESTATION_DAYS,
                                    np.full(owners.size, rate), cap)
            if device == "cuff":
                self._cuff(who_idx[who], day, rng.choice([7.0, 19.5, 3.0, 13.0], who.size, p=[0.45, 0.4, 0.07, 0.08]))
            else:
                self._meter(who_idx[who], day, extra=preg["glu"][who] - self.glucose(day, who_idx[who]))
        # Delivery: an inpatient stay; birth weight and gestational age per infant, recorded on the mother.
        stay = rng.integers(1, 5, k)
        self.visits.add(person=pid, concept=VISIT_CONCEPTS["inpatient"], start=delivery, end=delivery + stay)
        ts = _ts(delivery, rng.uniform(0, 24, k))
        for infant in range(2):
            born = np.flatnonzero(preg["twins"]) if infant else np.arange(k)
            self._measure(who_idx[born], "birth_weight", ts[born], TYPE_EHR, preg["bw"][born, infant])
            self._measure(who_idx[born], "gestational_age_at_birth", ts[born], TYPE_EHR, preg["ga"][born])

    def _plant_alerts(self) -> None:
        """A few readings per site that must raise a rule alert (home systolic >= 180, glucose out of range)."""
        rng, p = self.rng, self.p
        present = (p.obs_end >= _SCORING) & (p.age_at(_INDEX) >= 18)
        sbp_high = SIGNALS["sbp"].alert[1]
        glu_low, glu_high = SIGNALS["glucose"].alert
        plans = (("sbp", self.has["cuff"], 3), ("glucose", self.has["meter"], 2))
        taken = np.zeros(p.n, bool)
        for name, owners, count in plans:
            pool = np.flatnonzero(present & owners & ~taken)
            if pool.size < count:  # a small site: someone present gets a device now
                pool = np.flatnonzero(present & ~taken)
            chosen = np.sort(rng.choice(pool, min(count, pool.size), replace=False))
            taken[chosen] = True
            m = chosen.size
            day = _SCORING - rng.integers(1, _PLANT_DAYS + 1, m)
            ts = _ts(day, rng.uniform(0, 24, m))
            if name == "sbp":
                value = np.round(rng.uniform(sbp_high + 6, sbp_high + 35, m))
                self.measurements.add(person=p.person_id[chosen], concept=CONCEPTS["sbp"].concept_id, ts=ts,
                                      type=TYPE_DEVICE, value=value, planted=True)
                self.measurements.add(person=p.person_id[chosen], concept=CONCEPTS["dbp"].concept_id, ts=ts,
                                      type=TYPE_DEVICE, value=np.round(rng.uniform(95, 115, m)), planted=False)
            else:
                low = np.arange(m) % 2 == 1
                value = np.where(low, np.round(rng.uniform(1.8, glu_low - 0.4, m), 1),
                                 np.round(rng.uniform(glu_high + 1.5, 28.0, m), 1))
                self.measurements.add(person=p.person_id[chosen], concept=CONCEPTS["glucose"].concept_id, ts=ts,
                                      type=TYPE_DEVICE, value=value, planted=True)
            self.planted.add(person=p.person_id[chosen], concept=np.full(m, name, dtype=object), ts=ts, value=value)

    # ---------------------------------------------------------------- tables
    def tables(self) -> dict[str, pa.Table]:
        p = self.p
        base = self.site_index * 1_000_000_000
        birth = p.birth.astype("datetime64[D]")
        out: dict[str, dict[str, np.ndarray]] = {
            "person": {
                "person_id": p.person_id,
                "gender_concept_id": np.where(p.male, CONCEPTS["male"].concept_id, CONCEPTS["female"].concept_id),
                "year_of_birth": birth.astype("datetime64[Y]").astype(int) + 1970,
                "month_of_birth": birth.astype("datetime64[M]").astype(int) % 12 + 1,
                "day_of_birth": (birth - birth.astype("datetime64[M]")).astype(int) + 1,
                "birth_datetime": _ts(p.birth, p.birth_hour),
                "care_site_id": np.full(p.n, self.site_index),
                "location_id": self.site_index * 10 + np.where(p.urban, 1, 2),
            },
            "observation_period": {
                "observation_period_id": base + np.arange(1, p.n + 1),
                "person_id": p.person_id,
                "observation_period_start_date": p.obs_start,
                "observation_period_end_date": p.obs_end,
                "period_type_concept_id": np.full(p.n, TYPE_EHR),
            },
        }
        v = self.visits.frame()
        out["visit_occurrence"] = self._numbered("visit_occurrence_id", base, {
            "person_id": v["person"], "visit_concept_id": v["concept"], "visit_start_date": v["start"],
            "visit_end_date": v["end"], "visit_type_concept_id": np.full(v["person"].size, TYPE_EHR)},
            ("person_id", "visit_start_date", "visit_concept_id"))
        c = self.conditions.frame()
        out["condition_occurrence"] = self._numbered("condition_occurrence_id", base, {
            "person_id": c["person"], "condition_concept_id": c["concept"], "condition_start_date": c["start"],
            "condition_end_date": c["end"], "condition_type_concept_id": np.full(c["person"].size, TYPE_EHR)},
            ("person_id", "condition_start_date", "condition_concept_id"))
        m = self.measurements.frame()
        value = self._quiet(m)
        out["measurement"] = self._numbered("measurement_id", base, {
            "person_id": m["person"], "measurement_concept_id": m["concept"],
            "measurement_date": m["ts"] // _US_PER_DAY, "measurement_datetime": m["ts"],
            "measurement_type_concept_id": m["type"], "value_as_number": value,
            "unit_concept_id": _map(m["concept"], _UNITS)},
            ("person_id", "measurement_datetime", "measurement_concept_id", "measurement_type_concept_id"))
        o = self.observations.frame()
        out["observation"] = self._numbered("observation_id", base, {
            "person_id": o["person"], "observation_concept_id": o["concept"], "observation_date": o["day"],
            "observation_type_concept_id": o["type"], "value_as_number": np.full(o["person"].size, np.nan)},
            ("person_id", "observation_date", "observation_concept_id"))
        d = self.drugs.frame()
        out["drug_exposure"] = self._numbered("drug_exposure_id", base, {
            "person_id": d["person"], "drug_concept_id": d["concept"], "drug_exposure_start_date": d["start"],
            "drug_exposure_end_date": d["end"], "drug_type_concept_id": np.full(d["person"].size, TYPE_EHR)},
            ("person_id", "drug_exposure_start_date", "drug_concept_id"))
        return {name: _arrow(name, columns) for name, columns in out.items()}

    @staticmethod
    def _quiet(m: dict[str, np.ndarray]) -> np.ndarray:
        """Keep every unplanted signal reading from ``_QUIET_FROM`` on strictly inside its alert range."""
        value = m["value"].astype(np.float64)
        late = (m["ts"] >= _QUIET_FROM * _US_PER_DAY) & ~m["planted"].astype(bool)
        for name, signal in SIGNALS.items():
            rows = late & (m["concept"] == CONCEPTS[name].concept_id)
            margin = _ALERT_MARGIN[name]
            value[rows] = np.clip(value[rows], signal.alert[0] + margin, signal.alert[1] - margin)
        return value

    @staticmethod
    def _numbered(id_column: str, base: int, columns: dict[str, np.ndarray], order: tuple[str, ...]
                  ) -> dict[str, np.ndarray]:
        """Rows sorted by ``order`` (stable: ties keep their drawing order), numbered from ``base + 1``."""
        sort = np.lexsort(tuple(columns[c] for c in reversed(order)))
        return {id_column: base + np.arange(1, sort.size + 1, dtype=np.int64),
                **{c: v[sort] for c, v in columns.items()}}

    # ---------------------------------------------------------------- truth
    def truth(self) -> dict[str, pa.Table]:
        p = self.p
        out: dict[str, pa.Table] = {}
        for name, task in TASKS.items():
            if task.index == "calendar":
                outcome = task.outcome[0]
                excluded_by = [self.dx[c] for c in task.exclusion if c in self.dx]
                drug_start = self.htn_drug_start if outcome == "hypertension" else self.t2d_drug_start
                first_record = np.minimum.reduce([*excluded_by, drug_start])
                index = _INDEX
                target = ((_completed_years(p.birth, index) >= 18)
                          & (p.obs_start <= index + task.lookback_days[0]) & (p.obs_end >= index)
                          & (first_record > index))
                dx = self.dx[outcome]
                positive = (dx >= index + task.time_at_risk_days[0]) & (dx <= index + task.time_at_risk_days[1])
                known = positive | (p.obs_end >= index + task.time_at_risk_days[1])
                keep = np.flatnonzero(target & known)
                risk = self.htn_risk if outcome == "hypertension" else self.t2d_risk
                out[name] = _truth_table(p.person_id[keep], np.full(keep.size, index), positive[keep], risk[keep])
            else:
                preg = self.preg
                index = preg["conception"] + INDEX_GESTATION_DAYS
                in_period = (index >= _day(DEFAULT_PERIOD[0])) & (index <= _day(DEFAULT_PERIOD[1]))
                rows = np.flatnonzero(in_period)
                rows = rows[np.lexsort((index[rows], preg["who"][rows]))]
                first = rows[np.r_[True, preg["who"][rows][1:] != preg["who"][rows][:-1]]] if rows.size else rows
                lo, hi = index[first] + task.time_at_risk_days[0], index[first] + task.time_at_risk_days[1]
                if name == "maternal_gdm_preeclampsia":
                    gdm = preg["gdm"][first] & (preg["gdm_day"][first] >= lo) & (preg["gdm_day"][first] <= hi)
                    pe = preg["pe"][first] & (preg["pe_day"][first] >= lo) & (preg["pe_day"][first] <= hi)
                    label, risk = gdm | pe, preg["p_maternal"][first]
                else:
                    at = (preg["delivery"][first] >= lo) & (preg["delivery"][first] <= hi)
                    bw = preg["bw"][first]
                    small = (bw[:, 0] < LOW_BIRTH_WEIGHT_G) | (preg["twins"][first] & (bw[:, 1] < LOW_BIRTH_WEIGHT_G))
                    label, risk = at & (small | (preg["ga"][first] < PRETERM_WEEKS)), preg["p_infant"][first]
                order = np.argsort(p.person_id[preg["who"][first]], kind="stable")
                first, label, risk = first[order], label[order], risk[order]
                out[name] = _truth_table(p.person_id[preg["who"][first]], index[first], label, risk)
        pl = self.planted.frame()
        out["planted_alerts"] = pa.table({
            "person_id": pa.array(pl["person"].astype(np.int64), _INT64),
            "concept": pa.array(pl["concept"].astype(str).tolist(), pa.string()),
            "measurement_datetime": pa.array(pl["ts"].astype(np.int64), _INT64).cast(_TS),
            "value_as_number": pa.array(pl["value"].astype(np.float64), _F64),
        }, schema=ALERT_SCHEMA)
        return out


_UNITS: Mapping[int, int] = {
    c.concept_id: CONCEPTS[c.unit].concept_id for c in CONCEPTS.values() if c.domain == "measurement"
}


def _map(values: np.ndarray, lookup: Mapping[int, int]) -> np.ndarray:
    keys = np.array(sorted(lookup), dtype=np.int64)
    mapped = np.array([lookup[int(k)] for k in keys], dtype=np.int32)
    return mapped[np.searchsorted(keys, values.astype(np.int64))]


def _truth_table(person: np.ndarray, index: np.ndarray, label: np.ndarray, risk: np.ndarray) -> pa.Table:
    return pa.table({
        "person_id": pa.array(person.astype(np.int64), _INT64),
        "index_date": pa.array(index.astype(np.int32), pa.int32()).cast(_DATE),
        "label": pa.array(label.astype(np.int8), pa.int8()),
        "true_risk": pa.array(risk.astype(np.float64), _F64),
    }, schema=TRUTH_SCHEMA)


def _arrow(name: str, columns: Mapping[str, np.ndarray]) -> pa.Table:
    schema = SCHEMAS[name]
    arrays = []
    for field in schema:
        values = np.asarray(columns[field.name])
        if field.type == _DATE:
            arrays.append(pa.array(values.astype(np.int32), pa.int32()).cast(_DATE))
        elif field.type == _TS:
            arrays.append(pa.array(values.astype(np.int64), _INT64).cast(_TS))
        elif field.type == _F64:
            arrays.append(pa.array(values.astype(np.float64), _F64, from_pandas=True))
        else:
            arrays.append(pa.array(values.astype(field.type.to_pandas_dtype()), field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _write(table: pa.Table, path: Path) -> None:
    # Through Python's file object, so a refused write is an OSError with its errno (the CLI's hints).
    try:
        with open(path, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


#: The alliance's shape (DESIGN.md): 17 cities, 140 tier-3 and 400 tier-2 hospitals.
ALLIANCE_CITIES = 17
ALLIANCE_TIER_3 = 140
ALLIANCE_TIER_2 = 400
#: What ``profile`` may name: the default pattern (every third hospital tier-3) or the alliance's.
PROFILES = ("default", "alliance")


@dataclass(frozen=True)
class HospitalPlan:
    """One hospital a profile asks for: its index (which seeds it), name, tier, city and size factor."""

    index: int
    name: str
    tier: str
    city: int  # 1-based; 0 in the default profile, which has no cities
    scale: float


def alliance_plan(n_hospitals: int, *, patients_scale: float = 1.0, tier2_scale: float = 1.0) -> list[HospitalPlan]:
    """The alliance profile's first `n_hospitals`: tier-3 and tier-2 in the alliance's 140:400 mix, over 17 cities.

    Hospitals are dealt to the cities in turn, and tier-3 ones are spread evenly through
    the list, so any prefix has the alliance's mix: 540 is the whole alliance. Tier-2
    hospitals are also scaled by `tier2_scale` (small sites make a large rehearsal cheap to
    generate, and some fall below a node's minimum cohort size, as small hospitals do).
    Names read ``c<city>-t<tier>-<number>``, e.g. ``c07-t3-012``.
    """
    total = ALLIANCE_TIER_3 + ALLIANCE_TIER_2
    plan: list[HospitalPlan] = []
    counts = {TIER_3: 0, TIER_2: 0}
    for i in range(n_hospitals):
        # Hospital i is tier-3 when it takes the running share of tier-3 hospitals past a whole one.
        tier = TIER_3 if (i + 1) * ALLIANCE_TIER_3 // total > i * ALLIANCE_TIER_3 // total else TIER_2
        counts[tier] += 1
        city = i % ALLIANCE_CITIES + 1
        scale = patients_scale * (tier2_scale if tier == TIER_2 else 1.0)
        plan.append(HospitalPlan(i + 1, f"c{city:02d}-t{tier[-1]}-{counts[tier]:03d}", tier, city, scale))
    return plan


def default_plan(n_hospitals: int, *, patients_scale: float = 1.0) -> list[HospitalPlan]:
    """The default profile: ``hospital_1`` .. ``hospital_<n>``, every third from the first tier-3."""
    return [
        HospitalPlan(i, f"hospital_{i}", TIER_3 if i % 3 == 1 else TIER_2, 0, patients_scale)
        for i in range(1, n_hospitals + 1)
    ]


def write_hospital(out: Path, plan: HospitalPlan, *, seed: int) -> OmopSite:
    """Write one planned hospital's OMOP tables and truth into ``out/<name>/``."""
    generator = _Site(plan.index, seed, plan.scale, plan.tier)
    generator.simulate()
    generator.rows()
    folder, truth = out / plan.name / "omop", out / plan.name / "truth"
    for path in (folder, truth):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise SynthError(f"cannot make folder {path}: a file is in the way ({err.strerror})") from err
    for table_name, table in generator.tables().items():
        _write(table, folder / f"{table_name}.parquet")
    for task_name, table in generator.truth().items():
        _write(table, truth / f"{task_name}.parquet")
    site = OmopSite(site=plan.name, folder=folder, truth=truth, tier=generator.mix.tier, n_patients=generator.p.n)
    logger.info("wrote %s (%s): %d patients", plan.name, site.tier, site.n_patients)
    return site


def write_omop_alliance(out: Path, *, n_hospitals: int, seed: int, patients_scale: float = 1.0) -> list[OmopSite]:
    """Write ``out/hospital_<i>/omop/<table>.parquet`` and ``out/hospital_<i>/truth/`` for each hospital.

    Parameters
    ----------
    out
        Folder to write one sub-folder per hospital into; created if missing. Existing files are overwritten.
    n_hospitals
        Number of hospitals, named ``hospital_1`` .. ``hospital_<n_hospitals>``.
    seed
        Alliance seed; with the site's index it seeds the site's generator, so the same seed writes
        byte-identical files.
    patients_scale
        Multiplies every hospital's size (at least 20 patients each).
    """
    if n_hospitals < 1:
        raise SynthError(f"--hospitals must be at least 1; found {n_hospitals}")
    if not patients_scale > 0 or patients_scale > 100:
        raise SynthError(f"--scale must be > 0 and at most 100; found {patients_scale}")
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} is a file, not a folder: name a folder to write the hospitals into")
    return [write_hospital(out, plan, seed=seed) for plan in default_plan(n_hospitals, patients_scale=patients_scale)]
