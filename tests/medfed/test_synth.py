"""The synthetic alliance: reproducible, heterogeneous, plausible, and labelled by a known risk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medfed.synth import (
    FEATURES,
    FOLLOW_UP,
    ID_COLUMN,
    LABEL,
    SITE_COLUMN,
    SiteCohort,
    generate_cohort,
    true_onset_logit,
    write_alliance,
)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties share ranks)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def alliance() -> list[pd.DataFrame]:
    return [generate_cohort(i, n_hospitals=6, seed=11) for i in range(1, 7)]


def test_columns_are_id_site_features_then_label(alliance: list[pd.DataFrame]) -> None:
    assert list(alliance[0].columns) == [ID_COLUMN, SITE_COLUMN, *FEATURES, LABEL, FOLLOW_UP]
    assert len(FEATURES) == 16
    assert LABEL == "htn_onset_1y"


def test_one_row_per_patient_with_site_prefixed_pseudonyms(alliance: list[pd.DataFrame]) -> None:
    for index, cohort in enumerate(alliance, start=1):
        assert cohort[ID_COLUMN].is_unique
        assert cohort[ID_COLUMN].str.fullmatch(rf"H{index}-\d{{6}}").all()
        assert set(cohort[SITE_COLUMN]) == {f"hospital_{index}"}


def test_same_seed_gives_identical_cohort() -> None:
    pd.testing.assert_frame_equal(generate_cohort(2, seed=5), generate_cohort(2, seed=5))


def test_different_seeds_give_different_cohorts() -> None:
    first, second = generate_cohort(1, seed=1), generate_cohort(1, seed=2)
    assert not first.equals(second)


def test_write_alliance_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    first = write_alliance(tmp_path / "a", n_hospitals=2, seed=3)
    second = write_alliance(tmp_path / "b", n_hospitals=2, seed=3)
    for one, other in zip(first, second, strict=True):
        assert one.csv_path.read_bytes() == other.csv_path.read_bytes()


def test_write_alliance_reports_each_site(tmp_path: Path) -> None:
    cohorts = write_alliance(tmp_path, n_hospitals=3, seed=7)
    assert [c.site for c in cohorts] == ["hospital_1", "hospital_2", "hospital_3"]
    assert [c.tier for c in cohorts] == ["tier-3", "tier-2", "tier-2"]
    for cohort in cohorts:
        assert isinstance(cohort, SiteCohort)
        assert cohort.csv_path == tmp_path / cohort.site / "cohort.csv"
        assert cohort.parquet_path == tmp_path / cohort.site / "cohort.parquet"
        frame = pd.read_csv(cohort.csv_path)
        assert cohort.n_patients == len(frame)
        assert cohort.prevalence == pytest.approx(frame[LABEL].mean())


def test_csv_and_parquet_hold_identical_content(tmp_path: Path) -> None:
    for cohort in write_alliance(tmp_path, n_hospitals=2, seed=4):
        pd.testing.assert_frame_equal(pd.read_csv(cohort.csv_path), pd.read_parquet(cohort.parquet_path))


def test_written_cohort_equals_generated_cohort(tmp_path: Path) -> None:
    [cohort] = write_alliance(tmp_path, n_hospitals=1, seed=9)
    expected = generate_cohort(1, n_hospitals=1, seed=9)
    pd.testing.assert_frame_equal(pd.read_parquet(cohort.parquet_path), expected)


def test_tier_3_sites_are_larger_and_older(alliance: list[pd.DataFrame]) -> None:
    tier_3 = [alliance[0], alliance[3]]
    tier_2 = [alliance[1], alliance[2], alliance[4], alliance[5]]
    assert all(1500 <= len(c) <= 2500 for c in tier_3)
    assert all(500 <= len(c) <= 1200 for c in tier_2)
    assert min(c["age"].mean() for c in tier_3) > max(c["age"].mean() for c in tier_2)


def test_sites_differ_in_mix_and_prevalence(alliance: list[pd.DataFrame]) -> None:
    prevalence = [c[LABEL].mean() for c in alliance]
    sodium = [c["sodium_intake_g"].mean() for c in alliance]
    smokers = [c["smoker"].mean() for c in alliance]
    assert max(prevalence) - min(prevalence) > 0.04
    assert max(sodium) - min(sodium) > 0.3
    assert max(smokers) - min(smokers) > 0.03
    assert len({len(c) for c in alliance}) == len(alliance)


@pytest.mark.parametrize("seed", [0, 7, 42])
def test_prevalence_per_site_is_in_band(seed: int) -> None:
    for index in range(1, 4):
        prevalence = generate_cohort(index, n_hospitals=3, seed=seed)[LABEL].mean()
        assert 0.08 <= prevalence <= 0.28, (index, prevalence)


RANGES = {
    "age": (18, 90),
    "sex_male": (0, 1),
    "bmi": (16, 55),
    "sbp_home_mean": (70, 200),
    "dbp_home_mean": (40, 130),
    "sbp_home_sd": (0.1, 40),
    "sbp_wearable_mean": (75, 190),
    "dbp_wearable_mean": (40, 125),
    "resting_hr_mean": (42, 115),
    "fasting_glucose": (3.5, 15),
    "smoker": (0, 1),
    "family_history_htn": (0, 1),
    "sodium_intake_g": (1, 9),
    "physical_activity_min_wk": (0, 1200),
    "alcohol_units_wk": (0, 70),
    "egfr": (15, 130),
    LABEL: (0, 1),
}


def test_values_are_physiologically_plausible(alliance: list[pd.DataFrame]) -> None:
    frame = pd.concat(alliance)
    assert not frame.isna().any().any()
    for column, (low, high) in RANGES.items():
        assert frame[column].between(low, high).all(), column
    for column in ("sex_male", "smoker", "family_history_htn", LABEL):
        assert set(frame[column].unique()) == {0, 1}, column
    # A normotensive-at-baseline cohort: home systolic means sit mostly below 140 mmHg.
    assert (frame["sbp_home_mean"] < 140).mean() > 0.97
    assert frame["sbp_home_mean"].between(110, 125).mean() > 0.3


def test_wearable_tracks_home_pressure_with_more_noise(alliance: list[pd.DataFrame]) -> None:
    frame = pd.concat(alliance)
    correlation = np.corrcoef(frame["sbp_home_mean"], frame["sbp_wearable_mean"])[0, 1]
    assert 0.5 < correlation < 0.95
    home_dbp = np.corrcoef(frame["sbp_home_mean"], frame["dbp_home_mean"])[0, 1]
    assert home_dbp > 0.5


def test_label_follows_the_true_risk_function(alliance: list[pd.DataFrame]) -> None:
    frame = pd.concat(alliance)
    score = auc(true_onset_logit(frame), frame[LABEL].to_numpy())
    assert 0.80 <= score <= 0.88


def test_true_logit_beats_any_single_feature(alliance: list[pd.DataFrame]) -> None:
    frame = pd.concat(alliance)
    labels = frame[LABEL].to_numpy()
    best_single = max(max(auc(frame[f].to_numpy(), labels), auc(-frame[f].to_numpy(), labels)) for f in FEATURES)
    assert auc(true_onset_logit(frame), labels) > best_single + 0.03


def test_high_normal_pressure_is_strongly_predictive(alliance: list[pd.DataFrame]) -> None:
    frame = pd.concat(alliance)
    high_normal = frame[frame["sbp_home_mean"].between(130, 139.9)][LABEL].mean()
    optimal = frame[frame["sbp_home_mean"] < 120][LABEL].mean()
    assert high_normal > 3 * optimal


def test_true_logit_is_deterministic_and_row_wise() -> None:
    frame = generate_cohort(1, n_hospitals=1, seed=3)
    whole = true_onset_logit(frame)
    assert whole.shape == (len(frame),)
    np.testing.assert_array_equal(true_onset_logit(frame.iloc[::-1]), whole[::-1])


def test_site_index_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"site_index must be in 1\.\.3; found 4"):
        generate_cohort(4, n_hospitals=3)
    with pytest.raises(ValueError, match="n_hospitals must be >= 1; found 0"):
        generate_cohort(1, n_hospitals=0)
