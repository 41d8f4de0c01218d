"""Clinical metrics of a binary risk model on exact arrays: AUC with DeLong's interval, calibration, thresholds.

This is benchmark and report mathematics for data whose rows are all at hand (the
generated alliance), never what a node releases: a node's quality leaves as a noisy
score histogram (:mod:`models.evaluation`). Everything here takes predicted
probabilities and 0/1 labels as arrays and returns numbers; no I/O.

- **AUC with a 95 % confidence interval** by DeLong's method (DeLong, DeLong and
  Clarke-Pearson 1988), computed from midranks as Sun and Xu (2014) do: each positive's
  placement is the share of negatives it outranks (ties count half), each negative's the
  share of positives that outrank it; the AUC is their mean and its variance
  ``var(V10) / m + var(V01) / n``. The interval is ``AUC ± z·se`` kept within [0, 1], as
  pROC reports it. Two scores on the same patients are compared by DeLong's paired
  test: the covariance of their placements gives the variance of the AUCs' difference.
- **Calibration** as OHDSI's PatientLevelPrediction reports it: the outcome regressed
  on the linear predictor ``logit(p)`` by logistic regression. The *slope* is the
  coefficient of ``y ~ a + b·logit(p)`` (1 when the spread of risks is right; below 1
  when the model is overconfident); the *intercept* (calibration-in-the-large) is ``a``
  of ``y ~ a + offset(logit(p))``, the slope fixed at 1 (0 when mean predicted risk
  matches the observed rate; positive when the model under-predicts). Both are fitted by
  Newton's method on the exact log-likelihood.
- **Reliability curve**: patients sorted by predicted risk in ten groups of (near)
  equal size; each group's mean predicted risk against its observed rate.
- **Sensitivity, specificity, PPV, NPV** at a stated threshold; a score at or above it
  is a positive prediction. A ratio with an empty denominator is NaN, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "AucDifference",
    "AucInterval",
    "Calibration",
    "ClinicalSummary",
    "ReliabilityBin",
    "ThresholdMetrics",
    "auc_delong",
    "auc_difference_delong",
    "calibration",
    "clinical_summary",
    "reliability_curve",
    "threshold_metrics",
    "within_group_auc",
]

# Scores are kept this far inside (0, 1) before taking logits: a score of exactly 0 or 1
# (a saturated sigmoid in float32) would otherwise be an infinite linear predictor.
_EPS = 1e-12


def _arrays(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} scores for {y.size} labels")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0 or 1")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("scores must be probabilities in [0, 1]")
    return p, y.astype(bool)


@dataclass(frozen=True)
class AucInterval:
    """An AUC, its DeLong standard error and a two-sided interval at `level`."""

    auc: float
    se: float
    low: float
    high: float
    level: float
    positives: int
    negatives: int


def _placements(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placements: each positive's share of negatives it outranks, each negative's of positives above it."""
    m, n = int(y.sum()), int((~y).sum())
    ranks_all = stats.rankdata(p)  # midranks: ties share the average rank
    v10 = (ranks_all[y] - stats.rankdata(p[y])) / n
    v01 = 1.0 - (ranks_all[~y] - stats.rankdata(p[~y])) / m
    return v10, v01


def auc_delong(scores: np.ndarray, labels: np.ndarray, *, level: float = 0.95) -> AucInterval:
    """AUC with DeLong's standard error and interval; NaN throughout when a class is absent.

    With a single positive or negative the variance of that class's placements is
    undefined (one value), so the standard error and interval are NaN while the AUC is not.
    """
    p, y = _arrays(scores, labels)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return AucInterval(math.nan, math.nan, math.nan, math.nan, level, m, n)
    v10, v01 = _placements(p, y)
    auc = float(v10.mean())
    if m < 2 or n < 2:
        return AucInterval(auc, math.nan, math.nan, math.nan, level, m, n)
    se = math.sqrt(float(v10.var(ddof=1)) / m + float(v01.var(ddof=1)) / n)
    z = float(stats.norm.ppf(0.5 + level / 2))
    return AucInterval(auc, se, max(0.0, auc - z * se), min(1.0, auc + z * se), level, m, n)


@dataclass(frozen=True)
class AucDifference:
    """Two scores' AUCs on the same patients, their difference ``a - b`` and its paired DeLong standard error."""

    auc_a: float
    auc_b: float
    difference: float
    se: float

    def z(self) -> float:
        """The difference in standard errors (inf or -inf when the scores rank every pair alike but differ)."""
        if self.se > 0:
            return self.difference / self.se
        return 0.0 if self.difference == 0 else math.copysign(math.inf, self.difference)


def auc_difference_delong(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray) -> AucDifference:
    """DeLong's paired comparison of two scores' AUCs on the same patients.

    The covariance of the two AUCs comes from the covariance of their placements
    (DeLong et al. 1988): ``var(A - B) = var_A + var_B - 2 cov_AB`` with each term
    ``S10 / m + S01 / n``. Two scores that rank patients alike have a small difference
    variance even on few patients, which is what makes the test sharper than two
    separate intervals. Needs at least two patients of each class.
    """
    pa_, y = _arrays(scores_a, labels)
    pb, yb = _arrays(scores_b, labels)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"a paired AUC comparison needs two patients of each class; got {m} positive, {n} negative")
    a10, a01 = _placements(pa_, y)
    b10, b01 = _placements(pb, yb)
    s10 = np.cov(np.vstack([a10, b10]), ddof=1)
    s01 = np.cov(np.vstack([a01, b01]), ddof=1)
    covariance = s10 / m + s01 / n
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    auc_a, auc_b = float(a10.mean()), float(b10.mean())
    return AucDifference(auc_a, auc_b, auc_a - auc_b, math.sqrt(max(variance, 0.0)))


