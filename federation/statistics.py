"""Combining the sites' noisy statistics releases into pooled estimates with confidence intervals.

Each site answers a statistics query with noisy vectors (one value per group-by cell, or
cells × bins) and the noise it added: the discrete Laplace mechanism (scale t, variance
``2e^{-1/t}/(1-e^{-1/t})^2``) on counts, the Laplace mechanism (scale b, variance ``2b^2``)
on sums of values centred at the midpoint of their bounds, optionally the Gaussian (scale
σ, variance σ²). The coordinator only post-processes them: nothing here touches patient
data, and the noise it simulates nowhere; every rule below is deterministic.

The functions work on plain numpy data (:class:`NoisyVector`, one per site and release)
so that they bind to the query model by position; :meth:`NoisyVector.from_answer` reads
one release out of a site answer in the wire layout of the shared plan. Each returns one
:class:`~experiments.study_report.Estimate` per cell (or a tuple per cell for bins,
quantiles, 2×2 cells and survival times); :func:`report_rows` labels them for the report.

What is estimated, and so which errors the interval covers
------------------------------------------------------------
- **Census quantities** (count, sum, histogram bins, 2×2 cells) are totals over the
  patients the contributing sites hold: there is no sampling error, only the DP noise.
  Their interval is the exact central interval of the summed noise (the sites' noise
  distributions convolved; on the integer lattice for counts, so coverage is at least the
  level), clipped below at 0 for counts. The point estimate is the unbiased noisy sum and
  can be negative; plots draw it as 0.
- **Superpopulation parameters** (mean, variance, SD, proportion, quantiles, odds ratio,
  survival) treat the pooled patients as a sample: the interval covers sampling and DP
  noise together (normal approximation on the scale stated per statistic, the noise
  variance added to the sampling variance; the noises are independent of each other and
  of the sample).

Rules per statistic (n is the pooled noisy count, centred values lie in [-r, r] with
r = (upper - lower)/2 and midpoint m)
-----------------------------------------------------------------------------------------
- mean: ``m + S/n`` (Σ noisy centred sums over Σ noisy counts), clipped to the bounds.
  Variance ``σ²/n + (v_S + R² v_n)/n²`` (R = S/n; delta method). σ² is ``Q/n - R²`` when a
  noisy centred sum of squares Q is released, else the worst case for the bounds, r².
- variance: ``(Q - S²/n)/(n - 1)``, clipped to [0, r²]. Sampling variance ``(μ4 - σ⁴)/n``
  with μ4 bounded by ``(2r)² σ²`` (no fourth moment is released; ``kurtosis=`` replaces the
  bound by ``(κ - 1)σ⁴/n`` when the caller is willing to assume one), plus the noise by
  the delta method. SD: the square roots of the variance's estimate and interval.
- proportion: ``E/n`` clipped to [0, 1]. Interval: the Wilson score interval with the
  noise added to the score variance, ``p(1-p)/n + (v_E + p² v_n)/n²`` at the hypothesised
  p, solved as a quadratic and clipped to [0, 1]. Wilson rather than the delta method
  because prevalences near 0 or 1 in small cells are the common case, where the Wald
  interval collapses to a point.
- quantiles: from the merged noisy histogram. The cumulative noisy counts at the bin
  edges are made non-decreasing (running maximum) and clipped to [0, total]; the quantile
  is interpolated linearly inside its bin. Interval: Woodruff's: a normal interval for
  F at the quantile, with variance ``p(1-p)/n`` plus the noise variance of the merged CDF
  there, mapped back through the same interpolated CDF.
- odds ratio: crude pooled 2×2 table (sites' cells summed). Noisy cells below 0 are set
  to 0; when any cell is then 0, 0.5 is added to all four (Haldane–Anscombe). Woolf's
  interval on the log scale with variance ``Σ 1/x + Σ v/x²`` (sampling plus noise).
- survival: pooled events and censorings per time bin and the noisy total; negative
  values are set to 0. Risk sets are derived: ``n_k = total - Σ_{j<k}(events_j +
  censored_j)``; ``S_k = Π_{j≤k}(1 - d_j/n_k)`` with ``d_j = min(events_j, n_j)``, so S
  is non-increasing and within [0, 1]. Variance of log S: Greenwood's sum plus the noise
  of the total, the events and the censorings propagated by the delta method; the
  interval is the log-log one (as lifelines'). ``S_k`` is survival past the bin's right
  edge; all events of a bin count as happening before its censorings. A bin whose
  derived risk set is not positive ends the curve (NaN from there on).

Suppression: a site that suppressed a cell contributes nothing to it (none of the
statistic's releases for that cell). Each estimate says how many sites contributed; a
cell no site released is marked suppressed (NaN estimate). The pooled count is the
total over the contributing sites only.

Securely aggregated studies: every rule above reads only the sums over the sites that
released each cell and the noise of those sums, so the coordinator needs no site's own
vector. A :class:`NoisyVector` with ``sites`` holds such a sum, as SecAgg+ delivers it
(``federation.protocol.SecureTotals``): per cell, the total over ``sites[cell]`` sites,
each of which added its own noise at the vector's mechanism and scale (public: the spec
fixes them). Its noise in a cell is then ``sites[cell]`` independent draws, which is
what the pooled variances and the exact noise intervals compose; pooling one such total
gives the estimates that pooling the sites' own vectors would.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from experiments.study_report import Estimate, ReportRow
from federation.errors import StatisticsError
from privacy import mechanisms

__all__ = [
    "MECHANISMS",
    "NoisyVector",
    "merged_histogram",
    "noise_variance",
    "pooled_count",
    "pooled_mean",
    "pooled_odds_ratio",
    "pooled_proportion",
    "pooled_quantiles",
    "pooled_sd",
    "pooled_sum",
    "pooled_survival",
    "pooled_table",
    "pooled_variance",
    "report_rows",
]

MECHANISMS = ("discrete-laplace", "laplace", "gaussian")

NOTE_COUNT = "census count over the contributing sites; exact interval of the summed noise, clipped at 0"
NOTE_SUM = "census total over the contributing sites; interval of the summed noise"
NOTE_BIN = "census count; interval of the summed noise; noisy sums may be < 0 (plots draw 0)"
NOTE_MEAN_Q = "ratio estimator; delta method, noise + sampling (variance from the noisy sum of squares)"
NOTE_MEAN_BOUND = "ratio estimator; delta method, noise + sampling (worst-case variance ((upper-lower)/2)^2)"
NOTE_VARIANCE = "noise (delta method) + sampling, 4th moment bounded by (upper-lower)^2 s^2; in [0, ((upper-lower)/2)^2]"
NOTE_VARIANCE_KURTOSIS = "noise (delta method) + sampling with assumed kurtosis {kurtosis:g}; in [0, ((upper-lower)/2)^2]"
NOTE_SD = "square roots of the variance's estimate and interval"
NOTE_PROPORTION = "Wilson score interval with the noise variance added; in [0, 1]"
NOTE_QUANTILE = "merged noisy histogram, linear inside bins; Woodruff interval, sampling + noise"
NOTE_ODDS = "crude pooled 2x2; Woolf log-OR interval, sampling + noise"
NOTE_SURVIVAL = "product-limit on derived risk sets; Greenwood + noise (delta method), log-log interval"
NOTE_UNDEFINED = "undefined: the pooled noisy count is too small"
NOTE_NO_RISK = "undefined: no one left in the derived risk set"

TABLE_QUANTITIES = ("exposed, outcome", "exposed, no outcome", "unexposed, outcome", "unexposed, no outcome")


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise StatisticsError(f"level must be in (0, 1); found {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


# ---------------------------------------------------------------- noise


def noise_variance(mechanism: str, scale: float) -> float:
    """The variance of one noisy value released by `mechanism` at `scale` (Gaussian: scale
    is σ), as :func:`privacy.mechanisms.noise_variance` gives it; 0 for scale 0 (no noise).

    Raises
    ------
    StatisticsError
        Unknown mechanism, or a scale that is negative or not finite.
    """
    _check_noise(mechanism, scale, "mechanism")
    return 0.0 if scale == 0 else mechanisms.noise_variance(mechanism, scale)


def _check_noise(mechanism: str, scale: float, where: str) -> None:
    if mechanism not in MECHANISMS:
        raise StatisticsError(f"{where} must be one of {', '.join(MECHANISMS)}; found {mechanism!r}")
    if not (math.isfinite(scale) and scale >= 0):
        raise StatisticsError(f"{where}: scale must be finite and >= 0; found {scale}")


def _laplace_cdf(x: np.ndarray, b: float) -> np.ndarray:
    return np.where(x < 0, 0.5 * np.exp(np.minimum(x, 0) / b), 1 - 0.5 * np.exp(-np.maximum(x, 0) / b))


_erf = np.frompyfunc(math.erf, 1, 1)


def _component_pmf(weight: float, mechanism: str, scale: float, step: float) -> np.ndarray:
    """The noise `weight`·X on the grid ``step``·k, as a symmetric pmf array centred at its middle."""
    if mechanism == "discrete-laplace":
        p = math.exp(-1.0 / scale)
        reach = math.ceil(36 * scale) + 1  # p**reach < 1e-15
        k = np.arange(-reach, reach + 1)
        mass = (1 - p) / (1 + p) * p ** np.abs(k)
        k, mass = k[mass > 1e-18], mass[mass > 1e-18]  # a tiny scale is exact: k = 0 alone
        where = np.rint(k * weight / step).astype(np.int64)
        half = int(where.max())
        pmf = np.zeros(2 * half + 1)
        np.add.at(pmf, where + half, mass)
        return pmf
    sd = weight * (math.sqrt(2) * scale if mechanism == "laplace" else scale)
    half = math.ceil(26 * sd / step) + 1  # beyond 26 sd: < 1e-15 for both
    edges = (np.arange(-half, half + 2) - 0.5) * step
    if mechanism == "laplace":
        cdf = _laplace_cdf(edges, weight * scale)
    else:
        cdf = 0.5 * (1 + _erf(edges / (weight * scale * math.sqrt(2))).astype(float))
    return np.diff(cdf)


@functools.lru_cache(maxsize=1024)
def _noise_halfwidth(components: tuple[tuple[float, str, float], ...], level: float) -> float:
    """The smallest h with P(|Σ w·X| <= h) >= level, for independent symmetric noises (w, mechanism, scale).

    On the integer lattice (counts: discrete Laplace, integer weights) the answer is exact.
    Otherwise the noises are put on a grid of 1/200 of the sum's standard deviation and
    convolved: h is then within one grid step.
    """
    live = [(abs(w), m, s) for w, m, s in components if w != 0 and s > 0]
    if not live:
        return 0.0
    lattice = all(m == "discrete-laplace" and float(w).is_integer() for w, m, _ in live)
    sd = math.sqrt(sum(w * w * noise_variance(m, s) for w, m, s in live))
    if sd == 0:
        return 0.0
    step = 1.0 if lattice else sd / 200
    counts: dict[tuple[float, str, float], int] = {}
    for component in live:
        counts[component] = counts.get(component, 0) + 1
    pmfs = {c: _component_pmf(*c, step) for c in counts}
    length = sum((len(pmfs[c]) - 1) * n for c, n in counts.items()) + 1
    size = 1 << (length - 1).bit_length()
    spectrum = np.ones(size // 2 + 1, dtype=complex)
    for component, times in counts.items():
        spectrum *= np.fft.rfft(pmfs[component], size) ** times
    mass = np.clip(np.fft.irfft(spectrum, size)[:length], 0, None)
    mass /= mass.sum()
    centre = length // 2
    if centre == 0:
        return 0.0
    right, left = mass[centre + 1 :], mass[centre - 1 :: -1]  # equal lengths: the pmf is symmetric
    inside = mass[centre] + np.concatenate([[0.0], np.cumsum(right + left)])  # P(|X| <= j step)
    reach = int(np.searchsorted(inside, level - 1e-12))
    return min(reach, length - centre - 1) * step


def _halfwidth(components: Sequence[tuple[float, str, float]], level: float) -> float:
    return _noise_halfwidth(tuple(sorted(components)), level)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class NoisyVector:
    """One site's release of one noisy vector.

    Attributes
    ----------
    values
        Shape ``(cells,)`` or ``(cells, width)`` (bins, 2×2 cells), in the query's cell
        order; NaN where the site suppressed the cell (a row with any NaN counts as missing).
    mechanism
        ``"discrete-laplace"`` (counts), ``"laplace"`` (sums) or ``"gaussian"``.
    scale
        The noise scale the site used (Laplace b, discrete Laplace t, Gaussian σ); 0 means
        no noise (exact values: oracles and tests).

    Raises
    ------
    StatisticsError
        Unknown mechanism, bad scale, or values that are not 1- or 2-dimensional.
    """

    values: np.ndarray
    mechanism: str
    scale: float
    sites: np.ndarray | None = None

    def __post_init__(self) -> None:
        values = np.array(self.values, dtype=float)
        if values.ndim not in (1, 2):
            raise StatisticsError(f"values must be (cells,) or (cells, width); found shape {values.shape}")
        values.setflags(write=False)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "scale", float(self.scale))
        _check_noise(self.mechanism, self.scale, "mechanism")
        if self.sites is not None:
            sites = np.asarray(self.sites)
            if sites.shape != (values.shape[0],) or not np.all(np.isfinite(sites)) or np.any(sites < 0) or np.any(sites != np.rint(sites)):
                raise StatisticsError(f"sites must hold one whole number >= 0 per cell ({values.shape[0]}); found {list(np.ravel(sites))}")
            sites = sites.astype(np.int64)
            sites.setflags(write=False)
            object.__setattr__(self, "sites", sites)

    @property
    def variance(self) -> float:
        """The noise variance of each value one site released."""
        return noise_variance(self.mechanism, self.scale)

    def contributions(self) -> np.ndarray:
        """Per cell: how many sites' releases the values sum (1 for a site's own vector, 0 where it suppressed)."""
        ones = np.ones(self.cells, dtype=np.int64) if self.sites is None else self.sites
        return np.where(self.present(), ones, 0)

    @property
    def cells(self) -> int:
        return int(self.values.shape[0])

    @property
    def width(self) -> int:
        return 1 if self.values.ndim == 1 else int(self.values.shape[1])

    def present(self) -> np.ndarray:
        """Per cell: did the site release it (every value of its row finite; for a sum, at least one site)?"""
        finite = np.isfinite(self.values)
        present = finite if finite.ndim == 1 else finite.all(axis=1)
        return present if self.sites is None else present & (self.sites > 0)

    @classmethod
    def from_answer(
        cls,
        answer: Mapping[str, Any],
        *,
        statistic: str,
        name: str,
        cells: int,
        width: int = 1,
        part: int = 0,
        parts: int = 1,
    ) -> NoisyVector:
        """Read release `name` of `statistic` from a site answer (the shared plan's wire layout).

        The release's ``values`` hold ``parts`` blocks of ``cells × width`` values, row-major
        (``None`` for a suppressed value); `part` picks the block (Kaplan–Meier's ``events``
        release is events then censorings: ``parts=2``). Cells listed in the answer's
        ``suppressed`` become NaN rows. An answer with ``sites`` (one whole number per cell)
        is a sum over that many sites per cell (a securely aggregated study's totals).

        Raises
        ------
        StatisticsError
            No such release, a length that is not ``parts × cells × width``, a suppressed
            index out of range, a value that is not a number, or ``sites`` that do not fit.
        """
        where = f"release {name!r} of statistic {statistic!r}"
        found = [r for r in answer.get("releases", ()) if r.get("statistic") == statistic and r.get("name") == name]
        if len(found) != 1:
            raise StatisticsError(f"the site answer must have exactly one {where}; found {len(found)}")
        release = found[0]
        raw = release.get("values")
        expected = parts * cells * width
        if not isinstance(raw, (list, tuple)) or len(raw) != expected:
            size = len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__
            raise StatisticsError(
                f"{where}: values must have {expected} entries ({parts} x {cells} cells x {width}); found {size}"
            )
        try:
            flat = np.array([math.nan if v is None else float(v) for v in raw], dtype=float)
        except (TypeError, ValueError):
            raise StatisticsError(f"{where}: values must be numbers or null") from None
        block = flat[part * cells * width : (part + 1) * cells * width]
        values = block if width == 1 else block.reshape(cells, width)
        for index in answer.get("suppressed", ()):
            if not (isinstance(index, int) and 0 <= index < cells):
                raise StatisticsError(f"suppressed must list cell indexes in [0, {cells}); found {index!r}")
            values[index] = math.nan
        try:
            scale = float(release["scale"])
        except (KeyError, TypeError, ValueError):
            raise StatisticsError(f"{where}: scale must be a number; found {release.get('scale')!r}") from None
        sites = answer.get("sites")
        if sites is not None and (not isinstance(sites, (list, tuple)) or len(sites) != cells):
            raise StatisticsError(f"sites must hold one number per cell ({cells}); found {sites!r}")
        return cls(values, str(release.get("mechanism")), scale, None if sites is None else np.asarray(sites, dtype=float))


@dataclass(frozen=True)
class _Pooled:
    """Several releases summed over the sites that released each cell."""

    sums: dict[str, np.ndarray]  # role -> (cells,) or (cells, width)
    variances: dict[str, np.ndarray]  # role -> (cells,): noise variance of each pooled value
    components: dict[str, list[list[tuple[float, str, float]]]]  # role -> per cell: (1, mechanism, scale) per site
    sites: np.ndarray  # (cells,) contributing sites


def _pool(roles: Mapping[str, Sequence[NoisyVector]], *, widths: Mapping[str, int] | None = None) -> _Pooled:
    names = list(roles)
    site_count = len(roles[names[0]])
    if site_count == 0:
        raise StatisticsError(f"{names[0]} must hold one vector per site; found none")
    for name in names:
        if len(roles[name]) != site_count:
            raise StatisticsError(
                f"{name} has {len(roles[name])} sites; {names[0]} has {site_count}: one vector per site each"
            )
    cells = roles[names[0]][0].cells
    for name in names:
        for index, vector in enumerate(roles[name]):
            if not isinstance(vector, NoisyVector):
                raise StatisticsError(f"{name}[{index}] must be a NoisyVector; found {type(vector).__name__}")
            if vector.cells != cells:
                raise StatisticsError(f"{name}[{index}] has {vector.cells} cells; {names[0]}[0] has {cells}")
            want = (widths or {}).get(name)
            if want is not None and vector.width != want:
                raise StatisticsError(f"{name}[{index}] has width {vector.width}; expected {want}")
            if vector.width != roles[name][0].width:
                raise StatisticsError(f"{name}[{index}] has width {vector.width}; {name}[0] has {roles[name][0].width}")
    mask = np.ones((site_count, cells), dtype=bool)
    for name in names:
        for index, vector in enumerate(roles[name]):
            mask[index] &= vector.present()
    # Per input and cell: how many sites' releases it sums (a site's own vector: one; a secure total: many).
    counts = np.zeros((site_count, cells), dtype=np.int64)
    for index in range(site_count):
        per_role = {tuple(roles[name][index].contributions()[mask[index]]) for name in names}
        if len(per_role) != 1:
            raise StatisticsError(f"the releases of input {index} sum different numbers of sites in a cell; they must agree")
        counts[index] = np.where(mask[index], roles[names[0]][index].contributions(), 0)
    sums, variances, components = {}, {}, {}
    for name in names:
        first = roles[name][0].values
        total = np.zeros(first.shape)
        variance = np.zeros(cells)
        per_cell: list[list[tuple[float, str, float]]] = [[] for _ in range(cells)]
        for index, vector in enumerate(roles[name]):
            keep = mask[index]
            total[keep] += vector.values[keep]
            variance[keep] += vector.variance * counts[index][keep]
            for cell in np.flatnonzero(keep):
                per_cell[cell].extend([(1.0, vector.mechanism, vector.scale)] * int(counts[index][cell]))
        sums[name], variances[name], components[name] = total, variance, per_cell
    return _Pooled(sums, variances, components, counts.sum(axis=0))


def _bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    lower, upper = (float(b) for b in bounds)
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise StatisticsError(f"bounds must be finite with lower < upper; found {bounds}")
    return (lower + upper) / 2, (upper - lower) / 2


def _edges(edges: Sequence[float], bins: int, what: str = "edges") -> np.ndarray:
    array = np.asarray(edges, dtype=float)
    if array.ndim != 1 or len(array) != bins + 1:
        found = len(array) if array.ndim == 1 else array.shape
        raise StatisticsError(f"{what} must hold bins + 1 = {bins + 1} values; found {found}")
    if not (np.all(np.isfinite(array)) and np.all(np.diff(array) > 0)):
        raise StatisticsError(f"{what} must be finite and strictly increasing; found {list(array)}")
    return array


# ---------------------------------------------------------------- census totals


def pooled_count(counts: Sequence[NoisyVector], *, level: float = 0.95) -> list[Estimate]:
    """The number of patients per cell: Σ noisy counts over the sites that released the cell.

    A census count: the interval covers the DP noise only, exactly (see the module
    docstring), clipped below at 0.

    Raises
    ------
    StatisticsError
        Sites' vectors disagree in cells, or `level` is not in (0, 1).
    """
    _z(level)
    pooled = _pool({"counts": counts})
    out = []
    for cell, n in enumerate(pooled.sums["counts"]):
        if pooled.sites[cell] == 0:
            out.append(Estimate.suppressed_everywhere())
            continue
        h = _halfwidth(pooled.components["counts"][cell], level)
        out.append(Estimate(float(n), max(n - h, 0.0), max(n + h, 0.0), int(pooled.sites[cell]), False, NOTE_COUNT))
    return out


def pooled_sum(
    sums: Sequence[NoisyVector], counts: Sequence[NoisyVector], *, bounds: tuple[float, float], level: float = 0.95
) -> list[Estimate]:
    """The total of a bounded column per cell: ``Σ noisy centred sums + midpoint · Σ noisy counts``.

    A census total: the interval covers the DP noise of both releases only (their
    summed noise, the counts' weighted by the midpoint).

    Raises
    ------
    StatisticsError
        Sites' vectors disagree in cells or sites, or `bounds` are not lower < upper.
    """
    _z(level)
    midpoint, _ = _bounds(bounds)
    pooled = _pool({"sums": sums, "counts": counts})
    out = []
    for cell in range(len(pooled.sites)):
        if pooled.sites[cell] == 0:
            out.append(Estimate.suppressed_everywhere())
            continue
        total = pooled.sums["sums"][cell] + midpoint * pooled.sums["counts"][cell]
        noise = pooled.components["sums"][cell] + [(midpoint, m, s) for _, m, s in pooled.components["counts"][cell]]
        h = _halfwidth(noise, level)
        out.append(Estimate(float(total), float(total - h), float(total + h), int(pooled.sites[cell]), False, NOTE_SUM))
    return out


# ---------------------------------------------------------------- moments


def pooled_mean(
    sums: Sequence[NoisyVector],
    counts: Sequence[NoisyVector],
    *,
    bounds: tuple[float, float],
    squares: Sequence[NoisyVector] | None = None,
    level: float = 0.95,
) -> list[Estimate]:
    """The mean of a bounded column per cell: the ratio ``midpoint + Σ centred sums / Σ counts``.

    Interval: normal, with the delta-method variance ``σ²/n + (v_S + R² v_n)/n²``; σ² from
    the noisy centred sums of squares when `squares` are given, else ((upper-lower)/2)²,
    the largest variance a column within its bounds can have. Clipped to the bounds.

    Raises
    ------
    StatisticsError
        Sites' vectors disagree in cells or sites, or `bounds` are not lower < upper.
    """
    z = _z(level)
    midpoint, half = _bounds(bounds)
    roles = {"sums": sums, "counts": counts} | ({"squares": squares} if squares is not None else {})
    pooled = _pool(roles)
    lower, upper = midpoint - half, midpoint + half
    out = []
    for cell in range(len(pooled.sites)):
        sites = int(pooled.sites[cell])
        if sites == 0:
            out.append(Estimate.suppressed_everywhere())
            continue
        n = pooled.sums["counts"][cell]
        if n < 1:
            out.append(Estimate(math.nan, math.nan, math.nan, sites, False, NOTE_UNDEFINED))
            continue
        ratio = float(np.clip(pooled.sums["sums"][cell] / n, -half, half))
        if squares is not None:
            spread = float(np.clip(pooled.sums["squares"][cell] / n - ratio**2, 0.0, half**2))
        else:
            spread = half**2
        noise = (pooled.variances["sums"][cell] + ratio**2 * pooled.variances["counts"][cell]) / n**2
        width = z * math.sqrt(spread / n + noise)
        mean = midpoint + ratio
        out.append(Estimate(mean, max(mean - width, lower), min(mean + width, upper), sites, False,
                            NOTE_MEAN_Q if squares is not None else NOTE_MEAN_BOUND))
    return out


def pooled_variance(
    sums: Sequence[NoisyVector],
    squares: Sequence[NoisyVector],
    counts: Sequence[NoisyVector],
    *,
    bounds: tuple[float, float],
    kurtosis: float | None = None,
    level: float = 0.95,
) -> list[Estimate]:
    """The variance of a bounded column per cell: ``(Q - S²/n)/(n - 1)`` from centred sums.

    Interval: normal on the variance, clipped to [0, ((upper-lower)/2)²]. Sampling
    variance ``(μ4 - σ⁴)/n`` with μ4 <= (upper-lower)² σ² (valid for any column within
    its bounds; wide), or ``(kurtosis - 1)σ⁴/n`` when `kurtosis` is given (3 for normal
    data); plus the noise of Q, S and n by the delta method.

    Raises
    ------
    StatisticsError
        Sites' vectors disagree in cells or sites, bad `bounds`, or `kurtosis` < 1.
    """
    z = _z(level)
    _, half = _bounds(bounds)
    if kurtosis is not None and not (math.isfinite(kurtosis) and kurtosis >= 1):
        raise StatisticsError(f"kurtosis must be >= 1 (3 for normal data); found {kurtosis}")
    pooled = _pool({"sums": sums, "squares": squares, "counts": counts})
    note = NOTE_VARIANCE if kurtosis is None else NOTE_VARIANCE_KURTOSIS.format(kurtosis=kurtosis)
    out = []
    for cell in range(len(pooled.sites)):
        sites = int(pooled.sites[cell])
        if sites == 0:
            out.append(Estimate.suppressed_everywhere())
            continue
        n = pooled.sums["counts"][cell]
        if n < 2:
            out.append(Estimate(math.nan, math.nan, math.nan, sites, False, NOTE_UNDEFINED))
            continue
        s, q = pooled.sums["sums"][cell], pooled.sums["squares"][cell]
        variance = float(np.clip((q - s * s / n) / (n - 1), 0.0, half**2))
        if kurtosis is None:
            sampling = max((2 * half) ** 2 * variance - variance**2, 0.0) / n
        else:
            sampling = (kurtosis - 1) * variance**2 / n
        d_q, d_s, d_n = 1 / n, -2 * s / n**2, -q / n**2 + 2 * s * s / n**3
        noise = (d_q**2 * pooled.variances["squares"][cell] + d_s**2 * pooled.variances["sums"][cell]
                 + d_n**2 * pooled.variances["counts"][cell])
        width = z * math.sqrt(sampling + noise)
        out.append(Estimate(variance, max(variance - width, 0.0), min(variance + width, half**2), sites, False, note))
    return out


def pooled_sd(
    sums: Sequence[NoisyVector],
    squares: Sequence[NoisyVector],
    counts: Sequence[NoisyVector],
    *,
    bounds: tuple[float, float],
    kurtosis: float | None = None,
    level: float = 0.95,
) -> list[Estimate]:
    """The standard deviation per cell: the square roots of :func:`pooled_variance`'s estimate and interval.

    Raises
    ------
    StatisticsError
        As :func:`pooled_variance`.
    """
    out = []
    for v in pooled_variance(sums, squares, counts, bounds=bounds, kurtosis=kurtosis, level=level):
        if v.suppressed:
            out.append(v)
        else:
            out.append(Estimate(math.sqrt(v.estimate), math.sqrt(v.lower), math.sqrt(v.upper), v.sites, False,
                                f"{NOTE_SD}: {v.note}" if v.note != NOTE_UNDEFINED else v.note))
    return out


def pooled_proportion(
    events: Sequence[NoisyVector], counts: Sequence[NoisyVector], *, level: float = 0.95
) -> list[Estimate]:
    """A prevalence per cell: Σ noisy event counts / Σ noisy counts, clipped to [0, 1].

    Interval: Wilson's score interval with the noise in the score variance,
    ``p(1-p)/n + (v_E + p² v_n)/n²`` at the hypothesised p (so it reduces to Wilson's
    without noise and stays informative at p̂ = 0 or 1), clipped to [0, 1]; [0, 1] when
    the noise on n is too large for the quadratic to close.

    Raises
    ------
    StatisticsError
        Sites' vectors disagree in cells or sites.
    """
    z = _z(level)
    pooled = _pool({"events": events, "counts": counts})
    out = []
    for cell in range(len(pooled.sites)):
        sites = int(pooled.sites[cell])
        if sites == 0:
            out.append(Estimate.suppressed_everywhere())
            continue
        n = pooled.sums["counts"][cell]
        if n < 1:
            out.append(Estimate(math.nan, math.nan, math.nan, sites, False, NOTE_UNDEFINED))
            continue
        p = float(np.clip(pooled.sums["events"][cell] / n, 0.0, 1.0))
        v_e, v_n = pooled.variances["events"][cell], pooled.variances["counts"][cell]
        z2 = z * z
        # (p - π)² <= z²[π(1-π)/n + (v_e + π² v_n)/n²], a quadratic a π² - b π + c <= 0.
        a = 1 + z2 / n - z2 * v_n / n**2
        b = 2 * p + z2 / n
        c = p * p - z2 * v_e / n**2
        disc = b * b - 4 * a * c
        if a <= 0 or disc < 0:
            lo, hi = 0.0, 1.0
        else:
            root = math.sqrt(disc)
            lo, hi = (b - root) / (2 * a), (b + root) / (2 * a)
        out.append(Estimate(p, min(max(lo, 0.0), p), max(min(hi, 1.0), p), sites, False, NOTE_PROPORTION))
    return out


# ---------------------------------------------------------------- histograms and quantiles


def merged_histogram(bins: Sequence[NoisyVector], *, level: float = 0.95) -> list[tuple[Estimate, ...]]:
    """Per cell, per bin: Σ noisy bin counts over the sites that released the cell.

    Census counts: the interval covers the DP noise only, clipped below at 0. The
    estimate is the unbiased noisy sum and can be negative; plots draw such bins as 0.

    Raises
    ------
    StatisticsError
        Sites' vectors disagree in cells or bins.
    """
    _z(level)
    pooled = _pool({"bins": bins})
    out = []
    width = bins[0].width
    for cell, row in enumerate(np.atleast_2d(pooled.sums["bins"].reshape(len(pooled.sites), width))):
        sites = int(pooled.sites[cell])
        if sites == 0:
            out.append(tuple(Estimate.suppressed_everywhere() for _ in range(width)))
            continue
        h = _halfwidth(pooled.components["bins"][cell], level)
        out.append(tuple(Estimate(float(x), max(x - h, 0.0), max(x + h, 0.0), sites, False, NOTE_BIN) for x in row))
    return out


def _monotone_cdf(row: np.ndarray) -> tuple[np.ndarray, float]:
    """Cumulative noisy counts at the edges, made non-decreasing and clipped to [0, total]."""
    cumulative = np.concatenate([[0.0], np.cumsum(row)])
    total = float(cumulative[-1])
    return np.clip(np.maximum.accumulate(cumulative), 0.0, total), total


def _invert(edges: np.ndarray, cdf: np.ndarray, target: float) -> tuple[float, int, float]:
    """The x where the interpolated `cdf` reaches `target`; its bin and the fraction inside it."""
    if target <= cdf[0]:
        return float(edges[0]), 0, 0.0
    k = min(int(np.searchsorted(cdf, target, side="left")), len(cdf) - 1)
    lo, hi = cdf[k - 1], cdf[k]
    fraction = float((target - lo) / (hi - lo)) if hi > lo else 1.0
    return float(edges[k - 1] + fraction * (edges[k] - edges[k - 1])), k - 1, fraction


def pooled_quantiles(
    bins: Sequence[NoisyVector],
    *,
    edges: Sequence[float],
    probabilities: Sequence[float] = (0.25, 0.5, 0.75),
    level: float = 0.95,
) -> list[tuple[Estimate, ...]]:
    """Quantiles per cell from the merged noisy histogram (one estimate per probability).

    The merged cumulative counts are made non-decreasing and the quantile interpolated
    linearly inside its bin (exact for values spread evenly in a bin; off by at most a
    bin width otherwise). Woodruff's interval: F at the quantile has variance
    ``p(1-p)/n`` (sampling) plus ``(B² v_A + A² v_B - 2AB c)/n⁴``, the noise of the mass
    below (A) and above (B) the quantile, whose shared bin splits its noise; the normal
    interval for F is mapped back through the same CDF.

    Raises
    ------
    StatisticsError
        Sites disagree in cells or bins, `edges` do not fit the bins, or a probability is
        outside (0, 1).
    """
    z = _z(level)
    width = bins[0].width if bins else 0
    pooled = _pool({"bins": bins})
    grid = _edges(edges, width)
    for p in probabilities:
        if not 0 < p < 1:
            raise StatisticsError(f"probabilities must be in (0, 1); found {p}")
    out = []
    rows = pooled.sums["bins"].reshape(len(pooled.sites), width)
    for cell, row in enumerate(rows):
        sites = int(pooled.sites[cell])
        if sites == 0:
            out.append(tuple(Estimate.suppressed_everywhere() for _ in probabilities))
            continue
        cdf, n = _monotone_cdf(row)
        if n < 1:
            out.append(tuple(Estimate(math.nan, math.nan, math.nan, sites, False, NOTE_UNDEFINED) for _ in probabilities))
            continue
        v = pooled.variances["bins"][cell]
        estimates = []
        for p in probabilities:
            x, k, f = _invert(grid, cdf, p * n)
            below, above = p * n, (1 - p) * n
            v_below = (k + f * f) * v
            v_above = (width - k - 1 + (1 - f) ** 2) * v
            shared = f * (1 - f) * v
            spread = p * (1 - p) / n + (above**2 * v_below + below**2 * v_above - 2 * below * above * shared) / n**4
            step = z * math.sqrt(max(spread, 0.0))
            lo = _invert(grid, cdf, max(p - step, 0.0) * n)[0]
            hi = _invert(grid, cdf, min(p + step, 1.0) * n)[0]
            estimates.append(Estimate(x, lo, hi, sites, False, NOTE_QUANTILE))
        out.append(tuple(estimates))
    return out


# ---------------------------------------------------------------- 2x2 tables


def pooled_table(tables: Sequence[NoisyVector], *, level: float = 0.95) -> list[tuple[Estimate, ...]]:
    """The pooled 2×2 table per cell (census counts, in :data:`TABLE_QUANTITIES` order).

    Raises
    ------
    StatisticsError
        Sites disagree in cells, or a vector is not 4 wide.
    """
    for index, table in enumerate(tables):
        if table.width != 4:
            raise StatisticsError(f"tables[{index}] has width {table.width}; a 2x2 table has 4 cells")
    return merged_histogram(tables, level=level)


def pooled_odds_ratio(tables: Sequence[NoisyVector], *, level: float = 0.95) -> list[Estimate]:
    """The odds ratio per cell from the crude pooled 2×2 table ``[a, b, c, d]`` = (exposed &
    outcome, exposed & no outcome, unexposed & outcome, unexposed & no outcome): ``ad/bc``.

    Noisy cells below 0 are set to 0; if any cell is then 0, 0.5 is added to all four
    (Haldane–Anscombe; the note says so). Woolf's interval,
    ``exp(log OR ± z √(Σ 1/x + Σ v/x²))``, with the noise variance v of each pooled cell.

    Raises
    ------
    StatisticsError
        Sites disagree in cells, or a vector is not 4 wide.
    """
    z = _z(level)
    for index, table in enumerate(tables):
        if table.width != 4:
            raise StatisticsError(f"tables[{index}] has width {table.width}; a 2x2 table has 4 cells")
    pooled = _pool({"tables": tables})
    out = []
    for cell, row in enumerate(pooled.sums["tables"].reshape(len(pooled.sites), 4)):
        sites = int(pooled.sites[cell])
        if sites == 0:
            out.append(Estimate.suppressed_everywhere())
            continue
        x = np.maximum(row, 0.0)
        notes = [NOTE_ODDS]
        if (row < 0).any():
            notes.append("noisy cells < 0 set to 0")
        if (x == 0).any():
            x = x + 0.5
            notes.append("Haldane +0.5 on every cell")
        log_or = math.log(x[0] * x[3] / (x[1] * x[2]))
        spread = float(np.sum(1 / x) + pooled.variances["tables"][cell] * np.sum(1 / x**2))
        step = z * math.sqrt(spread)
        out.append(Estimate(math.exp(log_or), math.exp(log_or - step), math.exp(log_or + step), sites, False,
                            "; ".join(notes)))
    return out


# ---------------------------------------------------------------- survival


def pooled_survival(
    events: Sequence[NoisyVector],
    censored: Sequence[NoisyVector],
    totals: Sequence[NoisyVector],
    *,
    level: float = 0.95,
) -> list[tuple[Estimate, ...]]:
    """Pooled Kaplan–Meier survival per cell at the right edge of each time bin.

    `events` and `censored` are ``(cells, bins)`` per site, `totals` ``(cells,)``: the
    patients in the cell, whether or not they had an event or were censored within the
    bins. Rule (module docstring): negative values set to 0, risk sets derived from the
    total, product-limit, Greenwood plus the noise of every release by the delta method,
    log-log interval. Where nothing has happened yet (S = 1) the interval is
    ``[1 - z√V, 1]``; where S reaches 0 it is ``[0, previous upper]``.

    Raises
    ------
    StatisticsError
        Sites disagree in cells or bins, or events and censorings differ in bins.
    """
    z = _z(level)
    width = events[0].width if events else 0
    pooled = _pool({"events": events, "censored": censored, "totals": totals},
                   widths={"censored": width, "totals": 1})
    out = []
    cells = len(pooled.sites)
    all_events = pooled.sums["events"].reshape(cells, width)
    all_censored = pooled.sums["censored"].reshape(cells, width)
    for cell in range(cells):
        sites = int(pooled.sites[cell])
        if sites == 0:
            out.append(tuple(Estimate.suppressed_everywhere() for _ in range(width)))
            continue
        out.append(_survival_curve(
            np.maximum(all_events[cell], 0.0),
            np.maximum(all_censored[cell], 0.0),
            max(float(pooled.sums["totals"][cell]), 0.0),
            v_events=float(pooled.variances["events"][cell]),
            v_censored=float(pooled.variances["censored"][cell]),
            v_total=float(pooled.variances["totals"][cell]),
            sites=sites,
            z=z,
        ))
    return out


def _survival_curve(
    events: np.ndarray, censored: np.ndarray, total: float, *, v_events: float, v_censored: float, v_total: float,
    sites: int, z: float,
) -> tuple[Estimate, ...]:
    bins = len(events)
    at_risk = total - np.concatenate([[0.0], np.cumsum(events + censored)[:-1]])
    greenwood_terms = np.zeros(bins)  # d/(n(n-d)): also ∂ log S / ∂ n_j
    direct = np.zeros(bins)  # 1/(n-d): -∂ log S / ∂ d_j
    log_s = 0.0
    upper_before = 1.0
    out: list[Estimate] = []
    for k in range(bins):
        n = at_risk[k]
        if n <= 0:
            out.extend(Estimate(math.nan, math.nan, math.nan, sites, False, NOTE_NO_RISK) for _ in range(k, bins))
            break
        d = min(events[k], n)
        if d >= n or log_s == -math.inf:
            log_s = -math.inf
            out.append(Estimate(0.0, 0.0, upper_before, sites, False, NOTE_SURVIVAL))
            continue
        log_s += math.log1p(-d / n)
        greenwood_terms[k] = d / (n * (n - d))
        direct[k] = 1 / (n - d)
        so_far = np.cumsum(greenwood_terms[: k + 1])
        greenwood = so_far[-1]
        later = greenwood - so_far  # Σ_{i<j<=k} d_j/(n_j(n_j-d_j)) for each i
        noise = (v_total * greenwood**2 + v_events * float(np.sum((direct[: k + 1] + later) ** 2))
                 + v_censored * float(np.sum(later**2)))
        spread = greenwood + noise
        survival = math.exp(log_s)
        if log_s == 0.0:
            lower, upper = max(1.0 - z * math.sqrt(spread), 0.0), 1.0
        else:
            # Past e^700 the interval is already [0, 1]; the cap keeps math.exp finite.
            stretch = min(z * math.sqrt(spread) / abs(log_s), 700.0)
            lower, upper = survival ** math.exp(stretch), survival ** math.exp(-stretch)
        upper_before = upper
        out.append(Estimate(survival, lower, upper, sites, False, NOTE_SURVIVAL))
    return tuple(out)


# ---------------------------------------------------------------- labels


def _label(x: float) -> str:
    return f"{x:g}"


def report_rows(
    statistic: str,
    kind: str,
    cells: Sequence[tuple[str, ...]],
    per_cell: Sequence[Estimate | Sequence[Estimate]],
    *,
    edges: Sequence[float] | None = None,
    probabilities: Sequence[float] | None = None,
) -> list[ReportRow]:
    """Label a statistic's estimates for the report: one :class:`ReportRow` per number.

    `per_cell` is what the pooled function returned, one entry per cell of `cells` (the
    query's cell labels, in order). Histograms and survival need their `edges` (bin i is
    ``[edges[i], edges[i+1])``; survival is given at ``edges[i+1]``); quantiles their
    `probabilities`; a 2×2 table's rows are labelled :data:`TABLE_QUANTITIES`.

    Raises
    ------
    StatisticsError
        Cells and estimates differ in number, or the edges/probabilities do not fit.
    """
    if len(cells) != len(per_cell):
        raise StatisticsError(f"cells has {len(cells)} labels; per_cell has {len(per_cell)} entries")
    rows: list[ReportRow] = []
    for cell, value in zip(cells, per_cell, strict=True):
        if isinstance(value, Estimate):
            quantity = kind.replace("_", " ")
            rows.append(ReportRow(statistic, kind, tuple(cell), quantity, value))
            continue
        values = tuple(value)
        if kind in ("histogram", "survival"):
            if edges is None:
                raise StatisticsError(f"{kind} rows need the bin edges")
            grid = _edges(edges, len(values))
            for i, v in enumerate(values):
                left, right = _label(grid[i]), _label(grid[i + 1])
                quantity = f"[{left}, {right})" if kind == "histogram" else f"S({right})"
                rows.append(ReportRow(statistic, kind, tuple(cell), quantity, v, float(grid[i]), float(grid[i + 1])))
        elif kind == "quantile":
            if probabilities is None or len(probabilities) != len(values):
                raise StatisticsError(f"quantile rows need one probability per estimate ({len(values)})")
            rows.extend(
                ReportRow(statistic, kind, tuple(cell), f"q{_label(p)}", v)
                for p, v in zip(probabilities, values, strict=True)
            )
        elif kind == "table":
            if len(values) != 4:
                raise StatisticsError(f"a 2x2 table has 4 cells; found {len(values)}")
            rows.extend(ReportRow(statistic, kind, tuple(cell), q, v) for q, v in zip(TABLE_QUANTITIES, values, strict=True))
        else:
            raise StatisticsError(f"kind {kind!r} has one estimate per cell; found {len(values)}")
    return rows
