"""Privacy accounting: the composed epsilon of a sequence of DP events, by Opacus or dp-accounting.

medfed does not implement an accountant. :func:`epsilon` hands the events to a fresh
Opacus accountant (PRV by default, RDP on request) through its ``history`` and asks
it for epsilon, so the number a node reports is exactly the number Opacus gives for
the same steps.

``accountant="pld"`` composes the same events with dp-accounting's privacy-loss-
distribution accountant instead (pessimistic discretisation, add-or-remove-one
neighbours, as Opacus assumes): as tight as PRV, and it needs no torch, so a node's
budget checks in its short-lived ClientApp processes stay light (Opacus and torch take
about 3 s to import). A node's ledger composes with it alone
(:data:`LEDGER_ACCOUNTANT`): every epsilon a node reports is that one number. Specs keep
to :data:`ACCOUNTANTS`, the ones Opacus can also search a noise multiplier with: the
partner's planning estimate.

Only PLD composes every mechanism medfed releases (:data:`privacy.events.MECHANISMS`):
DP-SGD's Poisson-subsampled Gaussian, and the statistics releases' Gaussian, Laplace and
discrete Laplace, each as dp-accounting's own event (``GaussianDpEvent``,
``LaplaceDpEvent``, ``DiscreteLaplaceDpEvent``), so a dataset holding both training
rounds and statistics releases composes tightly, never by adding epsilons. Opacus knows
DP-SGD alone: PRV or RDP with any other mechanism is an :class:`AccountingError` that
names it.

Composition is commutative, so :func:`epsilon` first groups equal events, wherever they
stand, into one entry with their steps summed: the accountants then self-compose each
group (dp-accounting's ``compose(event, count)``, an Opacus history entry), and a ledger
of many runs, or a reservation of many rounds, costs one group per distinct mechanism,
never one object per round.

:func:`epsilon_bound` is dp-accounting's RDP bound: never tighter than PLD or PRV, and
as cheap at a million steps as at one, so it guards the tight accountants against
parameters whose epsilon is so large that their grids would not fit in memory
(:data:`privacy.limits.MAX_EPSILON`). It bounds the Gaussian and Laplace mechanisms too;
dp-accounting has no RDP of the discrete Laplace mechanism, which it refuses.

Opacus (and torch with it) is imported on first use, not on import: a hospital node
imports this module in every short-lived ClientApp process.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from privacy.errors import AccountingError
from privacy.events import DISCRETE_LAPLACE, GAUSSIAN, LAPLACE, POISSON_GAUSSIAN, DPEvent
from privacy.limits import MIN_NOISE_MULTIPLIER

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_ACCOUNTANT",
    "epsilon",
    "epsilon_bound",
    "grouped_history",
    "noise_for_target",
    "search_tolerance",
    "opacus_history",
    "steps_per_epoch",
]

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
# The accountant a node's ledger composes with, and so every epsilon a node reports: the
# one that can compose every mechanism medfed releases (dp-accounting's PLD).
LEDGER_ACCOUNTANT = "pld"
_ALL_ACCOUNTANTS = (LEDGER_ACCOUNTANT, *ACCOUNTANTS)

# dp-accounting's PLD grid: 1e-3 in privacy loss keeps a composition to tens of milliseconds
# and epsilon within about 1 % of PRV's at the parameters medfed uses (tests check both).
_PLD_DISCRETIZATION = 1e-3

#: One group of equal events: (mechanism, noise_multiplier, sample_rate, steps).
Group = tuple[str, float, float, int]


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one epoch of Poisson sampling at `sample_rate`.

    This is the length Opacus gives its Poisson data loader
    (``UniformWithReplacementSampler``): ``int(1 / sample_rate)``.
    """
    DPEvent(noise_multiplier=1.0, sample_rate=sample_rate, steps=1)  # validates sample_rate
    return int(1 / sample_rate)


