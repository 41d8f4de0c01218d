"""Combining per-site metrics into the experiment's aggregate.

Nothing a node sends is an exact metric (:mod:`federation.protocol`). A model's quality
arrives as each site's noisy validation-score histogram by label; from it this module
computes, as post-processing (:func:`models.evaluation.binned_quality`):

- each site's own AUC, accuracy, loss and Brier score (noisy: a small site's are rough);
- the federated model's *pooled* quality from the sum of the sites' histograms: one AUC
  and one calibration curve over every site's validation patients, not a mean of per-site
  AUCs, and a site whose split holds one class still counts.

Other metrics: ``num-examples`` (each site's released noisy training size) and ``steps``
are summed; epsilon is not averaged: each site has its own guarantee, and the aggregate
reports the largest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from federation.protocol import SCORE_METRICS, score_histogram_of
from models.evaluation import BinnedQuality, binned_quality

__all__ = ["QUALITY_METRICS", "aggregate_site_metrics", "pooled_quality", "site_quality"]

#: What a score histogram gives, per site and pooled (binned_quality's as_metrics keys).
QUALITY_METRICS = ("eval-auc", "eval-accuracy", "eval-loss", "eval-brier", "eval-patients", "eval-positives")


def site_quality(metrics: Mapping[str, float]) -> dict[str, float]:
    """A site's quality metrics (``eval-auc``, ...) from the histogram its reply carries; empty if none."""
    histogram = score_histogram_of(metrics)
    return {} if histogram is None else binned_quality(np.asarray(histogram)).as_metrics()


def pooled_quality(sites: Sequence[Mapping[str, float]]) -> BinnedQuality | None:
    """The quality of the sum of the sites' histograms; None if no site sent one."""
    histograms = [h for h in (score_histogram_of(m) for m in sites) if h is not None]
    if not histograms:
        return None
    return binned_quality(np.sum(np.asarray(histograms, dtype=float), axis=0))


def aggregate_site_metrics(sites: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Aggregate the metric dictionaries of several sites (keys as in federation.protocol).

    Score histograms become the pooled quality metrics (``eval-auc``, ...); the histogram
    bins themselves are not repeated.
    """
    if not sites:
        return {}
    out: dict[str, float] = {}
    for key in sorted(set().union(*sites) - set(SCORE_METRICS)):
        present = [s[key] for s in sites if key in s and math.isfinite(s[key])]
        if not present:
            continue
        if key.startswith("epsilon"):
            out[key] = max(present)
        else:
            out[key] = float(sum(present))
    pooled = pooled_quality(sites)
    if pooled is not None:
        out.update(pooled.as_metrics())
    return out
