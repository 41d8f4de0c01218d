"""Pooled statistics: estimates against independent oracles, interval coverage over seeded runs.

Oracles: numpy and scipy on the pooled exact data (means, variances, proportions,
quantiles, odds ratios), lifelines' KaplanMeierFitter for survival. The DP mechanisms
are simulated here only (numpy's Laplace for sums, the difference of two geometric
variables for the discrete Laplace on counts): the module under test adds no noise.

Coverage: 400 seeded simulations of sampling (three sites drawing their patients from a
known population) plus noise; the 95 % interval must cover the population value in
[0.92, 0.98] of them (0.95 ± 2.7 binomial standard errors), or at least 0.95 where the
rule is conservative by design (worst-case bounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.stats.contingency import odds_ratio

from experiments.study_report import Estimate
from federation.errors import StatisticsError
from federation.statistics import (
    NoisyVector,
    merged_histogram,
    noise_variance,
    pooled_count,
    pooled_mean,
    pooled_odds_ratio,
    pooled_proportion,
    pooled_quantiles,
    pooled_sd,
    pooled_sum,
    pooled_survival,
    pooled_table,
    pooled_variance,
    report_rows,
)

SIMULATIONS = 400
BAND = (0.92, 0.98)
SITE_SIZES = (400, 700, 900)


# ---------------------------------------------------------------- the mechanisms, simulated (tests only)


def discrete_laplace(rng: np.random.Generator, scale: float, size: int | tuple[int, ...]) -> np.ndarray:
    """P(k) ∝ exp(-|k|/scale): the difference of two geometric variables on {0, 1, ...}."""
    if scale == 0:
        return np.zeros(size)
    success = 1 - math.exp(-1 / scale)
    return (rng.geometric(success, size) - rng.geometric(success, size)).astype(float)


def count_release(rng: np.random.Generator, exact: np.ndarray, scale: float) -> NoisyVector:
    exact = np.asarray(exact, dtype=float)
    return NoisyVector(exact + discrete_laplace(rng, scale, exact.shape), "discrete-laplace", scale)


def sum_release(rng: np.random.Generator, exact: np.ndarray, scale: float) -> NoisyVector:
    exact = np.asarray(exact, dtype=float)
    noise = rng.laplace(0.0, scale, exact.shape) if scale > 0 else np.zeros(exact.shape)
    return NoisyVector(exact + noise, "laplace", scale)


def coverage(hits: Sequence[bool]) -> float:
    return float(np.mean(hits))


# Noise scales as the plan calibrates them: b = sensitivity / ε_release.
BOUNDS = (0.0, 100.0)
HALF = 50.0


def moment_releases(rng: np.random.Generator, samples: Sequence[np.ndarray], *, epsilon: float, noisy: bool = True):
    """Per site: noisy centred sum, centred sum of squares and count of one cell (ε split in 3)."""
    share = epsilon / 3
    b_sum, b_sq, t = (HALF / share, HALF**2 / share, 1 / share) if noisy else (0.0, 0.0, 0.0)
    sums, squares, counts = [], [], []
    for x in samples:
        centred = np.clip(x, *BOUNDS) - 50.0
        sums.append(sum_release(rng, np.array([centred.sum()]), b_sum))
        squares.append(sum_release(rng, np.array([(centred**2).sum()]), b_sq))
        counts.append(count_release(rng, np.array([len(x)]), t))
    return sums, squares, counts


# ---------------------------------------------------------------- noise variances


def test_noise_variances_match_their_series() -> None:
    k = np.arange(-2000, 2001)
    for t in (0.5, 2.0, 10.0):
        pmf = np.exp(-np.abs(k) / t)
        pmf /= pmf.sum()
        assert noise_variance("discrete-laplace", t) == pytest.approx(float(np.sum(k**2 * pmf)), rel=1e-9)
    assert noise_variance("laplace", 3.0) == 18.0
    assert noise_variance("gaussian", 2.0) == 4.0
    assert noise_variance("discrete-laplace", 0.0) == 0.0


def test_noise_variance_refuses_an_unknown_mechanism() -> None:
    with pytest.raises(StatisticsError, match="must be one of discrete-laplace, laplace, gaussian; found 'uniform'"):
        noise_variance("uniform", 1.0)


# ---------------------------------------------------------------- census totals


def test_count_interval_is_the_exact_discrete_laplace_interval() -> None:
    t = 10.0
    [estimate] = pooled_count([NoisyVector([1000.0], "discrete-laplace", t)])
    p = math.exp(-1 / t)
    half = estimate.upper - estimate.estimate
    # P(|Z| <= h) = 1 - 2 p^(h+1)/(1+p): the smallest integer h reaching 95 %.
    assert 1 - 2 * p ** (half + 1) / (1 + p) >= 0.95 > 1 - 2 * p**half / (1 + p)
    assert (estimate.lower, estimate.sites, estimate.suppressed) == (1000.0 - half, 1, False)


def test_count_without_noise_is_exact_with_a_point_interval() -> None:
    [estimate] = pooled_count([NoisyVector([12.0], "discrete-laplace", 0.0), NoisyVector([30.0], "discrete-laplace", 0.0)])
    assert (estimate.estimate, estimate.lower, estimate.upper, estimate.sites) == (42.0, 42.0, 42.0, 2)


def test_count_interval_covers_the_census_count() -> None:
    rng = np.random.default_rng(10)
    scales = (2.0, 5.0, 20.0)
    hits = []
    for _ in range(SIMULATIONS):
        exact = rng.integers(50, 500, size=3)
        [estimate] = pooled_count([count_release(rng, np.array([n]), t) for n, t in zip(exact, scales, strict=True)])
        hits.append(estimate.lower <= exact.sum() <= estimate.upper)
    assert 0.95 <= coverage(hits) <= BAND[1]


def test_sum_interval_covers_the_census_total() -> None:
    rng = np.random.default_rng(11)
    hits = []
    for _ in range(SIMULATIONS):
        samples = [rng.uniform(0, 100, n) for n in SITE_SIZES]
        sums, _, counts = moment_releases(rng, samples, epsilon=0.3)
        [estimate] = pooled_sum(sums, counts, bounds=BOUNDS)
        hits.append(estimate.lower <= sum(x.sum() for x in samples) <= estimate.upper)
    assert BAND[0] <= coverage(hits) <= BAND[1]


def test_sum_without_noise_is_the_total_of_the_clipped_values() -> None:
    rng = np.random.default_rng(12)
    samples = [rng.normal(50, 30, n) for n in SITE_SIZES]
    sums, _, counts = moment_releases(rng, samples, epsilon=1.0, noisy=False)
    [estimate] = pooled_sum(sums, counts, bounds=BOUNDS)
    assert estimate.estimate == pytest.approx(sum(np.clip(x, *BOUNDS).sum() for x in samples), rel=1e-12)


# ---------------------------------------------------------------- means and variances


def test_mean_without_noise_matches_numpy_and_the_normal_interval() -> None:
    rng = np.random.default_rng(20)
    samples = [rng.beta(2, 5, n) * 100 for n in SITE_SIZES]
    pooled = np.concatenate(samples)
    sums, squares, counts = moment_releases(rng, samples, epsilon=1.0, noisy=False)
    [estimate] = pooled_mean(sums, counts, bounds=BOUNDS, squares=squares)
    low, high = stats.norm.interval(0.95, loc=pooled.mean(), scale=pooled.std(ddof=0) / math.sqrt(len(pooled)))
    assert estimate.estimate == pytest.approx(pooled.mean(), rel=1e-12)
    assert (estimate.lower, estimate.upper) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert estimate.sites == 3 and "sum of squares" in estimate.note


def test_mean_interval_covers_the_population_mean() -> None:
    rng = np.random.default_rng(21)
    truth = 100 * 2 / 7  # Beta(2, 5) scaled to the bounds
    hits = []
    for _ in range(SIMULATIONS):
        samples = [rng.beta(2, 5, n) * 100 for n in SITE_SIZES]
        sums, squares, counts = moment_releases(rng, samples, epsilon=0.5)
        [estimate] = pooled_mean(sums, counts, bounds=BOUNDS, squares=squares)
        hits.append(estimate.lower <= truth <= estimate.upper)
    assert BAND[0] <= coverage(hits) <= BAND[1]


def test_mean_without_squares_uses_the_worst_case_variance_and_over_covers() -> None:
    rng = np.random.default_rng(22)
    truth = 100 * 2 / 7
    hits, widths = [], []
    for _ in range(SIMULATIONS // 4):
        samples = [rng.beta(2, 5, n) * 100 for n in SITE_SIZES]
        sums, squares, counts = moment_releases(rng, samples, epsilon=0.5)
        [bound] = pooled_mean(sums, counts, bounds=BOUNDS)
        [plugged] = pooled_mean(sums, counts, bounds=BOUNDS, squares=squares)
        hits.append(bound.lower <= truth <= bound.upper)
        widths.append((bound.upper - bound.lower) / (plugged.upper - plugged.lower))
    assert coverage(hits) >= 0.95
    assert min(widths) > 1.5  # σ ≈ 16 against the worst case 50
    assert "worst-case" in bound.note


def test_variance_and_sd_without_noise_match_numpy() -> None:
    rng = np.random.default_rng(23)
    samples = [rng.normal(50, 10, n) for n in SITE_SIZES]
    pooled = np.concatenate(samples)
    sums, squares, counts = moment_releases(rng, samples, epsilon=1.0, noisy=False)
    [variance] = pooled_variance(sums, squares, counts, bounds=BOUNDS)
    [sd] = pooled_sd(sums, squares, counts, bounds=BOUNDS)
    assert variance.estimate == pytest.approx(np.var(pooled, ddof=1), rel=1e-9)
    assert sd.estimate == pytest.approx(np.std(pooled, ddof=1), rel=1e-9)
    assert (sd.lower, sd.upper) == (pytest.approx(math.sqrt(variance.lower)), pytest.approx(math.sqrt(variance.upper)))


def test_variance_with_normal_kurtosis_matches_the_chi_square_interval_without_noise() -> None:
    rng = np.random.default_rng(24)
    pooled = rng.normal(50, 10, 20_000)
    sums, squares, counts = moment_releases(rng, [pooled], epsilon=1.0, noisy=False)
    [variance] = pooled_variance(sums, squares, counts, bounds=BOUNDS, kurtosis=3.0)
    s2, df = np.var(pooled, ddof=1), len(pooled) - 1
    # The large-sample normal interval agrees with the exact chi-square one to ~1 %.
    assert variance.lower == pytest.approx(df * s2 / stats.chi2.ppf(0.975, df), rel=0.01)
    assert variance.upper == pytest.approx(df * s2 / stats.chi2.ppf(0.025, df), rel=0.01)


def test_variance_interval_covers_the_population_variance() -> None:
    rng = np.random.default_rng(25)
    hits, bound_hits = [], []
    for _ in range(SIMULATIONS):
        samples = [rng.normal(50, 10, n) for n in SITE_SIZES]
        sums, squares, counts = moment_releases(rng, samples, epsilon=2.0)
        [assumed] = pooled_variance(sums, squares, counts, bounds=BOUNDS, kurtosis=3.0)
        [bounded] = pooled_variance(sums, squares, counts, bounds=BOUNDS)
        hits.append(assumed.lower <= 100.0 <= assumed.upper)
        bound_hits.append(bounded.lower <= 100.0 <= bounded.upper)
    assert BAND[0] <= coverage(hits) <= BAND[1]
    assert coverage(bound_hits) >= 0.95


def test_variance_refuses_a_kurtosis_below_one() -> None:
    one = [NoisyVector([1.0], "laplace", 0.0)]
    with pytest.raises(StatisticsError, match="kurtosis must be >= 1"):
        pooled_variance(one, one, [NoisyVector([5.0], "discrete-laplace", 0.0)], bounds=BOUNDS, kurtosis=0.5)


# ---------------------------------------------------------------- proportions


def test_proportion_without_noise_is_the_wilson_interval() -> None:
    events, counts = [30, 5, 12], [400, 150, 300]
    [estimate] = pooled_proportion(
        [NoisyVector([e], "discrete-laplace", 0.0) for e in events],
        [NoisyVector([n], "discrete-laplace", 0.0) for n in counts],
    )
    wilson = stats.binomtest(sum(events), sum(counts)).proportion_ci(0.95, method="wilson")
    assert estimate.estimate == pytest.approx(sum(events) / sum(counts))
    assert (estimate.lower, estimate.upper) == (pytest.approx(wilson.low, rel=1e-6), pytest.approx(wilson.high, rel=1e-6))


def test_proportion_interval_covers_the_prevalence() -> None:
    rng = np.random.default_rng(30)
    truth, t = 0.12, 1 / 0.25  # ε 0.5 split over events and count
    hits = []
    for _ in range(SIMULATIONS):
        events = [rng.binomial(n, truth) for n in SITE_SIZES]
        [estimate] = pooled_proportion(
            [count_release(rng, np.array([e]), t) for e in events],
            [count_release(rng, np.array([n]), t) for n in SITE_SIZES],
        )
        hits.append(estimate.lower <= truth <= estimate.upper)
    assert BAND[0] <= coverage(hits) <= BAND[1]


def test_rare_proportion_interval_stays_informative_and_within_0_1() -> None:
    rng = np.random.default_rng(31)
    truth, t = 0.01, 1 / 0.5
    hits = []
    for _ in range(SIMULATIONS):
        events = [rng.binomial(100, truth) for _ in range(3)]
        [estimate] = pooled_proportion(
            [count_release(rng, np.array([e]), t) for e in events],
            [count_release(rng, np.array([100]), t) for _ in range(3)],
        )
        assert 0.0 <= estimate.lower <= estimate.estimate <= estimate.upper <= 1.0
        assert estimate.upper < 0.2
        hits.append(estimate.lower <= truth <= estimate.upper)
    assert coverage(hits) >= BAND[0]


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.integers(-50, 500), min_size=1, max_size=4),
    counts=st.lists(st.integers(-50, 500), min_size=4, max_size=4),
    scale=st.sampled_from([0.0, 0.5, 2.0, 50.0]),
)
def test_proportion_and_its_interval_stay_within_0_1(events: list[int], counts: list[int], scale: float) -> None:
    sites = len(events)
    [estimate] = pooled_proportion(
        [NoisyVector([e], "discrete-laplace", scale) for e in events],
        [NoisyVector([n], "discrete-laplace", scale) for n in counts[:sites]],
    )
    if math.isnan(estimate.estimate):
        assert sum(counts[:sites]) < 1
    else:
        assert 0.0 <= estimate.lower <= estimate.estimate <= estimate.upper <= 1.0


# ---------------------------------------------------------------- histograms and quantiles

EDGES = np.arange(0.0, 101.0, 2.0)  # 50 bins over the bounds


def histogram_releases(rng: np.random.Generator, samples: Sequence[np.ndarray], scale: float) -> list[NoisyVector]:
    return [count_release(rng, np.histogram(np.clip(x, *BOUNDS), EDGES)[0][None, :], scale) for x in samples]


def test_merged_histogram_without_noise_is_numpys() -> None:
    rng = np.random.default_rng(40)
    samples = [rng.normal(50, 10, n) for n in SITE_SIZES]
    [bins] = merged_histogram(histogram_releases(rng, samples, 0.0))
    expected = np.histogram(np.concatenate(samples), EDGES)[0]
    assert [b.estimate for b in bins] == list(expected.astype(float))


def test_merged_histogram_keeps_negative_noisy_bins_and_clips_only_the_interval() -> None:
    [bins] = merged_histogram([NoisyVector([[-3.0, 10.0]], "discrete-laplace", 2.0)])
    assert bins[0].estimate == -3.0 and bins[0].lower == 0.0 and bins[0].upper > 0
    assert "plots draw 0" in bins[0].note


def test_quantiles_without_noise_match_numpy_within_a_fraction_of_a_bin() -> None:
    rng = np.random.default_rng(41)
    samples = [rng.normal(50, 10, n) for n in SITE_SIZES]
    pooled = np.concatenate(samples)
    [quantiles] = pooled_quantiles(histogram_releases(rng, samples, 0.0), edges=EDGES, probabilities=(0.25, 0.5, 0.75))
    for q, p in zip(quantiles, (0.25, 0.5, 0.75), strict=True):
        assert q.estimate == pytest.approx(np.quantile(pooled, p), abs=0.5)  # bins are 2 wide
        assert q.lower < q.estimate < q.upper


def test_quantiles_of_values_spread_evenly_in_their_bins_are_exact() -> None:
    values = np.arange(0.5, 100, 1.0)  # one value in the middle of each unit: the CDF is linear between edges
    [[median]] = pooled_quantiles(
        [NoisyVector(np.histogram(values, EDGES)[0][None, :], "discrete-laplace", 0.0)], edges=EDGES, probabilities=(0.5,)
    )
    assert median.estimate == pytest.approx(50.0)


def test_quantile_interval_without_noise_agrees_with_the_order_statistic_interval() -> None:
    rng = np.random.default_rng(42)
    pooled = rng.normal(50, 10, 2000)
    [[median]] = pooled_quantiles(histogram_releases(rng, [pooled], 0.0), edges=EDGES, probabilities=(0.5,))
    ordered = np.sort(pooled)
    # Distribution-free interval: order statistics at the binomial 2.5 % and 97.5 % ranks.
    low_rank, high_rank = stats.binom.ppf([0.025, 0.975], len(pooled), 0.5).astype(int)
    assert median.lower == pytest.approx(ordered[low_rank - 1], abs=0.3)
    assert median.upper == pytest.approx(ordered[high_rank], abs=0.3)


def test_quantile_intervals_cover_the_population_quantiles() -> None:
    rng = np.random.default_rng(43)
    probabilities = (0.25, 0.5, 0.75)
    truths = stats.norm.ppf(probabilities, loc=50, scale=10)
    hits: dict[float, list[bool]] = {p: [] for p in probabilities}
    for _ in range(SIMULATIONS):
        samples = [rng.normal(50, 10, n) for n in SITE_SIZES]
        [quantiles] = pooled_quantiles(histogram_releases(rng, samples, 1.0), edges=EDGES, probabilities=probabilities)
        for p, truth, q in zip(probabilities, truths, quantiles, strict=True):
            hits[p].append(q.lower <= truth <= q.upper)
    for p in probabilities:
        assert BAND[0] <= coverage(hits[p]) <= BAND[1], p


def test_quantiles_refuse_edges_that_do_not_fit_the_bins() -> None:
    with pytest.raises(StatisticsError, match="edges must hold bins \\+ 1 = 3 values; found 4"):
        pooled_quantiles([NoisyVector([[1.0, 2.0]], "discrete-laplace", 1.0)], edges=[0, 1, 2, 3])


# ---------------------------------------------------------------- 2x2 tables


def test_odds_ratio_without_noise_matches_scipy() -> None:
    sites = [[20, 80, 10, 90], [35, 65, 15, 85]]
    [estimate] = pooled_odds_ratio([NoisyVector([cells], "discrete-laplace", 0.0) for cells in sites])
    a, b, c, d = np.sum(sites, axis=0)
    oracle = odds_ratio([[a, b], [c, d]], kind="sample")
    interval = oracle.confidence_interval(0.95)
    assert estimate.estimate == pytest.approx(oracle.statistic)
    assert (estimate.lower, estimate.upper) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert "Haldane" not in estimate.note


def test_odds_ratio_applies_haldane_to_a_zero_or_negative_cell_and_says_so() -> None:
    [estimate] = pooled_odds_ratio([NoisyVector([[12.0, 40.0, -2.0, 60.0]], "discrete-laplace", 1.0)])
    assert estimate.estimate == pytest.approx(12.5 * 60.5 / (40.5 * 0.5))
    assert "set to 0" in estimate.note and "Haldane +0.5" in estimate.note


def test_odds_ratio_interval_covers_the_population_odds_ratio() -> None:
    rng = np.random.default_rng(50)
    probabilities = np.array([0.3 * 0.35, 0.3 * 0.65, 0.7 * 0.2, 0.7 * 0.8])
    truth = (0.35 / 0.65) / (0.2 / 0.8)
    hits = []
    for _ in range(SIMULATIONS):
        tables = [count_release(rng, rng.multinomial(n, probabilities)[None, :], 2.0) for n in SITE_SIZES]
        [estimate] = pooled_odds_ratio(tables)
        hits.append(estimate.lower <= truth <= estimate.upper)
    assert BAND[0] <= coverage(hits) <= BAND[1]


def test_pooled_table_is_the_sum_of_the_sites_cells() -> None:
    sites = [NoisyVector([[1, 2, 3, 4]], "discrete-laplace", 0.0), NoisyVector([[10, 20, 30, 40]], "discrete-laplace", 0.0)]
    [cells] = pooled_table(sites)
    assert [c.estimate for c in cells] == [11.0, 22.0, 33.0, 44.0]


def test_odds_ratio_refuses_a_table_that_is_not_2x2() -> None:
    with pytest.raises(StatisticsError, match="tables\\[0\\] has width 3; a 2x2 table has 4 cells"):
        pooled_odds_ratio([NoisyVector([[1.0, 2.0, 3.0]], "discrete-laplace", 1.0)])


# ---------------------------------------------------------------- survival


def survival_releases(
    rng: np.random.Generator, sites: Sequence[tuple[np.ndarray, np.ndarray]], edges: np.ndarray, scale: float
) -> tuple[list[NoisyVector], list[NoisyVector], list[NoisyVector]]:
    """Per site: noisy events and censorings per time bin, and the noisy total.

    Follow-up past the last edge counts only in the total (at risk throughout the bins).
    """
    events, censored, totals = [], [], []
    for time, event in sites:
        events.append(count_release(rng, np.histogram(time[event], edges)[0][None, :], scale))
        censored.append(count_release(rng, np.histogram(time[~event], edges)[0][None, :], scale))
        totals.append(count_release(rng, np.array([len(time)]), scale))
    return events, censored, totals


def exponential_cohort(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Events at rate 0.5, censoring at rate 0.2, follow-up ending at 4."""
    event_time, censor_time = rng.exponential(2.0, n), np.minimum(rng.exponential(5.0, n), 4.0)
    return np.minimum(event_time, censor_time), event_time <= censor_time