def opacus_history(events: Sequence[DPEvent]) -> list[tuple[float, float, int]]:
    """The ``history`` an Opacus accountant would hold after these events.

    Consecutive events with equal ``(noise_multiplier, sample_rate)`` become one entry
    with their steps summed, exactly as ``PRVAccountant.step`` and
    ``RDPAccountant.step`` build it.

    Raises
    ------
    AccountingError
        An event is not DP-SGD's (``"poisson-gaussian"``): Opacus cannot hold it.
    """
    _refuse_for_opacus({event.mechanism for event in events}, "Opacus's")
    history: list[tuple[float, float, int]] = []
    for event in events:
        if history and history[-1][:2] == (event.noise_multiplier, event.sample_rate):
            sigma, q, steps = history[-1]
            history[-1] = (sigma, q, steps + event.steps)
        else:
            history.append((event.noise_multiplier, event.sample_rate, event.steps))
    return history


def grouped_history(events: Iterable[DPEvent]) -> list[Group]:
    """`events` as ``(mechanism, noise_multiplier, sample_rate, steps)`` groups, equal events merged.

    Unlike :func:`opacus_history` this merges equal events wherever they stand (composition
    is commutative) and sorts the groups, so that the same events in any order compose to
    the same number to the last bit; memory grows with the number of distinct events,
    not with the number of events or steps. Events of different mechanisms never merge,
    even with equal parameters.
    """
    steps: dict[tuple[str, float, float], int] = {}
    for event in events:
        key = (event.mechanism, event.noise_multiplier, event.sample_rate)
        steps[key] = steps.get(key, 0) + event.steps
    return [(mechanism, sigma, q, n) for (mechanism, sigma, q), n in sorted(steps.items())]


def epsilon(events: Iterable[DPEvent], *, delta: float, accountant: str = "prv") -> float:
    """Composed epsilon of all `events` at `delta`, computed by Opacus or dp-accounting.

    Parameters
    ----------
    events
        The DP events (any iterable; equal ones are grouped, see :func:`grouped_history`);
        empty gives 0.0. Repeat an event with :meth:`DPEvent.times`, not a list.
    delta
        Target delta, in (0, 1).
    accountant
        ``"prv"`` (tight, numerical), ``"pld"`` (tight, numerical, dp-accounting) or
        ``"rdp"``. If PRV or PLD fails, which it can for extreme parameters (for example a
        very small delta), the RDP bound, which is never tighter, is returned and a
        warning logged: Opacus's for DP-SGD alone, dp-accounting's when other mechanisms
        are among the events.

    Raises
    ------
    AccountingError
        `delta` or `accountant` is invalid; an event's mechanism is not DP-SGD's and
        `accountant` is Opacus's (``"prv"`` or ``"rdp"``): only ``"pld"`` composes it; or
        PLD failed and the RDP fallback cannot compose a mechanism among the events
        (discrete Laplace).
    """
    _check_delta(delta, name="delta")
    _check_accountant(accountant, _ALL_ACCOUNTANTS)
    history = grouped_history(events)
    if not history:
        return 0.0
    if accountant != "pld":
        _refuse_for_opacus({group[0] for group in history}, f"Opacus's {accountant.upper()}")
    failure: str | None = None
    if accountant in ("prv", "pld"):
        try:
            value = _compose_pld(history, delta) if accountant == "pld" else _compose("prv", history, delta)
        except (ArithmeticError, RuntimeError, ValueError) as err:
            failure = f"failed ({err})"
        else:
            if math.isfinite(value):
                return value
            failure = f"gave {value}"
        logger.warning(
            "%s accounting %s for %d event group(s) at delta=%g; using the RDP bound",
            accountant.upper(), failure, len(history), delta,
        )
        failure = f"{accountant.upper()} accounting {failure} at delta={delta:g}"
    if all(group[0] == POISSON_GAUSSIAN for group in history):
        return _compose("rdp", history, delta)
    # Opacus knows DP-SGD alone: the other mechanisms fall back to dp-accounting's RDP.
    return _compose_rdp(history, delta, after=failure)


