"""One-run privacy auditing: an empirical lower bound on epsilon from guesses about canaries.

The method is Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023, arXiv:2305.08846). ``m`` canaries are each included in one training run
independently with probability 1/2 (the secret ``S``). After the run, an auditor scores
every canary, guesses "in" for the ``k_plus`` highest scores and "out" for the ``k_minus``
lowest, and abstains on the rest. If the training is (epsilon, delta)-DP, the number of
correct guesses ``W`` among the ``r = k_plus + k_minus`` made is stochastically dominated
by what epsilon-DP randomized response would allow, up to a delta term (the paper's main
result, and the computation of its Appendix D):

    P[W >= v] <= beta + 2 m delta alpha,
    beta  = P[Binomial(r, p) >= v],              p = e^eps / (1 + e^eps),
    alpha = max over i in 1..v of P[v - i <= Binomial(r, p) < v] / i.

The right-hand side is the p-value of the hypothesis "the training is (eps, delta)-DP"
after ``v`` correct guesses (:func:`p_value`). The empirical lower bound at confidence
``c`` is the largest eps that this p-value rejects at level ``1 - c``
(:func:`epsilon_lower_bound`): with probability at least ``c`` over the canaries' coins
and the training's randomness, a mechanism that is (eps, delta)-DP does not produce a
bound above eps. It is a *lower* bound: it can show that an accountant's epsilon is too
small (a bug in the accounting or the training), never that it is right.

:func:`audit_scores` turns canary scores into one such bound. It tries a small family of
guess counts fixed in advance (:func:`guess_options`: top-k only, and top-k/2 with
bottom-k/2, for k a fixed fraction of m) and reports the largest bound, each computed at
level ``(1 - c) / len(options)``: a Bonferroni correction, so the reported bound keeps
confidence ``c`` although the best option was picked after seeing the scores.

Why not a library (PyPI, December 2026): jax-privacy 2.0's ``auditing`` module implements
this p-value, but comes with JAX, which a hospital node does not otherwise install;
opake-auditing 0.16 has a one-run estimator, but on the Opake engine (its own torch
substrate and DP-SGD, whose canary partitioning and scores assume training through it),
while a node must audit the DP-SGD it runs (Opacus, through ``models.training``);
privacy-estimates 0.1 (2022) and privacy-meter 1.0 (2023) predate the one-run method. The
formula above is the paper's own (Appendix D); the tests check it against its closed forms
and against randomized response.

scipy does the binomial tails and the root search. This module reads no data and
imports nothing of medfed's but its errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from privacy.errors import AccountingError

__all__ = [
    "DEFAULT_CONFIDENCE",
    "GUESS_FRACTIONS",
    "OneRunBound",
    "audit_scores",
    "epsilon_lower_bound",
    "guess_options",
    "p_value",
]

#: The confidence the node reports bounds at unless told otherwise.
DEFAULT_CONFIDENCE = 0.95
#: Guess counts tried, as fractions of the canaries: each as top-k alone and as top-k/2 with bottom-k/2.
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4)
# Past this, e^eps / (1 + e^eps) is 1 in double precision: no number of guesses rejects more.
_MAX_EPSILON = 50.0


@dataclass(frozen=True)
class OneRunBound:
    """The empirical lower bound of one audit, and the guesses that gave it.

    ``epsilon`` is 0.0 when no guess option rejects eps = 0 at its level (the audit saw
    nothing a DP mechanism with any epsilon could not do by chance).
    """

    epsilon: float
    confidence: float
    delta: float
    canaries: int
    guesses: int  # r = k_plus + k_minus of the option that gave the bound
    correct: int  # v: correct guesses among them
    k_plus: int
    k_minus: int
    options: int  # guess options tried (the Bonferroni factor)


def _check(canaries: int, guesses: int, correct: int, delta: float) -> None:
    problems = []
    if isinstance(canaries, bool) or not isinstance(canaries, int | np.integer) or canaries < 1:
        problems.append(f"canaries must be an integer >= 1; found {canaries!r}")
    elif isinstance(guesses, bool) or not isinstance(guesses, int | np.integer) or not 0 <= guesses <= canaries:
        problems.append(f"guesses must be an integer in 0..canaries ({canaries}); found {guesses!r}")
    elif isinstance(correct, bool) or not isinstance(correct, int | np.integer) or not 0 <= correct <= guesses:
        problems.append(f"correct must be an integer in 0..guesses ({guesses}); found {correct!r}")
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
        problems.append(f"delta must be in [0, 1); found {delta!r}")
    if problems:
        raise AccountingError("; ".join(problems))


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise AccountingError(f"confidence must be in (0, 1); found {confidence!r}")


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least `correct` of `guesses` guesses right] if the training is (epsilon, delta)-DP.

    Steinke, Nasr and Jagielski (2023), as their Appendix D computes it:
    ``beta + 2 m delta alpha`` (see the module docstring), capped at 1.
    """
    _check(canaries, guesses, correct, delta)
    if not math.isfinite(epsilon) or epsilon < 0:
        raise AccountingError(f"epsilon must be a finite number >= 0; found {epsilon!r}")
    r, v = int(guesses), int(correct)
    p = float(special.expit(epsilon))  # how often epsilon-DP randomized response guesses right
    beta = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # P[v - i <= Binomial(r, p) < v] for i = 1..v: cumulative sums of the pmf below v.
    below = np.cumsum(stats.binom.pmf(v - i, r, p))
    alpha = float(np.max(below / i))
    return min(beta + 2.0 * canaries * delta * alpha, 1.0)


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, confidence: float) -> float:
    """The largest epsilon that `correct` of `guesses` guesses refute at `confidence`; 0.0 if none.

    The p-value grows with epsilon (randomized response with a larger epsilon guesses
    right more often), so the bound is where it crosses ``1 - confidence``: bracketed by
    doubling, then found by Brent's method to 1e-9.
    """
    _check(canaries, guesses, correct, delta)
    _check_confidence(confidence)
    level = 1.0 - confidence

    def excess(eps: float) -> float:
        return p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta) - level

    if guesses == 0 or excess(0.0) >= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) < 0:
        if high >= _MAX_EPSILON:
            return _MAX_EPSILON
        low, high = high, min(2.0 * high, _MAX_EPSILON)
    return float(optimize.brentq(excess, low, high, xtol=1e-9))


