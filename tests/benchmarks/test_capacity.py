"""benchmarks/capacity.py at N=3 for one round, so that the capacity harness does not rot.

Three real node services (on-demand executors forked from one pre-imported parent) and
a real SuperLink with TLS and node authentication: no executor runs before the run,
one per node while it is out, none once they have been idle; the experiment completes,
every number the report needs is there, and nothing is left running.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.report_module import benchmark_module

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_three_nodes_one_round_complete_and_leave_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    code = benchmark_module("capacity", "capacity_benchmark").main([
        "--nodes", "3", "--rounds", "1", "--idle", "4", "--idle-seconds", "2", "--fork",
        "--workdir", str(tmp_path / "work"), "--json", str(out),
    ])
    report = json.loads(out.read_text())
    assert code == 0, report["problem"]
    assert report["leftovers"] == []
    [result] = report["results"]
    idle, run = result["idle"], result["run"]
    assert result["executor"] == "on-demand forked"
    assert idle["executors_alive_peak"] == 0  # on demand: nothing before the run
    assert 40 < idle["memory_per_node_mib"] < 400
    assert run["status"] == "finished:completed"
    assert run["executors_alive_peak"] == 3
    assert 0 <= run["executors_stopped_after_s"] <= 4 + 15  # NaN (still running) fails
    for node in ("hospital_1", "hospital_2", "hospital_3"):
        log = (tmp_path / "work" / "cluster-3" / "logs" / f"supernode-{node}.log").read_text()
        assert "the SuperNode holds a task: node executor started" in log
        assert "the node executor stopped after 4 s without a task" in log
    assert len(run["round_gaps_s"]) == 1 and 0 < run["round_s"] < 120
    assert 10_000 < run["fleet_bytes_per_round"] < 5_000_000  # a 17-weight model to 3 nodes and back, with TLS and polls
    assert run["superlink_cpu_s"] > 0 and run["coordinator_cpu_s"] > 0
    assert run["node_memory_mib"] > idle["memory_per_node_mib"]