def epsilon_bound(events: Iterable[DPEvent], *, delta: float) -> float:
    """dp-accounting's RDP bound on the composed epsilon of `events` at `delta`.

    Never tighter than :func:`epsilon` by PLD or PRV, computed at the same cost for any
    number of steps and without torch: the guard to call before the tight accountants
    when the parameters come from outside. It composes DP-SGD, the Gaussian and the
    Laplace mechanisms.

    Raises
    ------
    AccountingError
        `delta` is invalid, or an event is of the discrete Laplace mechanism, which
        dp-accounting's RDP accountant cannot compose (the PLD accountant can).
    """
    _check_delta(delta, name="delta")
    history = grouped_history(events)
    if not history:
        return 0.0
    return _compose_rdp(history, delta)


def _compose_rdp(history: list[Group], delta: float, *, after: str | None = None) -> float:
    """dp-accounting's RDP epsilon of `history`; `after` says how the tight accountant failed, if it did."""
    refused = sorted({group[0] for group in history} - set(_RDP_MECHANISMS))
    if refused:
        mechanisms = f"the {_names(refused)} mechanism{'s' if len(refused) > 1 else ''}"
        if after is None:
            raise AccountingError(
                f"dp-accounting's RDP accountant cannot compose {mechanisms}; only the ledger's PLD "
                f"accountant (accountant='pld') composes {'them' if len(refused) > 1 else 'it'}"
            )
        raise AccountingError(
            f"{after}, and its fallback, dp-accounting's RDP accountant, cannot compose {mechanisms}: "
            "these events have no epsilon at this delta (a larger delta may have one)"
        )
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    with _quiet("absl"):
        for mechanism, sigma, q, steps in history:
            accountant.compose(_dp_event(mechanism, sigma, q), steps)
        return float(accountant.get_epsilon(delta))


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hold back `name`'s warnings for a moment: dp-accounting's RDP warns (through absl)
    for each fractional order that does not converge and drops it, which leaves a valid
    bound from the other orders; the user has nothing to do about it."""
    chatty = logging.getLogger(name)
    level = chatty.level
    chatty.setLevel(logging.ERROR)
    try:
        yield
    finally:
        chatty.setLevel(level)


def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = LEDGER_ACCOUNTANT,
    epsilon_tolerance: float = 0.01,
    least_noise: float = MIN_NOISE_MULTIPLIER,
) -> float:
    """The least noise multiplier, not below `least_noise`, whose `steps` stay within `target_epsilon`.

    Composed by `accountant` exactly as :func:`epsilon` composes it (by default the
    ledger's PLD, what every node charges), the epsilon reached is at most
    `target_epsilon` and at least `target_epsilon` less :func:`search_tolerance` (the
    larger of `epsilon_tolerance` and 0.5 % of the target, at most 10 % of it), unless the
    target is loose enough for `least_noise` itself (the least the limits let a spec
    train with), which is then the answer, or the accountant's epsilon moves in steps
    coarser than the tolerance. Every epsilon comes from the accountant; only the root
    search is ours: doubling from `least_noise` brackets the noise, then regula falsi on
    log epsilon against log noise (nearly linear there) closes in, typically in 2 to 5
    compositions. Opacus's ``get_noise_multiplier`` (doubling from zero, then bisecting
    to an absolute tolerance) took 10-25 compositions, seconds at the limits' corners.

    Raises
    ------
    AccountingError
        A parameter is invalid, or no noise multiplier up to :data:`MAX_NOISE` reaches
        the target.
    """
    if not _is_real(target_epsilon) or not math.isfinite(target_epsilon) or not target_epsilon > 0:
        raise AccountingError(f"target_epsilon must be a finite number > 0; found {target_epsilon!r}")
    if not _is_real(epsilon_tolerance) or not epsilon_tolerance > 0:
        raise AccountingError(f"epsilon_tolerance must be a number > 0; found {epsilon_tolerance!r}")
    if not _is_real(least_noise) or not 0 < least_noise < MAX_NOISE:
        raise AccountingError(f"least_noise must be in (0, {MAX_NOISE:g}); found {least_noise!r}")
    _check_delta(delta, name="delta")
    _check_accountant(accountant, _ALL_ACCOUNTANTS)
    DPEvent(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)  # validates q and steps

    def cost(sigma: float) -> float:
        return epsilon([DPEvent(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    # Start where the Gaussian approximation of the composition puts the target (low
    # for small noise, where subsampling amplifies less), never below the least noise:
    # an epsilon far above the target is the costliest composition of all.
    guess = sample_rate * math.sqrt(2.0 * steps * math.log(1.0 / delta)) / target_epsilon
    start = min(max(float(least_noise), guess), MAX_NOISE)
    low, at_low = start, cost(start)
    high: float | None = None
    while at_low <= target_epsilon:  # the start meets the target: halve until it does not
        if low <= least_noise:
            return low  # the least noise meets the target
        high, at_high = low, at_low
        low = max(low / 2.0, float(least_noise))
        at_low = cost(low)
    if high is None:
        # More noise until the target is met: each step extrapolates the last two points
        # on log epsilon against log noise a little past the target (doubling at first).
        goal = math.log(target_epsilon)
        previous: tuple[float, float] | None = None
        high = 2.0 * low
        while (at_high := cost(high)) > target_epsilon:
            if high >= MAX_NOISE:
                raise _unreachable(target_epsilon, delta, sample_rate, steps)
            previous, (low, at_low) = (low, at_low), (high, at_high)
            factor = 2.0
            if previous[1] > at_low > 0:
                slope = (math.log(at_low) - math.log(previous[1])) / (math.log(low) - math.log(previous[0]))
                factor = math.exp(min(max(1.1 * (goal - math.log(at_low)) / slope, math.log(1.1)), math.log(16.0)))
            high = min(low * factor, MAX_NOISE)
    tolerance = search_tolerance(target_epsilon, epsilon_tolerance)
    return _solve(cost, (low, at_low), (high, at_high), target_epsilon, tolerance)


def search_tolerance(target_epsilon: float, epsilon_tolerance: float = 0.01) -> float:
    """How far below its target a noise search may land: `epsilon_tolerance`, or 0.5 % of
    a large target (each composition near the least noise costs a tenth of a second, and
    polishing the last 0.5 % buys the partner nothing), at most 10 % of a small one."""
    return min(max(epsilon_tolerance, 0.005 * target_epsilon), target_epsilon / 10.0)


#: No search goes past this noise multiplier (Opacus's own limit, MAX_SIGMA).
MAX_NOISE = 1e6
_MAX_ITERATIONS = 30


def _solve(
    cost: Callable[[float], float], low: tuple[float, float], high: tuple[float, float], target: float, tolerance: float
) -> float:
    """A noise in [low, high] whose cost is within [target - tolerance, target], by regula falsi.

    `low` and `high` are (noise, cost) with cost(low) > target >= cost(high); cost
    decreases with the noise. Works on log noise against log cost with the Illinois
    modification, so that neither end stalls; aims at the middle of the tolerance band
    and returns the least noise found meeting the target.
    """
    goal = math.log(target - tolerance / 2.0)
    x_low, y_low = math.log(low[0]), math.log(low[1]) - goal
    x_high, y_high = math.log(high[0]), math.log(high[1]) - goal if high[1] > 0 else -math.inf
    if high[1] >= target - tolerance:
        return high[0]
    side = 0
    for _ in range(_MAX_ITERATIONS):
        if math.isfinite(y_high) and y_high != y_low:
            x = x_high - y_high * (x_high - x_low) / (y_high - y_low)
        else:
            x = (x_low + x_high) / 2.0
        if not x_low < x < x_high:
            x = (x_low + x_high) / 2.0
        value = cost(math.exp(x))
        if target - tolerance <= value <= target:
            return math.exp(x)
        y = math.log(value) - goal if value > 0 else -math.inf
        if value > target:  # too little noise: x is the new low end
            x_low, y_low = x, y
            if side == -1 and math.isfinite(y_high):
                y_high /= 2.0
            side = -1
        else:  # more noise than needed: x is the new high end
            x_high, y_high = x, y
            if side == 1:
                y_low /= 2.0
            side = 1
        if x_high - x_low < 1e-9:
            break
    return math.exp(x_high)


def _unreachable(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> AccountingError:
    return AccountingError(
        f"target_epsilon {target_epsilon!r} cannot be reached in {steps} steps at sample_rate "
        f"{sample_rate!r} and delta {delta!r}; raise target_epsilon, or lower rounds, local "
        "epochs or the sample rate"
    )


def _compose(name: str, history: list[Group], delta: float) -> float:
    """Opacus's PRV or RDP epsilon of a DP-SGD-only `history` (the caller has refused the rest)."""
    triples = [(sigma, q, steps) for _, sigma, q, steps in history]
    if name == "prv":
        return _compose_prv(triples, delta)
    accountant = _new_accountant(name)
    accountant.history = triples
    return float(accountant.get_epsilon(delta=delta))


