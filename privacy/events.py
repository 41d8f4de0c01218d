"""DP events: one privacy-relevant release, as the accountant composes it.

A training round with DP-SGD is ``steps`` applications of the Poisson-subsampled
Gaussian mechanism (``"poisson-gaussian"``) with noise multiplier ``noise_multiplier``
(noise standard deviation over the clipping norm) and sampling probability
``sample_rate``.

A statistics release adds noise once to a vector computed from the whole dataset
(``sample_rate = 1``), with one of:

- ``"laplace"``: Laplace noise of scale ``b`` on a float vector of L1 sensitivity
  ``Δ``; ``noise_multiplier = b / Δ`` (so epsilon is ``1 / noise_multiplier``).
- ``"discrete-laplace"``: discrete Laplace noise of scale ``t`` (probability of ``k``
  proportional to ``exp(-|k| / t)``) on an integer vector of L1 sensitivity 1, such as
  the cell counts of a group-by; ``noise_multiplier = t``.
- ``"gaussian"``: Gaussian noise of standard deviation ``σ`` on a vector of L2
  sensitivity ``Δ``; ``noise_multiplier = σ / Δ``.

``rounds`` rounds of one event are one event again, with the steps multiplied
(:meth:`DPEvent.times`): composing it is exactly composing the ``rounds`` copies, and
the accountants self-compose it (dp-accounting's ``compose(event, count)``, Opacus's
history entry of ``steps`` applications), so nothing ever holds one object per round.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from privacy.errors import AccountingError

__all__ = [
    "DISCRETE_LAPLACE",
    "DPEvent",
    "GAUSSIAN",
    "LAPLACE",
    "MECHANISMS",
    "POISSON_GAUSSIAN",
    "WHOLE_DATASET_MECHANISMS",
    "TrainingReleases",
    "count_event",
    "training_releases",
]

#: DP-SGD's mechanism: the Poisson-subsampled Gaussian. Opacus's PRV and RDP
#: accountants compose this one only.
POISSON_GAUSSIAN = "poisson-gaussian"
#: The Gaussian mechanism on the whole dataset (noise_multiplier = sigma / L2 sensitivity).
GAUSSIAN = "gaussian"
#: The Laplace mechanism on a float vector (noise_multiplier = scale / L1 sensitivity).
LAPLACE = "laplace"
#: The discrete Laplace mechanism on an integer vector of L1 sensitivity 1 (noise_multiplier = scale).
DISCRETE_LAPLACE = "discrete-laplace"

#: The mechanisms the ledger's accountant (dp-accounting's PLD) composes.
MECHANISMS = (POISSON_GAUSSIAN, GAUSSIAN, LAPLACE, DISCRETE_LAPLACE)
#: The mechanisms that release from the whole dataset: their sample_rate is 1.
WHOLE_DATASET_MECHANISMS = (GAUSSIAN, LAPLACE, DISCRETE_LAPLACE)


@dataclass(frozen=True)
class DPEvent:
    """``steps`` compositions of one DP mechanism.

    Parameters
    ----------
    noise_multiplier
        Noise scale over sensitivity (see the module docstring for each mechanism;
        for ``"discrete-laplace"`` the scale itself, the sensitivity being 1); > 0.
    sample_rate
        Poisson sampling probability of each record per step; in (0, 1], and exactly 1
        for the mechanisms that release from the whole dataset
        (:data:`WHOLE_DATASET_MECHANISMS`).
    steps
        Number of mechanism applications; >= 1.
    mechanism
        One of :data:`MECHANISMS`.

    Raises
    ------
    AccountingError
        A parameter is out of range; the message names it.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    mechanism: str = POISSON_GAUSSIAN

    def __post_init__(self) -> None:
        problems = _event_problems(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps
        )
        if self.mechanism not in MECHANISMS:
            problems.append(f"mechanism must be one of {', '.join(map(repr, MECHANISMS))}; found {self.mechanism!r}")
        elif self.mechanism in WHOLE_DATASET_MECHANISMS and _is_real(self.sample_rate) and 0 < self.sample_rate < 1:
            problems.append(
                f"sample_rate must be 1 for the {self.mechanism} mechanism (it releases from the whole "
                f"dataset); found {self.sample_rate!r}"
            )
        if problems:
            raise AccountingError("; ".join(problems))
        # Any real number is accepted (ints, NumPy scalars); store builtin floats and ints
        # so that equal events compare, hash and serialise alike.
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "steps", int(self.steps))

    def times(self, count: int) -> DPEvent:
        """`count` compositions of this event: the same mechanism with ``steps * count`` steps.

        Raises
        ------
        AccountingError
            `count` is not an integer >= 1.
        """
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 1:
            raise AccountingError(f"count must be an integer >= 1; found {count!r}")
        return DPEvent(self.noise_multiplier, self.sample_rate, self.steps * int(count), self.mechanism)


