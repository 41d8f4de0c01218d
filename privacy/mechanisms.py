"""Noise mechanisms: OpenDP's samplers for the statistics releases, and their noise variance.

medfed does not sample noise itself. Each function here builds one OpenDP measurement
over a whole vector and invokes it once (OpenDP's ``make_laplace`` and
``make_gaussian``), so every value is drawn by OpenDP's exact samplers (the discrete
Laplace and discrete Gaussian of Canonne, Kamath and Steinke, fed by the operating
system's randomness), which cannot be seeded:

- :func:`discrete_laplace`: integer vectors (cell counts) get discrete Laplace noise of
  scale ``t``, probability of ``k`` proportional to ``exp(-|k| / t)``; sensitivity 1,
  so epsilon is ``1 / t`` (the ledger's ``"discrete-laplace"`` event, noise multiplier ``t``).
- :func:`laplace`: float vectors (clipped, centred sums) get Laplace noise of scale
  ``b``; epsilon is ``Δ / b`` for L1 sensitivity ``Δ`` (the ``"laplace"`` event, noise
  multiplier ``b / Δ``). OpenDP 0.16 draws it exactly, on a grid of 2^k finer than the
  scale, so no floating-point attack applies and only the "contrib" feature is needed
  ("floating-point", now "idealized-numerics", stays off).
- :func:`gaussian`: Gaussian noise of standard deviation ``σ`` (floats in, floats out;
  integers in, the discrete Gaussian's integers out; the ``"gaussian"`` event, noise
  multiplier ``σ / Δ`` for L2 sensitivity ``Δ``).

:func:`noise_variance` is what the confidence intervals need. The sensitivity plays no
part here: the caller calibrates the scale from it and charges the matching
:class:`~privacy.events.DPEvent`.

OpenDP is imported on first use. No value is ever named in an error: a message says
which positions are wrong, never what they hold.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from privacy.errors import AccountingError
from privacy.events import DISCRETE_LAPLACE, GAUSSIAN, LAPLACE, WHOLE_DATASET_MECHANISMS

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["add_noise", "discrete_laplace", "gaussian", "laplace", "noise_variance"]

# Positions named in an error about values, at most.
_SHOWN = 5


def discrete_laplace(values: Sequence[int] | NDArray[np.integer], scale: float) -> NDArray[np.int64]:
    """`values` plus discrete Laplace noise of scale `scale`, drawn by OpenDP.

    Parameters
    ----------
    values
        Integers (any shape; an array keeps its shape), such as the cell counts of a
        group-by, whose vector has L1 sensitivity 1.
    scale
        The discrete Laplace scale ``t`` > 0: the probability of noise ``k`` is
        proportional to ``exp(-|k| / t)``.

    Returns
    -------
    numpy.ndarray
        int64, shaped like `values`.

    Raises
    ------
    AccountingError
        `scale` is not a finite number > 0, or `values` are not integers that fit in 64 bits.
    """
    _check_scale(scale)
    vector = _integers(values)
    return _sample("i64", vector, scale, "l1_distance", "make_laplace")


def laplace(values: ArrayLike, scale: float) -> NDArray[np.float64]:
    """`values` plus Laplace noise of scale `scale`, drawn by OpenDP.

    Parameters
    ----------
    values
        Finite real numbers (any shape; an array keeps its shape), such as clipped,
        centred sums.
    scale
        The Laplace scale ``b`` > 0 (standard deviation ``b * sqrt(2)``).

    Returns
    -------
    numpy.ndarray
        float64, shaped like `values`.

    Raises
    ------
    AccountingError
        `scale` is not a finite number > 0, or `values` are not finite real numbers.
    """
    _check_scale(scale)
    vector = _floats(values)
    return _sample("f64", vector, scale, "l1_distance", "make_laplace")


def gaussian(values: ArrayLike, scale: float) -> NDArray[np.float64] | NDArray[np.int64]:
    """`values` plus Gaussian noise of standard deviation `scale`, drawn by OpenDP.

    Integers get the discrete Gaussian (int64 out), anything else real gets float64.

    Raises
    ------
    AccountingError
        `scale` is not a finite number > 0, or `values` are not finite real numbers
        (integers that fit in 64 bits, for integer input).
    """
    _check_scale(scale)
    array = _array(values)
    if array.dtype.kind in "iu":
        return _sample("i64", _integers(array), scale, "l2_distance", "make_gaussian")
    return _sample("f64", _floats(array), scale, "l2_distance", "make_gaussian")


def add_noise(values: ArrayLike, *, mechanism: str, scale: float) -> NDArray[np.float64] | NDArray[np.int64]:
    """`values` through the sampler of `mechanism` (one of the DP events' release mechanisms).

    Raises
    ------
    AccountingError
        `mechanism` is not ``"discrete-laplace"``, ``"laplace"`` or ``"gaussian"``, or
        the sampler refuses `values` or `scale`.
    """
    if mechanism == DISCRETE_LAPLACE:
        return discrete_laplace(values, scale)  # type: ignore[arg-type]
    if mechanism == LAPLACE:
        return laplace(values, scale)
    if mechanism == GAUSSIAN:
        return gaussian(values, scale)
    raise AccountingError(_unknown(mechanism))


def noise_variance(mechanism: str, scale: float) -> float:
    """The variance of one noise value of `mechanism` at `scale`: what an interval adds for DP.

    - ``"laplace"``: ``2 b^2``.
    - ``"discrete-laplace"``: ``2 exp(-1/t) / (1 - exp(-1/t))^2`` (just under ``2 t^2``).
    - ``"gaussian"``: ``σ^2`` (for integer input, the discrete Gaussian's variance is at
      most that, so intervals built on it stay valid).

    Raises
    ------
    AccountingError
        `mechanism` is not a release mechanism, or `scale` is not a finite number > 0.
    """
    if mechanism not in WHOLE_DATASET_MECHANISMS:
        raise AccountingError(_unknown(mechanism))
    _check_scale(scale)
    if mechanism == LAPLACE:
        return 2.0 * scale * scale
    if mechanism == GAUSSIAN:
        return float(scale) * scale
    # expm1 keeps the denominator exact where 1/t is tiny (large scales).
    a = 1.0 / scale
    return 2.0 * math.exp(-a) / math.expm1(-a) ** 2


# ---------------------------------------------------------------- OpenDP


def _sample(atom: str, vector: NDArray[Any], scale: float, metric: str, make: str) -> NDArray[Any]:
    """One OpenDP measurement over the whole of `vector` (flattened), invoked once."""
    if vector.size == 0:
        return vector.copy()
    measurement = _measurement(atom, float(scale), metric, make)
    dp = _opendp()
    try:
        noisy = measurement(np.ascontiguousarray(vector.ravel()))
    except dp.OpenDPException as err:
        # The message could quote a value; say only what kind of failure it was.
        raise AccountingError(f"OpenDP could not add noise to {vector.size} value(s) ({err.variant})") from None
    return np.asarray(noisy, dtype=vector.dtype).reshape(vector.shape)


@lru_cache(maxsize=64)
def _measurement(atom: str, scale: float, metric: str, make: str) -> Any:
    """OpenDP's measurement for vectors of `atom` under `metric` at `scale` (kept for the next vector).

    The measurement holds no data and no randomness, so it may be reused; it draws fresh
    noise at every invocation.
    """
    dp = _opendp()
    domain = dp.atom_domain(T=atom) if atom == "i64" else dp.atom_domain(T=atom, nan=False)
    space = dp.vector_domain(domain), getattr(dp, metric)(T=atom)
    try:
        return getattr(dp.m, make)(*space, scale=scale)
    except dp.OpenDPException as err:
        raise AccountingError(f"OpenDP refuses scale {scale!r} for {make} over {atom} vectors: {err.message}") from None


@cache
def _opendp() -> Any:
    import opendp.prelude as dp

    # "contrib": OpenDP's mechanisms that are proven but not yet vetted, which include
    # make_laplace and make_gaussian. Nothing else is enabled.
    dp.enable_features("contrib")
    return dp


# ---------------------------------------------------------------- input checks


def _check_scale(scale: object) -> None:
    if (
        not isinstance(scale, numbers.Real)
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or not scale > 0
    ):
        raise AccountingError(f"scale must be a finite number > 0; found {scale!r}")


def _array(values: object) -> NDArray[Any]:
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as err:
        raise AccountingError(f"values must be an array of numbers ({type(err).__name__})") from None
    if array.dtype.kind not in "iuf":
        raise AccountingError(f"values must be real numbers; found dtype {array.dtype}")
    return array


def _integers(values: object) -> NDArray[np.int64]:
    array = _array(values)
    if array.size == 0:  # np.asarray([]) is float64; an empty vector of counts is still one
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise AccountingError(f"values must be integers (counts); found dtype {array.dtype}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        too_big = np.flatnonzero(array.ravel() > np.iinfo(np.int64).max)
        raise AccountingError(f"values must fit in 64-bit integers; {_positions(too_big)} do not")
    return array.astype(np.int64, copy=False)


def _floats(values: object) -> NDArray[np.float64]:
    array = _array(values).astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(array.ravel()))
    if bad.size:
        raise AccountingError(f"values must be finite; {_positions(bad)} are not")
    return array


def _positions(indices: NDArray[np.intp]) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:_SHOWN])
    more = f" and {indices.size - _SHOWN} more" if indices.size > _SHOWN else ""
    return f"{indices.size} value(s) (flat positions {shown}{more})"


def _unknown(mechanism: object) -> str:
    return f"mechanism must be one of {', '.join(map(repr, WHOLE_DATASET_MECHANISMS))}; found {mechanism!r}"