# Orders for the bound on PRV's truncation domain: integers only. Opacus's own bound also
# tries fractional orders, whose RDP series converges slowly near q = 0.5 (1-2.5 s there,
# for a bound whose only use is to size a grid); any set of orders gives a valid bound.
_DOMAIN_ORDERS = (*range(2, 64), 80, 128, 256)


def _compose_prv(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus's ``PRVAccountant.get_epsilon`` (eps_error 0.01, delta_error delta/1000), its
    parts called in its order, with the truncation domain bounded by RDP at integer orders.

    The domain is Gopi et al.'s safe truncation ``L`` (Opacus's
    ``compute_safe_domain_size``): the RDP epsilon of the whole history at
    ``delta_error / 4`` and of each single step at ``delta_error / (8 * steps)``, plus 3.
    Fewer orders can only give a larger ``L``, a wider grid at the same mesh: the same
    epsilon to about 1e-5 (the grid's alignment moves), and never a narrower domain
    than the guarantee needs.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    eps_error, delta_error = 0.01, delta / 1000
    steps = [n for _, _, n in history]
    total = sum(steps)

    def rdp_epsilon(part: list[tuple[float, float, int]], at: float) -> float:
        rdp = RDPAccountant()
        rdp.history = part
        with warnings.catch_warnings():  # "optimal order is the smallest alpha": a bound all the same
            warnings.simplefilter("ignore", UserWarning)
            return float(rdp.get_epsilon(delta=at, alphas=list(_DOMAIN_ORDERS)))

    bound = max(
        rdp_epsilon(list(history), delta_error / 4),
        *(rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)) for sigma, q, _ in history),
    )
    half_width = max(bound, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    truncated = [TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max) for prv in prvs]
    composed = compose_heterogeneous(dprvs=[discretize(t, domain) for t in truncated], num_self_compositions=steps)
    _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(upper)  # the upper bound, as Opacus returns


