"""What a node does with each message of an experiment: query, train, evaluate.

Every handler follows the same order: parse the instruction, check everything that can
be checked without touching patient rows (node home, dataset registered, label and
features declared, privacy parameters consistent, round not already released), then
read the data, compute, charge the ledger, and only then build the reply. A refusal is
an error reply with a code from ``federation.protocol.REFUSAL_CODES`` and a one-line
reason for the researcher; it never contains patient data.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from clients.hospital_node.errors import ConnectorError, NodeError
from clients.hospital_node.home import NodeHome
from federation.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    IMAGING_TASK,
    METRICS_KEY,
    NODE_KEY,
    REFUSED_BAD_INSTRUCTION,
    REFUSED_BUDGET,
    REFUSED_DATASET,
    ProtocolError,
    TrainInstruction,
    node_record,
    refusal_reason,
)
from privacy.accountant import steps_per_epoch
from privacy.errors import PrivacyError
from privacy.ledger import PrivacyLedger

if TYPE_CHECKING:  # the connectors pull in pandas and pydicom: imported where they are used
    from clients.hospital_node.connectors import TabularData
    from clients.hospital_node.imaging_connector import ImagingData

__all__ = ["answer"]

logger = logging.getLogger(__name__)


def answer(kind: str, msg: Message, node_config: Mapping[str, Any]) -> Message:
    """Handle one message of `kind` ("query", "train" or "evaluate") and build the reply."""
    home: NodeHome | None = None
    try:
        home = _open_home(node_config)
        config = msg.content.config_records.get(CONFIG_KEY)
        if config is None:
            raise ProtocolError(f"the message has no '{CONFIG_KEY}' ConfigRecord")
        instruction = TrainInstruction.from_config(config)
        _check_accounting(instruction)
        content = _HANDLERS[kind](home, instruction, msg)
    except ProtocolError as err:
        return _refuse(msg, home, REFUSED_BAD_INSTRUCTION, str(err))
    except NodeError as err:
        return _refuse(msg, home, REFUSED_DATASET, str(err))
    except PrivacyError as err:
        return _refuse(msg, home, REFUSED_BUDGET, str(err))
    content[NODE_KEY] = node_record(home.name)
    return Message(content, reply_to=msg)


def _refuse(msg: Message, home: NodeHome | None, code: int, reason: str) -> Message:
    logger.warning("refused %s message of run %s: %s", msg.metadata.message_type, msg.metadata.run_id, reason)
    site = home.name if home is not None else "unconfigured node"
    return Message(Error(code=code, reason=refusal_reason(site, reason)), reply_to=msg)


def _open_home(node_config: Mapping[str, Any]) -> NodeHome:
    home = node_config.get("home")
    if not isinstance(home, str) or not home:
        raise NodeError("the SuperNode was started without --node-config home=<node home folder>")
    return NodeHome.open(Path(home))


def _check_accounting(instruction: TrainInstruction) -> None:
    """The node recomputes the step count it will be charged for; it never trusts it."""
    expected = instruction.local_epochs * steps_per_epoch(instruction.sample_rate)
    if instruction.steps != expected:
        raise ProtocolError(
            f"steps per round {instruction.steps} does not match local_epochs x "
            f"steps_per_epoch(sample_rate) = {expected}"
        )


def _load(home: NodeHome, instruction: TrainInstruction) -> TabularData | ImagingData:
    """The dataset's arrays, split by patient: TabularData or ImagingData, per the task."""
    entry = home.dataset(instruction.dataset)
    wanted = "imaging" if instruction.task == IMAGING_TASK else "tabular"
    if entry.kind != wanted:
        raise ConnectorError(
            f"dataset '{instruction.dataset}' on node '{home.name}' is of kind '{entry.kind}'; "
            f"task {instruction.task} needs a dataset of kind '{wanted}'"
        )
    if instruction.task == IMAGING_TASK:
        from clients.hospital_node.imaging_connector import ImagingConnector

        assert instruction.imaging is not None  # TrainInstruction checks it
        return ImagingConnector(home, entry).load(instruction.imaging)
    from clients.hospital_node.connectors import TabularConnector

    if entry.label_column != instruction.label:
        raise ProtocolError(
            f"label '{instruction.label}' is not the label of dataset '{instruction.dataset}' "
            f"on this node ('{entry.label_column}')"
        )
    return TabularConnector(entry).load().select(instruction.features, instruction.scaling)


def _model(instruction: TrainInstruction, arrays: ArrayRecord | None):  # type: ignore[no-untyped-def]
    if instruction.task == IMAGING_TASK:
        from models.imaging import build_imaging_model

        assert instruction.imaging is not None  # TrainInstruction checks it
        model = build_imaging_model(instruction.model_kind, instruction.imaging.size, channels=instruction.channels)
    else:
        from models.tabular import build_tabular_model

        model = build_tabular_model(instruction.model_kind, len(instruction.features), hidden=instruction.hidden)
    if arrays is not None:
        state = arrays.to_torch_state_dict()
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        received = {k: tuple(v.shape) for k, v in state.items()}
        if expected != received:
            raise ProtocolError("the received model arrays do not match the instructed model")
        model.load_state_dict(state)
    return model


