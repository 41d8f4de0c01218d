"""LocalCluster under load: a SuperLink that stops answering ends in a ClusterError, never a TimeoutExpired."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from medfed.cluster import LocalCluster
from medfed.errors import ClusterError

from .conftest import alive

pytestmark = pytest.mark.integration


def test_a_superlink_that_stops_answering_is_retried_then_a_clear_cluster_error(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path / "cluster")
    try:
        local.start_superlink()
        [superlink] = local.pids
        os.killpg(superlink, signal.SIGSTOP)  # as frozen as a SuperLink starved of CPU: it accepts, never answers
        try:
            with pytest.raises(ClusterError, match=r"`flwr supernode ls` did not answer within 2 s, 2 times: the machine may be overloaded"):
                local.flwr("supernode", "ls", local.connection, "--format", "json", timeout=2, attempts=2)
            with pytest.raises(ClusterError, match=r"fewer than 1 SuperNodes came online within 3 s \(`flwr supernode ls` did not answer"):
                local.wait_for_nodes(1, timeout=3)
        finally:
            os.killpg(superlink, signal.SIGCONT)
        assert local.online_nodes() == 0  # answering again once it has the CPU back
    finally:
        pids = local.pids
        local.stop()
        assert not [p for p in pids if alive(p)]
