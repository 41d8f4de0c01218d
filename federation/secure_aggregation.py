"""Flower's legacy ``SecAggPlusWorkflow`` over the participants: a training round, or a study's answers.

Flower 1.39 offers SecAgg+ only on its legacy path, so a secure round builds what that
path expects and runs its fit workflow once: a ``LegacyContext`` whose client manager
lists the experiment's participants, the legacy ``flwr.server.strategy.FedAvg`` sending
our instruction and signed spec as the fit config, and the global model as the numbered
legacy parameters. The workflow adds three waves to the round (setup, share keys, then
the train wave that collects masked vectors, then unmask) and hands the strategy only
the unmasked *sum*.

Weighting: each node multiplies its update by ``num_examples / max_weight`` (quantised
to ``2**-22``) and also sends that weight, both masked; the workflow divides the sum of
the weighted updates by the sum of the weights, which is FedAvg's average by
``num_examples``. Every node's result then carries that same average, so the legacy
FedAvg's own weighting returns it unchanged. ``max_weight`` is the largest training
size the nodes reported in the query wave, so no weight exceeds 1; each node refuses an
update that SecAgg+'s clipping (``CLIPPING_RANGE`` after weighting) would change.
Quantisation leaves the average within about ``1e-5`` of plain FedAvg's.

The per-site metrics ride in plain beside the masked vector of the collect wave (see
``federation.protocol``); this module returns those replies, and each node's refusal or
failure from any stage, for the experiment loop to collect as in a plain round.

A securely aggregated statistics study (:class:`SecureSum`) runs the same workflow once,
with settings that make the result the exact element-wise sum of the sites' integer
vectors (``federation.protocol``: weight 1 everywhere, clipping range ``C`` and
quantisation range ``2C`` chosen for the number of nodes, Flower's modulus 2**32); it
returns those sums and the nodes they hold. Drop-outs: a node that fails before its
masked vector arrives is left out of the sum (its pairwise masks are recovered from the
others' shares); one that fails after is still in it. Fewer surviving share holders
than the threshold stop the protocol: then nothing is unmasked and there is no sum.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp import Grid

from federation.participants import DelegatingGrid
from federation.protocol import (
    METRICS_KEY,
    SECAGG_MODULUS,
    SECURE_SUM_WEIGHT,
    ProtocolError,
    secure_clipping_range,
)

__all__ = ["CLIPPING_RANGE", "SecureRound", "SecureRoundResult", "SecureSum", "SecureSumResult", "node_of", "senders_of"]

logger = logging.getLogger(__name__)

#: SecAgg+'s clipping range for weighted parameters (Flower's default).
CLIPPING_RANGE = 8.0
#: SecAgg+'s quantisation range for training (Flower's default, 2**22 levels over the clipping range).
QUANTIZATION_RANGE = 1 << 22
# The order of the workflow's waves (SecAggPlusWorkflow's stages).
_STAGES = ("setup", "share keys", "collect masked vectors", "unmask")
_COLLECT = 2


class _RecordingGrid(DelegatingGrid):
    """Delegates to `grid`, keeping the replies of each wave (one wave per SecAgg+ stage)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.waves: list[list[Message]] = []
        self.sent: list[dict[str, int]] = []  # per wave: message id -> the node it was sent to
        self.senders: dict[str, int] = {}  # message id -> the node it was sent to, every wave

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.sent.append(senders_of(messages))
        self.senders |= self.sent[-1]
        self.waves.append(replies)
        logger.debug("SecAgg+ %s: %d repl(ies)", _STAGES[min(len(self.waves) - 1, 3)], len(replies))
        return replies


@dataclass
class SecureRoundResult:
    """What a secure round produced: the aggregate (None if the protocol stopped) and the replies to collect."""

    arrays: ArrayRecord | None
    replies: list[Message]
    sampled: list[int]
    threshold: int
    waves: int
    senders: dict[str, int] = field(default_factory=dict)
    # The collect wave (the charged train messages): whom it went to, and the replies that came in time.
    collect_sent: dict[str, int] = field(default_factory=dict)
    collect_replies: list[Message] = field(default_factory=list)


