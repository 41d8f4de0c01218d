"""A Grid restricted to the nodes that accepted an experiment, polling replies briskly.

Flower's strategies sample from ``grid.get_node_ids()``; a node that refused the query
(or never answered it) must not receive training messages, so the strategy sees a view
of the grid that lists only the participants still connected.

Flower 1.39's ``send_and_receive`` sleeps 3 s between pulls, so a wave whose replies
are all in after 3.1 s is noticed at 6 s. Replies are pulled here sooner: first every
``poll_interval`` seconds (0.2 s), then less often as the wave ages and the more replies
are pending (:func:`poll_wait`), up to ``max_poll_interval`` (1.5 s). Each pull is one
HTTP request to the SuperLink naming every pending reply, so a fixed 0.2 s pull costs
the coordinator and the SuperLink in proportion to the nodes and the wave's length; a
wave of a few fast nodes is still noticed within a few tenths of a second, and a long
wave of hundreds is noticed at most ``max_poll_interval`` late, against the tens of
seconds it lasts. A wave takes seconds however light the nodes' work (Flower's floor),
so the coordinator can do its own slow work (imports, saving the model) *while* a wave
is out: pass it as ``meanwhile``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["DelegatingGrid", "ParticipantGrid", "poll_wait"]

# How the wait between pulls grows: per second the wave has been out, and per pending reply.
_GROWTH_PER_SECOND = 0.05
_GROWTH_PER_PENDING = 0.005


def poll_wait(*, waited: float, pending: int, shortest: float, longest: float) -> float:
    """Seconds to wait before the next pull, `waited` seconds into a wave with `pending` replies out.

    ``shortest`` at the start of a wave of one, growing by 0.05 s per second waited and
    5 ms per pending reply, never above ``longest`` (nor below ``shortest``): 3 nodes
    3 s in wait 0.37 s; 100 nodes at the start 0.7 s, 20 s in 1.5 s.
    """
    grown = shortest + _GROWTH_PER_SECOND * max(waited, 0.0) + _GROWTH_PER_PENDING * max(pending, 0)
    return max(shortest, min(longest, grown))


class DelegatingGrid(Grid):
    """A Grid that passes every call to `grid`; subclasses change what they need."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:  # pragma: no cover - the real grid is already set
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(  # noqa: PLR0913 - Flower's signature
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class ParticipantGrid(DelegatingGrid):
    """Delegates to `grid`, listing only `participants` among its connected nodes.

    Replies are pulled after `poll_interval` seconds, then less often (:func:`poll_wait`),
    never more than `max_poll_interval` apart; equal values pull at a fixed interval.
    """

    def __init__(
        self, grid: Grid, participants: Iterable[int], *, poll_interval: float = 0.2, max_poll_interval: float = 1.5
    ) -> None:
        super().__init__(grid)
        self.participants = frozenset(participants)
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._grid.get_node_ids() if n in self.participants]

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        meanwhile: Callable[[], object] | None = None,
    ) -> Iterable[Message]:
        """Push `messages`, call `meanwhile`, then pull until every reply is in or `timeout` seconds pass.

        The timeout counts from the push, `meanwhile`'s time included. If `meanwhile`
        raises, its error propagates and the replies are left unread.
        """
        pending = set(self.push_messages(messages))
        pushed = time.monotonic()
        deadline = None if timeout is None else pushed + timeout
        if meanwhile is not None:
            meanwhile()
        replies: list[Message] = []
        while pending:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(m.metadata.reply_to_message_id for m in received)
            now = time.monotonic()
            if not pending or (deadline is not None and now >= deadline):
                break
            wait = poll_wait(waited=now - pushed, pending=len(pending), shortest=self.poll_interval, longest=self.max_poll_interval)
            # The last pull happens at the deadline, not up to a whole wait after it.
            time.sleep(wait if deadline is None else min(wait, deadline - now))
        return replies
