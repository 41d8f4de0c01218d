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
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

__all__ = ["SECAGG_RECORD", "secure_aggregation_mod"]

#: flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS (not imported: the
#: ClientApp module must stay light).
SECAGG_RECORD = "secaggplus_configs"

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