def _tensors(data: TabularData | ImagingData):  # type: ignore[no-untyped-def]
    import torch

    return (
        torch.from_numpy(data.x_train),
        torch.from_numpy(data.y_train),
        torch.from_numpy(data.x_val),
        torch.from_numpy(data.y_val),
    )


def _query(home: NodeHome, instruction: TrainInstruction, msg: Message) -> RecordDict:
    # Cheap on purpose: every check short of training, without importing torch or an
    # accountant, so the query wave costs about Flower's floor for a wave.
    data = _load(home, instruction)
    metrics = {"num-examples": float(data.n_train), "eval-num-examples": float(data.n_val)}
    return RecordDict({METRICS_KEY: MetricRecord(metrics)})


def _train(home: NodeHome, instruction: TrainInstruction, msg: Message) -> RecordDict:
    import torch

    from models.training import evaluate, train_dp

    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    run_id = str(msg.metadata.run_id)
    if server_round < 1:
        raise ProtocolError(f"server-round must be >= 1; found {server_round}")
    with PrivacyLedger.open(home.ledger_path) as ledger:
        if any(c.run_id == run_id and c.round == server_round for c in ledger.charges(instruction.dataset)):
            raise ProtocolError(
                f"round {server_round} of run {run_id} was already trained and charged on "
                f"dataset '{instruction.dataset}'; a second release is refused"
            )
    data = _load(home, instruction)
    model = _model(instruction, msg.content.array_records.get(ARRAYS_KEY))
    x_train, y_train, x_val, y_val = _tensors(data)
    incoming = evaluate(model, x_val, y_val)
    # Seed the Poisson sampling from the OS so batches are unpredictable to anyone else.
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    stats = train_dp(
        model,
        x_train,
        y_train,
        noise_multiplier=instruction.noise_multiplier,
        max_grad_norm=instruction.max_grad_norm,
        sample_rate=instruction.sample_rate,
        steps=instruction.steps,
        learning_rate=instruction.learning_rate,
        proximal_mu=float(msg.content[CONFIG_KEY].get("proximal-mu", 0.0)),
        generator=generator,
    )
    with PrivacyLedger.open(home.ledger_path) as ledger:
        ledger.charge(
            instruction.dataset,
            run_id=run_id,
            round=server_round,
            noise_multiplier=instruction.noise_multiplier,
            sample_rate=instruction.sample_rate,
            steps=stats.steps,
        )
        epsilon = ledger.spent(instruction.dataset, delta=instruction.delta, accountant=instruction.accountant)
    logger.info(
        "run %s round %s: trained %s steps on dataset '%s'; epsilon spent %.3f",
        run_id, server_round, stats.steps, instruction.dataset, epsilon,
    )
    metrics = {
        "num-examples": float(data.n_train),
        **incoming.as_dict(),
        "train-loss": stats.mean_loss,
        "steps": float(stats.steps),
        "epsilon": epsilon,
    }
    arrays = ArrayRecord(model.state_dict())
    home.audit_log().append("release", _release_record(run_id, server_round, instruction, arrays, metrics))
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(metrics)})


def _release_record(
    run_id: str, server_round: int, instruction: TrainInstruction, arrays: ArrayRecord, metrics: dict[str, float]
) -> dict[str, object]:
    """What leaves the site with a training reply: names, shapes, size and digest, never values."""
    digest = hashlib.sha256()
    for name, array in sorted(arrays.items()):
        digest.update(name.encode())
        digest.update(array.data)
    return {
        "run": run_id,
        "round": server_round,
        "message": "train",
        "experiment": instruction.experiment,
        "spec_digest": instruction.spec_digest,
        "dataset": instruction.dataset,
        "arrays": {name: list(array.shape) for name, array in sorted(arrays.items())},
        "bytes": arrays.count_bytes(),
        "sha256": digest.hexdigest(),
        "metrics": sorted(metrics),
        "charge": {
            "noise_multiplier": instruction.noise_multiplier,
            "sample_rate": instruction.sample_rate,
            "steps": int(metrics["steps"]),
            "epsilon_spent": metrics["epsilon"],
            "delta": instruction.delta,
            "accountant": instruction.accountant,
        },
    }


def _evaluate(home: NodeHome, instruction: TrainInstruction, msg: Message) -> RecordDict:
    from models.training import evaluate

    data = _load(home, instruction)
    model = _model(instruction, msg.content.array_records.get(ARRAYS_KEY))
    _, _, x_val, y_val = _tensors(data)
    metrics = evaluate(model, x_val, y_val).as_dict()
    return RecordDict({METRICS_KEY: MetricRecord(metrics)})


_HANDLERS = {"query": _query, "train": _train, "evaluate": _evaluate}