def lifelines_at(time: np.ndarray, event: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from lifelines import KaplanMeierFitter

    fitter = KaplanMeierFitter().fit(time, event)
    survival = fitter.survival_function_at_times(at).to_numpy()
    bands = fitter.confidence_interval_
    rows = bands.index.get_indexer(at, method="ffill")
    return survival, bands["KM_estimate_lower_0.95"].to_numpy()[rows], bands["KM_estimate_upper_0.95"].to_numpy()[rows]


def test_survival_without_noise_is_lifelines_kaplan_meier_at_the_bin_edges() -> None:
    rng = np.random.default_rng(60)
    # Follow-up in whole days, one bin per day: the binned product-limit is the exact one.
    sites = [(rng.integers(1, 31, n).astype(float), rng.random(n) < 0.4) for n in SITE_SIZES]
    edges = np.arange(0.5, 31.0, 1.0)
    [curve] = pooled_survival(*survival_releases(rng, sites, edges, 0.0))
    time, event = np.concatenate([t for t, _ in sites]), np.concatenate([e for _, e in sites])
    survival, lower, upper = lifelines_at(time, event, edges[1:])
    np.testing.assert_allclose([s.estimate for s in curve], survival, rtol=1e-12)
    np.testing.assert_allclose([s.lower for s in curve], lower, rtol=1e-9)
    np.testing.assert_allclose([s.upper for s in curve], upper, rtol=1e-9)


def test_survival_of_continuous_times_in_fine_bins_is_close_to_lifelines() -> None:
    rng = np.random.default_rng(61)
    sites = [exponential_cohort(rng, n) for n in SITE_SIZES]
    edges = np.arange(0.0, 3.01, 0.05)
    [curve] = pooled_survival(*survival_releases(rng, sites, edges, 0.0))
    time, event = np.concatenate([t for t, _ in sites]), np.concatenate([e for _, e in sites])
    survival, _, _ = lifelines_at(time, event, edges[1:])
    # Censorings inside a bin count as at risk for all of it: off by well under a standard error.
    assert np.max(np.abs(np.array([s.estimate for s in curve]) - survival)) < 0.005


def test_noisy_survival_bands_hold_the_exact_kaplan_meier_curve() -> None:
    rng = np.random.default_rng(62)
    sites = [exponential_cohort(rng, n) for n in SITE_SIZES]
    edges = np.arange(0.0, 3.01, 0.1)
    [curve] = pooled_survival(*survival_releases(rng, sites, edges, 2.0))
    time, event = np.concatenate([t for t, _ in sites]), np.concatenate([e for _, e in sites])
    survival, lower, upper = lifelines_at(time, event, edges[1:])
    assert all(s.lower <= exact <= s.upper for s, exact in zip(curve, survival, strict=True))
    # Noise widens the band beyond the sampling-only (lifelines) one.
    assert all(s.upper - s.lower > hi - lo for s, lo, hi in zip(curve, lower, upper, strict=True))


def test_survival_bands_cover_the_population_survival() -> None:
    rng = np.random.default_rng(63)
    edges = np.arange(0.0, 3.01, 0.05)
    checked = {19: math.exp(-0.5 * 1.0), 39: math.exp(-0.5 * 2.0), 59: math.exp(-0.5 * 3.0)}  # S at t = 1, 2, 3
    hits: dict[int, list[bool]] = {k: [] for k in checked}
    for _ in range(SIMULATIONS):
        sites = [exponential_cohort(rng, n) for n in SITE_SIZES]
        [curve] = pooled_survival(*survival_releases(rng, sites, edges, 2.0))
        for k, truth in checked.items():
            hits[k].append(curve[k].lower <= truth <= curve[k].upper)
    for k in checked:
        assert BAND[0] <= coverage(hits[k]) <= BAND[1], edges[k + 1]


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.integers(-20, 60), min_size=6, max_size=6),
    censored=st.lists(st.integers(-20, 60), min_size=6, max_size=6),
    total=st.integers(-10, 400),
    scale=st.sampled_from([0.0, 1.0, 20.0]),
)
# A first event on a tiny risk set under heavy noise: the log-log stretch overflowed math.exp.
@example(events=[0, 0, 0, 0, 1, 0], censored=[0, 0, 0, 0, 12, 0], total=14, scale=20.0)
def test_survival_is_non_increasing_and_within_0_1_whatever_the_noise(
    events: list[int], censored: list[int], total: int, scale: float
) -> None:
    [curve] = pooled_survival(
        [NoisyVector([events], "discrete-laplace", scale)],
        [NoisyVector([censored], "discrete-laplace", scale)],
        [NoisyVector([total], "discrete-laplace", scale)],
    )
    defined = [s for s in curve if not math.isnan(s.estimate)]
    assert all(math.isnan(s.estimate) for s in curve[len(defined):])  # the curve only ends
    values = [s.estimate for s in defined]
    assert values == sorted(values, reverse=True)
    assert all(0.0 <= s.lower <= s.estimate <= s.upper <= 1.0 for s in defined)


