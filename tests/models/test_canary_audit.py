"""Dirac canaries: each canary alone on its coordinate, scored from the moves of its weight."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.canary_audit import TrainingPhase, canary_scale, dirac_canary_scores


def _cohort(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 1.0).float()


def _included(m: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random(m) < 0.5


def test_without_dp_an_excluded_canary_never_moves_and_a_sampled_one_always_does() -> None:
    # Patients' rows are zero on the canaries' inputs, so nothing but canary i moves weight f + i.
    x, y = _cohort()
    included = _included(200)
    scores = dirac_canary_scores(
        x, y, included, phases=[TrainingPhase(None, 0.1, 30)], max_grad_norm=1.0, learning_rate=0.5,
        generator=torch.Generator().manual_seed(2),
    )
    assert (scores[~included] == 0.0).all()
    assert (scores[included] >= 0.0).all()
    # A canary that is in is sampled at least once in 30 steps at rate 0.1 with probability 1 - 0.9^30 = 96 %.
    assert 0.9 < (scores[included] > 0).mean() <= 1.0


def test_with_dp_the_included_canaries_score_higher_on_average() -> None:
    x, y = _cohort()
    included = _included(400)
    torch.manual_seed(3)
    scores = dirac_canary_scores(
        x, y, included, phases=[TrainingPhase(0.8, 0.1, 30)], max_grad_norm=1.0, learning_rate=0.5,
        generator=torch.Generator().manual_seed(4),
    )
    assert np.isfinite(scores).all()
    # Summed per-step log-likelihood ratios: in canaries gain about T q^2 (exp(g^2 / sd^2) - 1) = 1.1 more than
    # out ones while their gradient is at the norm (g = 1, sd = 0.8), less once it is not.
    gap = scores[included].mean() - scores[~included].mean()
    assert 0.4 < gap < 1.5


def test_the_phases_follow_each_other_in_one_training() -> None:
    x, y = _cohort()
    included = _included(100)
    kwargs = {"max_grad_norm": 1.0, "learning_rate": 0.5}
    one = dirac_canary_scores(x, y, included, phases=[TrainingPhase(None, 0.1, 20)], generator=torch.Generator().manual_seed(5), **kwargs)
    two = dirac_canary_scores(
        x, y, included, phases=[TrainingPhase(None, 0.1, 10), TrainingPhase(None, 0.1, 10)],
        generator=torch.Generator().manual_seed(5), **kwargs,
    )
    np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-9)


def test_the_canary_scale_aims_the_logits_drift_at_one_within_its_range() -> None:
    phase = TrainingPhase(1.0, 0.05, 60)
    # Weight noise over 60 steps: 0.5 * 1 * 1 * sqrt(60) / round(0.05 * 1000) = 0.0775; 1 / that = 12.9.
    assert canary_scale([phase], max_grad_norm=1.0, learning_rate=0.5, expected_size=1000) == pytest.approx(
        50 / (0.5 * math.sqrt(60)), rel=1e-9
    )
    assert canary_scale([phase], max_grad_norm=1.0, learning_rate=50.0, expected_size=1000) == 3.0  # the least: 3 x the norm
    assert canary_scale([phase], max_grad_norm=2.0, learning_rate=1e-4, expected_size=1000) == 60.0  # the most: 30 x


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ([], "at least one phase"),
        ([TrainingPhase(1.0, 0.1, 5), TrainingPhase(None, 0.1, 5)], "all private or all without DP"),
    ],
)
def test_bad_phases_are_refused(phases: list[TrainingPhase], message: str) -> None:
    x, y = _cohort(20)
    with pytest.raises(ValueError, match=message):
        dirac_canary_scores(x, y, _included(10), phases=phases, max_grad_norm=1.0, learning_rate=0.5)


def test_a_phase_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        TrainingPhase(0.0, 0.1, 5)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        TrainingPhase(1.0, 0.1, 0)
