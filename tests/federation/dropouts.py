"""A node that drops out at a given SecAgg+ stage, for in-process runs (training rounds and secure studies)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from federation.inprocess_grid import InProcessGrid

__all__ = ["COLLECT_STAGE", "UNMASK_STAGE", "drops_out_at"]

#: SecAgg+'s stages are train messages: setup, share keys, collect masked vectors, unmask.
COLLECT_STAGE = 3  # gone before its masked vector leaves
UNMASK_STAGE = 4  # gone after it: its vector is in the sum already

Handler = Callable[[Message], Message]


def drops_out_at(handlers: dict[int, Handler], node: int, stage: int) -> dict[str, InProcessGrid]:
    """Make `node` disconnect when its `stage`-th train message reaches it; set the returned ``["grid"]`` to the grid."""
    holder: dict[str, InProcessGrid] = {}
    alive, seen = handlers[node], [0]

    def dies(message: Message) -> Message:
        if message.metadata.message_type == "train":
            seen[0] += 1
            if seen[0] == stage:
                holder["grid"].disconnect(node)
                return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=message)
        return alive(message)

    handlers[node] = dies
    return holder
