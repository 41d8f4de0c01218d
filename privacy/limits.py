"""Limits on what one experiment may ask of a node's accountant: rounds, steps, sampling, delta, epsilon.

A spec's counts multiply into the work of costing it: ``rounds x local_epochs x
steps_per_epoch(sample_rate)`` DP-SGD steps, composed by a numerical accountant whose
grid grows with the square root of the steps, with ``log(1/delta)`` and with the
epsilon it has to cover. Unbounded, one signed spec (``rounds = 1e9``,
``sample_rate = 1e-9``) took a node's memory. These limits bound the parameters
themselves, so that costing any spec within them takes under a second on a 2-core
machine with either accountant (PLD, which the nodes charge with, and Opacus's PRV, the
partner's planning estimate; measured in BENCHMARKS.md), in memory that does not
depend on the number of rounds.

``experiments.spec`` refuses a spec outside them and the node refuses an instruction
outside them (``federation.protocol.TrainInstruction``), each on its own: the node never
trusts the coordinator to have checked. Plain numbers and :func:`schedule_problems`,
the node's check of them, with no import, so that the wire contract can read them
without importing an accountant.
"""

from __future__ import annotations

import math

__all__ = [
    "DEFAULT_COUNT_EPSILON",
    "DEFAULT_EVALUATION_EPSILON",
    "MAX_COUNT_EPSILON",
    "MAX_EVALUATION_EPSILON",
    "MAX_EPSILON",
    "MAX_LOCAL_EPOCHS",
    "MAX_ROUNDS",
    "MAX_STEPS_PER_ROUND",
    "MAX_TOTAL_STEPS",
    "MIN_DELTA",
    "MIN_NOISE_MULTIPLIER",
    "MIN_SAMPLE_RATE",
    "fraction_problem",
    "rounds_per_node",
    "schedule_problems",
]

#: The epsilon of a training run's one release of each site's training-set size (a
#: discrete Laplace count, reused to weight every round), when the spec does not say.
DEFAULT_COUNT_EPSILON = 0.1
#: The most a spec's ``privacy.count_epsilon`` may be.
MAX_COUNT_EPSILON = 1.0
#: The epsilon of a training run's release of each site's validation scores (a histogram
#: by label, discrete Laplace), in the final round, when the spec does not say.
DEFAULT_EVALUATION_EPSILON = 0.5
#: The most a spec's ``privacy.evaluation_epsilon`` may be (per evaluation).
MAX_EVALUATION_EPSILON = 2.0
#: Federated rounds of one experiment.
MAX_ROUNDS = 1000
#: Local epochs per round.
MAX_LOCAL_EPOCHS = 100
#: The smallest Poisson sampling rate: an epoch is at most 1 / MIN_SAMPLE_RATE = 1000 steps.
MIN_SAMPLE_RATE = 1e-3
#: DP-SGD steps a node takes in one round (local_epochs x steps per epoch).
MAX_STEPS_PER_ROUND = 1000
#: DP-SGD steps a node takes in the whole experiment (rounds x steps per round).
MAX_TOTAL_STEPS = 1000
#: The smallest noise multiplier: below it sampling amplifies little, a step's privacy
#: loss spreads wide, and the accountants' grids with it.
MIN_NOISE_MULTIPLIER = 0.5
#: The smallest delta an experiment may be accounted at.
MIN_DELTA = 1e-10
#: The largest epsilon one experiment may cost a dataset at its delta, by the RDP bound
#: (dp-accounting's, which is never tighter than PLD or PRV and costs the same at any
#: step count); a target_epsilon may not exceed it either. Policies cap experiments at
#: 10 by default; the headroom lets a target of 10 pass RDP's looser reading.
MAX_EPSILON = 12.0


def schedule_problems(
    *, rounds: object, steps: object, sample_rate: object, noise_multiplier: object, delta: object, local_epochs: object = 1
) -> list[str]:
    """Every way a schedule (`steps` DP-SGD steps per round) lies beyond the limits; empty within them.

    One message per problem, named as a training instruction names its fields:
    ``rounds must be an integer in 1..1000; found 1000000000``. The epsilon limit needs
    an accountant and is checked by the caller (:func:`privacy.accountant.epsilon_bound`).
    """
    problems = []
    counts = {"local_epochs": (local_epochs, MAX_LOCAL_EPOCHS), "steps": (steps, MAX_STEPS_PER_ROUND), "rounds": (rounds, MAX_ROUNDS)}
    for name, (value, most) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            problems.append(f"{name} must be an integer in 1..{most}; found {value!r}")
    if not problems and rounds * steps > MAX_TOTAL_STEPS:  # type: ignore[operator]
        problems.append(f"rounds x steps must be <= {MAX_TOTAL_STEPS} DP-SGD steps in all; found {rounds * steps}")  # type: ignore[operator]
    if not _is_real(noise_multiplier) or not noise_multiplier >= MIN_NOISE_MULTIPLIER:  # type: ignore[operator]
        problems.append(f"noise_multiplier must be >= {MIN_NOISE_MULTIPLIER:g}; found {noise_multiplier!r}")
    if not _is_real(sample_rate) or not MIN_SAMPLE_RATE <= sample_rate <= 1:  # type: ignore[operator]
        problems.append(f"sample_rate must be in [{MIN_SAMPLE_RATE:g}, 1]; found {sample_rate!r}")
    if not _is_real(delta) or not MIN_DELTA <= delta < 1:  # type: ignore[operator]
        problems.append(f"delta must be in [{MIN_DELTA:g}, 1); found {delta!r}")
    return problems


def fraction_problem(fraction: object) -> str | None:
    """Why `fraction` is not a spec's ``federation.fraction_per_round`` (a number in (0, 1]); None when it is."""
    if not _is_real(fraction) or not 0 < fraction <= 1:  # type: ignore[operator]
        return f"federation.fraction_per_round must be a number in (0, 1]; found {fraction!r}"
    return None


def rounds_per_node(rounds: int, fraction: float) -> int:
    """The rounds each node trains, and is charged for, when a spec samples `fraction` of the nodes a round.

    ``ceil(fraction x rounds)``: the coordinator draws every node exactly this many rounds
    before the run starts, and a node reserves exactly this many (never ``rounds``). The
    product is rounded to 9 decimals first, so that a fraction written in decimal
    (0.1 x 30 = 3.0000000000000004 in binary) does not gain a round.
    """
    problem = fraction_problem(fraction)
    if problem is not None:
        raise ValueError(problem)
    return max(1, math.ceil(round(fraction * rounds, 9)))


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
