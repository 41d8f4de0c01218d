"""The privacy cost of an experiment: what each site's dataset is charged, before submitting.

Every site runs the same DP-SGD: ``rounds`` rounds of ``local_epochs`` epochs of Poisson
sampling at ``sample_rate``, so ``steps_per_round = local_epochs * steps_per_epoch(q)``.
Each round is one DP event on the site's dataset, and the ``rounds`` rounds compose as
one self-composed event (:meth:`privacy.events.DPEvent.times`), at the spec's delta:

- ``epsilon_charged_per_site``: by dp-accounting's PLD, the accountant every node's
  ledger composes with: the epsilon a node charges this experiment, the number its
  officer sees;
- ``epsilon_per_site``: by the spec's own accountant (Opacus's PRV or RDP), the
  partner's *planning estimate*, the one a ``target_epsilon`` is met by (the noise search
  and the node's check of the target use it too). PRV and PLD agree to about 1 %.

Besides its rounds, a run releases on each site (:func:`privacy.events.training_releases`):

- the training-set size, once, as a discrete Laplace count at ``privacy.count_epsilon``
  (default :data:`privacy.limits.DEFAULT_COUNT_EPSILON`, 0.1), which the coordinator
  reuses to weight every round (post-processing);
- the final model's validation scores, once, as a histogram by label with discrete
  Laplace noise at ``privacy.evaluation_epsilon`` (default
  :data:`privacy.limits.DEFAULT_EVALUATION_EPSILON`, 0.5), for the site's and the pooled
  AUC and calibration; with ``privacy.evaluate_every_round`` also the incoming model's,
  every round.

The ε share rule: these are fixed, separate amounts on top of DP-SGD's, composed with the
rounds by PLD (never added), so ``epsilon_charged_per_site`` counts them; a
``target_epsilon`` sets the DP-SGD noise alone (``epsilon_training_charged_per_site``
meets it), and the planning estimate (``epsilon_per_site``, Opacus's accountants compose
the subsampled Gaussian only) is DP-SGD's alone.

Node sampling (``federation.fraction_per_round`` = f < 1): every node trains, and is
charged for, exactly ``rounds_per_node = ceil(f x rounds)`` rounds, which the coordinator
draws before the run (:mod:`federation.schedule`); a node reserves those rounds, never
the others. So every epsilon here is over ``rounds_per_node`` rounds, ``total_steps`` is
``rounds_per_node x steps_per_round`` and a ``target_epsilon`` sets the noise for those
rounds. There is no amplification by sampling nodes: a node knows it was picked (its
schedule is in its query), so its own patients' epsilon is that of the rounds it trains,
nothing less.

These numbers are the increment this experiment alone costs. It is not what a node will
report as spent afterwards: a node composes this experiment's events with every earlier
release on the same dataset, and composition is not additive (the total is less than the
sum of the parts). Only the node's ledger knows the total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from experiments.errors import SpecError
from experiments.spec import ExperimentSpec
from privacy import limits
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon, epsilon_bound, noise_for_target, steps_per_epoch
from privacy.errors import AccountingError
from privacy.events import DPEvent, training_releases
from privacy.limits import DEFAULT_COUNT_EPSILON, DEFAULT_EVALUATION_EPSILON

__all__ = ["PrivacyPlan", "PrivacySchedule", "plan_privacy", "privacy_schedule"]


@dataclass(frozen=True)
class PrivacySchedule:
    """The DP-SGD parameters every site trains with: what a node's instruction carries.

    Attributes
    ----------
    noise_multiplier
        Noise multiplier every site trains with (from the spec, or derived from
        ``target_epsilon`` when ``noise_from_target``).
    sample_rate
        Poisson sampling probability per step.
    steps_per_round
        DP-SGD steps each site takes per round: ``local_epochs * steps_per_epoch``.
    rounds, rounds_per_node, total_steps
        Federated rounds; the rounds each node trains and is charged for
        (``ceil(fraction_per_round * rounds)``, ``rounds`` without sampling); and
        ``rounds_per_node * steps_per_round``, a node's steps in all.
    delta, accountant
        Where epsilon is read off, and the accountant of the planning estimate (and of
        the noise search).
    noise_from_target
        Whether the noise was derived from the spec's ``target_epsilon``.
    target_epsilon
        The spec's target, when it gave one (for the DP-SGD rounds).
    count_epsilon
        Epsilon of the once-per-run discrete Laplace release of each site's training-set size.
    evaluation_epsilon, evaluate_every_round
        Epsilon of each release of a site's validation-score histogram, and whether it is
        released every round besides the final one.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    rounds_per_node: int
    total_steps: int
    delta: float
    accountant: str
    noise_from_target: bool
    target_epsilon: float | None = None
    count_epsilon: float = DEFAULT_COUNT_EPSILON
    evaluation_epsilon: float = DEFAULT_EVALUATION_EPSILON
    evaluate_every_round: bool = False


