"""The aggregation strategy a spec selects, from Flower's Message-API strategies.

Each round is one message wave (a node evaluates the incoming model and trains in the
same message), so every strategy is built with ``fraction_evaluate=0``: Flower's own
evaluate wave would double the waves for nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from federation.metrics import aggregate_site_metrics
from federation.protocol import ARRAYS_KEY, CONFIG_KEY, TRAIN_METRICS, read_metrics

__all__ = ["STRATEGIES", "build_strategy"]

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def _aggregate(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's metric hook: sums, the largest epsilon, the pooled quality of the score histograms."""
    return MetricRecord(aggregate_site_metrics([read_metrics(r, TRAIN_METRICS) for r in replies]))


def build_strategy(
    name: str,
    *,
    min_nodes: int,
    proximal_mu: float = 0.0,
    server_learning_rate: float = 0.1,
    client_learning_rate: float = 0.1,
) -> FedAvg:
    """A configured FedAvg, FedProx or FedAdam; raises ValueError for any other name."""
    common: dict[str, object] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": 0,
        "min_available_nodes": min_nodes,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
        "train_metrics_aggr_fn": _aggregate,
    }
    builders: dict[str, Callable[[], FedAvg]] = {
        "fedavg": lambda: FedAvg(**common),  # type: ignore[arg-type]
        "fedprox": lambda: FedProx(proximal_mu=proximal_mu, **common),  # type: ignore[arg-type]
        "fedadam": lambda: FedAdam(eta=server_learning_rate, eta_l=client_learning_rate, **common),  # type: ignore[arg-type]
    }
    if name not in builders:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; found {name!r}")
    return builders[name]()


