"""Secure aggregation on the node: Flower's ``secaggplus_mod`` around the train handler.

A train message that carries a SecAgg+ stage (Flower's ``secaggplus_configs`` record)
goes through ``secaggplus_mod``; any other train message goes straight to the handler,
so one ``@app.train()`` serves both plain and secure runs. Flower's SecAgg+ workflow
sends its four stages as plain ``train`` messages, so a named action cannot tell them
apart; the record can. Only the third stage (collect masked vectors) reaches the
handler (:func:`clients.hospital_node.rounds.answer`), with the signed spec and the
instruction in its legacy fit config; the other stages exchange keys and key shares.

Two guards wrap the mod:

- a refusal by the handler (signature, approval, policy, budget, ...) goes back to the
  coordinator as that refusal, with its code and reason, instead of failing inside the
  mod, which expects a fit result;
- the egress guard on what actually leaves: only SecAgg+'s own record, the legacy fit
  result's bookkeeping and our declared per-site metrics and site name; every array
  record must be empty (the update leaves only as the masked vector).

The collect stage serves a securely aggregated statistics study the same way (its signed
spec rides in the legacy fit config; :mod:`clients.hospital_node.study_round`). A study's
handler checks the settings the mod will actually mask with, which the mod keeps in the
run's context (:func:`secagg_settings`), rather than anything the coordinator restates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SECAGG_RECORD", "SecAggSettings", "legacy_fit_result", "secagg_settings", "secure_aggregation_mod"]

#: flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS (not imported: the
#: ClientApp module must stay light).
SECAGG_RECORD = "secaggplus_configs"
#: ... and RECORD_KEY_STATE: where ``secaggplus_mod`` keeps its state in the run's context.
SECAGG_STATE = "secaggplus_state"


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ settings this node's ``secaggplus_mod`` took from the setup stage and masks with."""

    sample_num: int
    share_num: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    def to_mapping(self) -> dict[str, float | int]:
        return {
            "sample_num": self.sample_num,
            "share_num": self.share_num,
            "threshold": self.threshold,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "modulus_range": self.modulus_range,
            "max_weight": self.max_weight,
        }


def secagg_settings(context: Context) -> SecAggSettings | None:
    """The settings of the run's SecAgg+ setup stage as ``secaggplus_mod`` stored them; None before any."""
    state: Mapping[str, object] | None = context.state.config_records.get(SECAGG_STATE)
    keys = ("sample_num", "share_num", "threshold", "clipping_range", "target_range", "mod_range", "max_weight")
    if state is None or any(key not in state for key in keys):
        return None
    number = (int, float)
    if not all(isinstance(state[key], number) and not isinstance(state[key], bool) for key in keys):
        return None
    return SecAggSettings(
        sample_num=int(state["sample_num"]),  # type: ignore[call-overload]
        share_num=int(state["share_num"]),  # type: ignore[call-overload]
        threshold=int(state["threshold"]),  # type: ignore[call-overload]
        clipping_range=float(state["clipping_range"]),  # type: ignore[arg-type]
        quantization_range=int(state["target_range"]),  # type: ignore[call-overload]
        modulus_range=int(state["mod_range"]),  # type: ignore[call-overload]
        max_weight=float(state["max_weight"]),  # type: ignore[arg-type]
    )


def legacy_fit_result(values: Sequence[np.ndarray], num_examples: int, metrics: Mapping[str, float]) -> RecordDict:
    """Flower's legacy fit result of `values` (the vector ``secaggplus_mod`` masks) and `num_examples`, plus our metrics.

    The legacy result's own metrics stay empty: ours travel in ``METRICS_KEY``, where the
    egress guard and the coordinator check them.
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    from federation.protocol import METRICS_KEY

    parameters = ndarrays_to_parameters(list(values))
    content = fitres_to_recorddict(FitRes(Status(Code.OK, "ok"), parameters, num_examples, {}), keep_input=False)
    content[METRICS_KEY] = MetricRecord(dict(metrics))
    return content

_MAY_LEAVE = {SECAGG_RECORD, "fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status", "metrics", "node"}


class _Refused(Exception):
    """Carries the handler's refusal through secaggplus_mod unchanged."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ train messages through ``secaggplus_mod``; pass every other message on."""
    if not msg.has_content() or SECAGG_RECORD not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    def handler(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error():
            raise _Refused(reply)
        return reply

    try:
        reply = secaggplus_mod(msg, context, handler)
    except _Refused as refused:
        return refused.reply
    _guard(reply)
    return reply


def _guard(reply: Message) -> None:
    from federation.protocol import METRICS_KEY, NODE_KEY, ProtocolError

    assert {METRICS_KEY, NODE_KEY} <= _MAY_LEAVE  # the names above are the protocol's
    content = reply.content
    unexpected = sorted(set(content) - _MAY_LEAVE)
    if unexpected:
        raise ProtocolError(f"egress guard: a secure-aggregation reply may not carry {', '.join(unexpected)}; nothing was sent")
    if any(len(record) for record in content.array_records.values()):
        raise ProtocolError("egress guard: a secure-aggregation reply carried unmasked arrays; nothing was sent")
