"""The plain app's ServerApp: Flower's FedAvg then one evaluate wave, or empty waves.

``mode = "fedavg"``: ``flwr.serverapp.strategy.FedAvg`` (``fraction_evaluate=0``, as
medfed's strategies: nodes evaluate the incoming model inside the train message) runs
``num-rounds`` train waves with ``strategy.start``, then one evaluate wave sends the
final model to every node. ``mode = "empty"``: ``num-rounds`` waves of empty query
messages to every node. Nothing is saved or tracked.

With ``poll-interval = 0`` replies are collected by Flower's own
``Grid.send_and_receive`` (a pull every 3 s); with a positive value by medfed's
``federation.participants.ParticipantGrid``, which pulls that often, so that the
baseline can also be compared at medfed's polling.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plainfed.config import PlainConfig

__all__ = ["app"]

logger = logging.getLogger(__name__)

app = ServerApp()


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() >= deadline:
            raise RuntimeError(f"only {len(nodes)} node(s) connected within {timeout:g} s; need {minimum}")
        time.sleep(1.0)
    return nodes


def _grid(grid: Grid, nodes: list[int], config: PlainConfig) -> Grid:
    if config.poll_interval <= 0:
        return grid
    from federation.participants import ParticipantGrid

    return ParticipantGrid(grid, nodes, poll_interval=config.poll_interval)


def _wave(grid: Grid, kind: str, server_round: int, content: RecordDict, nodes: list[int], timeout: float) -> list[Message]:
    """Send `content` to every node and return the replies; fail unless all succeeded."""
    messages = [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [r for r in replies if r.has_error()]
    if len(replies) < len(nodes) or failed:
        reasons = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed)
        raise RuntimeError(f"{kind} wave {server_round}: {len(replies) - len(failed)} of {len(nodes)} node(s) replied. {reasons}")
    return replies


def _fedavg(grid: Grid, config: PlainConfig, nodes: list[int]) -> None:
    from plainfed.task import ARRAYS_KEY, METRICS_KEY, initial_arrays

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=config.min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=config.min_nodes,
        arrayrecord_key=ARRAYS_KEY,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays(config),
        num_rounds=config.num_rounds,
        timeout=config.round_timeout,
    )
    if sorted(result.train_metrics_clientapp) != list(range(1, config.num_rounds + 1)):
        raise RuntimeError(f"FedAvg aggregated rounds {sorted(result.train_metrics_clientapp)} of {config.num_rounds}")
    content = RecordDict({ARRAYS_KEY: result.arrays, "config": ConfigRecord({"server-round": config.num_rounds})})
    replies = _wave(grid, MessageType.EVALUATE, config.num_rounds, content, nodes, config.round_timeout)
    sizes = [float(r.content[METRICS_KEY]["eval-num-examples"]) for r in replies]
    aucs = [float(r.content[METRICS_KEY]["eval-auc"]) for r in replies]
    auc = sum(a * n for a, n in zip(aucs, sizes, strict=True)) / sum(sizes)
    logger.info("final model: validation AUC %.3f over %d node(s)", auc, len(replies))


def _empty(grid: Grid, config: PlainConfig, nodes: list[int]) -> None:
    for server_round in range(1, config.num_rounds + 1):
        _wave(grid, MessageType.QUERY, server_round, RecordDict(), nodes, config.round_timeout)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the mode the run config selects."""
    config = PlainConfig.from_run_config(context.run_config)
    nodes = _wait_for_nodes(grid, config.min_nodes, config.round_timeout)
    run = _fedavg if config.mode == "fedavg" else _empty
    run(_grid(grid, nodes, config), config, nodes)
