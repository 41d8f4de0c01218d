"""A differencing attack on the node's statistics answers, measured against the DP bound.

Two approved queries whose cohorts differ by one patient (the target: the only one aged
89 or over): "the prevalence of hypertension among everyone" and "... among those under
89". Exact aggregates behind a minimum-cell filter give the target's diagnosis away with
certainty (the difference of the two event counts). Through the node's real answer path
(``statistics.evaluate`` and ``study_round.noisy_answer`` with OpenDP's samplers), the
attacker may do no better than the release's epsilon allows: for any guess of one
patient's value between two neighbouring datasets, P(correct) <= e^eps / (1 + e^eps)
with a fair prior.

Two attackers, each over N runs of fresh noise (OpenDP cannot be seeded; the bands are
4 standard errors, a false failure well under 1e-4):

- the differencing attacker, who sees only the two noisy answers;
- the strongest attacker DP is defined against, who knows every other patient exactly and
  thresholds the target's query alone: with discrete Laplace noise its success is exactly
  the bound, which shows the measurement can see a mechanism weaker than promised.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from clients.hospital_node.statistics import evaluate
from clients.hospital_node.study_round import noisy_answer
from privacy.query import StatisticsQuery

RUNS = 1500
EPSILON = 1.0  # the whole query; the event count gets half of it


def _query(cohort_filter: str) -> StatisticsQuery:
    return StatisticsQuery.from_mapping(
        {
            "data": {"dataset": "htn_cohort", "filter": cohort_filter, "group_by": []},
            "columns": {"age": {"type": "numeric", "lower": 18, "upper": 90}, "htn": {"type": "boolean"}},
            "statistics": [{"kind": "proportion", "name": "prevalence", "column": "htn"}],
            "privacy": {"epsilon": EPSILON, "delta": 1e-6},
        },
        source="test",
    )


EVERYONE, ALL_BUT_TARGET = _query("age >= 18"), _query("age < 89")


def _cohort(target_has_htn: bool) -> pl.DataFrame:
    rng = np.random.default_rng(7)
    ages = rng.uniform(18, 88, 400)
    htn = rng.random(400) < 0.3
    return pl.DataFrame({"age": [*ages.tolist(), 89.5], "htn": [*htn.tolist(), target_has_htn]})


def _events(query: StatisticsQuery, exact: list[np.ndarray]) -> float:
    answer = noisy_answer(query, exact, min_cell_size=0)
    [events] = [r.values[0] for r in answer.releases if r.name == "events"]
    return float(events)


def _bound() -> float:
    [release] = [r for r in EVERYONE.releases() if r.name == "events"]
    assert release.sensitivity / release.scale == pytest.approx(release.epsilon) == EPSILON / 2
    return math.exp(release.epsilon) / (1 + math.exp(release.epsilon))


def test_exact_aggregates_would_give_the_target_away() -> None:
    for truth in (False, True):
        frame = _cohort(truth)
        everyone, others = evaluate(EVERYONE, frame), evaluate(ALL_BUT_TARGET, frame)
        assert int(everyone[0][0] - others[0][0]) == int(truth)  # the events vector: certainty


def test_a_differencing_attack_does_no_better_than_epsilon_allows() -> None:
    exact = {truth: (evaluate(EVERYONE, _cohort(truth)), evaluate(ALL_BUT_TARGET, _cohort(truth))) for truth in (False, True)}
    others_known = int(exact[False][1][0][0])  # every other patient's diagnoses, for the strongest attacker
    rng = np.random.default_rng(11)  # the worlds only: which value the target has in each run
    differencing = strongest = 0
    for truth in rng.random(RUNS) < 0.5:
        everyone, others = exact[bool(truth)]
        seen = _events(EVERYONE, everyone)
        differencing += (seen - _events(ALL_BUT_TARGET, others) > 0.5) == truth
        strongest += (seen - others_known > 0.5) == truth
    bound = _bound()
    band = 4 * math.sqrt(bound * (1 - bound) / RUNS)
    assert differencing / RUNS <= bound + band
    assert strongest / RUNS <= bound + band
    # The strongest attacker reaches the bound: the measurement is sharp enough to catch
    # a mechanism with less noise than its epsilon promises (and the attack is real).
    assert strongest / RUNS >= bound - band
    assert differencing / RUNS >= 0.5 - band  # no worse than a coin: it is a working attack