def _compose_pld(history: list[Group], delta: float) -> float:
    from dp_accounting.pld import PLDAccountant

    _guard_sparse_power()
    accountant = PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    for mechanism, sigma, q, steps in history:
        accountant.compose(_dp_event(mechanism, sigma, q), steps)  # self-composed: one PLD per group
    return float(accountant.get_epsilon(delta))


_SPARSE_GUARDED = False


def _guard_sparse_power() -> None:
    """Spare dp-accounting's sparse self-composition an exact integer power; the result is unchanged.

    ``SparsePLDPmf.self_compose(n)`` decides between its sparse loop and the dense (FFT)
    path by computing ``size ** n`` as a Python integer: at the step counts a node's
    history reaches (hundreds of thousands of DP-SGD steps in one group) that power has
    hundreds of thousands of digits and took seconds, the whole of a composition. This
    takes the dense path at once when ``n * log(size)`` already shows the power past the
    sparse limit (by a margin no rounding can cross), and leaves every other case to the
    original: the same branch is taken, so every epsilon is bit for bit what it was
    (``tests/privacy/test_accountant.py`` compares them). Installed once, on first use.
    """
    global _SPARSE_GUARDED
    if _SPARSE_GUARDED:
        return
    from dp_accounting.pld import pld_pmf

    original = pld_pmf.SparsePLDPmf.self_compose
    limit = math.log(pld_pmf._MAX_PMF_SPARSE_SIZE) + 1.0

    def self_compose(self, num_times, tail_mass_truncation=1e-15):  # type: ignore[no-untyped-def]
        if isinstance(num_times, int) and num_times > 1 and self.size > 1 and num_times * math.log(self.size) > limit:
            return self.to_dense_pmf().self_compose(num_times, tail_mass_truncation)
        return original(self, num_times, tail_mass_truncation)

    self_compose.original = original  # type: ignore[attr-defined]  # dp-accounting's own, for the tests
    pld_pmf.SparsePLDPmf.self_compose = self_compose
    _SPARSE_GUARDED = True


