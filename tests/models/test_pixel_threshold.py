"""The non-learned imaging baseline: the best global pixel statistic, thresholded."""

from __future__ import annotations

import pytest
import torch

from models.pixel_threshold import PixelStatisticThreshold, fit_pixel_threshold, pixel_statistic
from models.training import evaluate


def _images(values: list[float]) -> torch.Tensor:
    """One 4 x 4 image per value: zeros with one pixel at the value."""
    x = torch.zeros(len(values), 1, 4, 4)
    x[:, 0, 1, 2] = torch.tensor(values)
    return x


def test_it_picks_the_statistic_that_separates_and_thresholds_between_the_classes() -> None:
    x, y = _images([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), torch.tensor([0.0, 0, 0, 1, 1, 1])
    model = fit_pixel_threshold(x, y)
    assert model.statistic == "max" and model.sign == 1.0 and 0.3 < model.threshold < 0.7
    result = evaluate(model, x, y)
    assert (result.auc, result.accuracy) == (1.0, 1.0)


def test_a_statistic_lower_in_the_positive_class_gets_a_negative_sign() -> None:
    x, y = _images([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), torch.tensor([0.0, 0, 0, 1, 1, 1])
    model = fit_pixel_threshold(x, y)
    assert model.sign == -1.0 and evaluate(model, x, y).accuracy == 1.0


def test_the_statistics_are_computed_per_image() -> None:
    x = _images([1.0, 2.0])
    assert pixel_statistic("max", x).tolist() == [1.0, 2.0]
    assert pixel_statistic("mean", x).tolist() == [1 / 16, 2 / 16]
    assert pixel_statistic("p99", x).shape == (2,)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="statistic must be one of max, mean, std, p99; found 'median'"):
        PixelStatisticThreshold("median", 0.5)
    with pytest.raises(ValueError, match="needs training images of both classes"):
        fit_pixel_threshold(_images([0.1, 0.2]), torch.tensor([1.0, 1.0]))
