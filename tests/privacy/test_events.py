"""DP events of the statistics releases: Gaussian, Laplace and discrete Laplace on the whole dataset.

DP-SGD's events are tested with the accountant (tests/privacy/test_accountant.py).
"""

from __future__ import annotations

import re

import pytest

from privacy.errors import AccountingError
from privacy.events import (
    DISCRETE_LAPLACE,
    GAUSSIAN,
    LAPLACE,
    MECHANISMS,
    POISSON_GAUSSIAN,
    WHOLE_DATASET_MECHANISMS,
    DPEvent,
)


def test_the_mechanisms_are_dp_sgds_and_the_three_release_mechanisms() -> None:
    assert MECHANISMS == ("poisson-gaussian", "gaussian", "laplace", "discrete-laplace")
    assert (POISSON_GAUSSIAN, GAUSSIAN, LAPLACE, DISCRETE_LAPLACE) == MECHANISMS
    assert WHOLE_DATASET_MECHANISMS == ("gaussian", "laplace", "discrete-laplace")


@pytest.mark.parametrize("mechanism", WHOLE_DATASET_MECHANISMS)
def test_a_release_event_is_one_application_on_the_whole_dataset(mechanism: str) -> None:
    # A Laplace sum of L1 sensitivity 4 with scale 8: noise multiplier 2 (epsilon 0.5).
    event = DPEvent(noise_multiplier=8 / 4, sample_rate=1, steps=1, mechanism=mechanism)
    assert (event.noise_multiplier, event.sample_rate, event.steps, event.mechanism) == (2.0, 1.0, 1, mechanism)
    assert isinstance(event.sample_rate, float)


@pytest.mark.parametrize("mechanism", WHOLE_DATASET_MECHANISMS)
def test_a_release_event_refuses_a_sample_rate_below_one_by_name(mechanism: str) -> None:
    message = f"sample_rate must be 1 for the {mechanism} mechanism (it releases from the whole dataset); found 0.5"
    with pytest.raises(AccountingError, match=f"^{re.escape(message)}$"):
        DPEvent(noise_multiplier=2.0, sample_rate=0.5, steps=1, mechanism=mechanism)


def test_a_release_event_reports_every_problem_at_once_without_repeating_the_rate() -> None:
    with pytest.raises(AccountingError) as info:
        DPEvent(noise_multiplier=0, sample_rate=1.5, steps=0, mechanism="laplace")
    assert str(info.value) == (
        "noise_multiplier must be > 0; found 0; sample_rate must be in (0, 1]; found 1.5; steps must be >= 1; found 0"
    )


def test_events_of_different_mechanisms_with_equal_parameters_differ() -> None:
    laplace = DPEvent(2.0, 1.0, 1, LAPLACE)
    assert laplace != DPEvent(2.0, 1.0, 1, DISCRETE_LAPLACE)
    assert laplace != DPEvent(2.0, 1.0, 1, GAUSSIAN)
    assert laplace != DPEvent(2.0, 1.0, 1)
    assert len({laplace, DPEvent(2.0, 1.0, 1, DISCRETE_LAPLACE), DPEvent(2.0, 1, 1, "laplace")}) == 2


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_times_keeps_the_mechanism(mechanism: str) -> None:
    event = DPEvent(2.0, 1.0, 1, mechanism)
    assert event.times(5) == DPEvent(2.0, 1.0, 5, mechanism)


def test_a_count_event_is_discrete_laplace_of_scale_one_over_epsilon_and_costs_its_epsilon() -> None:
    from privacy.accountant import epsilon
    from privacy.events import DISCRETE_LAPLACE, count_event

    event = count_event(epsilon=0.1)
    assert event == DPEvent(noise_multiplier=10.0, sample_rate=1.0, steps=1, mechanism=DISCRETE_LAPLACE)
    assert epsilon([event], delta=1e-5, accountant="pld") == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), True])
def test_a_count_event_refuses_an_epsilon_that_is_not_positive_and_finite(value: object) -> None:
    from privacy.events import count_event

    with pytest.raises(AccountingError, match="count epsilon must be a finite number > 0"):
        count_event(epsilon=value)  # type: ignore[arg-type]
