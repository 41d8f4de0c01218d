"""What a training run releases once, whatever its rounds: drawn once, charged once, kept and reused.

A training run reserves two once-per-run events besides its rounds
(:class:`privacy.ledger.RunReservation`'s ``once``), both discrete Laplace releases of
counts over the hospital's patients (adding or removing one patient changes one count by
one, so L1 sensitivity 1 and scale ``1 / epsilon``), drawn with OpenDP's sampler
(:func:`privacy.mechanisms.add_noise`):

``training-size`` (:data:`TRAINING_SIZE`, ``privacy.count_epsilon``)
    the training-set size. FedAvg weights each site's update by it, SecAgg+ scales the
    update by it, and DP-SGD's expected batch size is computed from it; the first
    message of the run that needs it (the query, or the first round) draws it, and every
    later reply of the submission, continuations after a coordinator restart included,
    sends the same value: post-processing, which costs nothing more.
``final-evaluation`` (:data:`FINAL_EVALUATION`, ``privacy.evaluation_epsilon``)
    the final model's validation scores, a histogram by label over fixed bins
    (:mod:`models.evaluation`), from which the coordinator computes the site's and the
    pooled AUC, loss and calibration. It is tied to the model it scored: asked again
    for the same model (a coordinator that restarted), the node sends the same
    histogram; asked for another model, it refuses (a run's end is not a metric oracle).

Each value is written to the node home (``released/``, 0600) before it is charged, and
charged before it leaves: a crash between the two leaves a drawn value that the next
message charges and sends, never a second draw. A value that was charged but whose file
is gone cannot be drawn again (that would be a second, uncharged release): the run is
refused instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from clients.hospital_node.errors import NodeError
from clients.hospital_node.home import NodeHome
from privacy.events import DISCRETE_LAPLACE, DPEvent
from privacy.ledger import Budget, PrivacyLedger
from privacy.mechanisms import add_noise
from privacy.private_files import make_private_folder, publish

__all__ = ["FINAL_EVALUATION", "ONCE_PER_RUN", "RELEASED_DIR", "TRAINING_SIZE", "Release", "noisy_counts", "release_once"]

logger = logging.getLogger(__name__)

#: The node home's folder of once-per-run releases, one file per dataset, submission and name.
RELEASED_DIR = "released"
TRAINING_SIZE = "training-size"
FINAL_EVALUATION = "final-evaluation"
#: A training run's once-per-run releases, in the order its reservation holds them.
ONCE_PER_RUN = (TRAINING_SIZE, FINAL_EVALUATION)


@dataclass(frozen=True)
class Release:
    """A once-per-run release: the mechanism's output, as drawn, and whether this call charged it."""

    name: str
    noisy: tuple[int, ...]  # exact values + discrete Laplace noise, element by element
    event: DPEvent  # the mechanism it came from
    charged_now: bool  # False: released (and charged) earlier in the submission, reused

    def record(self, post_processing: str) -> dict[str, object]:
        """What the audit log says of it: mechanism, scale, output, post-processing, when charged."""
        return {
            "mechanism": self.event.mechanism,
            "scale": self.event.noise_multiplier,
            "output": list(self.noisy),
            "post_processing": post_processing,
            "charged": "now" if self.charged_now else "earlier in the run (reused)",
        }


