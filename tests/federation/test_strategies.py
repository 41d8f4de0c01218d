"""The spec's strategy name selects a Flower Message-API strategy with one wave per round."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from federation.strategies import build_strategy


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_each_strategy_skips_flowers_evaluate_wave(name: str, cls: type) -> None:
    strategy = build_strategy(name, min_nodes=3, proximal_mu=0.1)
    assert type(strategy) is cls
    assert strategy.fraction_evaluate == 0.0
    assert strategy.min_train_nodes == 3


def test_fedprox_carries_mu_and_fedadam_eta() -> None:
    assert build_strategy("fedprox", min_nodes=2, proximal_mu=0.25).proximal_mu == 0.25
    assert build_strategy("fedadam", min_nodes=2, server_learning_rate=0.03).eta == 0.03


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="strategy must be one of fedavg, fedprox, fedadam; found 'krum'"):
        build_strategy("krum", min_nodes=2)
