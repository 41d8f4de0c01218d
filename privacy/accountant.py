"""Privacy accounting: the composed epsilon of a sequence of DP events, by Opacus or dp-accounting.

medfed does not implement an accountant. :func:`epsilon` hands the events to a fresh
Opacus accountant (PRV by default, RDP on request) through its ``history`` and asks
it for epsilon, so the number a node reports is exactly the number Opacus gives for
the same steps. Consecutive events with the same noise multiplier and sample rate are
merged by summing their steps, as Opacus's own ``step()`` does.

``accountant="pld"`` composes the same events with dp-accounting's privacy-loss-
distribution accountant instead (pessimistic discretisation, add-or-remove-one
neighbours, as Opacus assumes): as tight as PRV, and it needs no torch, so a node's
budget checks in its short-lived ClientApp processes stay light (Opacus and torch take
about 3 s to import). Specs keep to :data:`ACCOUNTANTS`, the ones Opacus can also
search a noise multiplier with; :data:`LEDGER_ACCOUNTANTS` are those a node may compose
its budget with.

Opacus (and torch with it) is imported on first use, not on import: a hospital node
imports this module in every short-lived ClientApp process.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

from privacy.errors import AccountingError
from privacy.events import DPEvent

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

__all__ = ["ACCOUNTANTS", "LEDGER_ACCOUNTANTS", "epsilon", "noise_for_target", "opacus_history", "steps_per_epoch"]

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
LEDGER_ACCOUNTANTS = ("pld", *ACCOUNTANTS)

# dp-accounting's PLD grid: 1e-3 in privacy loss keeps a composition to tens of milliseconds
# and epsilon within about 1 % of PRV's at the parameters medfed uses (tests check both).
_PLD_DISCRETIZATION = 1e-3


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
    """
    history: list[tuple[float, float, int]] = []
    for event in events:
        if history and history[-1][:2] == (event.noise_multiplier, event.sample_rate):
            sigma, q, steps = history[-1]
            history[-1] = (sigma, q, steps + event.steps)
        else:
            history.append((event.noise_multiplier, event.sample_rate, event.steps))
    return history


def epsilon(events: Sequence[DPEvent], *, delta: float, accountant: str = "prv") -> float:
    """Composed epsilon of all `events` at `delta`, computed by Opacus.

    Parameters
    ----------
    events
        The DP events in the order they happened; empty gives 0.0.
    delta
        Target delta, in (0, 1).
    accountant
        ``"prv"`` (tight, numerical), ``"pld"`` (tight, numerical, dp-accounting) or
        ``"rdp"``. If PRV or PLD fails, which it can for extreme parameters (for example a
        very small delta), the RDP bound, which is never tighter, is returned and a
        warning logged.

    Raises
    ------
    AccountingError
        `delta` or `accountant` is invalid.
    """
    _check_delta(delta, name="delta")
    _check_accountant(accountant, LEDGER_ACCOUNTANTS)
    history = opacus_history(list(events))
    if not history:
        return 0.0
    if accountant in ("prv", "pld"):
        try:
            value = _compose_pld(history, delta) if accountant == "pld" else _compose("prv", history, delta)
        except (ArithmeticError, RuntimeError, ValueError) as err:
            logger.warning(
                "%s accounting failed for %d event group(s) at delta=%g (%s); using the RDP bound",
                accountant.upper(), len(history), delta, err,
            )
        else:
            if math.isfinite(value):
                return value
            logger.warning(
                "%s accounting gave %s for %d event group(s) at delta=%g; using the RDP bound",
                accountant.upper(), value, len(history), delta,
            )
    return _compose("rdp", history, delta)


def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to `epsilon_tolerance`) whose `steps` stay within `target_epsilon`.

    Opacus's ``get_noise_multiplier`` does the search: the epsilon it reaches is at most
    `target_epsilon` and at least `target_epsilon - epsilon_tolerance`.

    Raises
    ------
    AccountingError
        A parameter is invalid, or the target cannot be reached with any noise
        multiplier up to Opacus's limit (1e6).
    """
    if not _is_real(target_epsilon) or not math.isfinite(target_epsilon) or not target_epsilon > 0:
        raise AccountingError(f"target_epsilon must be a finite number > 0; found {target_epsilon!r}")
    if not _is_real(epsilon_tolerance) or not epsilon_tolerance > 0:
        raise AccountingError(f"epsilon_tolerance must be > 0; found {epsilon_tolerance!r}")
    _check_delta(delta, name="delta")
    _check_accountant(accountant)
    DPEvent(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)  # validates q and steps

    from opacus.accountants.utils import get_noise_multiplier

    def search(name: str) -> float:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=name,
                epsilon_tolerance=epsilon_tolerance,
            )
        )

    try:
        return search(accountant)
    except (ArithmeticError, RuntimeError, ValueError) as err:
        if _budget_too_low(err):
            raise _unreachable(target_epsilon, delta, sample_rate, steps) from None
        if accountant != "prv":
            raise
        logger.warning("PRV accounting failed while searching for the noise (%s); using RDP", err)
    try:
        return search("rdp")
    except ValueError as err:
        if _budget_too_low(err):
            raise _unreachable(target_epsilon, delta, sample_rate, steps) from None
        raise


def _budget_too_low(err: Exception) -> bool:
    # Opacus signals "no noise multiplier up to MAX_SIGMA reaches the target" this way.
    return isinstance(err, ValueError) and "budget is too low" in str(err)


def _unreachable(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> AccountingError:
    return AccountingError(
        f"target_epsilon {target_epsilon!r} cannot be reached in {steps} steps at sample_rate "
        f"{sample_rate!r} and delta {delta!r}; raise target_epsilon, or lower rounds, local "
        "epochs or the sample rate"
    )


def _compose(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = _new_accountant(name)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _compose_pld(history: list[tuple[float, float, int]], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def _new_accountant(name: str) -> IAccountant:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return PRVAccountant() if name == "prv" else RDPAccountant()


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
