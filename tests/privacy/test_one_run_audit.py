"""One-run auditing's bound (Steinke, Nasr, Jagielski 2023): p-values, epsilon lower bounds, guesses from scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privacy.errors import AccountingError
from privacy.one_run_audit import audit_scores, epsilon_lower_bound, guess_options, p_value


def _all_right_bound(r: int, confidence: float) -> float:
    """With delta = 0 and every guess right, P[Binomial(r, p) >= r] = p^r: the bound is logit(level^(1/r))."""
    p = (1 - confidence) ** (1 / r)
    return math.log(p / (1 - p))


def test_without_delta_the_p_value_is_the_binomial_tail_of_randomized_response() -> None:
    p = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(canaries=1000, guesses=100, correct=80, epsilon=1.0, delta=0.0) == pytest.approx(
        stats.binom.sf(79, 100, p), rel=1e-12
    )


def test_delta_adds_the_papers_term_to_the_p_value() -> None:
    # Appendix D: beta + 2 m delta max_i P[v - i <= Binomial(r, p) < v] / i.
    m, r, v, eps, delta = 1000, 100, 80, 1.0, 1e-5
    p = math.exp(eps) / (1 + math.exp(eps))
    beta = stats.binom.sf(v - 1, r, p)
    alpha = max((stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - 1 - i, r, p)) / i for i in range(1, v + 1))
    assert p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta) == pytest.approx(beta + 2 * m * delta * alpha, rel=1e-9)
    assert alpha > 0


@pytest.mark.parametrize("r", [10, 50, 100, 500])
def test_all_guesses_right_without_delta_matches_the_closed_form(r: int) -> None:
    bound = epsilon_lower_bound(canaries=1000, guesses=r, correct=r, delta=0.0, confidence=0.95)
    assert bound == pytest.approx(_all_right_bound(r, 0.95), abs=1e-7)


def test_with_every_guess_right_the_bound_grows_with_the_number_of_guesses() -> None:
    bounds = [epsilon_lower_bound(canaries=1000, guesses=r, correct=r, delta=1e-5, confidence=0.95) for r in (10, 50, 100, 500, 1000)]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    # Ten right guesses show little; a thousand about 5.8 (the most a thousand canaries can show at 95 %).
    assert 0.9 < bounds[0] < 1.1
    assert 5.5 < bounds[-1] < 6.0


def test_half_the_guesses_right_is_no_evidence() -> None:
    assert epsilon_lower_bound(canaries=1000, guesses=200, correct=100, delta=1e-5, confidence=0.95) == 0.0
    assert epsilon_lower_bound(canaries=1000, guesses=200, correct=110, delta=1e-5, confidence=0.95) == 0.0
    assert epsilon_lower_bound(canaries=1000, guesses=0, correct=0, delta=1e-5, confidence=0.95) == 0.0


def test_the_bound_falls_as_the_confidence_rises() -> None:
    bounds = [epsilon_lower_bound(canaries=1000, guesses=100, correct=90, delta=1e-5, confidence=c) for c in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)]
    assert bounds == sorted(bounds, reverse=True) and len(set(bounds)) == len(bounds)
    assert 1.4 < bounds[3] < 1.8  # 90 of 100 right at 95 %


def test_a_larger_delta_gives_a_smaller_bound() -> None:
    bounds = [epsilon_lower_bound(canaries=1000, guesses=400, correct=380, delta=d, confidence=0.95) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert bounds == sorted(bounds, reverse=True) and bounds[0] > bounds[-1]


def test_at_the_bound_the_p_value_is_the_level() -> None:
    bound = epsilon_lower_bound(canaries=1000, guesses=300, correct=250, delta=1e-5, confidence=0.95)
    assert p_value(canaries=1000, guesses=300, correct=250, epsilon=bound, delta=1e-5) == pytest.approx(0.05, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 400), data=st.data())
def test_more_right_guesses_never_lower_the_bound(r: int, data: st.DataObject) -> None:
    v = data.draw(st.integers(0, r - 1))
    low = epsilon_lower_bound(canaries=1000, guesses=r, correct=v, delta=1e-5, confidence=0.95)
    high = epsilon_lower_bound(canaries=1000, guesses=r, correct=v + 1, delta=1e-5, confidence=0.95)
    assert 0.0 <= low <= high


def test_randomized_response_at_epsilon_one_is_rarely_bounded_above_one() -> None:
    # The bound's promise, checked empirically: canaries guessed by 1-DP randomized response
    # (right with probability e / (1 + e)) exceed 1 in at most 5 % of audits (here: 200 audits).
    rng = np.random.default_rng(3)
    p = math.e / (1 + math.e)
    right = rng.binomial(200, p, size=200)
    bounds = [epsilon_lower_bound(canaries=1000, guesses=200, correct=int(v), delta=0.0, confidence=0.95) for v in right]
    assert sum(b > 1.0 for b in bounds) <= 0.05 * len(bounds) + 3
    assert max(bounds) < 1.5 and np.median(bounds) > 0.3  # the audit sees something, never much beyond the truth


def test_audit_scores_guesses_in_for_the_top_and_out_for_the_bottom() -> None:
    included = np.zeros(1000, dtype=bool)
    included[::2] = True
    scores = np.where(included, 1.0, -1.0) + np.linspace(0, 0.1, 1000)  # perfectly separated
    bound = audit_scores(scores, included, delta=1e-5, confidence=0.95)
    assert bound.correct == bound.guesses == 400  # the largest option: 400 right of 400 guessed
    assert bound.options == len(guess_options(1000)) == 14
    # 14 options: each at level 0.05 / 14, so below the single-option bound for 400 right guesses.
    single = epsilon_lower_bound(canaries=1000, guesses=400, correct=400, delta=1e-5, confidence=0.95)
    assert 4.0 < bound.epsilon < single


def test_audit_scores_of_noise_give_no_bound() -> None:
    rng = np.random.default_rng(5)
    included = rng.random(1000) < 0.5
    bound = audit_scores(rng.normal(size=1000), included, delta=1e-5, confidence=0.95)
    assert bound.epsilon < 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"canaries": 10, "guesses": 11, "correct": 1}, "guesses must be an integer in 0..canaries"),
        ({"canaries": 10, "guesses": 5, "correct": 6}, "correct must be an integer in 0..guesses"),
        ({"canaries": 0, "guesses": 0, "correct": 0}, "canaries must be an integer >= 1"),
    ],
)
def test_impossible_counts_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(AccountingError, match=message):
        epsilon_lower_bound(**kwargs, delta=1e-5, confidence=0.95)


def test_a_confidence_outside_zero_one_is_refused() -> None:
    with pytest.raises(AccountingError, match="confidence must be in"):
        epsilon_lower_bound(canaries=10, guesses=5, correct=5, delta=1e-5, confidence=1.0)
