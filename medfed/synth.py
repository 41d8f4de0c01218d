"""Synthetic hospital alliance: one seeded hypertension-onset cohort per hospital.

Each hospital gets one row per patient, normotensive at baseline, with home blood
pressure monitor summaries (about two weeks of twice-daily readings), cuffless
wearable estimates, lifestyle and laboratory features, and ``htn_onset_1y``: whether
hypertension was diagnosed within a year.

``followup_days`` is the year of follow-up as a survival time: the day hypertension was
diagnosed for a patient with ``htn_onset_1y`` (earlier for higher risk), else the day
follow-up ended: 365, or earlier for the one patient in eight lost to follow-up. With
``htn_onset_1y`` as the event flag it answers "how long until hypertension" questions
(Kaplan-Meier); it is drawn after everything else, so the other columns are those of
cohorts generated before it existed.

The label follows a known risk function, :func:`true_onset_logit`, so that tests and
benchmarks can tell what a model should be able to learn:

    label ~ Bernoulli(sigmoid(true_onset_logit(row) + site_shift + unmeasured))

``site_shift`` is a small per-hospital intercept (case mix, coding habits) and
``unmeasured`` a per-patient normal term standing for risk factors nobody recorded.
The best achievable AUC is about 0.80-0.88 and prevalence 10-25% per hospital.

Hospitals differ on purpose, as a real alliance does: every third hospital, starting
with the first, is a large tier-3 hospital (1500-2500 patients, older, more
comorbidity); the others are tier-2 (500-1200 patients, younger). Each hospital's
age, sex, BMI, smoking, family-history, sodium and activity mixes, and its wearable
device's bias, are drawn from its own seeded generator, and a gradient along the
alliance (index 1 to N) shifts diet and activity so no two sites look alike.

Everything is drawn from ``numpy.random.default_rng([seed, site_index])``: the same
seed gives byte-identical CSV files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "FEATURES",
    "FOLLOW_UP",
    "ID_COLUMN",
    "LABEL",
    "SITE_COLUMN",
    "SiteCohort",
    "generate_cohort",
    "site_name",
    "site_tier",
    "true_onset_logit",
    "write_alliance",
]

logger = logging.getLogger(__name__)

FEATURES: tuple[str, ...] = (
    "age",
    "sex_male",
    "bmi",
    "sbp_home_mean",
    "dbp_home_mean",
    "sbp_home_sd",
    "sbp_wearable_mean",
    "dbp_wearable_mean",
    "resting_hr_mean",
    "fasting_glucose",
    "smoker",
    "family_history_htn",
    "sodium_intake_g",
    "physical_activity_min_wk",
    "alcohol_units_wk",
    "egfr",
)
LABEL = "htn_onset_1y"
#: Days from baseline to the diagnosis (``LABEL`` true) or to the end of follow-up (censored).
FOLLOW_UP = "followup_days"
FOLLOW_UP_DAYS = 365
# One patient in eight leaves follow-up early (moves away, changes provider).
_LOST_TO_FOLLOW_UP = 0.125
ID_COLUMN = "patient_id"
SITE_COLUMN = "site"

TIER_3 = "tier-3"
TIER_2 = "tier-2"

# Home monitoring protocol: morning and evening readings for two weeks.
HOME_READINGS = 28

# Intercept of the risk function, set so that prevalence lands in 10-25% per site.
_INTERCEPT = -2.65
# Spread of the per-site intercept shift and of the unmeasured per-patient risk.
_SITE_SHIFT_SD = 0.08
_UNMEASURED_SD = 0.45


@dataclass(frozen=True)
class SiteCohort:
    """One generated hospital cohort and where it was written."""

    site: str
    tier: str
    n_patients: int
    csv_path: Path
    parquet_path: Path
    prevalence: float


def site_name(site_index: int) -> str:
    """Name of the hospital at 1-based ``site_index``: ``hospital_<index>``."""
    return f"hospital_{site_index}"


def site_tier(site_index: int) -> str:
    """Tier of the hospital at 1-based ``site_index``: tier-3 for 1, 4, 7, ...; else tier-2."""
    return TIER_3 if site_index % 3 == 1 else TIER_2


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def true_onset_logit(df: pd.DataFrame) -> np.ndarray:
    """Log-odds of hypertension onset within a year, shared by every hospital.

    Nonlinear on purpose, so that a linear model cannot reach the best AUC:

    - age: linear, steeper after 50;
    - home systolic pressure: linear plus a sharp rise across 130 mmHg, so that
      high-normal pressure (130-139) is strongly predictive;
    - home diastolic pressure and systolic variability (SD of home readings);
    - BMI: linear, plus obesity (BMI > 30) times family history;
    - fasting glucose above 5.6 mmol/L (impaired fasting glucose);
    - sodium intake times age (salt sensitivity grows with age);
    - physical activity protective, saturating around 300 min/week;
    - smoking, alcohol, and reduced kidney function (eGFR below 90).

    The wearable estimates and resting heart rate carry no risk of their own: they
    are noisy proxies a model may use, or may be misled by.

    Parameters
    ----------
    df
        Frame holding at least the columns in :data:`FEATURES`.

    Returns
    -------
    numpy.ndarray
        One float64 log-odds per row, without the per-site shift or unmeasured risk.
    """
    age = df["age"].to_numpy(dtype=np.float64)
    bmi = df["bmi"].to_numpy(dtype=np.float64)
    sbp = df["sbp_home_mean"].to_numpy(dtype=np.float64)
    dbp = df["dbp_home_mean"].to_numpy(dtype=np.float64)
    sbp_sd = df["sbp_home_sd"].to_numpy(dtype=np.float64)
    glucose = df["fasting_glucose"].to_numpy(dtype=np.float64)
    smoker = df["smoker"].to_numpy(dtype=np.float64)
    family = df["family_history_htn"].to_numpy(dtype=np.float64)
    sodium = df["sodium_intake_g"].to_numpy(dtype=np.float64)
    activity = df["physical_activity_min_wk"].to_numpy(dtype=np.float64)
    alcohol = df["alcohol_units_wk"].to_numpy(dtype=np.float64)
    egfr = df["egfr"].to_numpy(dtype=np.float64)

    logit = np.full(age.shape, _INTERCEPT)
    logit += 0.01 * (age - 45.0) + 0.025 * np.maximum(age - 50.0, 0.0)
    logit += 0.03 * (sbp - 120.0) + 2.0 * _sigmoid((sbp - 130.0) / 1.5)
    logit += 0.03 * (dbp - 75.0)
    logit += 0.05 * (sbp_sd - 8.0)
    logit += 0.03 * (bmi - 25.0) + 0.9 * (bmi > 30.0) * family
    logit += 0.35 * family
    logit += 0.55 * np.maximum(glucose - 5.6, 0.0)
    logit += 0.018 * (sodium - 3.4) * (age - 40.0)
    logit -= 0.8 * np.minimum(activity, 300.0) / 300.0
    logit += 0.3 * smoker
    logit += 0.015 * alcohol
    logit += 0.015 * np.maximum(90.0 - egfr, 0.0)
    return logit


@dataclass(frozen=True)
class _SiteMix:
    """Population mix of one hospital, drawn from its generator."""

    tier: str
    n_patients: int
    age_mean: float
    male_share: float
    bmi_shift: float
    smoker_share: float
    family_share: float
    sodium_mean: float
    activity_mean: float
    alcohol_share: float
    wearable_sbp_bias: float
    wearable_dbp_bias: float
    intercept_shift: float


def _site_mix(rng: np.random.Generator, site_index: int, n_hospitals: int) -> _SiteMix:
    tier = site_tier(site_index)
    # 0 at the first hospital, 1 at the last: a regional gradient in diet and activity.
    position = (site_index - 1) / max(n_hospitals - 1, 1)
    if tier == TIER_3:
        n_patients = int(rng.integers(1500, 2501))
        age_mean = rng.uniform(53.0, 58.0)
        bmi_shift = rng.uniform(0.5, 1.5)
    else:
        n_patients = int(rng.integers(500, 1201))
        age_mean = rng.uniform(43.0, 49.0)
        bmi_shift = rng.uniform(-0.6, 0.6)
    return _SiteMix(
        tier=tier,
        n_patients=n_patients,
        age_mean=float(age_mean),
        male_share=float(rng.uniform(0.42, 0.56)),
        bmi_shift=float(bmi_shift),
        smoker_share=float(rng.uniform(0.12, 0.28)),
        family_share=float(rng.uniform(0.22, 0.40)),
        sodium_mean=float(3.1 + 0.8 * position + rng.normal(0.0, 0.15)),
        activity_mean=float(170.0 - 60.0 * position + rng.normal(0.0, 15.0)),
        alcohol_share=float(rng.uniform(0.45, 0.70)),
        wearable_sbp_bias=float(rng.normal(0.0, 3.0)),
        wearable_dbp_bias=float(rng.normal(0.0, 2.0)),
        intercept_shift=float(rng.normal(0.0, _SITE_SHIFT_SD)),
    )


def _truncated_normal(
    rng: np.random.Generator, mean: np.ndarray, sd: float, low: float, high: float
) -> np.ndarray:
    """Normal draws around ``mean`` redrawn until inside [low, high] (then clipped)."""
    values = rng.normal(mean, sd)
    for _ in range(50):
        outside = (values < low) | (values > high)
        if not outside.any():
            break
        values[outside] = rng.normal(mean[outside], sd)
    return np.clip(values, low, high)


def generate_cohort(site_index: int, *, n_hospitals: int = 3, seed: int = 7) -> pd.DataFrame:
    """One hospital's cohort, one row per patient; pure and seeded.

    Parameters
    ----------
    site_index
        1-based index of the hospital in the alliance; it is named ``hospital_<index>``.
    n_hospitals
        Size of the alliance; the hospital's place along it shifts its diet and activity.
    seed
        Alliance seed; with ``site_index`` it seeds the hospital's generator.

    Returns
    -------
    pandas.DataFrame
        Columns ``patient_id``, ``site``, the :data:`FEATURES` in order, ``htn_onset_1y``, then ``followup_days``.
    """
    if n_hospitals < 1:
        raise ValueError(f"n_hospitals must be >= 1; found {n_hospitals}")
    if not 1 <= site_index <= n_hospitals:
        raise ValueError(f"site_index must be in 1..{n_hospitals}; found {site_index}")
    rng = np.random.default_rng([seed, site_index])
    mix = _site_mix(rng, site_index, n_hospitals)
    n = mix.n_patients

    age = np.round(np.clip(rng.normal(mix.age_mean, 13.0, n), 18.0, 90.0))
    male = (rng.random(n) < mix.male_share).astype(np.int64)
    bmi = np.clip(
        rng.lognormal(np.log(25.5 + mix.bmi_shift), 0.16, n) + 0.03 * (age - 50.0), 16.0, 55.0
    )
    # Men smoke more; the site's share is the average over both sexes.
    smoker_p = np.clip(mix.smoker_share * np.where(male == 1, 1.3, 0.75), 0.0, 1.0)
    smoker = (rng.random(n) < smoker_p).astype(np.int64)
    family = (rng.random(n) < mix.family_share).astype(np.int64)
    sodium = np.clip(rng.normal(mix.sodium_mean, 0.9, n), 1.0, 9.0)
    active = rng.random(n) > 0.12  # about one patient in eight reports no activity at all
    activity = np.where(active, rng.gamma(2.0, mix.activity_mean / 2.0, n), 0.0)
    activity = np.round(np.clip(activity, 0.0, 1200.0))
    drinks = rng.random(n) < mix.alcohol_share
    alcohol = np.clip(np.where(drinks, rng.gamma(1.5, 4.0 + 3.0 * male, n), 0.0), 0.0, 70.0)
    glucose = (
        5.1
        + 0.012 * (age - 50.0)
        + 0.05 * (bmi - 26.0)
        + rng.normal(0.0, 0.45, n)
        # a tail of undiagnosed dysglycaemia, more common in tier-3 populations
        + (rng.random(n) < (0.10 if mix.tier == TIER_3 else 0.06)) * rng.gamma(2.0, 0.8, n)
    )
    glucose = np.clip(glucose, 3.5, 15.0)
    egfr = np.clip(108.0 - 0.85 * (age - 40.0) + rng.normal(0.0, 11.0, n), 15.0, 130.0)

    # Latent true blood pressure of a normotensive-at-baseline population.
    sbp_true = _truncated_normal(
        rng,
        113.0
        + 0.30 * (age - 45.0)
        + 0.7 * (bmi - 25.0)
        + 4.0 * male
        + 1.5 * (sodium - 3.4)
        + 2.5 * family,
        9.0,
        90.0,
        139.0,
    )
    dbp_true = _truncated_normal(rng, 0.45 * sbp_true + 20.0 + 0.2 * (bmi - 25.0), 5.0, 55.0, 89.0)

    # Home monitor: per-patient reading-to-reading variability around the true pressure.
    variability = rng.gamma(6.0, 1.4, n)
    home_sbp = sbp_true[:, None] + variability[:, None] * rng.standard_normal((n, HOME_READINGS))
    home_dbp = dbp_true[:, None] + 0.55 * variability[:, None] * rng.standard_normal(
        (n, HOME_READINGS)
    )
    home_sbp = np.clip(home_sbp, 70.0, 200.0)
    home_dbp = np.clip(home_dbp, 40.0, 130.0)

    # Cuffless wearable: the site's device bias, a per-patient calibration error, noise.
    wear_sbp = sbp_true + mix.wearable_sbp_bias + rng.normal(0.0, 7.0, n)
    wear_dbp = dbp_true + mix.wearable_dbp_bias + rng.normal(0.0, 5.0, n)

    resting_hr = np.clip(
        74.0 - 0.02 * activity + 4.0 * smoker - 2.0 * male + rng.normal(0.0, 8.0, n), 42.0, 115.0
    )

    ids = np.sort(rng.choice(1_000_000, size=n, replace=False))
    frame = pd.DataFrame(
        {
            ID_COLUMN: [f"H{site_index}-{i:06d}" for i in ids],
            SITE_COLUMN: site_name(site_index),
            "age": age.astype(np.int64),
            "sex_male": male,
            "bmi": np.round(bmi, 1),
            "sbp_home_mean": np.round(home_sbp.mean(axis=1), 1),
            "dbp_home_mean": np.round(home_dbp.mean(axis=1), 1),
            "sbp_home_sd": np.round(home_sbp.std(axis=1, ddof=1), 2),
            "sbp_wearable_mean": np.round(np.clip(wear_sbp, 75.0, 190.0), 1),
            "dbp_wearable_mean": np.round(np.clip(wear_dbp, 40.0, 125.0), 1),
            "resting_hr_mean": np.round(resting_hr, 1),
            "fasting_glucose": np.round(glucose, 1),
            "smoker": smoker,
            "family_history_htn": family,
            "sodium_intake_g": np.round(sodium, 2),
            "physical_activity_min_wk": activity.astype(np.int64),
            "alcohol_units_wk": np.round(alcohol, 1),
            "egfr": np.round(egfr).astype(np.int64),
        }
    )
    # The label is drawn from the rounded values, exactly what a reader of the file sees.
    logit = true_onset_logit(frame) + mix.intercept_shift + rng.normal(0.0, _UNMEASURED_SD, n)
    risk = _sigmoid(logit)
    frame[LABEL] = (rng.random(n) < risk).astype(np.int64)
    # Follow-up, drawn last: cases are diagnosed earlier the higher their risk; others are
    # followed to the year's end unless lost to follow-up before it.
    onset = np.ceil(FOLLOW_UP_DAYS * rng.beta(1.0 + 2.0 * (1.0 - risk), 1.5, n))
    lost = rng.random(n) < _LOST_TO_FOLLOW_UP
    left = np.ceil(rng.uniform(30.0, FOLLOW_UP_DAYS, n))
    days = np.where(frame[LABEL] == 1, onset, np.where(lost, left, FOLLOW_UP_DAYS))
    frame[FOLLOW_UP] = np.clip(days, 1, FOLLOW_UP_DAYS).astype(np.int64)
    return frame


def write_alliance(out: Path, *, n_hospitals: int = 3, seed: int = 7) -> list[SiteCohort]:
    """Write ``out/hospital_<i>/cohort.csv`` and ``cohort.parquet`` for each hospital.

    Both files hold the same rows and columns. Existing files are overwritten.

    Parameters
    ----------
    out
        Folder to write one sub-folder per hospital into; created if missing.
    n_hospitals
        Number of hospitals, named ``hospital_1`` .. ``hospital_<n_hospitals>``.
    seed
        Alliance seed; the same seed writes byte-identical CSV files.
    """
    if n_hospitals < 1:
        raise ValueError(f"n_hospitals must be >= 1; found {n_hospitals}")
    cohorts: list[SiteCohort] = []
    for site_index in range(1, n_hospitals + 1):
        frame = generate_cohort(site_index, n_hospitals=n_hospitals, seed=seed)
        site = site_name(site_index)
        folder = out / site
        folder.mkdir(parents=True, exist_ok=True)
        csv_path = folder / "cohort.csv"
        parquet_path = folder / "cohort.parquet"
        frame.to_csv(csv_path, index=False, lineterminator="\n")
        frame.to_parquet(parquet_path, index=False)
        cohort = SiteCohort(
            site=site,
            tier=site_tier(site_index),
            n_patients=len(frame),
            csv_path=csv_path,
            parquet_path=parquet_path,
            prevalence=float(frame[LABEL].mean()),
        )
        logger.info(
            "wrote %s (%s): %d patients, prevalence %.3f",
            site,
            cohort.tier,
            cohort.n_patients,
            cohort.prevalence,
        )
        cohorts.append(cohort)
    return cohorts
