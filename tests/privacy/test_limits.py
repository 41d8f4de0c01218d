"""The limits on one experiment's schedule, as the node checks them."""

from __future__ import annotations

from privacy import limits
from privacy.limits import schedule_problems


def test_a_schedule_at_every_limit_has_no_problem() -> None:
    assert schedule_problems(rounds=1, steps=1000, sample_rate=0.001, noise_multiplier=0.5, delta=1e-10, local_epochs=1) == []
    assert schedule_problems(rounds=1000, steps=1, sample_rate=1.0, noise_multiplier=50.0, delta=0.5, local_epochs=100) == []


def test_every_problem_is_named_at_once() -> None:
    assert schedule_problems(rounds=10**9, steps=0, sample_rate=1e-9, noise_multiplier=0.1, delta=0.0, local_epochs=True) == [
        "local_epochs must be an integer in 1..100; found True",
        "steps must be an integer in 1..1000; found 0",
        "rounds must be an integer in 1..1000; found 1000000000",
        "noise_multiplier must be >= 0.5; found 0.1",
        "sample_rate must be in [0.001, 1]; found 1e-09",
        "delta must be in [1e-10, 1); found 0.0",
    ]


def test_the_steps_in_all_are_bounded_when_each_count_is_within_its_own() -> None:
    assert schedule_problems(rounds=2, steps=1000, sample_rate=0.001, noise_multiplier=1.0, delta=1e-5) == [
        "rounds x steps must be <= 1000 DP-SGD steps in all; found 2000"
    ]


def test_values_that_are_not_numbers_are_problems_not_errors() -> None:
    problems = schedule_problems(rounds="5", steps=None, sample_rate=float("nan"), noise_multiplier="1", delta=float("inf"))
    assert len(problems) == 5


def test_an_epoch_at_the_smallest_sample_rate_fits_in_one_round() -> None:
    assert int(1 / limits.MIN_SAMPLE_RATE) <= limits.MAX_STEPS_PER_ROUND <= limits.MAX_TOTAL_STEPS