def within_group_auc(groups: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The AUC over positive-negative pairs from the same group only (a stratified AUC).

    Each group is ``(scores, labels)``; its AUC weighs by its pairs (positives x
    negatives), and a group with one class adds none. Unlike the AUC of the groups'
    union it compares no patient of one group (site) with one of another, so scores from
    different models, or sites with different base rates, do not mix. NaN with no pair.
    """
    concordant = pairs = 0.0
    for scores, labels in groups:
        result = auc_delong(scores, labels)
        weight = result.positives * result.negatives
        if weight:
            concordant += result.auc * weight
            pairs += weight
    return concordant / pairs if pairs else math.nan


@dataclass(frozen=True)
class Calibration:
    """Calibration-in-the-large (slope fixed at 1) and the calibration slope; 0 and 1 when perfect."""

    intercept: float
    slope: float


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1 - _EPS)
    return np.log(q) - np.log1p(-q)


def _logistic_fit(design: np.ndarray, y: np.ndarray, offset: np.ndarray, *, iterations: int = 100) -> np.ndarray:
    """Maximum-likelihood coefficients of ``y ~ design @ beta + offset`` by Newton's method.

    Each step is halved until the log-likelihood does not decrease, so that a poorly
    scaled start cannot overshoot; stops when the step is below 1e-10.
    """
    beta = np.zeros(design.shape[1])

    def loglik(b: np.ndarray) -> float:
        eta = design @ b + offset
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    current = loglik(beta)
    for _ in range(iterations):
        eta = design @ beta + offset
        mu = 1.0 / (1.0 + np.exp(-eta))
        gradient = design.T @ (y - mu)
        hessian = (design * (mu * (1 - mu))[:, None]).T @ design
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return np.full(design.shape[1], math.nan)
        scale = 1.0
        while scale > 1e-6:
            candidate = beta + scale * step
            value = loglik(candidate)
            if value >= current - 1e-12:
                break
            scale /= 2
        beta, current = candidate, value
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    return beta


def calibration(scores: np.ndarray, labels: np.ndarray) -> Calibration:
    """Calibration intercept (slope fixed at 1) and slope of ``y`` on ``logit(scores)``.

    NaN when a class is absent (the fits have no finite maximum).
    """
    p, y = _arrays(scores, labels)
    if y.all() or not y.any():
        return Calibration(math.nan, math.nan)
    lp = _logit(p)
    yf = y.astype(np.float64)
    ones = np.ones((len(p), 1))
    [intercept] = _logistic_fit(ones, yf, lp)
    _, slope = _logistic_fit(np.column_stack([ones, lp]), yf, np.zeros(len(p)))
    return Calibration(float(intercept), float(slope))


@dataclass(frozen=True)
class ReliabilityBin:
    """One group of a reliability curve: its patients, mean predicted risk and observed rate."""

    patients: int
    predicted: float
    observed: float


def reliability_curve(scores: np.ndarray, labels: np.ndarray, *, groups: int = 10) -> tuple[ReliabilityBin, ...]:
    """Patients sorted by predicted risk, split in `groups` groups of near-equal size (deciles).

    Ties in the score are split by a stable sort; fewer patients than groups give one
    group per patient, and no patient no group.
    """
    p, y = _arrays(scores, labels)
    if groups < 1:
        raise ValueError(f"groups must be >= 1; found {groups}")
    if len(p) == 0:
        return ()
    order = np.argsort(p, kind="stable")
    return tuple(
        ReliabilityBin(len(part), float(p[part].mean()), float(y[part].mean()))
        for part in np.array_split(order, min(groups, len(p)))
        if len(part)
    )


@dataclass(frozen=True)
class ThresholdMetrics:
    """Confusion counts and their ratios at one threshold (score >= threshold: predicted positive)."""

    threshold: float
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int

    @staticmethod
    def _ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else math.nan

    @property
    def sensitivity(self) -> float:
        return self._ratio(self.true_positives, self.true_positives + self.false_negatives)

    @property
    def specificity(self) -> float:
        return self._ratio(self.true_negatives, self.true_negatives + self.false_positives)

    @property
    def ppv(self) -> float:
        return self._ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def npv(self) -> float:
        return self._ratio(self.true_negatives, self.true_negatives + self.false_negatives)


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, *, threshold: float) -> ThresholdMetrics:
    """Sensitivity, specificity, PPV and NPV at `threshold` (a score at or above it is positive)."""
    p, y = _arrays(scores, labels)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1]; found {threshold}")
    predicted = p >= threshold
    return ThresholdMetrics(
        threshold=float(threshold),
        true_positives=int(np.sum(predicted & y)),
        false_positives=int(np.sum(predicted & ~y)),
        true_negatives=int(np.sum(~predicted & ~y)),
        false_negatives=int(np.sum(~predicted & y)),
    )


@dataclass(frozen=True)
class ClinicalSummary:
    """What a clinician reads of a risk model on one set of patients."""

    patients: int
    positives: int
    auc: AucInterval
    calibration: Calibration
    at_threshold: ThresholdMetrics
    reliability: tuple[ReliabilityBin, ...]


def clinical_summary(scores: np.ndarray, labels: np.ndarray, *, threshold: float, groups: int = 10) -> ClinicalSummary:
    """AUC with its interval, calibration, the threshold metrics and the reliability curve at once."""
    p, y = _arrays(scores, labels)
    return ClinicalSummary(
        patients=len(p),
        positives=int(y.sum()),
        auc=auc_delong(p, y),
        calibration=calibration(p, y),
        at_threshold=threshold_metrics(p, y, threshold=threshold),
        reliability=reliability_curve(p, y, groups=groups),
    )
