"""Node sampling and round deadlines in the coordinator's loop, against real node logic in one process.

Three sites, three rounds, ``fraction_per_round = 0.5``: every site trains exactly two
rounds, two sites a round. One site is held back in its first round (the in-process
grid's straggler) until the round's deadline has passed and the round was aggregated
without it; it then answers, and the coordinator pulls its late reply before the next
round. tests/integration/test_sampling.py does the same over real processes.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from flwr.app import MessageType

from clients.hospital_node.governance import budget_status, set_budget
from clients.hospital_node.home import NodeHome
from experiments.spec import ExperimentSpec
from experiments.tracking import InMemoryTracker
from federation.errors import NotEnoughNodesError
from federation.experiment import NO_REPLY, SUMMARY_FILE, run_experiment
from federation.inprocess_grid import InProcessGrid
from federation.schedule import draw_schedule, schedule_seed
from medfed.demo import DATASET, EXAMPLE_SPEC, approve_everywhere, prepare_alliance, signed_spec
from privacy.ledger import USED_UP, PrivacyLedger

from .test_experiment import _handler


def _spec(**federation: object) -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["federation"].update({
        "rounds": 3, "min_nodes": 1, "fraction_per_round": 0.5, "round_deadline_seconds": 0.5,
        "node_wait_seconds": 0.1, "approval_wait_seconds": 0.1, **federation,
    })
    return ExperimentSpec.from_mapping(mapping, source="test")


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("sampling")
    sites = prepare_alliance(workdir, n_hospitals=3, seed=6)
    for site in sites:
        set_budget(NodeHome.open(site.home), DATASET, epsilon_=40.0, delta=1e-5, by="test-officer")
    return sites, workdir


def _charged(home: Path, run_id: str) -> set[int]:
    with PrivacyLedger.open(NodeHome.open(home).ledger_path) as ledger:
        return {c.round for c in ledger.charges(DATASET) if c.run_id == run_id and c.round > 0}


def _trained(home: Path, run_id: str) -> set[int]:
    entries = NodeHome.open(home).audit_log().entries()
    return {e.payload["round"] for e in entries if e.kind == "release" and e.payload["message"] == "train" and e.payload["run"] == run_id}


def test_charged_nodes_are_exactly_the_scheduled_ones_and_a_late_reply_is_charged_not_aggregated(alliance, tmp_path: Path) -> None:
    sites, workdir = alliance
    spec = _spec()
    approve_everywhere(sites, spec)
    signed = signed_spec(spec, workdir)
    nodes = {i + 10: site for i, site in enumerate(sites)}
    grid = InProcessGrid({node: _handler(site.home) for node, site in nodes.items()}, run_id=201)
    # The coordinator's own draw, from the spec and the submission: known before the run.
    schedule = draw_schedule(nodes, rounds=3, fraction=0.5, seed=schedule_seed(spec.digest(), signed.submission_id))
    assert all(len(schedule.of(n)) == 2 for n in nodes) and [len(schedule.participants(r)) for r in (1, 2, 3)] == [2, 2, 2]
    straggler = schedule.participants(1)[0]
    grid.hold(straggler, MessageType.TRAIN)  # it answers round 1 only once that round has gone on without it

    def on_round(server_round: int, _metrics: object) -> None:
        if server_round == 1:
            assert grid.release(straggler) == 1  # it trains (and is charged) now, after the deadline

    tracker = InMemoryTracker()
    result = run_experiment(grid, spec, signed=signed, tracker=tracker, output_dir=tmp_path, on_round=on_round)

    assert tracker.status == "FINISHED"
    for node, site in nodes.items():
        report = result.sites[node].round_report()
        scheduled = set(schedule.of(node))
        assert set(report["rounds_scheduled"]) == scheduled
        # The node's ledger, its audit log and the coordinator's report agree, round by round.
        assert _charged(site.home, "201") == _trained(site.home, "201") == scheduled
        assert set(report["rounds_aggregated"]) | set(report["rounds_late"]) == scheduled
        assert report["rounds_no_reply"] == [] and report["rounds_refused"] == {} and set(report["rounds_sent"]) == scheduled
        [row] = [r for r in budget_status(NodeHome.open(site.home)) if r.dataset == DATASET]
        assert row.open_reservations == 0 and [r.state for r in row.reservations if r.reservation.submission == signed.submission_id] == [USED_UP]
    late = result.sites[straggler].round_report()
    assert late["rounds_late"] == [1] and 1 not in late["rounds_aggregated"]
    # Round 1 was aggregated from the other scheduled site alone; the others from both.
    aggregated = {r: sorted(n for n in nodes if r in result.sites[n].rounds) for r in (1, 2, 3)}
    assert aggregated[1] == [n for n in schedule.participants(1) if n != straggler]
    assert aggregated[2] == schedule.participants(2) and aggregated[3] == schedule.participants(3)

    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert (summary["fraction_per_round"], summary["rounds_per_node"], summary["round_deadline_seconds"]) == (0.5, 2, 0.5)
    assert summary["no_reply_means"] == NO_REPLY
    assert summary["sites"][nodes[straggler].name]["rounds_late"] == [1]
    assert tracker.metrics[f"{nodes[straggler].name}.rounds_late"][0] == 1.0
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert checkpoint["schedule"] == schedule.to_mapping()  # a continuation keeps the schedule the nodes recorded


def test_a_round_the_accepting_nodes_cannot_fill_stops_before_anything_trains(alliance, tmp_path: Path) -> None:
    sites, workdir = alliance
    spec = _spec(min_nodes=3, round_deadline_seconds=None)  # 2 nodes a round can never be 3
    approve_everywhere(sites, spec)
    grid = InProcessGrid({i + 20: _handler(site.home) for i, site in enumerate(sites)}, run_id=202)
    tracker = InMemoryTracker()
    with pytest.raises(NotEnoughNodesError, match=r"fraction_per_round 0.5 schedules 2 of 3 round\(s\) each, fewer than federation.min_nodes = 3"):
        run_experiment(grid, spec, signed=signed_spec(spec, workdir), tracker=tracker, output_dir=tmp_path)
    assert tracker.status == "NONE"
    for site in sites:
        assert _charged(site.home, "202") == set()
        [row] = [r for r in budget_status(NodeHome.open(site.home)) if r.dataset == DATASET]
        assert row.open_reservations == 0  # the run's end gave back what the query reserved


class _CoordinatorDied(BaseException):
    """The ServerApp process dying (a signal, not a failure of the run)."""


@pytest.mark.slow  # two runs of four rounds
def test_a_continuation_keeps_the_schedule_the_nodes_recorded(alliance, tmp_path: Path) -> None:
    sites, workdir = alliance
    spec = _spec(rounds=4, round_deadline_seconds=None)  # 2 of 4 rounds a node
    approve_everywhere(sites, spec)
    signed = signed_spec(spec, workdir)
    handlers = {i + 40: _handler(site.home) for i, site in enumerate(sites)}
    schedule = draw_schedule(handlers, rounds=4, fraction=0.5, seed=schedule_seed(spec.digest(), signed.submission_id))

    def die_after_round_2(server_round: int, _metrics: object) -> None:
        if server_round == 2:
            raise _CoordinatorDied

    tracker = InMemoryTracker()
    with pytest.raises(_CoordinatorDied):
        run_experiment(InProcessGrid(handlers, run_id=204), spec, signed=signed, tracker=tracker, output_dir=tmp_path, on_round=die_after_round_2)
    result = run_experiment(InProcessGrid(handlers, run_id=205), spec, signed=signed, tracker=tracker, output_dir=tmp_path)
    assert tracker.status == "FINISHED"
    for node, site in zip(handlers, sites, strict=True):
        # Each node accepted the continuation's query (the same schedule it recorded) and trained its rounds once.
        assert _charged(site.home, "204") | _charged(site.home, "205") == set(schedule.of(node))
        assert set(result.sites[node].round_report()["rounds_aggregated"]) == set(schedule.of(node))
        assert not [e for e in NodeHome.open(site.home).audit_log().entries() if e.kind == "refusal" and e.payload.get("run") in ("204", "205")]


@pytest.mark.slow  # a third alliance and three SecAgg+ rounds: ~35 s
def test_a_sampled_secure_round_runs_secagg_over_the_rounds_scheduled_nodes_only(tmp_path: Path) -> None:
    from .test_secure_aggregation import _node
    from .test_secure_aggregation import _spec as _secure_spec

    sites = prepare_alliance(tmp_path / "alliance", n_hospitals=3, seed=12)
    spec = _secure_spec(rounds=3, fraction_per_round=0.6)  # ceil(1.8) = 2 rounds a node, 2 nodes a round
    approve_everywhere(sites, spec)
    signed = signed_spec(spec, tmp_path / "alliance")
    nodes = {30 + i: site for i, site in enumerate(sites)}
    grid = InProcessGrid({n: _node(site.home, n, 203) for n, site in nodes.items()}, run_id=203)
    schedule = draw_schedule(nodes, rounds=3, fraction=0.6, seed=schedule_seed(spec.digest(), signed.submission_id))
    result = run_experiment(grid, spec, signed=signed, tracker=InMemoryTracker(), output_dir=tmp_path / "out")
    for node, site in nodes.items():
        assert _charged(site.home, "203") == _trained(site.home, "203") == set(schedule.of(node))
        assert sorted(result.sites[node].rounds) == list(schedule.of(node))  # every scheduled round in a SecAgg+ sum
    masked = [e.payload for e in NodeHome.open(sites[0].home).audit_log().entries() if e.kind == "release" and e.payload["message"] == "train"]
    assert masked and all(p["secure_aggregation"]["masked"] for p in masked)


@pytest.mark.slow  # SecAgg+ rounds with a deadline: ~30 s
def test_a_secure_rounds_straggler_is_left_out_of_the_sum_and_its_late_masked_reply_reported(tmp_path: Path) -> None:
    from .test_secure_aggregation import _node
    from .test_secure_aggregation import _spec as _secure_spec

    sites = prepare_alliance(tmp_path / "alliance", n_hospitals=3, seed=14)
    spec = _secure_spec(rounds=2, round_deadline_seconds=0.5)  # every node every round; SecAgg+'s default threshold 2 of 3
    approve_everywhere(sites, spec)
    nodes = {50 + i: site for i, site in enumerate(sites)}
    grid = InProcessGrid({n: _node(site.home, n, 206) for n, site in nodes.items()}, run_id=206)
    straggler = 52
    grid.hold(straggler, MessageType.TRAIN, after=2)  # answers setup and key sharing, then misses the collect deadline

    def on_round(server_round: int, _metrics: object) -> None:
        if server_round == 1:
            assert grid.release(straggler) == 1  # its masked vector leaves now: charged, too late for the sum

    result = run_experiment(
        grid, spec, signed=signed_spec(spec, tmp_path / "alliance"), tracker=InMemoryTracker(), output_dir=tmp_path / "out",
        on_round=on_round,
    )
    report = result.sites[straggler].round_report()
    assert (report["rounds_aggregated"], report["rounds_late"]) == ([2], [1])
    assert _charged(nodes[straggler].home, "206") == _trained(nodes[straggler].home, "206") == {1, 2}
    for node in nodes:
        if node != straggler:
            assert result.sites[node].round_report()["rounds_aggregated"] == [1, 2]
