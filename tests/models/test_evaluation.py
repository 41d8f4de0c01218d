"""Binned model quality: what the coordinator computes from the sites' score histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation import SCORE_BINS, SCORE_EDGES, binned_quality, score_histogram
from models.training import auc_score


def _cohort(rng: np.random.Generator, n: int, prevalence: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated scores: each patient's outcome is drawn with the probability the model gives it."""
    logits = rng.normal(np.log(prevalence / (1 - prevalence)), 1.5, n)
    scores = 1 / (1 + np.exp(-logits))
    return scores, (rng.random(n) < scores).astype(int)


def test_the_bins_are_fixed_logit_steps_with_one_half_as_an_edge() -> None:
    assert SCORE_BINS == 20 and len(SCORE_EDGES) == 19
    assert SCORE_EDGES[9] == 0.5 and SCORE_EDGES[0] == pytest.approx(1 / (1 + math.exp(4.5)))
    histogram = score_histogram(np.array([0.0, 0.5, 0.4999, 1.0, 0.5]), np.array([0, 1, 0, 1, 0]))
    assert histogram.shape == (2, SCORE_BINS) and histogram.sum() == 5
    assert (histogram[0, 0], histogram[0, 9], histogram[0, 10], histogram[1, 10], histogram[1, 19]) == (1, 1, 1, 1, 1)


def test_binned_metrics_match_the_exact_ones_within_the_binning_error() -> None:
    rng = np.random.default_rng(3)
    scores, labels = _cohort(rng, 20_000)
    quality = binned_quality(score_histogram(scores, labels))
    assert quality.auc == pytest.approx(auc_score(scores, labels), abs=0.005)  # ties within a bin count half
    assert quality.accuracy == pytest.approx(float(((scores >= 0.5) == labels).mean()), abs=1e-12)  # 0.5 is an edge
    exact_loss = float(-np.mean(labels * np.log(scores) + (1 - labels) * np.log1p(-scores)))
    assert quality.loss == pytest.approx(exact_loss, rel=0.02)
    assert quality.brier == pytest.approx(float(np.mean((scores - labels) ** 2)), rel=0.02)
    assert (quality.negatives, quality.positives) == (float((labels == 0).sum()), float(labels.sum()))


def test_a_calibrated_model_calibrates_in_every_well_filled_bin() -> None:
    rng = np.random.default_rng(4)
    scores, labels = _cohort(rng, 50_000)
    quality = binned_quality(score_histogram(scores, labels))
    for b in quality.calibration:
        if b.patients >= 2000:  # binomial sd <= 0.011
            assert b.low <= b.predicted <= b.high
            assert abs(b.observed - b.predicted) < 0.05, b


def test_noisy_counts_stay_in_the_sums_and_one_class_makes_auc_undefined_not_dropped() -> None:
    noisy = np.zeros((2, SCORE_BINS))
    noisy[0, 3], noisy[0, 4], noisy[1, 2] = 40.0, -7.0, -3.0  # the positives' noisy total is not positive
    quality = binned_quality(noisy)
    assert math.isnan(quality.auc) and (quality.negatives, quality.positives) == (33.0, -3.0)
    assert quality.accuracy == 1.0  # 33 / 30 right, kept in range
    assert [b.patients for b in quality.calibration] == [40.0]  # only bins whose noisy count is positive


def test_the_auc_of_noisy_histograms_is_unbiased_where_clamping_would_pull_it_to_one_half() -> None:
    # Three sites' worth of noise (discrete Laplace, scale 2, per bin) on 600 validation patients.
    rng = np.random.default_rng(8)
    scores, labels = _cohort(rng, 600)
    exact = score_histogram(scores, labels)
    truth = binned_quality(exact).auc
    p = 1 - math.exp(-1 / 2.0)
    draws, clamped = [], []
    for _ in range(400):
        noise = sum(rng.geometric(p, exact.shape) - rng.geometric(p, exact.shape) for _ in range(3))
        draws.append(binned_quality(exact + noise).auc)
        clamped.append(binned_quality(np.maximum(exact + noise, 0)).auc)
    assert abs(float(np.mean(draws)) - truth) < 0.01
    assert float(np.mean(clamped)) < truth - 0.02  # what clamping each bin first would report


def test_pooling_histograms_is_the_auc_of_all_patients_together() -> None:
    # A site whose validation split holds one class has no AUC of its own, but counts in the pool.
    rng = np.random.default_rng(5)
    a_scores, a_labels = _cohort(rng, 4000, prevalence=0.2)
    b_scores = rng.uniform(0.05, 0.2, 300)
    b_labels = np.zeros(300, dtype=int)
    site_b = binned_quality(score_histogram(b_scores, b_labels))
    assert math.isnan(site_b.auc)
    pooled = binned_quality(score_histogram(a_scores, a_labels) + score_histogram(b_scores, b_labels))
    together = auc_score(np.concatenate([a_scores, b_scores]), np.concatenate([a_labels, b_labels]))
    assert pooled.auc == pytest.approx(together, abs=0.005)


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [([0.2, 1.2], [0, 1], "probabilities in \\[0, 1\\]"), ([0.2, 0.3], [0, 2], "0 or 1"), ([0.2], [0, 1], "1 scores for 2 labels")],
)
def test_bad_scores_or_labels_are_refused(scores: list[float], labels: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_histogram(np.array(scores), np.array(labels))


def test_a_histogram_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="shape \\(2, 20\\)"):
        binned_quality(np.zeros((2, 10)))
