"""Noise samplers: OpenDP's draws are unbiased and of the mechanism's scale; bad input is refused by name.

OpenDP draws from the operating system's randomness and cannot be seeded, so each
statistical check is a band that a correct sampler leaves with probability below 1e-7,
and each test (three bands at most) fails falsely with probability below 1e-6. The
bands hold for these distributions exactly, not by a normal approximation:

- The whole distribution: the Dvoretzky-Kiefer-Wolfowitz inequality (Massart's constant)
  bounds the largest gap between the empirical and the true CDF,
  ``P(sup |F_n - F| > t) <= 2 exp(-2 n t^2)``; it holds for discrete laws too. The
  true CDF comes from SciPy (``dlaplace``, ``laplace``) or the standard library.
- The mean and the variance: a median of means over ``GROUPS`` groups of ``m`` draws.
  A group's mean is off by ``t`` or more with probability at most
  ``p = Var / (m t^2)`` (Chebyshev); the median is off only if half the groups are,
  which happens with probability at most ``exp(-GROUPS * KL(1/2 || p))`` (Chernoff).
  The variance is checked as the mean of the squared noise (its mean is 0), with the
  fourth moment computed from the distribution.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import pytest
from scipy import stats

from privacy import mechanisms
from privacy.accountant import epsilon
from privacy.errors import AccountingError
from privacy.events import DISCRETE_LAPLACE, GAUSSIAN, LAPLACE, DPEvent
from privacy.mechanisms import add_noise, discrete_laplace, gaussian, laplace, noise_variance

BAND_FAILURE = 1e-7  # per band; a test checks three at most
GROUPS = 50
GROUP_MISS = 0.15  # Chebyshev's bound on one group missing its band

# Draws per test: OpenDP takes about 10 us per discrete Laplace value, 30 us per Laplace
# and 70 us per Gaussian value on this machine.
DRAWS = {DISCRETE_LAPLACE: 40_000, LAPLACE: 40_000, GAUSSIAN: 20_000}


def _dkw_band(n: int) -> float:
    return math.sqrt(math.log(2 / BAND_FAILURE) / (2 * n))


def _median_of_means(values: np.ndarray) -> float:
    m = values.size // GROUPS
    return float(np.median(values[: GROUPS * m].reshape(GROUPS, m).mean(axis=1)))


def _median_of_means_band(item_variance: float, n: int) -> float:
    return math.sqrt(item_variance / (n // GROUPS * GROUP_MISS))


def test_the_bands_fail_a_correct_sampler_with_probability_below_1e_7() -> None:
    kl = 0.5 * math.log(0.5 / GROUP_MISS) + 0.5 * math.log(0.5 / (1 - GROUP_MISS))
    assert math.exp(-GROUPS * kl) < BAND_FAILURE
    assert 2 * math.exp(-2 * 1000 * _dkw_band(1000) ** 2) == pytest.approx(BAND_FAILURE)


# ---------------------------------------------------------------- the distributions


class Law:
    """A noise law as the tests see it: its CDF, variance and fourth moment, from references."""

    def __init__(self, cdf: Callable[[np.ndarray], np.ndarray], variance: float, fourth: float, discrete: bool) -> None:
        self.cdf, self.variance, self.fourth, self.discrete = cdf, variance, fourth, discrete


def _discrete_laplace_law(scale: float) -> Law:
    law = stats.dlaplace(1 / scale)
    return Law(law.cdf, float(law.var()), float(law.moment(4)), discrete=True)


def _laplace_law(scale: float) -> Law:
    law = stats.laplace(scale=scale)
    return Law(law.cdf, float(law.var()), float(law.moment(4)), discrete=False)


def _gaussian_law(scale: float) -> Law:
    normal = NormalDist(0.0, scale)
    return Law(np.vectorize(normal.cdf), scale**2, 3 * scale**4, discrete=False)


def _discrete_gaussian_law(scale: float) -> Law:
    support = np.arange(-int(40 * scale) - 1, int(40 * scale) + 2)
    weights = np.exp(-(support.astype(float) ** 2) / (2 * scale**2))
    pmf = weights / weights.sum()
    cumulative = np.cumsum(pmf)

    def cdf(points: np.ndarray) -> np.ndarray:
        index = np.clip(np.asarray(points, dtype=np.int64) - support[0], -1, support.size - 1)
        return np.where(index < 0, 0.0, cumulative[np.maximum(index, 0)])

    return Law(cdf, float(pmf @ support**2), float(pmf @ support.astype(float) ** 4), discrete=True)


CASES = [
    # mechanism, scale, integer input, the law of its noise
    pytest.param(DISCRETE_LAPLACE, 0.7, True, _discrete_laplace_law, id="discrete-laplace-0.7"),
    pytest.param(DISCRETE_LAPLACE, 5.0, True, _discrete_laplace_law, id="discrete-laplace-5"),
    pytest.param(LAPLACE, 0.5, False, _laplace_law, id="laplace-0.5"),
    pytest.param(LAPLACE, 3.0, False, _laplace_law, id="laplace-3"),
    pytest.param(GAUSSIAN, 2.0, False, _gaussian_law, id="gaussian-2"),
    pytest.param(GAUSSIAN, 1.5, True, _discrete_gaussian_law, id="discrete-gaussian-1.5"),
]


def _noise(mechanism: str, scale: float, integers: bool) -> np.ndarray:
    """Noise drawn by one call on a vector of varied values (what the sampler added to each)."""
    n = DRAWS[mechanism]
    values = np.arange(n) % 97 if integers else np.linspace(-250.0, 250.0, n)
    noisy = add_noise(values, mechanism=mechanism, scale=scale)
    assert noisy.shape == values.shape
    return (noisy - values).astype(np.float64)


def _largest_cdf_gap(noise: np.ndarray, law: Law) -> float:
    ordered = np.sort(noise)
    n = ordered.size
    if law.discrete:
        # Both CDFs are step functions with steps at the integers: the supremum is at one of them.
        points = np.arange(int(ordered[0]) - 1, int(ordered[-1]) + 1)
        empirical = np.searchsorted(ordered, points, side="right") / n
        return float(np.max(np.abs(empirical - law.cdf(points))))
    true = law.cdf(ordered)
    ranks = np.arange(1, n + 1) / n
    return float(max(np.max(ranks - true), np.max(true - (ranks - 1 / n))))


@pytest.mark.parametrize(("mechanism", "scale", "integers", "make_law"), CASES)
def test_the_noise_follows_the_mechanisms_law(mechanism: str, scale: float, integers: bool, make_law: Callable[[float], Law]) -> None:
    noise = _noise(mechanism, scale, integers)
    assert _largest_cdf_gap(noise, make_law(scale)) <= _dkw_band(noise.size)


@pytest.mark.parametrize(("mechanism", "scale", "integers", "make_law"), CASES)
def test_the_noise_is_unbiased_and_its_variance_is_the_mechanisms(
    mechanism: str, scale: float, integers: bool, make_law: Callable[[float], Law]
) -> None:
    law = make_law(scale)
    noise = _noise(mechanism, scale, integers)
    assert abs(_median_of_means(noise)) <= _median_of_means_band(law.variance, noise.size)
    # The variance the intervals use: exact for Laplace and discrete Laplace, an upper
    # bound (by far less than the band) for the discrete Gaussian.
    variance = noise_variance(mechanism, scale)
    assert law.variance <= variance * (1 + 1e-12)
    second_moment_band = _median_of_means_band(law.fourth - law.variance**2, noise.size)
    assert abs(_median_of_means(noise**2) - variance) <= second_moment_band


@pytest.mark.parametrize(
    ("mechanism", "integers", "make_law"),
    [(DISCRETE_LAPLACE, True, _discrete_laplace_law), (LAPLACE, False, _laplace_law)],
)
def test_the_bands_catch_noise_a_quarter_too_small(mechanism: str, integers: bool, make_law: Callable[[float], Law]) -> None:
    # Drawn at scale 3 and read as if it were 4. The true CDFs part by more than 0.05, over
    # twice the band, and the variances by 14 (18 against 32), over the sum of the two
    # laws' bands (3.7 and 6.5): wherever the draws fall inside their own bands, they fall
    # outside the other law's, so a correct sampler passes this with the same odds.
    noise = _noise(mechanism, 3.0, integers)
    wrong = make_law(4.0)
    assert _largest_cdf_gap(noise, wrong) > _dkw_band(noise.size)
    band = _median_of_means_band(wrong.fourth - wrong.variance**2, noise.size)
    assert abs(_median_of_means(noise**2) - noise_variance(mechanism, 4.0)) > band


# ---------------------------------------------------------------- shapes, types and the values kept


def test_discrete_laplace_keeps_integers_and_shape_and_leaves_the_input_alone() -> None:
    counts = np.array([[3, 0, 12], [7, 1, 5]], dtype=np.int32)
    noisy = discrete_laplace(counts, 2.0)
    assert noisy.dtype == np.int64 and noisy.shape == (2, 3)
    assert counts.tolist() == [[3, 0, 12], [7, 1, 5]]
    assert discrete_laplace([4, 5], 1.0).dtype == np.int64


def test_laplace_and_gaussian_give_floats_for_floats_and_gaussian_integers_for_integers() -> None:
    sums = [1.5, -2.25, 0.0]
    assert laplace(sums, 1.0).dtype == np.float64 and laplace(np.zeros((4, 2)), 1.0).shape == (4, 2)
    assert gaussian(sums, 1.0).dtype == np.float64
    assert gaussian(np.array([3, 4]), 1.0).dtype == np.int64
    assert laplace(np.array([1, 2]), 1.0).dtype == np.float64  # integer sums are sums too


def test_an_empty_vector_gets_no_noise() -> None:
    assert discrete_laplace([], 1.0).dtype == np.int64 and discrete_laplace([], 1.0).size == 0
    assert laplace(np.zeros((0, 3)), 1.0).shape == (0, 3)
    assert gaussian([], 1.0).size == 0


def test_a_huge_scale_hides_the_values() -> None:
    # Scale 1e6 on values 0..9: the noise dominates (a check that the scale reaches OpenDP).
    noisy = laplace(np.arange(10.0), 1e6)
    assert np.max(np.abs(noisy)) > 1e3


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), float("nan"), True, "2", None])
@pytest.mark.parametrize("sampler", [discrete_laplace, laplace, gaussian])
def test_a_bad_scale_is_refused_by_name(sampler: Callable[..., np.ndarray], scale: object) -> None:
    with pytest.raises(AccountingError, match=f"^{re.escape(f'scale must be a finite number > 0; found {scale!r}')}$"):
        sampler([1, 2], scale)


def test_discrete_laplace_takes_counts_only() -> None:
    with pytest.raises(AccountingError, match="^values must be integers \\(counts\\); found dtype float64$"):
        discrete_laplace([1.0, 2.5], 1.0)
    with pytest.raises(AccountingError, match="^values must be real numbers; found dtype bool$"):
        discrete_laplace([True, False], 1.0)
    with pytest.raises(AccountingError, match="^values must be real numbers; found dtype <U"):
        discrete_laplace(["12"], 1.0)
    with pytest.raises(AccountingError, match="^values must fit in 64-bit integers; 1 value\\(s\\) \\(flat positions 1\\) do not$"):
        discrete_laplace(np.array([1, 2**64 - 1], dtype=np.uint64), 1.0)


def test_non_finite_values_are_refused_by_position_never_by_value() -> None:
    sentinel = 987654.321  # a value read from patient data never appears in a message
    values = [sentinel, float("nan"), 2.0, float("inf"), *([float("-inf")] * 6)]
    for sampler in (laplace, gaussian):
        with pytest.raises(AccountingError) as info:
            sampler(values, 1.0)
        assert str(info.value) == "values must be finite; 8 value(s) (flat positions 1, 3, 4, 5, 6 and 3 more) are not"
        assert "987654" not in str(info.value)


def test_a_ragged_vector_is_refused() -> None:
    with pytest.raises(AccountingError, match="^values must be an array of numbers \\(ValueError\\)$"):
        laplace([[1.0], [2.0, 3.0]], 1.0)


def test_add_noise_dispatches_on_the_release_mechanism_and_refuses_dp_sgds() -> None:
    assert add_noise([1, 2], mechanism=DISCRETE_LAPLACE, scale=1.0).dtype == np.int64
    assert add_noise([1.0], mechanism=LAPLACE, scale=1.0).dtype == np.float64
    assert add_noise([1.0], mechanism=GAUSSIAN, scale=1.0).dtype == np.float64
    message = "mechanism must be one of 'gaussian', 'laplace', 'discrete-laplace'; found 'poisson-gaussian'"
    with pytest.raises(AccountingError, match=f"^{message}$"):
        add_noise([1.0], mechanism="poisson-gaussian", scale=1.0)


# ---------------------------------------------------------------- variance for the intervals


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0, 250.0, 1e6])
def test_noise_variance_is_each_laws_variance(scale: float) -> None:
    assert noise_variance(LAPLACE, scale) == pytest.approx(stats.laplace(scale=scale).var(), rel=1e-12)
    assert noise_variance(GAUSSIAN, scale) == pytest.approx(scale**2, rel=1e-15)
    assert noise_variance(DISCRETE_LAPLACE, scale) == pytest.approx(stats.dlaplace(1 / scale).var(), rel=1e-9)
    # The discrete Laplace's variance is just under the Laplace's 2 t^2.
    assert noise_variance(DISCRETE_LAPLACE, scale) < noise_variance(LAPLACE, scale)


def test_noise_variance_refuses_other_mechanisms_and_bad_scales_by_name() -> None:
    with pytest.raises(AccountingError, match="^mechanism must be one of 'gaussian', 'laplace', 'discrete-laplace'; found 'exponential'$"):
        noise_variance("exponential", 1.0)
    with pytest.raises(AccountingError, match="^scale must be a finite number > 0; found 0.0$"):
        noise_variance(LAPLACE, 0.0)


# ---------------------------------------------------------------- the noise is the charge


@pytest.mark.parametrize(("sensitivity", "scale"), [(1.0, 2.0), (3.0, 6.0), (0.25, 0.1)])
def test_opendps_laplace_costs_what_the_ledger_charges(sensitivity: float, scale: float) -> None:
    # OpenDP's own accounting of the measurement the sampler invokes, against the event it is charged as.
    opendp_epsilon = mechanisms._measurement("f64", scale, "l1_distance", "make_laplace").map(sensitivity)
    event = DPEvent(noise_multiplier=scale / sensitivity, sample_rate=1.0, steps=1, mechanism=LAPLACE)
    assert opendp_epsilon == pytest.approx(1 / event.noise_multiplier, rel=1e-12)
    assert epsilon([event], delta=1e-12, accountant="pld") == pytest.approx(opendp_epsilon, abs=1e-3)


@pytest.mark.parametrize("scale", [0.5, 2.0, 10.0])
def test_opendps_discrete_laplace_costs_what_the_ledger_charges(scale: float) -> None:
    opendp_epsilon = mechanisms._measurement("i64", scale, "l1_distance", "make_laplace").map(1)
    event = DPEvent(noise_multiplier=scale, sample_rate=1.0, steps=1, mechanism=DISCRETE_LAPLACE)
    assert opendp_epsilon == pytest.approx(1 / scale, rel=1e-12)
    assert epsilon([event], delta=1e-12, accountant="pld") == pytest.approx(opendp_epsilon, abs=1e-3)


@pytest.mark.parametrize(("sensitivity", "scale"), [(1.0, 2.0), (2.5, 4.0)])
def test_opendps_gaussian_is_the_ledgers_gaussian(sensitivity: float, scale: float) -> None:
    # OpenDP accounts its Gaussian in zero-concentrated DP: rho = (sensitivity / sigma)^2 / 2,
    # that of the Gaussian of noise multiplier sigma / sensitivity the ledger composes.
    rho = mechanisms._measurement("f64", scale, "l2_distance", "make_gaussian").map(sensitivity)
    assert rho == pytest.approx((sensitivity / scale) ** 2 / 2, rel=1e-9)