def _event_problems(*, noise_multiplier: object, sample_rate: object, steps: object) -> list[str]:
    """Every problem with these mechanism parameters, one message each (empty when valid)."""
    problems = []
    if not _is_real(noise_multiplier):
        problems.append(f"noise_multiplier must be a number; found {noise_multiplier!r}")
    elif not math.isfinite(noise_multiplier):  # type: ignore[arg-type]
        problems.append(f"noise_multiplier must be finite; found {noise_multiplier!r}")
    elif not noise_multiplier > 0:  # type: ignore[operator]
        problems.append(f"noise_multiplier must be > 0; found {noise_multiplier!r}")
    if not _is_real(sample_rate):
        problems.append(f"sample_rate must be a number; found {sample_rate!r}")
    elif not 0 < sample_rate <= 1:  # type: ignore[operator]
        problems.append(f"sample_rate must be in (0, 1]; found {sample_rate!r}")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool):
        problems.append(f"steps must be an integer; found {steps!r}")
    elif steps < 1:
        problems.append(f"steps must be >= 1; found {steps!r}")
    return problems


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def count_event(*, epsilon: float) -> DPEvent:
    """One count (sensitivity 1: add or remove one patient) released by discrete Laplace at pure `epsilon`.

    The scale is ``1 / epsilon``: ``P(k) ∝ exp(-epsilon |k|)``, which is epsilon-DP for a
    sensitivity of 1. A training run releases its training-set size so, once.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0 < epsilon < float("inf"):
        raise AccountingError(f"count epsilon must be a finite number > 0; found {epsilon!r}")
    return DPEvent(noise_multiplier=1.0 / float(epsilon), sample_rate=1.0, steps=1, mechanism=DISCRETE_LAPLACE)


@dataclass(frozen=True)
class TrainingReleases:
    """Everything one training run releases on a site's dataset, as DP events.

    ``per_round`` one round's releases, in order: the DP-SGD update, then (when the spec
    evaluates every round) the histogram of the incoming model's validation scores.
    ``once`` the run's once-per-run releases, in the reservation's order: the training-set
    size, then the final model's validation-score histogram.
    """

    per_round: tuple[DPEvent, ...]
    once: tuple[DPEvent, ...]

    def composed(self, rounds: int) -> list[DPEvent]:
        """Every event of a run of `rounds` rounds (each round's releases self-composed)."""
        return [event.times(rounds) for event in self.per_round] + list(self.once)


def training_releases(
    update: DPEvent, *, count_epsilon: float, evaluation_epsilon: float, evaluate_every_round: bool
) -> TrainingReleases:
    """What a training run whose rounds release `update` (DP-SGD) releases besides, by the spec's privacy options.

    The training-set size and the validation-score histogram are both counts of patients
    (add or remove one: one count changes by one), released by discrete Laplace
    (:func:`count_event`) at their epsilon.
    """
    evaluation = count_event(epsilon=evaluation_epsilon)
    per_round = (update, evaluation) if evaluate_every_round else (update,)
    return TrainingReleases(per_round, (count_event(epsilon=count_epsilon), evaluation))