# ---------------------------------------------------------------- suppression and inputs


def test_a_cell_suppressed_at_one_site_pools_the_others_and_says_how_many() -> None:
    counts = [
        NoisyVector([100.0, math.nan, math.nan], "discrete-laplace", 0.0),
        NoisyVector([200.0, 50.0, math.nan], "discrete-laplace", 0.0),
    ]
    sums = [NoisyVector([0.0, 0.0, 0.0], "laplace", 0.0), NoisyVector([200.0, 100.0, math.nan], "laplace", 0.0)]
    total, partial, everywhere = pooled_count(counts)
    assert (total.estimate, total.sites) == (300.0, 2)
    assert (partial.estimate, partial.sites, partial.suppressed) == (50.0, 1, False)
    assert everywhere.suppressed and everywhere.sites == 0 and math.isnan(everywhere.estimate)
    means = pooled_mean(sums, counts, bounds=BOUNDS)
    assert means[1].estimate == pytest.approx(52.0) and means[1].sites == 1
    assert means[2].suppressed and means[2].sites == 0 and math.isnan(means[2].estimate)


def test_a_site_missing_one_release_of_a_cell_contributes_nothing_to_it() -> None:
    events = [NoisyVector([10.0], "discrete-laplace", 0.0), NoisyVector([math.nan], "discrete-laplace", 0.0)]
    counts = [NoisyVector([100.0], "discrete-laplace", 0.0), NoisyVector([100.0], "discrete-laplace", 0.0)]
    [estimate] = pooled_proportion(events, counts)
    assert (estimate.estimate, estimate.sites) == (0.1, 1)


