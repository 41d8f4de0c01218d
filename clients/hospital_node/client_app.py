"""The hospital node's Flower ClientApp: the one installed with medfed, never one from a run's bundle.

The node executor (:mod:`clients.hospital_node.runtime.executor`) calls :data:`app` in its
long-lived process for every task of an allowed run; no SuperNode of a medfed node
imports a ClientApp from an app bundle. This module still imports only Flower's record
types, so that the executor starts fast; torch, Opacus and pandas are imported inside the
handlers (see ``clients.hospital_node.rounds``) and stay imported between messages. The
node's durable state (dataset registry, privacy ledger) lives in its home folder, which
the executor passes as the ``home`` node config. On Flower's simulation engine (``medfed
simulate``) the same handlers find their virtual hospital's rehearsal home through
:func:`clients.hospital_node.runtime.rehearsal.node_config`.

The train handler also serves secure aggregation: ``secure_aggregation_mod`` sends
SecAgg+ messages through Flower's ``secaggplus_mod`` and lets plain ones pass. A
securely aggregated statistics study is answered there too (SecAgg+ knows only train
messages), with the settings the mod masks with.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.hospital_node.runtime.rehearsal import node_config
from clients.hospital_node.secure_aggregation import secure_aggregation_mod
from federation.protocol import RELEASE_ACTION, STATISTICS_ACTION

__all__ = ["app"]

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Can this node run the instruction? Answers counts and current spend."""
    from clients.hospital_node.rounds import answer

    return answer("query", msg, node_config(context.node_config))


@app.query(RELEASE_ACTION)
def release(msg: Message, context: Context) -> Message:
    """The run ended early: give back the budget reserved for its rounds that will not come."""
    from clients.hospital_node.rounds import answer

    return answer("release", msg, node_config(context.node_config))


@app.query(STATISTICS_ACTION)
def statistics(msg: Message, context: Context) -> Message:
    """Answer a statistics study: exact vectors, DP noise, suppression on the noisy counts, the ledger charged."""
    from clients.hospital_node.rounds import answer

    return answer(STATISTICS_ACTION, msg, node_config(context.node_config))


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Evaluate the incoming global model, then train it with DP-SGD and charge the ledger (or, under SecAgg+, a study's answer)."""
    from clients.hospital_node.rounds import answer
    from clients.hospital_node.secure_aggregation import secagg_settings

    return answer("train", msg, node_config(context.node_config), secagg=secagg_settings(context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the final global model on the local validation split."""
    from clients.hospital_node.rounds import answer

    return answer("evaluate", msg, node_config(context.node_config))
