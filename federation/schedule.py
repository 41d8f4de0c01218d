"""Which nodes train in which round, drawn once per submission before its query.

Flower's strategies sample nodes afresh every round, so a node could not know at
admission which rounds it will train and would have to hold budget for all of them. With
``federation.fraction_per_round`` = f the coordinator instead draws the run's whole
schedule before the query: every queried node trains exactly ``k = ceil(f x R)`` of the
``R`` rounds (:func:`privacy.limits.rounds_per_node`), and each round has
``floor(N k / R)`` or ``ceil(N k / R)`` of the ``N`` nodes. Each node's query carries its
own rounds; the node checks them against the signed spec and reserves exactly those
(``clients.hospital_node.governance``).

The draw (:func:`draw_schedule`): the nodes in a random order; node ``i`` takes the
``k`` consecutive slots ``i k .. i k + k - 1`` of a round-robin over the ``R`` rounds
(slot ``s`` is round ``s mod R``: ``k <= R`` consecutive slots are ``k`` distinct rounds,
and the ``N k`` slots fill the rounds evenly); then the rounds are relabelled by a random
permutation, so that no round is always the fuller one. The generator is seeded from the
spec's digest and the submission id (:func:`schedule_seed`): the same submission draws
the same schedule on any coordinator, and a continuation after a restart (a new Flower
run of the same submission) keeps it, as the nodes recorded it. ``f = 1`` is every node
in every round, today's behaviour.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from privacy.limits import rounds_per_node

__all__ = ["RoundSchedule", "draw_schedule", "schedule_seed"]


@dataclass(frozen=True)
class RoundSchedule:
    """Each node's training rounds (sorted), for a run of `rounds` rounds of which each node trains `per_node`."""

    rounds: int
    per_node: int
    nodes: Mapping[int, tuple[int, ...]]
    seed: int

    def of(self, node: int) -> tuple[int, ...]:
        """The rounds `node` is scheduled for (empty: it is not in the schedule)."""
        return self.nodes.get(node, ())

    def participants(self, server_round: int) -> list[int]:
        """The nodes scheduled for `server_round`, in id order."""
        return sorted(n for n, rounds in self.nodes.items() if server_round in rounds)

    def to_mapping(self) -> dict[str, Any]:
        """Plain JSON, as the checkpoint and the run summary record it."""
        return {
            "rounds": self.rounds,
            "rounds_per_node": self.per_node,
            "seed": self.seed,
            "nodes": {str(n): list(r) for n, r in sorted(self.nodes.items())},
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RoundSchedule:
        """The schedule :meth:`to_mapping` wrote."""
        return cls(
            rounds=int(data["rounds"]),
            per_node=int(data["rounds_per_node"]),
            seed=int(data["seed"]),
            nodes={int(n): tuple(int(r) for r in rounds) for n, rounds in data["nodes"].items()},
        )


def schedule_seed(spec_digest: str, submission_id: str) -> int:
    """The draw's seed: the same for every Flower run of one submission, different for every submission."""
    return int(hashlib.sha256(f"medfed-schedule|{spec_digest}|{submission_id}".encode()).hexdigest()[:16], 16)


def draw_schedule(nodes: Iterable[int], *, rounds: int, fraction: float, seed: int) -> RoundSchedule:
    """Draw every node's ``ceil(fraction x rounds)`` rounds, balanced across rounds (see the module docstring).

    Raises
    ------
    ValueError
        `rounds` below 1, or `fraction` outside (0, 1].
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1; found {rounds!r}")
    k = rounds_per_node(rounds, fraction)
    generator = random.Random(seed)
    order = sorted(set(nodes))
    generator.shuffle(order)
    relabel = list(range(1, rounds + 1))
    generator.shuffle(relabel)
    schedule = {
        node: tuple(sorted(relabel[(i * k + j) % rounds] for j in range(k)))
        for i, node in enumerate(order)
    }
    return RoundSchedule(rounds=rounds, per_node=k, nodes=schedule, seed=seed)
