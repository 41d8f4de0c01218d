"""Clinical metrics on exact arrays: DeLong's AUC interval, calibration, reliability, threshold metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from models.clinical_metrics import (
    auc_delong,
    auc_difference_delong,
    calibration,
    clinical_summary,
    reliability_curve,
    threshold_metrics,
    within_group_auc,
)
from models.training import auc_score


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-t))


def _cohort(n: int, *, seed: int, true_shift: float = 0.0, score_gain: float = 1.0):  # type: ignore[no-untyped-def]
    """Risks sigmoid(z + true_shift) drawn for outcomes, scores sigmoid(score_gain * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.2, n)
    y = (rng.random(n) < _sigmoid(z + true_shift)).astype(np.int8)
    return _sigmoid(score_gain * z), y


# ---------------------------------------------------------------- AUC


def test_delong_on_five_patients_matches_the_hand_computation() -> None:
    # Positives 0.9, 0.6; negatives 0.7, 0.2, 0.1. Placements: V10 = (1, 2/3), V01 = (1/2, 1, 1).
    # AUC 5/6; var(V10) = 1/18, var(V01) = 1/12 (ddof 1); var = (1/18)/2 + (1/12)/3 = 1/18.
    result = auc_delong(np.array([0.9, 0.6, 0.7, 0.2, 0.1]), np.array([1, 1, 0, 0, 0]))
    assert result.auc == pytest.approx(5 / 6)
    assert result.se == pytest.approx(math.sqrt(1 / 18))
    assert result.low == pytest.approx(5 / 6 - 1.959964 * math.sqrt(1 / 18), abs=1e-6)
    assert result.high == 1.0  # 5/6 + 0.46 is kept within [0, 1]
    assert (result.positives, result.negatives) == (2, 3)


def test_delong_counts_a_tie_between_classes_as_half() -> None:
    # Positive 0.5 ties negative 0.5 and beats 0.1: placements V10 = (0.75, 1), AUC 7/8.
    result = auc_delong(np.array([0.5, 0.8, 0.5, 0.1]), np.array([1, 1, 0, 0]))
    assert result.auc == pytest.approx(7 / 8)


def test_delong_auc_equals_the_mann_whitney_auc() -> None:
    scores, labels = _cohort(500, seed=1)
    scores = np.round(scores, 2)  # plenty of ties
    assert auc_delong(scores, labels).auc == pytest.approx(auc_score(scores, labels), abs=1e-12)


def test_delong_standard_error_agrees_with_a_stratified_bootstrap() -> None:
    scores, labels = _cohort(400, seed=2)
    result = auc_delong(scores, labels)
    rng = np.random.default_rng(3)
    pos, neg = scores[labels == 1], scores[labels == 0]
    replicates = []
    for _ in range(800):
        p = rng.choice(pos, len(pos))
        q = rng.choice(neg, len(neg))
        replicates.append(auc_score(np.concatenate([p, q]), np.r_[np.ones(len(p)), np.zeros(len(q))]))
    bootstrap_se = float(np.std(replicates, ddof=1))
    # 800 replicates estimate a standard error to about ±5 %; DeLong's is asymptotically the same.
    assert 0.85 * bootstrap_se <= result.se <= 1.15 * bootstrap_se
    assert result.low < result.auc < result.high
    assert result.high - result.low == pytest.approx(2 * 1.959964 * result.se, rel=1e-6)


def test_delong_interval_covers_the_true_auc_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(4)
    # Binormal scores, unit variances, means 0 and 1: AUC = Phi(1 / sqrt(2)).
    true_auc = float(stats.norm.cdf(1 / math.sqrt(2)))
    covered = 0
    for _ in range(300):
        s = np.concatenate([rng.normal(1, 1, 60), rng.normal(0, 1, 140)])
        y = np.r_[np.ones(60), np.zeros(140)]
        r = auc_delong(_sigmoid(s), y)
        covered += r.low <= true_auc <= r.high
    assert 0.90 <= covered / 300 <= 0.99


