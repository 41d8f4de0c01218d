"""Sampling and deadlines over real processes: the charged nodes are exactly the ones that trained.

A SuperLink and three node services on loopback run a spec with ``fraction_per_round =
0.5`` over three rounds (every node trains two rounds, two nodes a round) and a round
deadline. One node is made a real straggler in round 1, deterministically and without
sleeps:

1. the operator's ``HOLD`` file (``federation.experiment``) holds the run after the
   query, before round 1's messages exist; the test waits for the checkpoint to say so;
2. every node has recorded its schedule in its audit log at admission; the test picks a
   node scheduled for round 1 and SIGSTOPs its whole process group (supervisor, Flower
   SuperNode, executor), so it cannot pull or answer anything;
3. the hold is lifted: round 1 goes out, waits its deadline, and is aggregated from the
   other node alone; the test waits for the checkpoint to record round 1 done;
4. SIGCONT: the node pulls round 1's message, trains, is charged, and replies late.

The stop lasts about the round's deadline plus a second, well inside the SuperLink's
heartbeat patience (a node counts as online until 60 s after its last heartbeat, sent
every 25 s), so the SuperLink never answers for it as unavailable: its own reply is the
one that arrives, late.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clients.hospital_node.governance import budget_status
from clients.hospital_node.home import NodeHome
from experiments.spec import ExperimentSpec
from experiments.submit import submit, wait_for_run
from federation.checkpoint import CHECKPOINT_FILE
from federation.experiment import HOLD_FILE, SUMMARY_FILE
from medfed.cluster import flower_env
from medfed.demo import DATASET, EXAMPLE_SPEC, approve_everywhere, partner_key_path, prepare_alliance
from privacy.keys import load_private_key
from privacy.ledger import PrivacyLedger

from .conftest import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEADLINE = 15.0


def _spec() -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["federation"].update({"rounds": 3, "min_nodes": 1, "fraction_per_round": 0.5, "round_deadline_seconds": DEADLINE})
    return ExperimentSpec.from_mapping(mapping, source="test")


def _until(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll `check` until it returns something truthy (a readiness check with a deadline, not a sleep to synchronise)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.2)


def _checkpoint(runs: Path) -> dict[str, Any] | None:
    for path in runs.glob(f"*/{CHECKPOINT_FILE}"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # replaced atomically, but read while it is: try again
            return None
    return None


def _audit(home: Path, kind: str) -> list[dict[str, Any]]:
    return [e.payload for e in NodeHome.open(home).audit_log().entries() if e.kind == kind]


def test_charged_nodes_are_exactly_the_ones_that_trained_and_a_straggler_is_charged_and_late(tmp_path: Path) -> None:
    workdir = tmp_path
    sites = prepare_alliance(workdir, n_hospitals=3, seed=13)
    spec = _spec()
    approve_everywhere(sites, spec)
    runs = workdir / "runs"
    runs.mkdir()
    (runs / HOLD_FILE).write_text("0")  # hold every submission after its query, before round 1
    with running_cluster(workdir, sites) as local:
        env = flower_env(local.flwr_home)
        run_id = submit(
            spec, connection=local.connection, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", output_dir=runs,
            signing_key=load_private_key(partner_key_path(workdir)), env=env,
        )
        held = _until("the run held before round 1", lambda: (c := _checkpoint(runs)) and c["held"] and c["round"] == 0 and c, 300)
        # Each node recorded its own rounds when it admitted the submission.
        schedules = {site.name: [p for p in _audit(site.home, "submission") if "schedule" in p] for site in sites}
        assert all(len(s) == 1 and len(s[0]["schedule"]) == 2 and s[0]["rounds_reserved"] == 2 for s in schedules.values())
        scheduled = {name: set(s[0]["schedule"]) for name, s in schedules.items()}
        assert sorted(len([n for n in scheduled if r in scheduled[n]]) for r in (1, 2, 3)) == [2, 2, 2]
        assert sorted(sorted(r) for r in held["schedule"]["nodes"].values()) == sorted(sorted(r) for r in scheduled.values())
        straggler = sorted(name for name in scheduled if 1 in scheduled[name])[0]

        local.pause(f"supernode-{straggler}")
        try:
            (runs / HOLD_FILE).unlink()
            _until("round 1 done without the straggler", lambda: (c := _checkpoint(runs)) and c["round"] >= 1, DEADLINE + 120)
        finally:
            local.resume(f"supernode-{straggler}")
        status = wait_for_run(run_id, connection=local.connection, env=env, timeout=600, poll=1.0)
        assert status.succeeded, status

    [summary_path] = list(runs.glob(f"*/{SUMMARY_FILE}"))
    summary = json.loads(summary_path.read_text())
    submission = summary_path.parent.name
    assert (summary["fraction_per_round"], summary["rounds_per_node"]) == (0.5, 2)
    for site in sites:
        report = summary["sites"][site.name]
        with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
            charged = {c.round for c in ledger.submission_charges(DATASET, submission) if c.round > 0}
        trained = {p["round"] for p in _audit(site.home, "release") if p["message"] == "train"}
        # The node's ledger, its signed audit log and the coordinator's report agree, round by round;
        # no round outside the node's schedule was charged.
        assert charged == trained == scheduled[site.name] == set(report["rounds_scheduled"])
        assert set(report["rounds_aggregated"]) | set(report["rounds_late"]) == charged
        assert report["rounds_no_reply"] == [] and report["rounds_refused"] == {}
        [row] = [r for r in budget_status(NodeHome.open(site.home)) if r.dataset == DATASET]
        assert row.open_reservations == 0 and [s.state for s in row.reservations] == ["used up"]
    late = summary["sites"][straggler]
    assert 1 in late["rounds_late"] and 1 not in late["rounds_aggregated"]
