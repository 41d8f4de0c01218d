"""A binary risk model's quality from score histograms by label, the way it leaves a node.

A node does not send its validation AUC or loss: those are exact metrics of private rows.
It sends, for each label, how many of its validation patients the model scored into each
of :data:`SCORE_BINS` fixed bins, with discrete Laplace noise added
(:mod:`clients.hospital_node.rounds`). Adding or removing one patient changes one bin of
one label by one, so the histogram's L1 sensitivity is 1 and one discrete Laplace draw
per bin at scale ``1 / epsilon`` is ``epsilon``-DP.

Everything reported is post-processing of such histograms (:func:`binned_quality`): a
site's own (noisy) quality, and the federated model's *pooled* quality from the sum of
every site's histogram — an AUC over all validation patients, not a mean of per-site
AUCs, and no site drops out because its split holds one class.

The bins are fixed (not taken from the data, which would reveal it): equal steps of 0.5
on the logit scale from -4.5 to 4.5 (probabilities 1.1 % to 98.9 %), plus a bin below and
above, so that rare outcomes, whose scores crowd near 0, still get resolution; 0.5 is an
edge, so accuracy at 0.5 is exact up to the noise. Binning is the only approximation:

- AUC counts a positive and a negative in the same bin as half concordant (ties).
- Loss and Brier score put each patient at its bin's representative probability (the
  logistic of the bin's logit midpoint; ±4.75 for the two open bins).
- The calibration curve is, per bin with patients in it, the bin's representative
  probability against the observed fraction of positives.

Noisy counts enter the sums as they are, negative ones included: the noise is zero-mean
and independent between bins and labels, so the sums, and the AUC's numerator and
denominator (products of counts of the two labels), are unbiased, and the ratios
consistent. Clamping each bin at 0 first would add phantom patients to every empty bin
and pull the AUC towards 0.5. Only the results are kept in range (AUC and accuracy in
[0, 1]); a label whose noisy total is not positive makes AUC undefined (NaN), never a
silent drop. The calibration curve, read bin by bin, shows only bins whose noisy count is
positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SCORE_BINS",
    "SCORE_EDGES",
    "BinnedQuality",
    "CalibrationBin",
    "binned_quality",
    "score_histogram",
]

#: Interior bin edges of a score histogram, as probabilities (logit -4.5, -4.0, ..., 4.5).
_LOGIT_EDGES = np.linspace(-4.5, 4.5, 19)
SCORE_EDGES: tuple[float, ...] = tuple(float(1.0 / (1.0 + math.exp(-t))) for t in _LOGIT_EDGES)
#: Bins per label: below the first edge, between edges, above the last.
SCORE_BINS = len(SCORE_EDGES) + 1
_MIDPOINTS = np.concatenate([[-4.75], (_LOGIT_EDGES[:-1] + _LOGIT_EDGES[1:]) / 2, [4.75]])
#: Each bin's representative probability (the logistic of its logit midpoint).
REPRESENTATIVE = 1.0 / (1.0 + np.exp(-_MIDPOINTS))


def score_histogram(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Exact counts, shape ``(2, SCORE_BINS)``: row 0 the negatives', row 1 the positives'.

    A score equal to an edge falls in the bin above it (so 0.5 is predicted positive, as
    accuracy at 0.5 counts it).
    """
    probabilities = np.asarray(probabilities, dtype=float).ravel()
    labels = np.asarray(labels).ravel()
    if probabilities.shape != labels.shape:
        raise ValueError(f"{probabilities.size} scores for {labels.size} labels")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError("labels must be 0 or 1")
    if np.any(~np.isfinite(probabilities)) or np.any((probabilities < 0) | (probabilities > 1)):
        raise ValueError("scores must be probabilities in [0, 1]")
    bins = np.searchsorted(np.asarray(SCORE_EDGES), probabilities, side="right")
    out = np.zeros((2, SCORE_BINS), dtype=np.int64)
    np.add.at(out, (labels.astype(np.int64), bins), 1)
    return out


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of a calibration curve: patients, predicted and observed risk (both post-processed counts)."""

    low: float
    high: float
    patients: float
    predicted: float
    observed: float


@dataclass(frozen=True)
class BinnedQuality:
    """What a (noisy) score histogram says of a model; NaN where it says nothing."""

    negatives: float
    positives: float
    auc: float
    accuracy: float
    loss: float
    brier: float
    calibration: tuple[CalibrationBin, ...]

    def as_metrics(self, prefix: str = "eval-") -> dict[str, float]:
        """The metrics a report shows, in the protocol's naming."""
        return {
            f"{prefix}auc": self.auc,
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}loss": self.loss,
            f"{prefix}brier": self.brier,
            f"{prefix}patients": self.negatives + self.positives,
            f"{prefix}positives": self.positives,
        }


def binned_quality(histogram: np.ndarray) -> BinnedQuality:
    """AUC, accuracy at 0.5, loss, Brier score and calibration of a ``(2, SCORE_BINS)`` histogram.

    `histogram` may be noisy (floats, negative counts); see the module docstring.
    """
    counts = np.asarray(histogram, dtype=float)
    if counts.shape != (2, SCORE_BINS):
        raise ValueError(f"a score histogram has shape (2, {SCORE_BINS}); found {counts.shape}")
    if not np.all(np.isfinite(counts)):
        raise ValueError("a score histogram holds a value that is not a finite number")
    negatives, positives = counts
    n0, n1 = float(negatives.sum()), float(positives.sum())
    total = n0 + n1
    below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])  # negatives in lower bins
    auc = _within(float(np.sum(positives * (below + 0.5 * negatives)) / (n0 * n1)), 0.0, 1.0) if n0 > 0 and n1 > 0 else math.nan
    if total > 0:
        predicts_positive = np.arange(SCORE_BINS) >= SCORE_EDGES.index(0.5) + 1
        accuracy = _within(float((negatives[~predicts_positive].sum() + positives[predicts_positive].sum()) / total), 0.0, 1.0)
        loss = _within(float(-(positives @ np.log(REPRESENTATIVE) + negatives @ np.log1p(-REPRESENTATIVE)) / total), 0.0, math.inf)
        brier = _within(float((positives @ (1 - REPRESENTATIVE) ** 2 + negatives @ REPRESENTATIVE**2) / total), 0.0, 1.0)
    else:
        accuracy = loss = brier = math.nan
    edges = (0.0, *SCORE_EDGES, 1.0)
    shown_negatives, shown_positives = np.maximum(counts, 0.0)
    calibration = tuple(
        CalibrationBin(edges[b], edges[b + 1], float(shown_negatives[b] + shown_positives[b]), float(REPRESENTATIVE[b]),
                       float(shown_positives[b] / (shown_negatives[b] + shown_positives[b])))
        for b in range(SCORE_BINS)
        if shown_negatives[b] + shown_positives[b] > 0
    )
    return BinnedQuality(n0, n1, auc, accuracy, loss, brier, calibration)


def _within(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)