# The mechanisms dp-accounting's RDP accountant composes (it has no discrete Laplace).
_RDP_MECHANISMS = (POISSON_GAUSSIAN, GAUSSIAN, LAPLACE)


def _dp_event(mechanism: str, sigma: float, q: float):  # type: ignore[no-untyped-def]
    """One application of `mechanism` as dp-accounting's event.

    - DP-SGD's step: the Poisson-subsampled Gaussian mechanism.
    - Gaussian and Laplace: their noise multiplier is dp-accounting's (noise scale over
      sensitivity, L2 and L1).
    - Discrete Laplace of scale ``t`` on sensitivity 1: dp-accounting's noise parameter
      is ``a = 1 / t`` (its probability mass is proportional to ``exp(-a |x|)``).
    """
    from dp_accounting import dp_event

    if mechanism == POISSON_GAUSSIAN:
        return dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    if mechanism == GAUSSIAN:
        return dp_event.GaussianDpEvent(sigma)
    if mechanism == LAPLACE:
        return dp_event.LaplaceDpEvent(sigma)
    if mechanism == DISCRETE_LAPLACE:
        return dp_event.DiscreteLaplaceDpEvent(noise_parameter=1.0 / sigma, sensitivity=1)
    raise AccountingError(f"mechanism {mechanism!r} has no dp-accounting event")  # DPEvent refuses it first


def _refuse_for_opacus(mechanisms: set[str], whose: str) -> None:
    """Refuse the mechanisms other than DP-SGD's, which Opacus's accountants cannot compose."""
    others = sorted(mechanisms - {POISSON_GAUSSIAN})
    if others:
        plural = len(others) > 1
        raise AccountingError(
            f"{whose} accountant composes DP-SGD's poisson-gaussian mechanism only, not the {_names(others)} "
            f"mechanism{'s' if plural else ''}; only the ledger's PLD accountant (accountant='pld') composes "
            f"{'them' if plural else 'it'}"
        )


def _names(mechanisms: Sequence[str]) -> str:
    return " and ".join([", ".join(mechanisms[:-1]), mechanisms[-1]] if len(mechanisms) > 1 else mechanisms)


def _new_accountant(name: str) -> IAccountant:
    from opacus.accountants import RDPAccountant

    assert name == "rdp", name  # PRV composes through _compose_prv
    return RDPAccountant()


def _check_delta(delta: object, *, name: str) -> None:
    if not _is_real(delta):
        raise AccountingError(f"{name} must be a number; found {delta!r}")
    if not 0 < delta < 1:  # type: ignore[operator]
        raise AccountingError(f"{name} must be in (0, 1); found {delta!r}")


def _check_accountant(accountant: object, allowed: tuple[str, ...] = ACCOUNTANTS) -> None:
    if accountant not in allowed:
        raise AccountingError(
            f"accountant must be one of {', '.join(map(repr, allowed))}; found {accountant!r}"
        )


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
