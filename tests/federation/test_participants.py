"""ParticipantGrid: only the accepted nodes, brisk pulls, and work done while a wave is out."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest

from flwr.app import ConfigRecord, Message, RecordDict

from federation.inprocess_grid import InProcessGrid
from federation.participants import ParticipantGrid, poll_wait


class _LoggingGrid(InProcessGrid):
    def __init__(self, log: list[str]) -> None:
        super().__init__({n: self._echo for n in (10, 11, 12)}, run_id=7)
        self.log = log

    @staticmethod
    def _echo(message: Message) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"seen": 1})}), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.log.append("push")
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.log.append("pull")
        return super().pull_messages(message_ids)


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]


def test_only_participants_are_listed() -> None:
    grid = ParticipantGrid(_LoggingGrid([]), [10, 12, 99])
    assert list(grid.get_node_ids()) == [10, 12]


def test_meanwhile_runs_after_the_push_and_before_the_first_pull() -> None:
    log: list[str] = []
    grid = ParticipantGrid(_LoggingGrid(log), [10, 11, 12], poll_interval=0.01)
    replies = list(grid.send_and_receive(_messages([10, 11, 12]), timeout=5, meanwhile=lambda: log.append("meanwhile")))
    assert log == ["push", "meanwhile", "pull"]
    assert sorted(r.metadata.src_node_id for r in replies) == [10, 11, 12]
    assert all(r.content["config"]["seen"] == 1 for r in replies)


def test_a_missing_reply_is_waited_for_only_until_the_timeout() -> None:
    log: list[str] = []
    inner = _LoggingGrid(log)
    inner.disconnect(12)
    grid = ParticipantGrid(inner, [10, 11, 12], poll_interval=0.01)
    replies = list(grid.send_and_receive(_messages([10, 11, 12]), timeout=0.05))
    assert sorted(r.metadata.src_node_id for r in replies) == [10, 11]
    assert log[0] == "push" and log.count("pull") >= 2


def test_a_fresh_wave_of_few_nodes_is_pulled_at_the_shortest_interval() -> None:
    assert poll_wait(waited=0.0, pending=3, shortest=0.2, longest=1.5) == pytest.approx(0.215)
    assert poll_wait(waited=3.0, pending=3, shortest=0.2, longest=1.5) == pytest.approx(0.365)


def test_the_wait_grows_with_the_pending_replies_and_the_time_waited_up_to_the_cap() -> None:
    start_of_big_wave = poll_wait(waited=0.0, pending=100, shortest=0.2, longest=1.5)
    assert start_of_big_wave == pytest.approx(0.7)
    assert poll_wait(waited=10.0, pending=100, shortest=0.2, longest=1.5) == pytest.approx(1.2)
    assert poll_wait(waited=60.0, pending=500, shortest=0.2, longest=1.5) == 1.5


def test_equal_shortest_and_longest_poll_at_a_fixed_interval() -> None:
    assert {poll_wait(waited=w, pending=p, shortest=0.2, longest=0.2) for w in (0, 5, 50) for p in (1, 100)} == {0.2}


def test_a_long_wait_between_pulls_does_not_overrun_the_timeout() -> None:
    log: list[str] = []
    inner = _LoggingGrid(log)
    inner.disconnect(12)
    grid = ParticipantGrid(inner, [10, 11, 12], poll_interval=5.0, max_poll_interval=5.0)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages([10, 11, 12]), timeout=0.3))
    assert 0.3 <= time.monotonic() - started < 2.0
    assert sorted(r.metadata.src_node_id for r in replies) == [10, 11]
    assert log == ["push", "pull", "pull"]  # one at the push, one at the deadline
