"""Combining per-site metrics into the experiment's aggregate.

Every metric is weighted by each site's released training-set size (``num-examples``, a
discrete Laplace count the node released once per run): no reply carries an exact count,
and the validation split is a fixed fraction of a site's patients. Epsilon is not averaged: each site has its own guarantee, and the
aggregate reports the largest. A pooled AUC cannot be computed from per-site AUCs; the
aggregate AUC is the validation-size-weighted mean of the sites' AUCs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["aggregate_site_metrics"]


def _weighted(values: Sequence[tuple[float, float]]) -> float:
    pairs = [(v, w) for v, w in values if math.isfinite(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def aggregate_site_metrics(sites: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Aggregate the metric dictionaries of several sites (keys as in federation.protocol)."""
    if not sites:
        return {}
    keys = set().union(*sites)
    out: dict[str, float] = {}
    for key in sorted(keys):
        present = [s for s in sites if key in s]
        if key in ("num-examples", "steps"):
            out[key] = float(sum(s[key] for s in present))
        elif key.startswith("epsilon"):
            out[key] = max(s[key] for s in present)
        else:
            out[key] = _weighted([(s[key], s.get("num-examples", 0.0)) for s in present])
    return out