def test_from_answer_reads_the_plan_layout_and_marks_suppressed_cells() -> None:
    answer = {
        "releases": [
            {"statistic": "km", "name": "events", "values": [1, 2, 3, 4, None, 6, 7, 8], "scale": 2.0,
             "mechanism": "discrete-laplace", "sensitivity": 1},
            {"statistic": "km", "name": "total", "values": [50, 60], "scale": 2.0, "mechanism": "discrete-laplace"},
        ],
        "suppressed": [1],
    }
    events = NoisyVector.from_answer(answer, statistic="km", name="events", cells=2, width=2, part=0, parts=2)
    censored = NoisyVector.from_answer(answer, statistic="km", name="events", cells=2, width=2, part=1, parts=2)
    total = NoisyVector.from_answer(answer, statistic="km", name="total", cells=2)
    np.testing.assert_array_equal(events.values, [[1, 2], [np.nan, np.nan]])
    np.testing.assert_array_equal(censored.values, [[math.nan, 6], [np.nan, np.nan]])
    np.testing.assert_array_equal(total.values, [50, np.nan])
    assert (events.mechanism, events.scale, events.variance) == ("discrete-laplace", 2.0, noise_variance("discrete-laplace", 2.0))


def test_from_answer_names_a_missing_release_and_a_wrong_length() -> None:
    release = {"statistic": "bmi", "name": "count", "values": [1, 2, 3], "scale": 1.0, "mechanism": "discrete-laplace"}
    answer = {"releases": [release]}
    with pytest.raises(StatisticsError, match="exactly one release 'sum' of statistic 'bmi'; found 0"):
        NoisyVector.from_answer(answer, statistic="bmi", name="sum", cells=3)
    with pytest.raises(StatisticsError, match="values must have 4 entries \\(1 x 4 cells x 1\\); found 3"):
        NoisyVector.from_answer(answer, statistic="bmi", name="count", cells=4)


