"""A Grid that delivers messages to handlers in this process (tests, dry runs).

Flower's ``GrpcGrid`` sends messages to SuperNodes over the SuperLink; this grid hands
each message to a callable registered for its destination node and returns the reply,
so the coordinator's logic can be exercised against real node logic without processes.
A node can be *held* (a straggler): the messages of a kind sent to it wait, unanswered,
until it is released, and are then answered as if the node had just caught up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid"]

Handler = Callable[[Message], Message]


class InProcessGrid(Grid):
    """Delivers each message to ``handlers[dst_node_id]``; a node can be disconnected."""

    def __init__(self, handlers: Mapping[int, Handler], *, run_id: int = 1) -> None:
        self._handlers = dict(handlers)
        self._connected = set(self._handlers)
        self._replies: dict[str, Message] = {}
        self._held: dict[int, list[object]] = {}  # node -> [the message type it holds back, how many still pass]
        self._waiting: list[tuple[str, Message]] = []  # (message id, message) held back, in order
        self._run = Run.create_empty(run_id)
        # Flower stamps every new Message with the run and node of the current process;
        # the coordinator is node 1 (SUPERLINK_NODE_ID) in Flower's numbering.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1

    def disconnect(self, node_id: int) -> None:
        """Make `node_id` vanish, as a SuperNode that lost its connection."""
        self._connected.discard(node_id)

    def hold(self, node_id: int, message_type: str, *, after: int = 0) -> None:
        """Make `node_id` a straggler: messages of `message_type` to it wait unanswered until :meth:`release`.

        The first `after` such messages are still answered (SecAgg+'s stages are all train
        messages: ``after=2`` holds back the collect stage, the one that trains).
        """
        self._held[node_id] = [message_type, after]

    def release(self, node_id: int) -> int:
        """Let `node_id` answer what it held back (its replies can be pulled now); returns how many."""
        self._held.pop(node_id, None)
        mine = [(i, m) for i, m in self._waiting if m.metadata.dst_node_id == node_id]
        self._waiting = [(i, m) for i, m in self._waiting if m.metadata.dst_node_id != node_id]
        for message_id, message in mine:
            self._replies[message_id] = self._handlers[node_id](message)
        return len(mine)

    def set_run(self, run: Run) -> None:
        self._run = run
        TaskIdentity.run_id = run.run_id

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self._connected)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            # As Flower's grids do: a message's id is its content-addressed object id.
            message_id = message.object_id
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node = message.metadata.dst_node_id
            if node in self._connected:
                # A node receives its own copy, as over the wire: Flower's workflows send
                # one content object to many nodes, and mods change what they receive.
                copy = message_from_proto(message_to_proto(message))
                held = self._held.get(node)
                if held is not None and held[0] == message.metadata.message_type:
                    if held[1] == 0:
                        self._waiting.append((message_id, copy))
                        continue
                    held[1] -= 1  # type: ignore[operator]
                self._replies[message_id] = self._handlers[node](copy)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))