def release_once(  # noqa: PLR0913
    home: NodeHome,
    *,
    name: str,
    dataset: str,
    submission: str,
    run_id: str,
    exact: Sequence[int],
    event: DPEvent,
    budget: Budget,
    hold: timedelta,
    run_cap: Budget | None,
    subject: str = "",
    debug_seed: int | None = None,
    charge: bool = True,
) -> Release:
    """The submission's release `name` on `dataset` (one of :data:`ONCE_PER_RUN`): drawn and charged once, then reused.

    `exact` are the counts it releases; `subject` names what they were computed from
    when that may differ between asks (the model a final evaluation scored): a stored
    release of another subject is refused. `debug_seed` (tests only, from the node
    home's ``debug-noise-seed``) draws the noise from numpy seeded by it instead of
    OpenDP's sampler, so that two runs of a spec release identically; the caller warns on
    every use. With ``charge=False`` the value is drawn (or read) and not charged: the
    caller charges it with a second call before it leaves (training uses the size first,
    and a failure there must charge nothing).

    Raises
    ------
    NodeError
        No reservation of this release; the stored value is another subject's or not
        this submission's; or the ledger says it was released but the node no longer
        holds its value.
    privacy.errors.PrivacyError
        The ledger refuses the charge (reservation released, used up or over budget).
    """
    if name not in ONCE_PER_RUN:
        raise NodeError(f"unknown once-per-run release '{name}'; expected one of {', '.join(ONCE_PER_RUN)}")
    if event.mechanism != DISCRETE_LAPLACE:
        raise NodeError(f"the {name} is released by {DISCRETE_LAPLACE}; found {event.mechanism}")
    index = ONCE_PER_RUN.index(name)
    path = make_private_folder(home.path / RELEASED_DIR) / f"{_key(dataset, submission, name)}.json"
    with PrivacyLedger.open(home.ledger_path) as ledger:
        reservation = ledger.run_reservation(dataset, submission)
        if reservation is None or len(reservation.once) != len(ONCE_PER_RUN) or reservation.once[index] != event:
            raise NodeError(f"submission {submission[:12]} holds no reservation of its {name} on dataset '{dataset}'")
        if not path.is_file():
            if reservation.once_charged[index]:
                raise NodeError(
                    f"the {name} of dataset '{dataset}' was released for submission {submission[:12]}, but the node "
                    "no longer holds its value; it cannot be released again (submit the spec again for a new run)"
                )
            record = {
                "name": name, "dataset": dataset, "submission": submission, "subject": subject,
                "noisy": noisy_counts(exact, event.noise_multiplier, debug_seed=debug_seed),
                "mechanism": event.mechanism, "scale": event.noise_multiplier,
            }
            try:
                publish(path, json.dumps(record, sort_keys=True), replace=False)
            except FileExistsError:  # another message of the run drew first: its value is the one
                pass
        stored = json.loads(path.read_text())
        if (stored.get("name"), stored.get("dataset"), stored.get("submission"), stored.get("scale")) != (
            name, dataset, submission, event.noise_multiplier
        ) or len(stored.get("noisy", ())) != len(exact):
            raise NodeError(f"the node's stored {name} of submission {submission[:12]} on dataset '{dataset}' is not its own")
        if stored.get("subject") != subject:
            raise NodeError(
                f"the {name} of submission {submission[:12]} on dataset '{dataset}' was released for another model; "
                "it is answered once"
            )
        charges = (
            ledger.charge_once(dataset, submission=submission, run_id=run_id, index=index, budget=budget, hold=hold, run_cap=run_cap)
            if charge
            else []
        )
    if charges:
        logger.info("released the %s of dataset '%s' for submission %s (discrete Laplace, scale %g)", name, dataset, submission[:12], event.noise_multiplier)
    return Release(name, tuple(int(v) for v in stored["noisy"]), event, bool(charges))


def noisy_counts(exact: Sequence[int], scale: float, *, debug_seed: int | None = None) -> list[int]:
    """`exact` counts plus discrete Laplace noise at `scale`, by OpenDP's sampler.

    `debug_seed` (tests only) draws the noise instead as the difference of two geometric
    draws from numpy seeded by it (the same distribution), so that a run can be repeated.
    """
    if debug_seed is None:
        return [int(v) for v in add_noise([int(x) for x in exact], mechanism=DISCRETE_LAPLACE, scale=scale)]
    import numpy as np

    generator = np.random.default_rng(debug_seed)
    p = 1.0 - math.exp(-1.0 / scale)
    noise = generator.geometric(p, len(exact)) - generator.geometric(p, len(exact))
    return [int(x) + int(e) for x, e in zip(exact, noise, strict=True)]


def _key(dataset: str, submission: str, name: str) -> str:
    return hashlib.sha256(f"{dataset}\x00{submission}\x00{name}".encode()).hexdigest()[:32]