def test_vectors_that_disagree_in_cells_are_refused_by_name() -> None:
    with pytest.raises(StatisticsError, match="counts\\[1\\] has 3 cells; sums\\[0\\] has 2"):
        pooled_mean(
            [NoisyVector([1.0, 2.0], "laplace", 1.0), NoisyVector([1.0, 2.0], "laplace", 1.0)],
            [NoisyVector([5.0, 6.0], "discrete-laplace", 1.0), NoisyVector([5.0, 6.0, 7.0], "discrete-laplace", 1.0)],
            bounds=BOUNDS,
        )


def test_bad_bounds_scale_and_mechanism_are_refused() -> None:
    one = [NoisyVector([1.0], "laplace", 1.0)]
    with pytest.raises(StatisticsError, match="bounds must be finite with lower < upper; found \\(5, 5\\)"):
        pooled_mean(one, [NoisyVector([5.0], "discrete-laplace", 1.0)], bounds=(5, 5))
    with pytest.raises(StatisticsError, match="scale must be finite and >= 0; found -1.0"):
        NoisyVector([1.0], "laplace", -1.0)
    with pytest.raises(StatisticsError, match="found 'gauss'"):
        NoisyVector([1.0], "gauss", 1.0)


# ---------------------------------------------------------------- securely aggregated totals


