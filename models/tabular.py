"""Tabular risk models: logistic regression and a small MLP, both valid for Opacus.

Each returns one logit per patient. Neither uses BatchNorm or any layer that mixes
samples, so per-sample gradients (and therefore DP-SGD) are well defined. Each also
names its layers in order (``linear_chain``): ``forward`` applies them in turn and
squeezes the single output column, which lets DP-SGD compute per-sample gradients of
these all-linear models in closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MODEL_KINDS", "LogisticRegression", "TabularMLP", "build_tabular_model"]

MODEL_KINDS = ("logistic", "mlp")


class LogisticRegression(nn.Module):
    """A single linear layer producing a logit."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)

    def linear_chain(self) -> tuple[nn.Module, ...]:
        """The layers `forward` applies in turn before squeezing out the logit."""
        return (self.linear,)


class TabularMLP(nn.Module):
    """A small multilayer perceptron with ReLU activations producing a logit."""

    def __init__(self, n_features: int, hidden: Sequence[int] = (32, 16)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def linear_chain(self) -> tuple[nn.Module, ...]:
        """The layers `forward` applies in turn before squeezing out the logit."""
        return tuple(self.net)


def build_tabular_model(
    kind: str, n_features: int, *, hidden: Sequence[int] = (32, 16), seed: int = 0
) -> nn.Module:
    """Build a model of `kind` ("logistic" or "mlp") with deterministic initial weights."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}; found {kind!r}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1; found {n_features}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if kind == "logistic":
            return LogisticRegression(n_features)
        return TabularMLP(n_features, hidden)
    finally:
        torch.random.set_rng_state(generator_state)