@dataclass
class _Outcome:
    """One run of the SecAgg+ fit workflow.

    ``averaged`` is the legacy strategy's result (FedAvg of the results, every one holding
    the workflow's weighted mean); ``mean`` the workflow's weighted mean itself;
    ``contributors`` the nodes whose masked vectors the sum holds, with the weights
    (legacy ``num_examples``) their replies reported in plain. None and empty when the
    protocol stopped before unmasking.
    """

    averaged: list[np.ndarray] | None
    mean: list[np.ndarray] | None
    contributors: list[int]
    weights: list[int]
    replies: list[Message]
    sampled: list[int]
    threshold: int
    waves: int
    senders: dict[str, int]
    collect_sent: dict[str, int] = field(default_factory=dict)
    collect_replies: list[Message] = field(default_factory=list)


def _threshold(num_shares: int | None, reconstruction_threshold: int | None, nodes: int) -> int:
    if reconstruction_threshold is not None:
        return reconstruction_threshold
    return max(2, (num_shares or nodes) // 2 + 1)


def _run_workflow(  # noqa: PLR0913
    grid: Grid,
    *,
    server_round: int,
    fit_config: dict[str, Any],
    parameters: list[np.ndarray],
    num_shares: int | None,
    reconstruction_threshold: int | None,
    max_weight: float,
    clipping_range: float,
    quantization_range: int,
    modulus_range: int,
    timeout: float,
) -> _Outcome:
    """Run Flower's SecAgg+ fit workflow once over every node of `grid`, sending `fit_config` and `parameters`."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.server_config import ServerConfig
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    nodes = sorted(grid.get_node_ids())
    recording = _RecordingGrid(grid)
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node, recording, grid.run.run_id))
    strategy = _AggregateOnce(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=max(len(nodes), 1),
        min_evaluate_clients=0,
        min_available_clients=max(len(nodes), 1),
        on_fit_config_fn=lambda _round: fit_config,
        accept_failures=True,
    )
    empty = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(empty, config=ServerConfig(num_rounds=server_round), strategy=strategy, client_manager=manager)
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(parameters), keep_input=True
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    threshold = _threshold(num_shares, reconstruction_threshold, len(nodes))
    workflow = SecAggPlusWorkflow(
        # A float is Flower's "this share of the round's nodes": 1.0 is every node.
        num_shares=num_shares if num_shares is not None else 1.0,
        reconstruction_threshold=threshold,
        max_weight=float(max_weight),
        clipping_range=float(clipping_range),
        quantization_range=int(quantization_range),
        modulus_range=int(modulus_range),
        timeout=timeout,
    )
    if len(nodes) >= 2:
        workflow(recording, context)
    averaged = None
    if strategy.aggregated:
        legacy = context.state.array_records[MAIN_PARAMS_RECORD]
        averaged = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy, keep_input=True))
    return _Outcome(
        averaged=averaged,
        mean=strategy.mean if strategy.aggregated else None,
        contributors=strategy.contributors if strategy.aggregated else [],
        weights=strategy.weights if strategy.aggregated else [],
        replies=_decisive(recording.waves, recording.senders),
        sampled=nodes,
        threshold=threshold,
        waves=len(recording.waves),
        senders=recording.senders,
        collect_sent=recording.sent[_COLLECT] if len(recording.sent) > _COLLECT else {},
        collect_replies=recording.waves[_COLLECT] if len(recording.waves) > _COLLECT else [],
    )


@dataclass(frozen=True)
class SecureRound:
    """SecAgg+ settings of an experiment: shares and threshold (None: defaults), weights' bound.

    Parameters
    ----------
    num_shares
        Nodes each private key is shared with; None: every node of the round.
    reconstruction_threshold
        Shares that recover a dropped node's masks; None: a majority of the shares (>= 2).
    max_weight
        The largest training size among the participants (from the query wave).
    timeout
        Seconds each of the protocol's waves may take.
    """

    num_shares: int | None
    reconstruction_threshold: int | None
    max_weight: float
    timeout: float

    def threshold_for(self, nodes: int) -> int:
        """The reconstruction threshold of a round over `nodes` nodes."""
        return _threshold(self.num_shares, self.reconstruction_threshold, nodes)

    def run(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> SecureRoundResult:
        """Run round `server_round` from the global model `arrays` over the nodes of `grid`."""
        names = list(arrays)
        dtypes = [arrays[name].numpy().dtype for name in names]
        outcome = _run_workflow(
            grid,
            server_round=server_round,
            fit_config=dict(config),
            parameters=[arrays[name].numpy() for name in names],
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=SECAGG_MODULUS,
            timeout=self.timeout,
        )
        aggregate = None
        if outcome.averaged is not None:
            aggregate = ArrayRecord(
                {name: Array(value.astype(dtype)) for name, value, dtype in zip(names, outcome.averaged, dtypes, strict=True)}
            )
        return SecureRoundResult(
            arrays=aggregate,
            replies=outcome.replies,
            sampled=outcome.sampled,
            threshold=outcome.threshold,
            waves=outcome.waves,
            senders=outcome.senders,
            collect_sent=outcome.collect_sent,
            collect_replies=outcome.collect_replies,
        )


@dataclass
class SecureSumResult:
    """What a study's secure wave produced: the sums (None if the protocol stopped) and the replies to collect.

    ``sums`` are the element-wise sums of the contributors' vectors (the workflow's mean
    times their number; each contributor reported the weight 1, which is checked), in
    :func:`federation.protocol.secure_encoding`'s layout; ``contributors`` the nodes whose
    vectors they hold.
    """

    sums: list[np.ndarray] | None
    contributors: list[int]
    replies: list[Message]
    sampled: list[int]
    threshold: int
    waves: int
    clipping_range: int
    senders: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureSum:
    """A study's answers summed by SecAgg+ (see :mod:`federation.protocol`): the coordinator sees only the sum.

    Every node of the grid is sent the SecAgg+ stages, the collect stage carrying
    `config` (the signed spec) as its legacy fit config. The settings make the sum exact:
    weight 1 for every node and as ``max_weight`` (the workflow's weighted mean is then the
    plain sum over the contributors, divided by their number), clipping range ``C`` of
    :func:`~federation.protocol.secure_clipping_range` for the round's nodes and
    quantisation range ``2C``, Flower's modulus; the shares go to every node and a
    majority of them recovers a node that drops out.
    """

    timeout: float

    def run(self, grid: Grid, config: ConfigRecord) -> SecureSumResult:
        """Run the secure wave over the nodes of `grid` (at least two)."""
        nodes = len(list(grid.get_node_ids()))
        clipping = secure_clipping_range(max(nodes, 1))
        outcome = _run_workflow(
            grid,
            server_round=1,
            fit_config=dict(config),
            parameters=[],
            num_shares=None,
            reconstruction_threshold=None,
            max_weight=float(SECURE_SUM_WEIGHT),
            clipping_range=float(clipping),
            quantization_range=2 * clipping,
            modulus_range=SECAGG_MODULUS,
            timeout=self.timeout,
        )
        sums = None
        if outcome.mean is not None:
            if any(weight != SECURE_SUM_WEIGHT for weight in outcome.weights):
                raise ProtocolError(
                    f"a site reported a SecAgg+ weight other than {SECURE_SUM_WEIGHT}: the sum would be distorted; nothing is reported"
                )
            sums = [vector * len(outcome.contributors) for vector in outcome.mean]
        return SecureSumResult(
            sums=sums,
            contributors=outcome.contributors,
            replies=outcome.replies,
            sampled=outcome.sampled,
            threshold=outcome.threshold,
            waves=outcome.waves,
            clipping_range=clipping,
            senders=outcome.senders,
        )


def senders_of(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of sent messages: whom a reply is about.

    The SuperLink answers for an unreachable node itself (its own id as the sender), so
    a reply's node is the destination of the message it replies to.
    """
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def node_of(reply: Message, senders: dict[str, int]) -> int:
    """The node a reply is about."""
    return senders.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def _decisive(waves: list[list[Message]], senders: dict[str, int]) -> list[Message]:
    """Per node: its collect-wave reply with metrics, else its first error reply of any wave."""
    chosen: dict[int, Message] = {}
    if len(waves) > _COLLECT:
        for reply in waves[_COLLECT]:
            if not reply.has_error() and METRICS_KEY in reply.content:
                chosen[node_of(reply, senders)] = reply
    for wave in waves:
        for reply in wave:
            if reply.has_error():
                chosen.setdefault(node_of(reply, senders), reply)
    return list(chosen.values())


class _AggregateOnce(LegacyFedAvg):
    """Flower's legacy FedAvg, noting whether the workflow reached aggregation, what it summed and whose."""

    aggregated = False
    mean: list[np.ndarray] | None = None
    contributors: list[int] = []  # noqa: RUF012 - replaced, never mutated
    weights: list[int] = []  # noqa: RUF012 - replaced, never mutated

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        from flwr.common import parameters_to_ndarrays

        self.aggregated = bool(results)
        if results:
            # The workflow gives every result the same parameters: its weighted mean of the masked vectors.
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.contributors = [int(proxy.node_id) for proxy, _ in results]
            self.weights = [int(result.num_examples) for _, result in results]
        return super().aggregate_fit(server_round, results, failures)