def _secure_total(vectors: Sequence[NoisyVector]) -> NoisyVector:
    """What SecAgg+ gives the coordinator of per-site vectors: their sum where reported, and how many reported."""
    present = np.array([v.present() for v in vectors])
    total = sum(np.where(v.present()[:, None] if v.values.ndim == 2 else v.present(), np.nan_to_num(v.values), 0.0) for v in vectors)
    sites = present.sum(axis=0)
    values = np.where((sites > 0)[:, None] if total.ndim == 2 else sites > 0, total, np.nan)
    return NoisyVector(values, vectors[0].mechanism, vectors[0].scale, sites=sites)


def _three_sites(rng: np.random.Generator, width: int = 1, *, mechanism: str, scale: float, low: int, high: int) -> list[NoisyVector]:
    """Three sites' noisy vectors over 3 cells; site 2 suppressed cell 1, and nobody released cell 2 but site 0."""
    shape = (3,) if width == 1 else (3, width)
    out = []
    for site in range(3):
        values = rng.integers(low, high, size=shape).astype(float)
        values += rng.laplace(0, scale, size=shape) if mechanism == "laplace" else discrete_laplace(rng, scale, shape)
        if site == 2:
            values[1] = np.nan
        if site > 0:
            values[2] = np.nan
        out.append(NoisyVector(values, mechanism, scale))
    return out


