"""Aggregating per-site metrics: weights by the released (noisy) training size, epsilon is the maximum."""

from __future__ import annotations

import math

import pytest

from federation.metrics import aggregate_site_metrics


def test_metrics_weighted_by_the_released_training_size_and_epsilon_is_max() -> None:
    sites = [
        {"num-examples": 300.0, "eval-auc": 0.8, "train-loss": 0.5, "epsilon": 1.2},
        {"num-examples": 100.0, "eval-auc": 0.6, "train-loss": 0.3, "epsilon": 0.9},
    ]
    out = aggregate_site_metrics(sites)
    assert out["eval-auc"] == pytest.approx((0.8 * 300 + 0.6 * 100) / 400)
    assert out["train-loss"] == pytest.approx((0.5 * 300 + 0.3 * 100) / 400)
    assert out["epsilon"] == 1.2
    assert out["num-examples"] == 400.0


def test_undefined_site_auc_is_left_out_of_the_mean() -> None:
    sites = [
        {"num-examples": 10.0, "eval-auc": math.nan},
        {"num-examples": 30.0, "eval-auc": 0.7},
    ]
    assert aggregate_site_metrics(sites)["eval-auc"] == pytest.approx(0.7)


def test_no_sites_no_metrics() -> None:
    assert aggregate_site_metrics([]) == {}
