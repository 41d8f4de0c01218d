"""The training-set size a node releases once per run: a discrete Laplace count, kept and reused.

FedAvg weights each site's update by its training-set size, and under SecAgg+ each node
scales its update by it. The exact size is a count over the hospital's patients (add or
remove one patient changes it by 1), so it never leaves. Instead, the first message of a
run that needs it (the query, or the first round if no query came) draws
``noisy = n + DiscreteLaplace(1 / count_epsilon)`` with OpenDP's sampler
(:func:`privacy.mechanisms.add_noise`), and the ledger charges that release once, as round
0 of the run (:meth:`privacy.ledger.PrivacyLedger.charge_once`; it was reserved with the
rounds at admission). Every later reply of the submission, continuations after a
coordinator restart included, sends the same value, clamped at 1 so that a weight is
never zero or negative: post-processing, which costs nothing more.

The value is written to the node home (``released-counts/``, 0600) before it is charged,
and charged before it leaves: a crash between the two leaves a drawn value that the next
message charges and sends, never a second draw. A value that was charged but whose file
is gone cannot be drawn again (that would be a second, uncharged release): the run is
refused instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from clients.hospital_node.errors import NodeError
from clients.hospital_node.home import NodeHome
from privacy.events import DISCRETE_LAPLACE, DPEvent
from privacy.ledger import Budget, PrivacyLedger
from privacy.mechanisms import add_noise
from privacy.private_files import make_private_folder, publish

__all__ = ["COUNTS_DIR", "ReleasedCount", "release_training_count"]

logger = logging.getLogger(__name__)

#: The node home's folder of released training-set sizes, one file per dataset and submission.
COUNTS_DIR = "released-counts"


@dataclass(frozen=True)
class ReleasedCount:
    """A released training-set size: the mechanism's output and the weight sent (clamped at 1)."""

    noisy: int  # the discrete Laplace output, as drawn
    event: DPEvent  # the mechanism it came from
    charged_now: bool  # whether this call charged it (False: released earlier, reused)

    @property
    def weight(self) -> float:
        """What leaves as ``num-examples``: the noisy count clamped at 1 (post-processing)."""
        return float(max(1, self.noisy))


def release_training_count(
    home: NodeHome,
    *,
    dataset: str,
    submission: str,
    run_id: str,
    exact: int,
    event: DPEvent,
    budget: Budget,
    hold,  # type: ignore[no-untyped-def]
    run_cap: Budget | None,
    debug_seed: int | None = None,
    charge: bool = True,
) -> ReleasedCount:
    """The submission's noisy training-set size on `dataset`: drawn and charged once, then reused.

    `debug_seed` (tests only, from the node home's ``debug-noise-seed``) draws the noise
    from numpy seeded by it instead of OpenDP's sampler, so that two runs of a spec weight
    identically; the caller warns on every use. With ``charge=False`` the value is drawn
    (or read) and not charged: the caller charges it with a second call before it leaves
    (training uses it first, and a failure there must charge nothing).

    Raises
    ------
    NodeError
        The ledger says the count was released for this submission but the node no
        longer holds its value.
    privacy.errors.PrivacyError
        The ledger refuses the charge (reservation released, used up or over budget).
    """
    if event.mechanism != DISCRETE_LAPLACE:
        raise NodeError(f"the training-set size is released by {DISCRETE_LAPLACE}; found {event.mechanism}")
    path = make_private_folder(home.path / COUNTS_DIR) / f"{_key(dataset, submission)}.json"
    with PrivacyLedger.open(home.ledger_path) as ledger:
        reservation = next((r for r in ledger.run_reservations(dataset) if r.submission == submission), None)
        if reservation is None or event not in reservation.once:
            raise NodeError(f"submission {submission[:12]} holds no reservation of its training-set size on dataset '{dataset}'")
        if not path.is_file():
            if reservation.once_charged:
                raise NodeError(
                    f"the training-set size of dataset '{dataset}' was released for submission {submission[:12]}, "
                    "but the node no longer holds its value; it cannot be released again (submit the spec again for a new run)"
                )
            noisy = int(exact) + (
                int(add_noise([0], mechanism=DISCRETE_LAPLACE, scale=event.noise_multiplier)[0])
                if debug_seed is None
                else _seeded_discrete_laplace(debug_seed, event.noise_multiplier)
            )
            record = {"dataset": dataset, "submission": submission, "noisy": noisy, "mechanism": event.mechanism, "scale": event.noise_multiplier}
            try:
                publish(path, json.dumps(record, sort_keys=True), replace=False)
            except FileExistsError:  # another message of the run drew first: its value is the one
                pass
        stored = json.loads(path.read_text())
        if (stored.get("dataset"), stored.get("submission"), stored.get("scale")) != (dataset, submission, event.noise_multiplier):
            raise NodeError(f"the node's stored training-set size of submission {submission[:12]} on dataset '{dataset}' is not its own")
        charges = (
            ledger.charge_once(dataset, submission=submission, run_id=run_id, budget=budget, hold=hold, run_cap=run_cap)
            if charge
            else []
        )
    if charges:
        logger.info("released the training-set size of dataset '%s' for submission %s (discrete Laplace, scale %g)", dataset, submission[:12], event.noise_multiplier)
    return ReleasedCount(int(stored["noisy"]), event, bool(charges))


def _seeded_discrete_laplace(seed: int, scale: float) -> int:
    """Tests only: discrete Laplace as the difference of two geometric draws, from a seeded generator."""
    import math

    import numpy as np

    generator = np.random.default_rng(seed)
    p = 1.0 - math.exp(-1.0 / scale)
    return int(generator.geometric(p) - generator.geometric(p))


def _key(dataset: str, submission: str) -> str:
    return hashlib.sha256(f"{dataset}\x00{submission}".encode()).hexdigest()[:32]