def _same(secure: Sequence[object], plain: Sequence[object]) -> None:
    for got, want in zip(secure, plain, strict=True):
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,), strict=True):
            assert a.sites == b.sites and a.suppressed == b.suppressed and a.note == b.note
            np.testing.assert_allclose([a.estimate, a.lower, a.upper], [b.estimate, b.lower, b.upper], rtol=1e-9, atol=1e-9)


def test_a_secure_total_pools_as_the_sites_own_vectors_do_for_every_rule() -> None:
    rng = np.random.default_rng(2024)
    counts = _three_sites(rng, mechanism="discrete-laplace", scale=4.0, low=200, high=400)
    events = [NoisyVector(np.where(c.present(), np.floor(np.nan_to_num(c.values) / 3), np.nan), "discrete-laplace", 4.0) for c in counts]
    sums = [NoisyVector(np.where(c.present(), rng.laplace(0, 30.0, 3) + 5 * np.nan_to_num(c.values), np.nan), "laplace", 30.0) for c in counts]
    squares = [NoisyVector(np.where(c.present(), rng.laplace(0, 900.0, 3) + 300 * np.nan_to_num(c.values), np.nan), "laplace", 900.0) for c in counts]
    one = {name: [_secure_total(v)] for name, v in {"counts": counts, "events": events, "sums": sums, "squares": squares}.items()}
    _same(pooled_count(one["counts"]), pooled_count(counts))
    _same(pooled_sum(one["sums"], one["counts"], bounds=BOUNDS), pooled_sum(sums, counts, bounds=BOUNDS))
    _same(pooled_mean(one["sums"], one["counts"], bounds=BOUNDS, squares=one["squares"]),
          pooled_mean(sums, counts, bounds=BOUNDS, squares=squares))
    _same(pooled_variance(one["sums"], one["squares"], one["counts"], bounds=BOUNDS), pooled_variance(sums, squares, counts, bounds=BOUNDS))
    _same(pooled_proportion(one["events"], one["counts"]), pooled_proportion(events, counts))
    bins = _three_sites(rng, 5, mechanism="discrete-laplace", scale=2.0, low=20, high=90)
    _same(merged_histogram([_secure_total(bins)]), merged_histogram(bins))
    edges = [0, 10, 20, 30, 40, 50]
    _same(pooled_quantiles([_secure_total(bins)], edges=edges), pooled_quantiles(bins, edges=edges))
    tables = _three_sites(rng, 4, mechanism="discrete-laplace", scale=2.0, low=10, high=60)
    _same(pooled_odds_ratio([_secure_total(tables)]), pooled_odds_ratio(tables))
    km_events = _three_sites(rng, 4, mechanism="discrete-laplace", scale=2.0, low=5, high=20)
    censored = [NoisyVector(np.where(e.present()[:, None], np.nan_to_num(e.values) // 2, np.nan), "discrete-laplace", 2.0) for e in km_events]
    totals = [NoisyVector(np.where(e.present(), 200.0, np.nan), "discrete-laplace", 2.0) for e in km_events]
    _same(pooled_survival([_secure_total(km_events)], [_secure_total(censored)], [_secure_total(totals)]),
          pooled_survival(km_events, censored, totals))
    # The reporting sites are counted per cell; the noise of a cell is that many sites' draws.
    assert [e.sites for e in pooled_count(one["counts"])] == [3, 2, 1]


def test_the_noise_of_a_secure_total_is_that_of_its_reporting_sites() -> None:
    total, _ = pooled_count([NoisyVector([30.0, 10.0], "discrete-laplace", 2.0, sites=[3, 1])])
    three = pooled_count([NoisyVector([10.0], "discrete-laplace", 2.0)] * 3)[0]
    assert (total.lower, total.upper, total.sites) == (three.lower, three.upper, 3)


def test_from_answer_reads_the_sites_of_a_secure_total() -> None:
    answer = {
        "releases": [{"statistic": "n", "name": "count", "values": [12, None, 30], "scale": 1.0, "mechanism": "discrete-laplace"}],
        "suppressed": [1],
        "sites": [2, 0, 3],
    }
    vector = NoisyVector.from_answer(answer, statistic="n", name="count", cells=3)
    assert list(vector.sites) == [2, 0, 3] and list(vector.contributions()) == [2, 0, 3]
    with pytest.raises(StatisticsError, match="sites must hold one number per cell \\(3\\)"):
        NoisyVector.from_answer({**answer, "sites": [1, 2]}, statistic="n", name="count", cells=3)
    with pytest.raises(StatisticsError, match="sites must hold one whole number >= 0 per cell"):
        NoisyVector([1.0, 2.0], "laplace", 1.0, sites=[1, -1])


# ---------------------------------------------------------------- labelled rows


def test_report_rows_label_bins_quantiles_survival_and_tables() -> None:
    cells = [("F",), ("M",)]
    estimate = Estimate(1.0, 0.5, 1.5, 2)
    histogram = report_rows("age", "histogram", cells, [(estimate, estimate)] * 2, edges=[0, 10, 20])
    assert [(r.cell, r.quantity, r.left, r.right) for r in histogram[:2]] == [
        (("F",), "[0, 10)", 0.0, 10.0),
        (("F",), "[10, 20)", 10.0, 20.0),
    ]
    survival = report_rows("km", "survival", cells, [(estimate,)] * 2, edges=[0, 365])
    assert survival[0].quantity == "S(365)"
    quantiles = report_rows("age", "quantile", cells, [(estimate, estimate)] * 2, probabilities=(0.5, 0.9))
    assert [r.quantity for r in quantiles[:2]] == ["q0.5", "q0.9"]
    table = report_rows("smoking", "table", [()], [(estimate,) * 4])
    assert [r.quantity for r in table][0] == "exposed, outcome"
    assert report_rows("htn", "odds_ratio", [()], [estimate])[0].quantity == "odds ratio"


def test_report_rows_refuse_cells_and_estimates_that_differ_in_number() -> None:
    with pytest.raises(StatisticsError, match="cells has 2 labels; per_cell has 1 entries"):
        report_rows("htn", "proportion", [("F",), ("M",)], [Estimate(0.1, 0.0, 0.2, 1)])


def test_labelled_estimates_render_and_round_trip_through_the_report(tmp_path: Path) -> None:
    from experiments.study_report import read_csv, render_table, write_csv

    rng = np.random.default_rng(70)
    samples = [rng.normal(50, 10, n) for n in SITE_SIZES]
    bins = histogram_releases(rng, samples, 1.0)
    rows = report_rows("age", "histogram", [("all",)], merged_histogram(bins), edges=EDGES)
    rows += report_rows("age", "quantile", [("all",)], pooled_quantiles(bins, edges=EDGES), probabilities=(0.25, 0.5, 0.75))
    sites = [exponential_cohort(rng, n) for n in SITE_SIZES]
    edges = np.arange(0.0, 3.01, 0.5)
    rows += report_rows("km", "survival", [("all",)], pooled_survival(*survival_releases(rng, sites, edges, 2.0)), edges=edges)
    assert max(len(line) for line in render_table(rows).splitlines()) <= 80
    back = read_csv(write_csv(rows, tmp_path / "rows.csv"))
    assert [(r.statistic, r.kind, r.quantity, r.value.estimate) for r in back] == [
        (r.statistic, r.kind, r.quantity, r.value.estimate) for r in rows
    ]
