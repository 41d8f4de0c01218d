"""Shared pieces of the real-process tests: a cluster over given node homes, stopped for sure."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from medfed.cluster import LocalCluster


class _Site(Protocol):
    name: str
    home: Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def running_cluster(workdir: Path, sites: Sequence[_Site]) -> Iterator[LocalCluster]:
    """A SuperLink and one SuperNode per site, all ready; afterwards none of them is left."""
    local = LocalCluster(workdir / "cluster")
    try:
        local.start_superlink()
        for site in sites:
            local.start_supernode(site.name, site.home)
        local.wait_for_nodes(len(sites))
        yield local
    finally:
        pids = local.pids
        local.stop()
        assert not [p for p in pids if alive(p)], "a Flower process outlived the cluster"