def test_delong_is_nan_without_both_classes_and_has_no_interval_with_one_positive() -> None:
    assert math.isnan(auc_delong(np.array([0.2, 0.4]), np.array([0, 0])).auc)
    one = auc_delong(np.array([0.9, 0.2, 0.4]), np.array([1, 0, 0]))
    assert one.auc == 1.0 and math.isnan(one.se) and math.isnan(one.low)


def test_paired_comparison_agrees_with_a_paired_bootstrap() -> None:
    scores, labels = _cohort(400, seed=6)
    rng = np.random.default_rng(7)
    other = _sigmoid(np.log(scores / (1 - scores)) + rng.normal(0, 0.8, scores.size))  # a noisier copy
    result = auc_difference_delong(scores, other, labels)
    assert result.auc_a == pytest.approx(auc_score(scores, labels), abs=1e-12)
    assert result.auc_b == pytest.approx(auc_score(other, labels), abs=1e-12)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    differences = []
    for _ in range(800):
        rows = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        differences.append(auc_score(scores[rows], labels[rows]) - auc_score(other[rows], labels[rows]))
    bootstrap_se = float(np.std(differences, ddof=1))
    assert 0.85 * bootstrap_se <= result.se <= 1.15 * bootstrap_se
    # Pairing is the point: the difference is far better known than either AUC alone.
    separate = math.hypot(auc_delong(scores, labels).se, auc_delong(other, labels).se)
    assert result.se < 0.8 * separate


def test_paired_comparison_of_a_score_with_itself_or_a_monotone_copy_is_exactly_zero() -> None:
    scores, labels = _cohort(100, seed=8)
    for same in (scores, scores**3):
        result = auc_difference_delong(scores, same, labels)
        assert result.difference == 0.0 and result.se == pytest.approx(0.0, abs=1e-12) and result.z() == 0.0
    with pytest.raises(ValueError, match="two patients of each class"):
        auc_difference_delong(np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3]), np.array([1, 0, 0]))


def test_within_group_auc_pairs_patients_of_the_same_group_only() -> None:
    # Group a: AUC 1 over 1 x 2 pairs; group b: AUC 0 over 2 x 1 pairs; group c: one class, no pair.
    # Pooled, b's high scores would outrank a's positive; within groups it is (2 + 0) / 4.
    a = (np.array([0.3, 0.1, 0.2]), np.array([1, 0, 0]))
    b = (np.array([0.8, 0.7, 0.9]), np.array([1, 1, 0]))
    c = (np.array([0.5, 0.6]), np.array([0, 0]))
    assert within_group_auc([a, b, c]) == pytest.approx(0.5)
    assert within_group_auc([a]) == 1.0
    assert math.isnan(within_group_auc([c]))


# ---------------------------------------------------------------- calibration


def test_perfectly_calibrated_scores_give_slope_one_and_intercept_zero() -> None:
    scores, labels = _cohort(20000, seed=5)
    result = calibration(scores, labels)
    assert result.slope == pytest.approx(1.0, abs=0.06)
    assert result.intercept == pytest.approx(0.0, abs=0.05)


def test_overconfident_scores_give_a_slope_below_one() -> None:
    scores, labels = _cohort(20000, seed=6, score_gain=2.0)  # logits twice too spread
    assert calibration(scores, labels).slope == pytest.approx(0.5, abs=0.04)


def test_underpredicted_risk_gives_a_positive_intercept() -> None:
    scores, labels = _cohort(20000, seed=7, true_shift=0.7)  # the true log-odds are 0.7 higher
    result = calibration(scores, labels)
    assert result.intercept == pytest.approx(0.7, abs=0.06)
    assert result.slope == pytest.approx(1.0, abs=0.08)


