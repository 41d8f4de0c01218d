"""A non-learned imaging baseline: a threshold on one global pixel statistic of the image.

What a CNN adds is only visible beside what needs no spatial features at all: the image
maximum, mean, standard deviation or 99th percentile, thresholded.
:func:`fit_pixel_threshold` picks the statistic that ranks a training set best (by AUC)
and the threshold that classifies it best; :class:`PixelStatisticThreshold` turns it into
a module with one logit per image, so it is scored by the same
:func:`models.training.evaluate` as the CNN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["PIXEL_STATISTICS", "PixelStatisticThreshold", "fit_pixel_threshold", "pixel_statistic"]

#: The global statistics, each of an image's pixels flattened to ``(n, pixels)``.
_STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": lambda flat: flat.amax(dim=1),
    "mean": lambda flat: flat.mean(dim=1),
    "std": lambda flat: flat.std(dim=1),
    "p99": lambda flat: torch.quantile(flat, 0.99, dim=1),
}
PIXEL_STATISTICS = tuple(_STATISTICS)


def pixel_statistic(name: str, x: torch.Tensor) -> torch.Tensor:
    """The statistic `name` ("max", "mean", "std" or "p99") of each image in `x`, shape ``(n,)``."""
    if name not in _STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(PIXEL_STATISTICS)}; found {name!r}")
    return _STATISTICS[name](x.reshape(len(x), -1).double())


class PixelStatisticThreshold(nn.Module):
    """Logit ``sign * (statistic(image) - threshold) / scale``: positive above the threshold.

    `sign` is -1 where the statistic is *lower* in the positive class; `scale` (the
    statistic's spread on the training set) only makes the probabilities readable.
    """

    def __init__(self, statistic: str, threshold: float, *, sign: float = 1.0, scale: float = 1.0) -> None:
        super().__init__()
        if statistic not in _STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(PIXEL_STATISTICS)}; found {statistic!r}")
        if sign not in (1.0, -1.0) or not scale > 0:
            raise ValueError(f"sign must be 1 or -1 and scale > 0; found {sign!r} and {scale!r}")
        self.statistic, self.threshold, self.sign, self.scale = statistic, float(threshold), float(sign), float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = pixel_statistic(self.statistic, x)
        return (self.sign * (value - self.threshold) / self.scale).float()

    def extra_repr(self) -> str:
        return f"statistic={self.statistic!r}, threshold={self.threshold:.4g}, sign={self.sign:+.0f}"


def fit_pixel_threshold(x: torch.Tensor, y: torch.Tensor) -> PixelStatisticThreshold:
    """The statistic with the best training AUC (either direction), thresholded at its best training accuracy."""
    from models.training import auc_score

    labels = y.reshape(-1).double().numpy()
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        raise ValueError("fitting a threshold needs training images of both classes")
    best: tuple[float, str, float, np.ndarray] | None = None
    for name in PIXEL_STATISTICS:
        values = pixel_statistic(name, x).numpy()
        auc = auc_score(values, labels)
        sign = 1.0 if auc >= 0.5 else -1.0
        if best is None or max(auc, 1 - auc) > best[0]:
            best = (max(auc, 1 - auc), name, sign, values)
    assert best is not None
    _, name, sign, values = best
    signed = sign * values
    # Candidate thresholds halfway between consecutive distinct values, and below them all.
    distinct = np.unique(signed)
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2])
    accuracy = [float(((signed > c) == (labels == 1)).mean()) for c in candidates]
    threshold = sign * float(candidates[int(np.argmax(accuracy))])
    scale = float(values.std()) or 1.0
    return PixelStatisticThreshold(name, threshold, sign=sign, scale=scale)