@dataclass(frozen=True, kw_only=True)
class PrivacyPlan(PrivacySchedule):
    """A schedule and the epsilon each site is charged for it.

    Attributes
    ----------
    epsilon_per_site
        Planning estimate: this experiment's events on one site's dataset composed by the
        spec's accountant (``accountant``, PRV or RDP).
    epsilon_charged_per_site
        Every event of the run (the DP-SGD rounds and the count release) composed as
        every node's ledger composes them (PLD): what each site is charged.
    epsilon_training_charged_per_site
        The DP-SGD rounds alone by PLD: what a ``target_epsilon`` is met by.
    """

    epsilon_per_site: float
    epsilon_charged_per_site: float
    epsilon_training_charged_per_site: float


def privacy_schedule(spec: ExperimentSpec) -> PrivacySchedule:
    """The noise and steps of `spec`; composes epsilon only to find a target's noise.

    Raises
    ------
    SpecError
        The spec's ``target_epsilon`` cannot be reached with any noise multiplier.
    """
    privacy, federation = spec.privacy, spec.federation
    steps_per_round = federation.local_epochs * steps_per_epoch(privacy.sample_rate)
    total_steps = federation.rounds_per_node * steps_per_round  # what one node trains: its scheduled rounds
    if privacy.target_epsilon is not None:
        try:
            noise = noise_for_target(
                target_epsilon=privacy.target_epsilon,
                delta=privacy.delta,
                sample_rate=privacy.sample_rate,
                steps=total_steps,
            )  # by the ledger's PLD: the run costs every site at most its target
        except AccountingError as err:
            raise SpecError(f"experiment {spec.experiment.name}", [f"privacy.{err}"]) from err
        # The spec's validation bounds an explicit noise; a derived one is bounded here,
        # before any node composes it (they refuse it otherwise).
        bound = epsilon_bound([DPEvent(noise, privacy.sample_rate, total_steps)], delta=privacy.delta)
        if bound > limits.MAX_EPSILON:
            raise SpecError(
                f"experiment {spec.experiment.name}",
                [
                    f"privacy.target_epsilon {privacy.target_epsilon:g} needs noise_multiplier {noise:.4g}, whose "
                    f"epsilon by the RDP bound, {bound:.4g}, is over the limit of {limits.MAX_EPSILON:g}; lower "
                    "target_epsilon"
                ],
            )
    else:
        assert privacy.noise_multiplier is not None  # the spec holds exactly one of the two
        noise = privacy.noise_multiplier
    return PrivacySchedule(
        noise_multiplier=noise,
        sample_rate=privacy.sample_rate,
        steps_per_round=steps_per_round,
        rounds=federation.rounds,
        rounds_per_node=federation.rounds_per_node,
        total_steps=total_steps,
        delta=privacy.delta,
        accountant=privacy.accountant,
        noise_from_target=privacy.target_epsilon is not None,
        target_epsilon=privacy.target_epsilon,
        count_epsilon=privacy.count_epsilon,
        evaluation_epsilon=privacy.evaluation_epsilon,
        evaluate_every_round=privacy.evaluate_every_round,
    )


def plan_privacy(spec: ExperimentSpec, schedule: PrivacySchedule | None = None) -> PrivacyPlan:
    """Work out the noise and the per-site epsilon of `spec` (from `schedule` if given).

    Raises
    ------
    SpecError
        The spec's ``target_epsilon`` cannot be reached with any noise multiplier.
    """
    schedule = schedule or privacy_schedule(spec)
    update = DPEvent(
        noise_multiplier=schedule.noise_multiplier, sample_rate=schedule.sample_rate, steps=schedule.steps_per_round
    )
    event = update.times(schedule.rounds_per_node)  # a node's rounds: its scheduled ones
    releases = training_releases(
        update,
        count_epsilon=schedule.count_epsilon,
        evaluation_epsilon=schedule.evaluation_epsilon,
        evaluate_every_round=schedule.evaluate_every_round,
    )
    return PrivacyPlan(
        **asdict(schedule),
        epsilon_per_site=epsilon([event], delta=schedule.delta, accountant=schedule.accountant),
        epsilon_charged_per_site=epsilon(releases.composed(schedule.rounds_per_node), delta=schedule.delta, accountant=LEDGER_ACCOUNTANT),
        epsilon_training_charged_per_site=epsilon([event], delta=schedule.delta, accountant=LEDGER_ACCOUNTANT),
    )