def test_calibration_fits_equal_a_general_optimizer() -> None:
    scores, labels = _cohort(300, seed=8, score_gain=1.5, true_shift=-0.3)
    lp = np.log(scores / (1 - scores))

    def negloglik(beta: np.ndarray, offset: np.ndarray, design: np.ndarray) -> float:
        eta = design @ beta + offset
        return float(np.sum(np.logaddexp(0, eta) - labels * eta))

    ones = np.ones((len(lp), 1))
    intercept = optimize.minimize(negloglik, [0.0], args=(lp, ones), method="BFGS", options={"gtol": 1e-9}).x[0]
    slope = optimize.minimize(negloglik, [0.0, 0.0], args=(np.zeros(len(lp)), np.column_stack([ones, lp])),
                              method="BFGS", options={"gtol": 1e-9}).x[1]
    result = calibration(scores, labels)
    assert result.intercept == pytest.approx(intercept, abs=1e-5)
    assert result.slope == pytest.approx(slope, abs=1e-5)


def test_calibration_survives_saturated_scores_and_is_nan_with_one_class() -> None:
    scores, labels = _cohort(500, seed=9)
    scores[:3] = [0.0, 1.0, 1.0]
    result = calibration(scores, labels)
    assert math.isfinite(result.intercept) and math.isfinite(result.slope)
    assert math.isnan(calibration(np.array([0.1, 0.2]), np.array([1, 1])).slope)


# ---------------------------------------------------------------- reliability and thresholds


def test_reliability_curve_groups_by_predicted_risk_into_deciles() -> None:
    scores = np.arange(1, 21) / 21.0
    labels = np.r_[np.zeros(10), np.ones(10)].astype(int)
    curve = reliability_curve(scores[::-1].copy(), labels[::-1].copy())
    assert [b.patients for b in curve] == [2] * 10
    assert curve[0].predicted == pytest.approx((1 / 21 + 2 / 21) / 2)
    assert [b.observed for b in curve] == [0.0] * 5 + [1.0] * 5


def test_reliability_curve_of_no_patient_is_empty() -> None:
    assert reliability_curve(np.array([]), np.array([])) == ()


def test_reliability_curve_of_calibrated_scores_lies_near_the_diagonal() -> None:
    scores, labels = _cohort(20000, seed=10)
    for b in reliability_curve(scores, labels):
        assert b.observed == pytest.approx(b.predicted, abs=0.03)


def test_threshold_metrics_on_hand_counted_patients() -> None:
    scores = np.array([0.9, 0.6, 0.3, 0.3, 0.7, 0.2, 0.1, 0.05])
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    m = threshold_metrics(scores, labels, threshold=0.3)  # >= 0.3: positive; 0.3 counts
    assert (m.true_positives, m.false_negatives, m.false_positives, m.true_negatives) == (3, 0, 2, 3)
    assert m.sensitivity == 1.0
    assert m.specificity == pytest.approx(3 / 5)
    assert m.ppv == pytest.approx(3 / 5)
    assert m.npv == 1.0


def test_threshold_metrics_say_nan_for_an_empty_denominator() -> None:
    m = threshold_metrics(np.array([0.1, 0.2]), np.array([0, 1]), threshold=0.9)
    assert math.isnan(m.ppv) and m.sensitivity == 0.0 and m.specificity == 1.0


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc_delong(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        calibration(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="threshold"):
        threshold_metrics(np.array([0.1]), np.array([0]), threshold=1.5)


def test_clinical_summary_holds_every_metric() -> None:
    scores, labels = _cohort(1000, seed=11)
    summary = clinical_summary(scores, labels, threshold=float(labels.mean()))
    assert summary.patients == 1000 and summary.positives == int(labels.sum())
    assert summary.auc.auc == pytest.approx(auc_score(scores, labels))
    assert len(summary.reliability) == 10
    assert summary.at_threshold.threshold == pytest.approx(labels.mean())
