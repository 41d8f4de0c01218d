"""ParticipantGrid: only the accepted nodes, brisk pulls, and work done while a wave is out."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict

from federation.inprocess_grid import InProcessGrid
from federation.participants import ParticipantGrid


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
