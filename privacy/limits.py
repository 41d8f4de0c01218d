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
trusts the coordinator to have checked. Plain numbers only, so that the wire contract
can read them without importing an accountant.
"""

from __future__ import annotations

__all__ = [
    "MAX_EPSILON",
    "MAX_LOCAL_EPOCHS",
    "MAX_ROUNDS",
    "MAX_STEPS_PER_ROUND",
    "MAX_TOTAL_STEPS",
    "MIN_DELTA",
    "MIN_NOISE_MULTIPLIER",
    "MIN_SAMPLE_RATE",
]

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
