"""Aggregating per-site metrics: sums, the largest epsilon, and quality pooled from the score histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from federation.metrics import QUALITY_METRICS, aggregate_site_metrics, pooled_quality, site_quality
from federation.protocol import SCORE_METRICS, ProtocolError, score_metrics
from models.evaluation import SCORE_BINS, score_histogram
from models.training import auc_score


def _site(rng: np.random.Generator, n: int, prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(math.log(prevalence / (1 - prevalence)), 1.5, n)
    scores = 1 / (1 + np.exp(-logits))
    return scores, (rng.random(n) < scores).astype(int)


def test_sizes_are_summed_and_epsilon_is_the_largest() -> None:
    sites = [{"num-examples": 300.0, "epsilon": 1.2, "steps": 20.0}, {"num-examples": 101.0, "epsilon": 0.9, "steps": 20.0}]
    assert aggregate_site_metrics(sites) == {"num-examples": 401.0, "epsilon": 1.2, "steps": 40.0}


def test_the_pooled_auc_is_that_of_all_validation_patients_not_a_mean_of_site_aucs() -> None:
    rng = np.random.default_rng(11)
    big, small = _site(rng, 5000, 0.4), _site(rng, 400, 0.05)
    replies = [score_metrics(score_histogram(*big).tolist()), score_metrics(score_histogram(*small).tolist())]
    out = aggregate_site_metrics(replies)
    together = auc_score(np.concatenate([big[0], small[0]]), np.concatenate([big[1], small[1]]))
    assert out["eval-auc"] == pytest.approx(together, abs=0.005)
    assert set(out) == set(QUALITY_METRICS)  # the bins themselves are not repeated
    assert out["eval-patients"] == 5400.0
    per_site = [site_quality(r)["eval-auc"] for r in replies]
    assert per_site[0] == pytest.approx(auc_score(*big), abs=0.005)
    assert per_site[1] == pytest.approx(auc_score(*small), abs=0.01)


def test_a_site_with_one_class_has_no_auc_but_counts_in_the_pool() -> None:
    only_negatives = np.zeros((2, SCORE_BINS))
    only_negatives[0, 2] = 80.0
    rng = np.random.default_rng(12)
    other = score_histogram(*_site(rng, 2000, 0.3))
    assert math.isnan(site_quality(score_metrics(only_negatives.tolist()))["eval-auc"])
    pooled = pooled_quality([score_metrics(only_negatives.tolist()), score_metrics(other.tolist())])
    assert pooled is not None and pooled.negatives == float(other[0].sum()) + 80.0 and 0.5 < pooled.auc < 1.0


def test_a_reply_with_part_of_a_histogram_is_refused() -> None:
    partial = dict(list(score_metrics(np.ones((2, SCORE_BINS)).tolist()).items())[:5])
    with pytest.raises(ProtocolError, match="5 of the 40 bins"):
        site_quality(partial)
    assert site_quality({"epsilon": 1.0}) == {} and pooled_quality([{"epsilon": 1.0}]) is None
    assert len(SCORE_METRICS) == 2 * SCORE_BINS


def test_no_sites_no_metrics() -> None:
    assert aggregate_site_metrics([]) == {}
