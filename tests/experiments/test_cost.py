"""The privacy cost of a spec: the same numbers the nodes' accountant will compute."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import PRVAccountant

from experiments.cost import PrivacyPlan, plan_privacy
from experiments.errors import SpecError
from experiments.spec import ExperimentSpec
from privacy.accountant import epsilon, noise_for_target
from privacy.events import DISCRETE_LAPLACE, DPEvent
from tests.peak_memory import MIB, peak_memory

EXAMPLE = Path(__file__).resolve().parents[2] / "experiments" / "examples" / "hypertension.toml"


def spec_with(**tables: dict[str, Any]) -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE.read_text())
    for table, values in tables.items():
        mapping[table].update(values)
    mapping["privacy"] = {k: v for k, v in mapping["privacy"].items() if v is not None}
    return ExperimentSpec.from_mapping(mapping, source="test")


def test_the_example_costs_what_a_fresh_opacus_accountant_says() -> None:
    plan = plan_privacy(ExperimentSpec.from_toml(EXAMPLE))
    assert (plan.noise_multiplier, plan.sample_rate, plan.delta, plan.accountant) == (1.0, 0.05, 1e-5, "prv")
    assert (plan.steps_per_round, plan.rounds, plan.total_steps) == (20, 5, 100)
    assert plan.noise_from_target is False and plan.target_epsilon is None

    fresh = PRVAccountant()
    fresh.history = [(1.0, 0.05, 100)]
    assert plan.epsilon_per_site == pytest.approx(fresh.get_epsilon(delta=1e-5), rel=1e-5)
    assert plan.epsilon_per_site == pytest.approx(3.5124, abs=1e-3)


def test_the_plan_matches_privacy_accountant_round_by_round() -> None:
    spec = spec_with(federation={"local_epochs": 2, "rounds": 3}, privacy={"sample_rate": 0.07, "accountant": "rdp"})
    plan = plan_privacy(spec)
    # Opacus's Poisson loader has int(1 / 0.07) = 14 batches per epoch.
    assert (plan.steps_per_round, plan.total_steps) == (28, 84)
    rounds = [DPEvent(noise_multiplier=1.0, sample_rate=0.07, steps=28)] * 3
    assert plan.epsilon_per_site == epsilon(rounds, delta=1e-5, accountant="rdp")


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
def test_a_target_epsilon_gives_the_noise_that_reaches_it_within_one_percent() -> None:
    plan = plan_privacy(spec_with(privacy={"noise_multiplier": None, "target_epsilon": 2.0}))
    assert plan.noise_from_target is True and plan.target_epsilon == 2.0
    # Met by the ledger's accountant, which every site is charged with; the spec's (PRV)
    # planning estimate reads within 1 % of it.
    assert 2.0 - 0.01 <= plan.epsilon_training_charged_per_site <= 2.0
    assert plan.epsilon_per_site == pytest.approx(plan.epsilon_training_charged_per_site, rel=0.01)
    assert plan.noise_multiplier == noise_for_target(target_epsilon=2.0, delta=1e-5, sample_rate=0.05, steps=100)


def test_a_target_whose_noise_reads_over_the_epsilon_limit_is_a_spec_error() -> None:
    # PLD meets the target of 12 at sigma 6.87; the RDP bound the nodes guard with reads 12.85 there.
    spec = spec_with(
        federation={"rounds": 10, "local_epochs": 50},
        privacy={"noise_multiplier": None, "target_epsilon": 12.0, "sample_rate": 0.5},
    )
    with pytest.raises(SpecError) as info:
        plan_privacy(spec)
    [problem] = info.value.problems
    assert problem.startswith("privacy.target_epsilon 12 needs noise_multiplier 6.8")
    assert "is over the limit of 12; lower target_epsilon" in problem


def test_the_plan_is_a_frozen_record() -> None:
    plan = plan_privacy(spec_with(privacy={"accountant": "rdp"}))
    assert isinstance(plan, PrivacyPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rounds = 6  # type: ignore[misc]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
def test_a_target_looser_than_the_least_noise_trains_with_the_least_noise() -> None:
    # One epoch of 1000 steps at q = 0.001 would reach epsilon 12 with a noise below 0.5,
    # which the limits do not allow: the run takes 0.5 and costs less than its target.
    spec = spec_with(federation={"rounds": 1}, privacy={"sample_rate": 0.001, "noise_multiplier": None, "target_epsilon": 12.0})
    plan = plan_privacy(spec)
    assert plan.noise_multiplier == 0.5 and plan.noise_from_target
    assert 3.0 < plan.epsilon_training_charged_per_site < 3.5


def test_costing_a_spec_at_the_limits_takes_bounded_memory() -> None:
    # The most steps (1000, one epoch at the smallest sample rate), the least noise, the smallest delta.
    spec = spec_with(federation={"rounds": 1}, privacy={"sample_rate": 0.001, "noise_multiplier": 0.5, "delta": 1e-10})
    plan, peak = peak_memory(lambda: plan_privacy(spec))
    assert plan.total_steps == 1000 and 0 < plan.epsilon_per_site < 12
    assert peak < 256 * MIB


def test_the_plan_carries_the_epsilon_the_nodes_charge_beside_the_planning_estimate() -> None:
    plan = plan_privacy(ExperimentSpec.from_toml(EXAMPLE))
    # What every node's ledger will charge: the same 100 steps and the once-per-run releases
    # (discrete Laplace: the training-set size at the default count epsilon 0.1, the final
    # evaluation's histogram at the default evaluation epsilon 0.5), composed by PLD.
    count = DPEvent(10.0, 1.0, 1, mechanism=DISCRETE_LAPLACE)
    histogram = DPEvent(2.0, 1.0, 1, mechanism=DISCRETE_LAPLACE)
    assert (plan.count_epsilon, plan.evaluation_epsilon, plan.evaluate_every_round) == (0.1, 0.5, False)
    assert plan.epsilon_charged_per_site == epsilon(
        [DPEvent(1.0, 0.05, 100), count, histogram], delta=1e-5, accountant="pld"
    )
    assert plan.epsilon_training_charged_per_site == epsilon([DPEvent(1.0, 0.05, 100)], delta=1e-5, accountant="pld")
    assert plan.epsilon_training_charged_per_site == pytest.approx(3.502, abs=1e-3)
    # Composition is not additive: less than the sum, more than the rounds alone.
    assert plan.epsilon_training_charged_per_site < plan.epsilon_charged_per_site < plan.epsilon_training_charged_per_site + 0.6
    # The planning estimate (PRV) of the DP-SGD rounds agrees to about 1 %.
    assert plan.epsilon_training_charged_per_site == pytest.approx(plan.epsilon_per_site, rel=1e-2)


def test_the_count_epsilon_comes_from_the_spec_and_is_charged() -> None:
    small = plan_privacy(spec_with(privacy={"count_epsilon": 0.05}))
    large = plan_privacy(spec_with(privacy={"count_epsilon": 1.0}))
    assert (small.count_epsilon, large.count_epsilon) == (0.05, 1.0)
    assert small.epsilon_training_charged_per_site == large.epsilon_training_charged_per_site
    assert small.epsilon_charged_per_site < large.epsilon_charged_per_site


def test_evaluating_every_round_is_charged_every_round_and_once_more_for_the_final_model() -> None:
    spec = ExperimentSpec.from_toml(EXAMPLE)
    every = spec_with(privacy={"evaluate_every_round": True, "evaluation_epsilon": 0.2})
    plan = plan_privacy(every)
    count = DPEvent(10.0, 1.0, 1, mechanism=DISCRETE_LAPLACE)
    histogram = DPEvent(5.0, 1.0, 1, mechanism=DISCRETE_LAPLACE)
    assert plan.epsilon_charged_per_site == epsilon(
        [DPEvent(1.0, 0.05, 100), histogram.times(5), count, histogram], delta=1e-5, accountant="pld"
    )
    assert plan.epsilon_charged_per_site > plan_privacy(spec).epsilon_charged_per_site