def guess_options(canaries: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The ``(k_plus, k_minus)`` guess counts tried on `canaries` canaries, fixed before any score is seen."""
    options: list[tuple[int, int]] = []
    for fraction in fractions:
        k = max(1, int(fraction * canaries))
        for option in ((k, 0), (k - k // 2, k // 2)):
            if option not in options and sum(option) <= canaries:
                options.append(option)
    return options


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
    options: Sequence[tuple[int, int]] | None = None,
) -> OneRunBound:
    """The one-run lower bound from each canary's score (higher: more likely in) and whether it was in.

    Ties keep the canaries' order (their index, which is independent of who was in), so
    the guesses are a function of the scores alone, as the theorem requires.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if scores.ndim != 1 or included.shape != scores.shape:
        raise AccountingError(f"scores and included must be two vectors of one length; found {scores.shape} and {included.shape}")
    if m == 0 or not np.isfinite(scores).all():
        raise AccountingError("scores must be a non-empty vector of finite numbers")
    _check_confidence(confidence)
    options = list(options) if options is not None else guess_options(m)
    if not options:
        raise AccountingError("at least one guess option is needed")
    level = (1.0 - confidence) / len(options)
    order = np.argsort(-scores, kind="stable")
    best = OneRunBound(0.0, confidence, delta, m, 0, 0, 0, 0, len(options))
    for k_plus, k_minus in options:
        if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
            raise AccountingError(f"guess option ({k_plus}, {k_minus}) does not fit {m} canaries")
        top, bottom = order[:k_plus], order[m - k_minus :] if k_minus else order[:0]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        bound = epsilon_lower_bound(
            canaries=m, guesses=k_plus + k_minus, correct=correct, delta=delta, confidence=1.0 - level
        )
        if bound > best.epsilon or best.guesses == 0:
            best = OneRunBound(bound, confidence, delta, m, k_plus + k_minus, correct, k_plus, k_minus, len(options))
    return best
