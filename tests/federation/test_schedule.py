"""The submission's schedule: every node exactly k = ceil(f x R) rounds, the rounds balanced, reproducible."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.protocol import schedule_problems
from federation.schedule import RoundSchedule, draw_schedule, schedule_seed
from privacy.limits import rounds_per_node


@settings(max_examples=200, deadline=None)
@given(
    nodes=st.sets(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=60),
    rounds=st.integers(min_value=1, max_value=40),
    fraction=st.floats(min_value=0.01, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**63),
)
def test_every_node_gets_k_distinct_rounds_and_the_rounds_are_balanced(nodes, rounds, fraction, seed) -> None:
    schedule = draw_schedule(nodes, rounds=rounds, fraction=fraction, seed=seed)
    k = rounds_per_node(rounds, fraction)
    assert schedule.per_node == k and set(schedule.nodes) == nodes
    for node in nodes:
        mine = schedule.of(node)
        assert len(mine) == k == len(set(mine)) and all(1 <= r <= rounds for r in mine)
        assert schedule_problems(mine, rounds=rounds, fraction=fraction) == []  # what a node accepts
    sizes = [len(schedule.participants(r)) for r in range(1, rounds + 1)]
    low, high = math.floor(len(nodes) * k / rounds), math.ceil(len(nodes) * k / rounds)
    assert all(low <= size <= high for size in sizes), sizes
    assert sum(sizes) == len(nodes) * k


def test_the_same_submission_draws_the_same_schedule_and_another_a_different_one() -> None:
    nodes = range(100, 112)
    seed = schedule_seed("a" * 64, "submission-1")
    first = draw_schedule(nodes, rounds=8, fraction=0.25, seed=seed)
    assert draw_schedule(reversed(nodes), rounds=8, fraction=0.25, seed=seed) == first  # order of the ids does not matter
    other = draw_schedule(nodes, rounds=8, fraction=0.25, seed=schedule_seed("a" * 64, "submission-2"))
    assert other.nodes != first.nodes
    assert RoundSchedule.from_mapping(first.to_mapping()) == first  # as the checkpoint keeps it


def test_fraction_one_is_every_node_every_round() -> None:
    schedule = draw_schedule([3, 1, 2], rounds=4, fraction=1.0, seed=7)
    assert schedule.per_node == 4
    assert all(schedule.of(n) == (1, 2, 3, 4) for n in (1, 2, 3))
    assert all(schedule.participants(r) == [1, 2, 3] for r in range(1, 5))


@pytest.mark.parametrize(
    ("rounds", "fraction", "k"),
    [(4, 0.5, 2), (3, 0.5, 2), (30, 0.1, 3), (10, 0.3, 3), (5, 0.01, 1), (7, 1.0, 7)],
)
def test_rounds_per_node_is_the_ceiling_without_float_slop(rounds: int, fraction: float, k: int) -> None:
    assert rounds_per_node(rounds, fraction) == k


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_a_fraction_outside_zero_to_one_is_refused(fraction: object) -> None:
    with pytest.raises(ValueError, match="federation.fraction_per_round must be a number in \\(0, 1\\]"):
        rounds_per_node(4, fraction)  # type: ignore[arg-type]
    assert schedule_problems((1, 2), rounds=4, fraction=fraction)[0].startswith("the signed spec's federation.fraction_per_round")


def test_a_schedule_beyond_the_signed_spec_is_named_problem_by_problem() -> None:
    assert schedule_problems((1, 2, 3), rounds=4, fraction=0.5) == [
        "the schedule names 3 round(s); the signed spec's federation.fraction_per_round 0.5 of 4 round(s) gives every node exactly 2"
    ]
    assert schedule_problems((2, 2), rounds=4, fraction=0.5) == ["the schedule names round(s) 2 more than once"]
    assert schedule_problems((0, 5), rounds=4, fraction=0.5) == ["round(s) 0, 5 of the schedule lie outside 1..4 (federation.rounds)"]
