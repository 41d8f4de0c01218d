"""What a node does with each message of an experiment: query, train, evaluate.

Every handler follows the same order: parse the instruction, let the node's governance
admit it (:func:`clients.hospital_node.governance.admit`: signature, approval, policy,
budget; nothing is read before that), check what else can be checked without touching
patient rows (dataset registered, label and features declared, privacy parameters
consistent, round not already released), reserve the round's budget, then read the
data, compute, charge the ledger, record the release in the audit log, and only then
build the reply. What leaves passes the egress guard: only the metric keys the protocol
declares for that message and arrays shaped exactly like the instructed model.

A refusal is an error reply with a code from ``federation.protocol.REFUSAL_CODES`` and a
one-line reason for the researcher; it never contains patient data, and it is recorded
in the node's audit log (except "awaiting approval", recorded once as the request).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from clients.hospital_node.errors import ConnectorError, NodeError
from clients.hospital_node.governance import Admission, Refusal, admit
from clients.hospital_node.home import NodeHome
from federation.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_METRICS,
    IMAGING_TASK,
    METRICS_KEY,
    NODE_KEY,
    QUERY_METRICS,
    REFUSED_BAD_INSTRUCTION,
    REFUSED_BUDGET,
    REFUSED_DATASET,
    REFUSED_POLICY,
    TRAIN_METRICS,
    ProtocolError,
    SignedSpec,
    TrainInstruction,
    node_record,
    refusal_reason,
)
from privacy.accountant import steps_per_epoch
from privacy.errors import PrivacyError
from privacy.events import DPEvent
from privacy.ledger import PrivacyLedger

if TYPE_CHECKING:  # the connectors pull in pandas and pydicom: imported where they are used
    from clients.hospital_node.connectors import TabularData
    from clients.hospital_node.imaging_connector import ImagingData

__all__ = ["answer"]

logger = logging.getLogger(__name__)


def answer(kind: str, msg: Message, node_config: Mapping[str, Any]) -> Message:
    """Handle one message of `kind` ("query", "train" or "evaluate") and build the reply."""
    home: NodeHome | None = None
    instruction: TrainInstruction | None = None
    try:
        home = _open_home(node_config)
        config = msg.content.config_records.get(CONFIG_KEY)
        if config is None:
            raise ProtocolError(f"the message has no '{CONFIG_KEY}' ConfigRecord")
        instruction = TrainInstruction.from_config(config)
        signed = SignedSpec.from_config(config)
        admission = admit(home, instruction, signed, run_id=str(msg.metadata.run_id), kind=kind)
        _check_accounting(instruction)
        content = _HANDLERS[kind](home, instruction, msg, admission)
        _guard(kind, content)
        if kind != "train":  # a training reply records itself, with its charge, before it is built
            home.audit_log().append("release", _reply_record(kind, msg, instruction, content))
    except Refusal as err:
        return _refuse(msg, home, instruction, err.code, err.reason, record=err.record)
    except ProtocolError as err:
        return _refuse(msg, home, instruction, REFUSED_BAD_INSTRUCTION, str(err))
    except NodeError as err:
        return _refuse(msg, home, instruction, REFUSED_DATASET, str(err))
    except PrivacyError as err:
        return _refuse(msg, home, instruction, REFUSED_BUDGET, str(err))
    content[NODE_KEY] = node_record(home.name)
    return Message(content, reply_to=msg)


def _refuse(
    msg: Message, home: NodeHome | None, instruction: TrainInstruction | None, code: int, reason: str, *, record: bool = True
) -> Message:
    kind, run_id = msg.metadata.message_type, str(msg.metadata.run_id)
    logger.warning("refused %s message of run %s: %s", kind, run_id, reason)
    if home is not None and record:
        payload = {"run": run_id, "message": kind, "code": code, "reason": reason}
        if instruction is not None:
            payload |= {"spec_digest": instruction.spec_digest, "dataset": instruction.dataset}
        try:
            home.audit_log().append("refusal", payload)
        except (NodeError, PrivacyError) as err:  # the refusal stands; the log says why it is silent
            logger.error("could not record the refusal in the audit log: %s", err)
    site = home.name if home is not None else "unconfigured node"
    return Message(Error(code=code, reason=refusal_reason(site, reason)), reply_to=msg)


_DECLARED = {"query": QUERY_METRICS, "train": TRAIN_METRICS, "evaluate": EVAL_METRICS}


def _guard(kind: str, content: RecordDict) -> None:
    """The egress guard: nothing leaves but the declared metric keys (and, for train, model arrays)."""
    unexpected = set(content) - {METRICS_KEY, ARRAYS_KEY if kind == "train" else METRICS_KEY}
    metrics = content.get(METRICS_KEY)
    if unexpected or not isinstance(metrics, MetricRecord):
        raise ProtocolError(f"egress guard: a {kind} reply may carry only '{METRICS_KEY}'" + (" and model arrays" if kind == "train" else ""))
    undeclared = sorted(set(metrics) - set(_DECLARED[kind]))
    if undeclared:
        raise ProtocolError(f"egress guard: undeclared metric(s) {', '.join(undeclared)} in a {kind} reply; nothing was sent")


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


def _check_cohort(data: TabularData | ImagingData, instruction: TrainInstruction, admission: Admission, msg: Message) -> None:
    """The dataset must have the policy's minimum cohort (or the signed spec's, if stricter)."""
    spec = SignedSpec.from_config(msg.content[CONFIG_KEY]).mapping()
    minimum = max(admission.policy.min_cohort_size, int(spec.get("privacy", {}).get("min_cohort_size") or 0))
    if data.n_train + data.n_val < minimum:
        # The count itself stays on the node: a small cohort is a disclosure risk.
        raise Refusal(REFUSED_POLICY, f"dataset '{instruction.dataset}' has fewer patients than the minimum cohort of {minimum}")


def _query(home: NodeHome, instruction: TrainInstruction, msg: Message, admission: Admission) -> RecordDict:
    # Cheap on purpose: every check short of training, without importing torch, so the
    # query wave costs little more than Flower's floor for a wave.
    data = _load(home, instruction)
    _check_cohort(data, instruction, admission, msg)
    metrics = {"num-examples": float(data.n_train), "eval-num-examples": float(data.n_val)}
    return RecordDict({METRICS_KEY: MetricRecord(metrics)})


def _train(home: NodeHome, instruction: TrainInstruction, msg: Message, admission: Admission) -> RecordDict:
    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    run_id = str(msg.metadata.run_id)
    if not 1 <= server_round <= instruction.rounds:
        raise ProtocolError(f"server-round must be in 1..{instruction.rounds} (the signed spec's rounds); found {server_round}")
    with PrivacyLedger.open(home.ledger_path) as ledger:
        if any(c.run_id == run_id and c.round == server_round for c in ledger.charges(instruction.dataset)):
            raise ProtocolError(
                f"round {server_round} of run {run_id} was already trained and charged on "
                f"dataset '{instruction.dataset}'; a second release is refused"
            )
        assert admission.budget is not None  # admitted for training: budget and caps were checked
        reservation = ledger.reserve(
            instruction.dataset,
            run_id=run_id,
            round=server_round,
            event=DPEvent(instruction.noise_multiplier, instruction.sample_rate, instruction.steps),
            budget=admission.budget,
            run_cap=admission.run_cap,
            accountant=admission.policy.accountant,
        )
    try:
        return _train_reserved(home, instruction, msg, admission, server_round, run_id, reservation)
    except BaseException:
        # Nothing left the node: give the reservation back. (A crash that skips this
        # leaves it open; it keeps counting and `medfed node budget` lists it.)
        with PrivacyLedger.open(home.ledger_path) as ledger:
            ledger.release(reservation)
        raise


def _train_reserved(  # type: ignore[no-untyped-def]
    home: NodeHome, instruction: TrainInstruction, msg: Message, admission: Admission, server_round: int, run_id: str, reservation
) -> RecordDict:
    import torch

    from models.training import evaluate, train_dp

    data = _load(home, instruction)
    _check_cohort(data, instruction, admission, msg)
    model = _model(instruction, msg.content.array_records.get(ARRAYS_KEY))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
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
    if stats.steps != instruction.steps:
        raise ProtocolError(f"training took {stats.steps} steps, not the {instruction.steps} reserved")
    arrays = ArrayRecord(model.state_dict())
    if {k: tuple(v.shape) for k, v in arrays.items()} != expected:
        raise ProtocolError("egress guard: the trained arrays are not shaped like the instructed model; nothing was sent")
    with PrivacyLedger.open(home.ledger_path) as ledger:
        ledger.commit(reservation)  # charged as the reply is built: from here on it counts
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
    home.audit_log().append("release", _release_record(run_id, server_round, instruction, arrays, metrics))
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(metrics)})


def _reply_record(kind: str, msg: Message, instruction: TrainInstruction, content: RecordDict) -> dict[str, object]:
    """What leaves with a query or evaluate reply: its metric names, size and digest."""
    metrics = content[METRICS_KEY]
    values = json.dumps({k: metrics[k] for k in sorted(metrics)}, sort_keys=True, separators=(",", ":"))
    return {
        "run": str(msg.metadata.run_id),
        "round": int(msg.content[CONFIG_KEY].get("server-round", 0)),
        "message": kind,
        "experiment": instruction.experiment,
        "spec_digest": instruction.spec_digest,
        "dataset": instruction.dataset,
        "arrays": {},
        "metrics": sorted(metrics),
        "bytes": metrics.count_bytes(),
        "sha256": hashlib.sha256(values.encode()).hexdigest(),
    }


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


def _evaluate(home: NodeHome, instruction: TrainInstruction, msg: Message, admission: Admission) -> RecordDict:
    from models.training import evaluate

    data = _load(home, instruction)
    model = _model(instruction, msg.content.array_records.get(ARRAYS_KEY))
    _, _, x_val, y_val = _tensors(data)
    metrics = evaluate(model, x_val, y_val).as_dict()
    return RecordDict({METRICS_KEY: MetricRecord(metrics)})


_HANDLERS = {"query": _query, "train": _train, "evaluate": _evaluate}
