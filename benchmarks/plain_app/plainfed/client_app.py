"""The plain app's ClientApp: train and evaluate as medfed's node computes them, or reply empty.

Flower starts a fresh process for every message, so this module imports only Flower;
the work (torch, Opacus, pandas through medfed's connector) is imported inside the
handlers, as medfed's ClientApp does. The empty-wave handler imports nothing more.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

__all__ = ["app"]

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Evaluate the incoming model, then train it with DP-SGD (no ledger, no checks)."""
    from plainfed.task import train_reply

    return train_reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the final model on the local validation split."""
    from plainfed.task import evaluate_reply

    return evaluate_reply(msg, context)


@app.query()
def empty(msg: Message, context: Context) -> Message:
    """Reply at once with empty content: one wave's floor."""
    return Message(RecordDict(), reply_to=msg)
