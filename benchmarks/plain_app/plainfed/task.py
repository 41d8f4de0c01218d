"""The plain app's per-message work: the same data, model and DP-SGD as medfed's node.

Per train message: load the node's registered dataset through medfed's
`clients.hospital_node.connectors.TabularConnector`, select and scale the features,
evaluate the incoming model on the validation split, train it with
`models.training.train_dp`, and reply the arrays and metrics (``num-examples`` is
FedAvg's weight). What it leaves out is exactly what medfed adds: the instruction and
its checks, the privacy ledger, refusals and the node record.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from clients.hospital_node.connectors import TabularConnector, TabularData
from clients.hospital_node.home import NodeHome
from models.tabular import build_tabular_model
from models.training import evaluate, train_dp
from plainfed.config import PlainConfig

__all__ = ["ARRAYS_KEY", "METRICS_KEY", "evaluate_reply", "initial_arrays", "train_reply"]

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"


def initial_arrays(config: PlainConfig) -> ArrayRecord:
    """The global model's starting weights (the same deterministic ones medfed starts from)."""
    model = build_tabular_model(config.model_kind, len(config.features), hidden=config.hidden)
    return ArrayRecord(model.state_dict())


def _data(config: PlainConfig, context: Context) -> TabularData:
    home = NodeHome.open(Path(str(context.node_config["home"])))
    return TabularConnector(home.dataset(config.dataset)).load().select(config.features, config.scaling)


def _model(config: PlainConfig, msg: Message) -> torch.nn.Module:
    model = build_tabular_model(config.model_kind, len(config.features), hidden=config.hidden)
    model.load_state_dict(msg.content[ARRAYS_KEY].to_torch_state_dict())
    return model


def train_reply(msg: Message, context: Context) -> Message:
    """Evaluate the incoming model, train it with DP-SGD, reply arrays and metrics."""
    config = PlainConfig.from_run_config(context.run_config)
    data = _data(config, context)
    model = _model(config, msg)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
    incoming = evaluate(model, x_val, y_val)
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    stats = train_dp(
        model,
        x_train,
        y_train,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        sample_rate=config.sample_rate,
        steps=config.steps,
        learning_rate=config.learning_rate,
        generator=generator,
    )
    metrics = {"num-examples": float(data.n_train), **incoming.as_dict(), "train-loss": stats.mean_loss}
    content = RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def evaluate_reply(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the validation split."""
    config = PlainConfig.from_run_config(context.run_config)
    data = _data(config, context)
    model = _model(config, msg)
    metrics = evaluate(model, torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)).as_dict()
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
